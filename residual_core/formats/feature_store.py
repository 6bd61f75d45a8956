"""Feature stores: one Zarr (v3) group per (model, pretrained, dataset, split).

The layout is declared once (:data:`SCHEMA`) and checked on open. A store holds the compact raw
form of the decomposition (raw head outputs, MLP and emb outputs, LN statistics), labels and
sample indices, the fixed read-out maps and the zero-shot text classifier. Rows are written in
*row chunks* of ``rows_per_chunk`` samples; each row chunk is one shard file per array (inner
chunks of one unit, so one unit can be read over all rows without reading the others) and is
marked in ``done`` only after its data is written, which makes extraction resumable after a kill
at any point. Float arrays are filled with NaN, so a missing chunk can never read as zeros.

Reading (:meth:`FeatureStore.contributions`) returns the exact output-space ``y_u`` of any units
and rows as a lazy Dask array: the projection is applied on read, block by block.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import dask
import dask.array as da
import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec

from residual_core.errors import StoreError
from residual_core.identity import FEATURE_DTYPES, WeightsId
from residual_core.formats.row_chunks import WriterProcess, delete_row_chunks, write_row_chunk
from residual_core.layout import is_local, local_path, zarr_target
from residual_core.method.decompose import (ReadoutMaps, affine_features, affine_maps,
                                            project_heads, project_residual)
from residual_core.method.spectral import AffineUnits, PCAResult, pca_affine
from residual_core.method.units import Unit, unit_table

SCHEMA_VERSION = 2  # 2: no text/template_embeddings (nothing read them); named dimensions
DECOMPOSITION_VERSION = 1  # bump when decompose() changes what it computes
FORMAT_NAME = "residual-feature-store"


@dataclass(frozen=True)
class ArraySpec:
    """One array of the layout: dims name sizes from :class:`StoreDims`; ``dtype`` ``feature``
    means the store's feature dtype; ``row_chunked`` arrays are chunked (and sharded) by rows."""

    dims: tuple[str, ...]
    dtype: str
    row_chunked: bool
    unit_axes: int = 0  # trailing axes after N that inner chunks split one by one (units)
    doc: str = ""
    # One chunk (file) per entry: parts writing different row chunks at once never rewrite
    # each other's entries (a shared chunk is read, modified and written whole).
    chunk_per_entry: bool = False


SCHEMA: dict[str, ArraySpec] = {
    "heads": ArraySpec(("n", "layer", "head", "head_dim"), "feature", True, 2,
                       "raw per-head attention output at CLS, before the output projection"),
    "mlp": ArraySpec(("n", "layer", "width"), "feature", True, 1,
                     "MLP output at CLS (after LayerScale), residual space"),
    "emb": ArraySpec(("n", "width"), "feature", True, 0, "ln_pre output at CLS"),
    "ln_mean": ArraySpec(("n",), "float32", True, 0, "mean of the residual stream at CLS"),
    "ln_inv_std": ArraySpec(("n",), "float32", True, 0, "1/sqrt(var + eps) of the same"),
    "labels": ArraySpec(("n",), "int64", True, 0, "class index into the classnames attribute"),
    "indices": ArraySpec(("n",), "int64", True, 0, "sample id in the source dataset"),
    "done": ArraySpec(("row_chunk",), "uint8", False, 0, "1 when a row chunk is fully written",
                      chunk_per_entry=True),
    "maps/head_maps": ArraySpec(("layer", "head", "head_dim", "embed"), "float32", False),
    "maps/head_bias": ArraySpec(("layer", "head", "embed"), "float32", False),
    "maps/resid_map": ArraySpec(("width", "embed"), "float32", False),
    "maps/gamma_proj": ArraySpec(("embed",), "float32", False),
    "maps/beta_proj": ArraySpec(("embed",), "float32", False),
    "text/class_weights": ArraySpec(("class", "embed"), "float32", False,
                                    doc="zero-shot classifier: averaged, renormalised"),
}
# Row-chunked arrays (raw fields, labels, indices: write_chunk writes them all) and the fixed ones
# derived from the model (maps/*, text/*: recomputed and rewritten by repair_fixed).
ROW_FIELDS = tuple(name for name, spec in SCHEMA.items() if spec.row_chunked)
FIXED_FIELDS = tuple(name for name, spec in SCHEMA.items()
                     if not spec.row_chunked and name != "done")
REQUIRED_ATTRS = ("dims", "feature_dtype", "rows_per_chunk", "config_hash")


@dataclass(frozen=True)
class StoreDims:
    """Sizes of the store's dimensions."""

    n: int
    layer: int
    head: int
    head_dim: int
    width: int
    embed: int
    n_class: int
    n_template: int
    rows_per_chunk: int

    @property
    def row_chunk(self) -> int:
        return -(-self.n // self.rows_per_chunk)

    def shape(self, spec: ArraySpec) -> tuple[int, ...]:
        sizes = {**self.__dict__, "class": self.n_class, "template": self.n_template,
                 "row_chunk": self.row_chunk}
        return tuple(sizes[d] for d in spec.dims)


def _reason(exc: BaseException) -> str:
    """``Type: first line`` of an exception from deep in the codec stack: messages stay one line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


CREATING_SUFFIX = ".creating-"  # <name>.zarr.creating-<uuid>: a local store being created


class _GuardedArray:
    """Array-like over a Zarr array for ``da.from_array``: read errors become StoreErrors."""

    def __init__(self, array: zarr.Array, where: str):
        self.array, self.where = array, where
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def __getitem__(self, key):
        try:
            return self.array[key]
        except Exception as exc:  # a truncated/corrupt chunk fails deep in the codec stack
            raise StoreError(
                f"{self.where} is corrupt: cannot read rows {key[0] if isinstance(key, tuple) else key}"
                f" ({_reason(exc)}). Rerun the extraction with verify=True "
                "(`residual extract ... --verify`) to recompute damaged chunks."
            ) from None


class FeatureStore:
    """An open feature store (validated). Use :meth:`create` or :meth:`open`."""

    def __init__(self, group: zarr.Group, url: str):
        self.group, self.url = group, url
        self.attrs: dict[str, Any] = dict(group.attrs)
        self._arrays: dict[str, zarr.Array] = {}

    def _array(self, name: str) -> zarr.Array:
        """The array ``name``, opened once (opening reads and parses its metadata; the data
        are read and written through the store each time)."""
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    def __repr__(self) -> str:
        a, d = self.attrs, self.dims
        done = int(self._done().sum())
        state = "complete" if self.complete else f"incomplete, {done}/{d.row_chunk} row chunks"
        return (f"<FeatureStore {WeightsId.from_attrs(a).label} on {a.get('dataset')} "
                f"{a.get('split')}: {d.n} rows x {len(self.units)} units x E={d.embed}, "
                f"{a.get('feature_dtype')}, {state}; read y_u with .contributions() at {self.url}>")

    # ---------------------------------------------------------------- creation and opening
    @classmethod
    def create(cls, url: str, *, dims: StoreDims, feature_dtype: str, attrs: dict[str, Any],
               maps: ReadoutMaps, text: dict[str, np.ndarray], labels: np.ndarray,
               indices: np.ndarray) -> "FeatureStore":
        """Create an empty (incomplete) store with its fixed content written.

        Atomic, so that a kill can never leave a half-made store that wedges every rerun: a local
        store is built under a temporary sibling (``<name>.creating-<uuid>``, which the next
        extraction deletes) and renamed into place once complete; an fsspec store (no atomic
        rename) carries ``state: creating`` until its attributes are written, and a rerun
        recreates it (:meth:`creation_interrupted`).
        """
        if feature_dtype not in FEATURE_DTYPES:
            raise StoreError(f"feature dtype must be one of {FEATURE_DTYPES}, got {feature_dtype!r}")
        if dims.rows_per_chunk < 1:
            raise StoreError(f"rows_per_chunk must be positive, got {dims.rows_per_chunk}")
        final = local_path(url) if is_local(url) else None
        target = str(final.with_name(f"{final.name}{CREATING_SUFFIX}{uuid.uuid4().hex[:12]}")) \
            if final is not None else url
        try:
            cls._build(target, dims=dims, feature_dtype=feature_dtype, attrs=attrs, maps=maps,
                       text=text, labels=labels, indices=indices)
            if final is not None:
                try:
                    os.rename(target, final)  # atomic; refuses a non-empty folder at ``final``
                except OSError as exc:
                    raise StoreError(f"cannot create {url}: {exc.strerror}; delete what is there "
                                     "and extract again") from None
        except BaseException:
            if final is not None:
                shutil.rmtree(target, ignore_errors=True)
            raise
        return cls(zarr.open_group(zarr_target(url), mode="r+"), url)

    @staticmethod
    def _build(target: str, *, dims: StoreDims, feature_dtype: str, attrs: dict[str, Any],
               maps: ReadoutMaps, text: dict[str, np.ndarray], labels: np.ndarray,
               indices: np.ndarray) -> None:
        """Write a whole new store at ``target``; its ``format`` attribute comes last."""
        group = zarr.open_group(target, mode="w", attributes={"state": "creating"})
        compressor = ZstdCodec(level=3, checksum=True)  # checksums catch corrupt chunks
        for name, spec in SCHEMA.items():
            shape = dims.shape(spec)
            dtype = feature_dtype if spec.dtype == "feature" else spec.dtype
            kwargs: dict[str, Any] = {}
            if spec.row_chunked:
                rows = min(dims.rows_per_chunk, max(dims.n, 1))
                kwargs["shards"] = (rows,) + shape[1:]
                inner = [1] * spec.unit_axes + list(shape[1 + spec.unit_axes:])
                kwargs["chunks"] = (rows, *inner)
            elif spec.chunk_per_entry:
                kwargs["chunks"] = (1,) * len(shape)
            else:
                kwargs["chunks"] = tuple(max(s, 1) for s in shape)
            fill = np.nan if np.dtype(dtype).kind == "f" else 0
            group.create_array(name, shape=shape, dtype=dtype, fill_value=fill,
                               compressors=compressor, attributes={"dims": list(spec.dims)},
                               dimension_names=spec.dims, **kwargs)
        for key, value in maps.as_numpy().items():
            group[f"maps/{key}"][...] = value
        group["text/class_weights"][...] = text["class_weights"]
        group["labels"][...] = labels
        group["indices"][...] = indices
        group["done"][...] = 0
        group.attrs.update({**attrs, "state": "incomplete", "feature_dtype": feature_dtype,
                            "rows_per_chunk": dims.rows_per_chunk, "dims": dims.__dict__,
                            "format": FORMAT_NAME, "schema_version": SCHEMA_VERSION,
                            "created_at": _now()})

    @staticmethod
    def temporary_siblings(url: str) -> list[Path]:
        """Local stores that :meth:`create` left half-made when it was killed (none for URLs)."""
        if not is_local(url):
            return []
        path = local_path(url)
        if not path.parent.is_dir():
            return []
        return sorted(p for p in path.parent.iterdir()
                      if p.name.startswith(path.name + CREATING_SUFFIX))

    @staticmethod
    def creation_interrupted(url: str) -> bool:
        """Whether ``url`` holds what a killed creation left: safe to delete, no rows computed.

        That is a store still in state ``creating``, or one without a ``format`` attribute whose
        members are all of the layout and whose ``done`` marks no row chunk (as written before
        creation was atomic), or an empty folder. Anything else (a foreign group, computed rows)
        is left to :meth:`open` to refuse.
        """
        if is_local(url):
            path = local_path(url)
            if not path.is_dir():
                return False
            if not any(path.iterdir()):
                return True
        try:
            group = zarr.open_group(zarr_target(url), mode="r")
            attrs = group.attrs.asdict()
            if attrs.get("state") == "creating":
                return True
            if attrs.get("format") is not None:
                return False
            names = {name for name, _ in group.members(max_depth=None)}
            if not names <= set(SCHEMA) | {"maps", "text"}:
                return False
            return "done" not in names or not group["done"][...].any()
        except Exception:  # not a readable Zarr group: not ours to delete
            return False

    @classmethod
    def open(cls, url: "str | os.PathLike", *, require_complete: bool = True) -> "FeatureStore":
        """Open and validate a store; raise :class:`StoreError` naming the problem and the fix."""
        url = str(url)
        if is_local(url) and not local_path(url).exists():
            raise StoreError(f"no feature store at {url}: run `residual extract` first")
        try:
            group = zarr.open_group(zarr_target(url), mode="r+")
        except Exception as exc:
            raise StoreError(f"{url} is not a Zarr group ({_reason(exc)}); "
                             "is it a feature store?") from None
        store = cls(group, url)
        store._validate(require_complete)
        return store

    def _validate(self, require_complete: bool) -> None:
        a = self.attrs
        if a.get("state") == "creating":
            raise StoreError(f"{self.url} was not fully created (its creation was interrupted): "
                             "rerun the same `residual extract` command to recreate it")
        if a.get("format") != FORMAT_NAME:
            raise StoreError(f"{self.url} is not a residual feature store (format attribute "
                             f"{a.get('format')!r}); point to a store written by `residual extract`")
        if a.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"{self.url} has schema version {a.get('schema_version')}, this code "
                             f"reads version {SCHEMA_VERSION}: re-extract it")
        for key in REQUIRED_ATTRS:
            if key not in a:
                raise StoreError(f"{self.url} lacks the {key!r} attribute (damaged store): "
                                 "delete it and extract again")
        try:
            dims = self.dims
        except (TypeError, ValueError):
            raise StoreError(f"{self.url} has a malformed 'dims' attribute {a['dims']!r} (damaged "
                             "store): delete it and extract again") from None
        for name, spec in SCHEMA.items():
            try:
                arr = self.group[name] if name in self.group else None
            except Exception as exc:
                raise StoreError(f"{self.url}: the metadata of array {name!r} is unreadable "
                                 f"({_reason(exc)}); delete the store and extract again") from None
            if arr is None:
                raise StoreError(f"{self.url} lacks array {name!r}: the store is incomplete or "
                                 "foreign; delete it and extract again")
            expected = dims.shape(spec)
            dtype = a["feature_dtype"] if spec.dtype == "feature" else spec.dtype
            if tuple(arr.shape) != expected or arr.dtype != np.dtype(dtype):
                raise StoreError(f"{self.url}: array {name!r} is {arr.shape} {arr.dtype}, the "
                                 f"layout says {expected} {dtype}; delete it and extract again")
        if require_complete and not self.complete:
            missing = int((self._done() == 0).sum())
            raise StoreError(f"{self.url} is incomplete ({missing} of {dims.row_chunk} row chunks "
                             "missing): rerun the same `residual extract` command to resume it")

    # ---------------------------------------------------------------- metadata
    @property
    def dims(self) -> StoreDims:
        return StoreDims(**self.attrs["dims"])

    @property
    def complete(self) -> bool:
        return self.attrs.get("state") == "complete"

    @property
    def shared_done(self) -> bool:
        """Whether the ``done`` flags share one chunk (stores made before partitioned
        extraction): then only one process may write the store at a time."""
        return self.dims.row_chunk > 1 and tuple(self.group["done"].chunks) != (1,)

    def refresh(self) -> None:
        """Re-read the attributes (another process may have changed them)."""
        self.group = zarr.open_group(zarr_target(self.url), mode="r+")
        self.attrs = dict(self.group.attrs)
        self._arrays = {}

    @property
    def units(self) -> tuple[Unit, ...]:
        return unit_table(self.dims.layer, self.dims.head)

    @property
    def classnames(self) -> list[str]:
        return list(self.attrs["classnames"])

    @property
    def maps(self) -> ReadoutMaps:
        return ReadoutMaps.from_numpy(
            {k.split("/", 1)[1]: self._read(k) for k in SCHEMA if k.startswith("maps/")})

    @property
    def labels(self) -> np.ndarray:
        return self._read("labels")

    @property
    def indices(self) -> np.ndarray:
        return self._read("indices")

    @property
    def text_tower(self) -> bool:
        """Whether the store's model has a text tower (so a zero-shot text classifier)."""
        return bool(self.attrs.get("text_tower", True))

    @property
    def class_weights(self) -> np.ndarray:
        """``[C, E]`` zero-shot text classifier; a vision-only model's store has none (use the
        class prototypes of :func:`~residual_core.method.batches.task_classifier`)."""
        if not self.text_tower:
            raise StoreError(f"{self.url}: {self.attrs.get('model')} is a vision-only model, so "
                             "its store has no zero-shot text classifier; use the centroid "
                             "classifier (class prototypes of the train encodings)")
        return self._read("text/class_weights")

    def _read(self, name: str) -> np.ndarray:
        """A whole array; a corrupt chunk is a StoreError naming the array and the fix."""
        try:
            return self.group[name][...]
        except Exception as exc:
            raise StoreError(f"{self.url}/{name} is corrupt ({_reason(exc)}). Rerun the extraction "
                             "with verify=True (`residual extract ... --verify`) to repair it"
                             ) from None

    def _done(self) -> np.ndarray:
        try:
            return self.group["done"][...]
        except Exception as exc:
            raise StoreError(f"{self.url}/done is corrupt ({_reason(exc)}): rerun the extraction "
                             "with verify=True (`residual extract ... --verify`) to rebuild it"
                             ) from None

    def pending_chunks(self) -> np.ndarray:
        """Indices of row chunks not yet written."""
        return np.flatnonzero(self._done() == 0)

    def chunk_rows(self, chunk: int) -> slice:
        r = self.dims.rows_per_chunk
        return slice(chunk * r, min((chunk + 1) * r, self.dims.n))

    # ---------------------------------------------------------------- writing
    def write_chunk(self, chunk: int, values: dict[str, np.ndarray],
                    writer: WriterProcess | None = None) -> None:
        """Write one full row chunk of every row-chunked array, then mark it done (commit point).

        ``values`` holds :data:`ROW_FIELDS`: the raw fields and the chunk's labels and indices, so
        that a chunk recomputed after damage is exactly what a clean extraction wrote. The chunk's
        old shards are deleted first: Zarr reads a partial (last) shard before rewriting it, which
        fails on a corrupt one. ``writer``: write in that writer process instead of here (see
        :mod:`~residual_core.formats.row_chunks`).
        """
        rows = self.chunk_rows(chunk)
        n = rows.stop - rows.start
        missing = [name for name in ROW_FIELDS if name not in values]
        if missing:
            raise StoreError(f"chunk {chunk}: write_chunk needs {', '.join(missing)} as well")
        for name in ROW_FIELDS:
            if values[name].shape[0] != n:
                raise StoreError(f"chunk {chunk} needs {n} rows of {name}, got "
                                 f"{values[name].shape[0]}")
        values = {name: values[name] for name in ROW_FIELDS}
        if writer is not None:
            writer.write(self.url, chunk, rows, values)
        else:
            write_row_chunk(self._array, chunk, rows, values)

    def mark_pending(self, chunks: Sequence[int]) -> None:
        """Mark row chunks as not written and delete their data (e.g. damaged chunks).

        Deleting matters: Zarr reads an existing shard before rewriting it, which fails on a
        corrupt one. :meth:`write_chunk` rewrites every array deleted here.
        """
        if not len(chunks):
            return
        self.set_attrs(state="incomplete")
        done = self._done()
        done[[int(c) for c in chunks]] = 0
        self.group["done"][...] = done
        self._delete_shards(chunks)

    def _delete_shards(self, chunks: Sequence[int]) -> None:
        delete_row_chunks(self._array, ROW_FIELDS, chunks)

    def finalize(self) -> None:
        """Mark the store complete once every row chunk is written."""
        pending = self.pending_chunks()
        if len(pending):
            raise StoreError(f"{self.url}: cannot finalize, {len(pending)} row chunks missing")
        self.set_attrs(state="complete", completed_at=_now())

    def set_attrs(self, **values: Any) -> None:
        self.group.attrs.update(values)
        self.attrs.update(values)

    def verify(self, labels: np.ndarray | None = None,
               indices: np.ndarray | None = None) -> list[int]:
        """Decode every written row chunk of every row-chunked array; return the bad chunks.

        Bad: unreadable, NaN in a float array (never written), or labels/indices other than the
        dataset's (when given; a deleted shard reads as zeros). A corrupt ``done`` array is
        rebuilt from what verifies: data that decodes completely was written by this
        configuration, so only the bad chunks become pending. Fixed arrays: :meth:`repair_fixed`.
        """
        expected = {"labels": labels, "indices": indices}
        try:
            candidates = np.flatnonzero(self._done() == 1)
            rebuild = False
        except StoreError:
            candidates, rebuild = np.arange(self.dims.row_chunk), True
        bad = [int(c) for c in candidates if not self._chunk_ok(int(c), expected)]
        if rebuild:
            self.set_attrs(state="incomplete")
            done = np.ones(self.dims.row_chunk, dtype=np.uint8)
            done[bad] = 0
            self.group["done"][...] = done  # one whole chunk: written without reading the old
        return bad

    def _chunk_ok(self, chunk: int, expected: dict[str, np.ndarray | None]) -> bool:
        rows = self.chunk_rows(chunk)
        for name in ROW_FIELDS:
            try:
                value = self.group[name][rows]
            except Exception:
                return False
            if value.dtype.kind == "f" and np.isnan(value).any():
                return False
            want = expected.get(name)
            if want is not None and not np.array_equal(value, np.asarray(want)[rows]):
                return False
        return True

    def repair_fixed(self, maps: ReadoutMaps, text: dict[str, np.ndarray]) -> list[str]:
        """Rewrite the fixed arrays that are unreadable or differ from ``maps``/``text`` (what
        :meth:`create` wrote, recomputed from the model); return the names rewritten."""
        want = {**{f"maps/{k}": v for k, v in maps.as_numpy().items()},
                **{f"text/{k}": v for k, v in text.items()}}
        rewritten = []
        for name in FIXED_FIELDS:
            arr = self.group[name]
            value = np.asarray(want[name]).astype(arr.dtype, copy=False)
            if value.shape != arr.shape:
                raise StoreError(f"{self.url}/{name} is {arr.shape}, the model gives "
                                 f"{value.shape}: delete the store and extract again")
            try:
                ok = np.array_equal(arr[...], value, equal_nan=True)
            except Exception:
                ok = False
            if not ok:
                arr[...] = value  # one whole chunk: written without reading the old one
                rewritten.append(name)
        return rewritten

    # ---------------------------------------------------------------- reading
    def raw_array(self, name: str) -> da.Array:
        """A raw array as a Dask array chunked by row chunks (read errors become StoreErrors)."""
        arr = self.group[name]
        rows = self.dims.rows_per_chunk
        return da.from_array(_GuardedArray(arr, f"{self.url}/{name}"),
                             chunks=(rows,) + tuple(arr.shape[1:]), name=False,
                             asarray=False)

    def contributions(self, units: Sequence[int | str] | None = None,
                      rows: slice | np.ndarray | None = None) -> da.Array:
        """Exact output-space contributions ``y_u``, lazily: ``[N_rows, len(units), E]`` float32.

        Args:
            units: unit indices or names (``emb``, ``L3.mlp``, ``L5H2``); default all units.
            rows: a slice or integer index array of rows; default all rows.

        Only the raw arrays of the requested units are read (heads by the rectangle of their
        layers × heads), and projected with the store's read-out maps, block by block.
        """
        table = self.units
        sel = self._unit_indices(units)
        maps = self.maps
        mean, inv = self.raw_array("ln_mean"), self.raw_array("ln_inv_std")
        resid, x, heads = self._raw_units(sel)
        parts: list[da.Array] = []
        if resid:
            parts.append(da.blockwise(_resid_block, "nue", x, "nuw", mean, "n", inv, "n",
                                      maps=maps, dtype=np.float32,
                                      new_axes={"e": maps.embed_dim}, concatenate=True))
        if heads:
            pairs = [(table[i].layer, table[i].head) for i in heads]
            layers = sorted({l for l, _ in pairs})
            hs = sorted({h for _, h in pairs})
            z = self.raw_array("heads")[:, layers][:, :, hs]
            rel = [(layers.index(l), hs.index(h)) for l, h in pairs]
            parts.append(da.blockwise(
                _heads_block, "nke", z, "nlhd", mean, "n", inv, "n", maps=maps,
                pairs=np.array(pairs), rel=np.array(rel), dtype=np.float32,
                new_axes={"k": len(pairs), "e": maps.embed_dim}, concatenate=True))
        order = resid + heads
        out = da.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        if order != sel:
            position = {u: k for k, u in enumerate(order)}
            out = out[:, [position[u] for u in sel]]
        return out if rows is None else out[rows]

    def pca(self, units: Sequence[int | str] | None = None) -> list[PCAResult]:
        """PCA of the output-space ``y_u`` of ``units`` (default all; in their order), in one
        out-of-core pass: each unit's scatter is accumulated on its raw features
        (:func:`~residual_core.method.decompose.affine_features`, ``dh + 2`` wide for a head)
        and mapped to output space once (:func:`~residual_core.method.spectral.pca_affine`),
        so the rows are never projected. Equals the PCA of :meth:`contributions` computed in
        float64.
        """
        table = self.units
        sel = self._unit_indices(units)
        maps = self.maps
        mean, inv = self.raw_array("ln_mean"), self.raw_array("ln_inv_std")
        resid, x, heads = self._raw_units(sel)
        parts: list[AffineUnits] = []
        if resid:
            linear, offset = affine_maps(maps)
            parts.append(AffineUnits(
                da.blockwise(affine_features, "nkd", x, "nkw", mean, "n", inv, "n",
                             dtype=np.float64, new_axes={"d": self.dims.width + 2},
                             concatenate=True),
                linear, np.tile(offset, (len(resid), 1))))  # one map for every unit
        if heads:
            pairs = np.array([(table[i].layer, table[i].head) for i in heads])
            z = self.raw_array("heads")
            rel = pairs[:, 0] * self.dims.head + pairs[:, 1]
            offset = affine_maps(maps, [0], [0])[1]  # the same for every head
            # the maps are built where the tasks run: a cluster's graph never carries them
            # (156 MB of float64 for ViT-L/14's heads)
            linear = da.from_delayed(
                dask.delayed(_stored_head_maps, pure=True)(
                    self.url, pairs[:, 0].tolist(), pairs[:, 1].tolist()),
                shape=(len(heads), maps.head_dim + 2, maps.embed_dim), dtype=np.float64)
            parts.append(AffineUnits(
                da.blockwise(_head_features_block, "nkd", z, "nlhw", mean, "n", inv, "n",
                             rel=rel, dtype=np.float64,
                             new_axes={"k": len(heads), "d": maps.head_dim + 2},
                             concatenate=True),
                linear, np.tile(offset, (len(heads), 1))))
        results = dict(zip(resid + heads, pca_affine(parts)))
        return [results[i] for i in sel]

    def _raw_units(self, sel: list[int]) -> tuple[list[int], da.Array | None, list[int]]:
        """The distinct units of ``sel`` by kind: the residual ones (emb first, then the MLPs
        by layer) with their raw outputs ``[N, len(resid), D]``, and the heads."""
        table = self.units
        unique = list(dict.fromkeys(sel))
        resid = sorted(i for i in unique if table[i].kind != "head")
        heads = [i for i in unique if table[i].kind == "head"]
        raw = [self.raw_array("emb")[:, None]] if resid and resid[0] == 0 else []
        layers = [table[i].layer for i in resid if i != 0]
        if layers:
            raw.append(self.raw_array("mlp")[:, layers])
        x = (da.concatenate(raw, axis=1) if len(raw) > 1 else raw[0]) if raw else None
        return resid, x, heads

    def _unit_indices(self, units: Sequence[int | str] | None) -> list[int]:
        table = self.units
        if units is None:
            return list(range(len(table)))
        by_name = {u.name: u.index for u in table}
        out = []
        for u in units:
            if isinstance(u, str):
                if u not in by_name:
                    raise StoreError(f"unknown unit {u!r}; units are emb, L{{l}}.mlp, L{{l}}H{{h}} "
                                     f"with l < {self.dims.layer}, h < {self.dims.head}")
                out.append(by_name[u])
            elif 0 <= int(u) < len(table):
                out.append(int(u))
            else:
                raise StoreError(f"unit index {u} out of range [0, {len(table)})")
        if not out:
            raise StoreError("select at least one unit")
        return out


def _resid_block(r: np.ndarray, mean: np.ndarray, inv: np.ndarray, maps: ReadoutMaps) -> np.ndarray:
    y = project_residual(torch.from_numpy(np.ascontiguousarray(r)), torch.from_numpy(mean),
                         torch.from_numpy(inv), maps)
    return y.numpy()


def _stored_head_maps(url: str, layers: list[int], heads: list[int]) -> np.ndarray:
    """The affine maps of heads ``(layers[i], heads[i])``, from the store's read-out maps."""
    return affine_maps(FeatureStore.open(url, require_complete=False).maps, layers, heads)[0]


def _head_features_block(z: np.ndarray, mean: np.ndarray, inv: np.ndarray,
                         rel: np.ndarray) -> np.ndarray:
    flat = z.reshape(z.shape[0], -1, z.shape[-1])[:, rel]
    return affine_features(flat, mean, inv)


def _heads_block(z: np.ndarray, mean: np.ndarray, inv: np.ndarray, maps: ReadoutMaps,
                 pairs: np.ndarray, rel: np.ndarray) -> np.ndarray:
    zt = torch.from_numpy(np.ascontiguousarray(z))[:, rel[:, 0], rel[:, 1]]
    y = project_heads(zt, torch.from_numpy(pairs[:, 0]), torch.from_numpy(pairs[:, 1]),
                      torch.from_numpy(mean), torch.from_numpy(inv), maps)
    return y.numpy()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
