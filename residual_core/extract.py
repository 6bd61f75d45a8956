"""The extract stage: run a model over a dataset split and write its feature store.

Resumable and safe: rows are processed in the store's row chunks; a chunk is marked done only
after its data is written, so a run killed at any point (even ``kill -9``) loses at most the
chunks in flight, and the same command resumes with the missing chunks only. Batches never
cross chunk boundaries, so a resumed store is identical to an uninterrupted run's. A complete
store is never recomputed; a store written with another configuration is an error; a lock
refuses a second concurrent writer (and :func:`remove_store` while one writes). Creating a store
is atomic, and what a killed creation left is deleted by the next run.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from .datasets import load_dataset
from .decompose import RAW_FIELDS, ReadoutMaps, decompose, readout_maps
from .errors import StoreError
from .models import LoadedModel, default_device, file_sha256, load_model
from .store import (DECOMPOSITION_VERSION, FEATURE_DTYPES, FORMAT_NAME, SCHEMA_VERSION,
                    FeatureStore, StoreDims, _is_local, _local_path, _zarr_target, config_hash,
                    default_store_root, feature_store_path, pretrained_slug)
from .zeroshot import text_classifier


@dataclass
class ExtractResult:
    """What an extraction did: the store, and how many row chunks it computed now."""

    url: str
    computed_chunks: int
    total_chunks: int
    rows_computed: int
    seconds: float

    @property
    def was_cached(self) -> bool:
        return self.computed_chunks == 0


class _ChunkBatches(Sampler):
    """Batches of row indices that never cross a row-chunk boundary, for the given chunks."""

    def __init__(self, store: FeatureStore, chunks: np.ndarray, batch_size: int):
        self.store, self.chunks, self.batch_size = store, chunks, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for chunk in self.chunks:
            rows = self.store.chunk_rows(int(chunk))
            for start in range(rows.start, rows.stop, self.batch_size):
                yield list(range(start, min(start + self.batch_size, rows.stop)))

    def __len__(self) -> int:
        return sum(-(-(s.stop - s.start) // self.batch_size)
                   for s in (self.store.chunk_rows(int(c)) for c in self.chunks))


def feature_store_url(model: str, pretrained: str | None, dataset: str, split: str,
                      store_root: str | Path | None = None) -> str:
    """Where ``extract`` writes (and later stages read) the store of these arguments."""
    sha = None
    if pretrained is not None and os.path.isfile(pretrained):
        sha = file_sha256(pretrained)
    return feature_store_path(store_root or default_store_root(), model,
                              pretrained_slug(pretrained, sha), dataset, split)


def extraction_config(loaded: LoadedModel, dataset: str, split: str, indices: np.ndarray,
                      feature_dtype: str, rows_per_chunk: int) -> dict[str, Any]:
    """What determines a store's content (its config hash covers exactly this)."""
    return {
        **loaded.identity,
        "dataset": dataset,
        "split": split,
        "n_samples": int(len(indices)),
        "indices_sha1": _sha1(np.ascontiguousarray(indices, dtype=np.int64)),
        "feature_dtype": feature_dtype,
        "rows_per_chunk": rows_per_chunk,
        "decomposition_version": DECOMPOSITION_VERSION,
        "schema_version": SCHEMA_VERSION,
    }


def extract(
    model: str,
    pretrained: str | None,
    dataset: str,
    split: str,
    *,
    data_root: str | Path | None = None,
    store_root: str | Path | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str | None = None,
    feature_dtype: str = "float32",
    rows_per_chunk: int = 1024,
    verify: bool = False,
    progress: bool = True,
    loaded: LoadedModel | None = None,
) -> ExtractResult:
    """Extract (or resume, or reuse) the feature store of ``model/pretrained`` on ``dataset/split``.

    Args:
        model, pretrained: open_clip name and tag / checkpoint path / None (random weights).
        dataset, split: a registered dataset name (or ``imagefolder:PATH``) and ``train|val|test``.
        data_root: where datasets live (default ``$RESIDUAL_DATA_ROOT/datasets``).
        store_root: local folder or fsspec URL under which stores live (default ``data/``).
        batch_size: images per forward pass (batches never cross row chunks).
        num_workers: DataLoader worker processes (default: ``min(4, cpus - 1)``).
        device: ``cuda``/``cpu`` (default CUDA when present).
        feature_dtype: ``float32`` or ``float16`` storage of the raw arrays (LN stats stay float32).
        rows_per_chunk: rows per written chunk (the unit of resumption).
        verify: check every array first: recompute damaged row chunks (decoded, labels and
            indices compared with the dataset's), rewrite damaged read-out maps and text
            classifier (recomputed from the model), rebuild a corrupt ``done``.
        progress: show a progress bar (images/s and ETA).
        loaded: an already loaded model (skips loading; must match ``model``/``pretrained``).

    Returns:
        :class:`ExtractResult`; ``computed_chunks == 0`` when the store was already complete.
    """
    _check_arguments(batch_size=batch_size, rows_per_chunk=rows_per_chunk,
                     feature_dtype=feature_dtype)  # before anything is loaded or written
    start = time.perf_counter()
    device = device or default_device()
    if loaded is None:
        loaded = load_model(model, pretrained, device=device)
    data = load_dataset(dataset, split, data_root=data_root, transform=loaded.preprocess)
    config = extraction_config(loaded, dataset, split, data.indices, feature_dtype, rows_per_chunk)
    chash = config_hash(config)
    url = feature_store_path(store_root or default_store_root(), model,
                             pretrained_slug(loaded.pretrained, loaded.checkpoint_sha256),
                             dataset, split)  # the same as feature_store_url(...), no re-hash
    with _writer_lock(url):
        store = _open_or_create(url, loaded, data, config, chash, rows_per_chunk, feature_dtype)
        if verify:
            store.repair_fixed(*_fixed_content(loaded, data.info))
            store.mark_pending(store.verify(labels=data.labels, indices=data.indices))
        pending = store.pending_chunks()
        rows = _compute(store, loaded, data, pending, batch_size, num_workers, progress)
        store.finalize()
    return ExtractResult(url, len(pending), store.dims.row_chunk, rows,
                         time.perf_counter() - start)


def _check_arguments(*, batch_size: int, rows_per_chunk: int, feature_dtype: str) -> None:
    for key, value in (("batch_size", batch_size), ("rows_per_chunk", rows_per_chunk)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise StoreError(f"{key} must be a positive integer, got {value!r}")
    if feature_dtype not in FEATURE_DTYPES:
        raise StoreError(f"feature_dtype must be one of {', '.join(FEATURE_DTYPES)}, "
                         f"got {feature_dtype!r}")


def _fixed_content(loaded: LoadedModel, info) -> tuple[ReadoutMaps, dict[str, np.ndarray]]:
    """The read-out maps and the text classifier: the fixed arrays, derived from the model."""
    maps = readout_maps(loaded.model)
    classifier = text_classifier(loaded.model, loaded.tokenizer, info.classnames, info.templates)
    return maps, {"template_embeddings": classifier.template_embeddings.numpy(),
                  "class_weights": classifier.weights.numpy()}


def _clear_interrupted_creation(url: str) -> None:
    """Delete what a killed creation left (the writer lock is held: none is in progress)."""
    for sibling in FeatureStore.temporary_siblings(url):
        shutil.rmtree(sibling, ignore_errors=True)
    if FeatureStore.creation_interrupted(url):
        _delete_tree(url)


def _open_or_create(url, loaded, data, config, chash, rows_per_chunk, feature_dtype) -> FeatureStore:
    _clear_interrupted_creation(url)
    exists = _local_path(url).exists() if _is_local(url) else _remote_exists(url)
    if exists:
        store = FeatureStore.open(url, require_complete=False)
        if store.attrs.get("config_hash") != chash:
            old = store.attrs.get("config", {})
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise StoreError(
                f"{url} was extracted with another configuration (differs in: {', '.join(diff)}). "
                "Delete it, or choose another --store-root, to extract with the new one.")
        return store
    info = data.info
    maps, text = _fixed_content(loaded, info)
    vis = loaded.model.visual
    dims = StoreDims(n=len(data), layer=maps.n_layers, head=maps.n_heads, head_dim=maps.head_dim,
                     width=maps.width, embed=maps.embed_dim, n_class=len(info.classnames),
                     n_template=len(info.templates), rows_per_chunk=rows_per_chunk)
    attrs = {
        **{k: config[k] for k in ("model", "pretrained", "checkpoint_sha256", "dataset", "split")},
        "config": config,
        "config_hash": chash,
        "decomposition_version": DECOMPOSITION_VERSION,
        "units": [u.as_dict() for u in maps.units],
        "classnames": list(info.classnames),
        "templates": list(info.templates),
        "image_size": list(vis.image_size),
        "versions": {p: _version(p) for p in ("torch", "open_clip_torch", "zarr", "numpy")},
        "residual_version": _version("residual"),
    }
    return FeatureStore.create(
        url, dims=dims, feature_dtype=feature_dtype, attrs=attrs, maps=maps, text=text,
        labels=np.asarray(data.labels, dtype=np.int64),
        indices=np.asarray(data.indices, dtype=np.int64))


def _compute(store: FeatureStore, loaded: LoadedModel, data, pending: np.ndarray,
             batch_size: int, num_workers: int | None, progress: bool) -> int:
    """Decompose the rows of ``pending`` chunks; a writer thread writes chunks behind compute."""
    if not len(pending):
        return 0
    if num_workers is None:
        num_workers = max(0, min(4, (os.cpu_count() or 1) - 1))
    loader = DataLoader(data, batch_sampler=_ChunkBatches(store, pending, batch_size),
                        num_workers=num_workers, pin_memory=loaded.device.type == "cuda",
                        persistent_workers=False)
    maps = readout_maps(loaded.model)
    dtype = np.dtype(store.attrs["feature_dtype"])
    total = sum(store.chunk_rows(int(c)).stop - store.chunk_rows(int(c)).start for c in pending)
    chunk_iter = iter(pending)
    chunk = int(next(chunk_iter))
    buffer: list[dict[str, np.ndarray]] = []
    filled = 0
    writes: list[Future] = []
    with ThreadPoolExecutor(max_workers=1) as writer, \
            tqdm(total=total, unit="img", disable=not progress, desc="extract",
                 dynamic_ncols=True) as bar:
        for images, _ in loader:
            raw = decompose(loaded.model, images, maps=maps).raw
            buffer.append({k: _to_numpy(getattr(raw, k), dtype, k) for k in RAW_FIELDS})
            filled += len(images)
            bar.update(len(images))
            rows = store.chunk_rows(chunk)
            if filled == rows.stop - rows.start:
                block = {k: np.concatenate([b[k] for b in buffer]) for k in RAW_FIELDS}
                block["labels"] = np.asarray(data.labels[rows], dtype=np.int64)
                block["indices"] = np.asarray(data.indices[rows], dtype=np.int64)
                _drain(writes, keep=1)  # at most one chunk queued behind the one being computed
                writes.append(writer.submit(store.write_chunk, chunk, block))
                buffer, filled = [], 0
                chunk = int(next(chunk_iter, -1))
        _drain(writes, keep=0)
    return total


def _drain(writes: list[Future], keep: int) -> None:
    while len(writes) > keep:
        writes.pop(0).result()  # re-raises a failed write here


def _to_numpy(t: torch.Tensor, dtype: np.dtype, name: str) -> np.ndarray:
    arr = t.detach().cpu().numpy()
    return arr if name.startswith("ln_") else arr.astype(dtype, copy=False)


class _writer_lock:
    """Exclusive writer lock next to a local store; a second writer is refused at once."""

    def __init__(self, url: str):
        self.url = url
        self.lock = None
        if _is_local(url):
            path = _local_path(url)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.lock = FileLock(str(path) + ".lock")

    def __enter__(self):
        if self.lock is not None:
            try:
                self.lock.acquire(timeout=0)
            except Timeout:
                raise StoreError(f"{self.url} is being written by another extraction (lock "
                                 f"{self.lock.lock_file}); wait for it to finish") from None
        return self

    def __exit__(self, *exc):
        if self.lock is not None:
            self.lock.release()


def remove_store(url: str) -> None:
    """Delete the feature store at ``url`` (local path or fsspec URL), e.g. to force re-extraction.

    Under the writer lock that :func:`extract` takes: deleting a store while an extraction writes
    it would crash that run, so it is refused instead (fsspec URLs have no lock). Refuses to
    delete anything that is not a feature store (or what a killed creation left).
    """
    url = str(url)
    if _is_local(url) and not _local_path(url).parent.is_dir():
        return  # nothing there (and no folder to create for the lock)
    with _writer_lock(url):
        for sibling in FeatureStore.temporary_siblings(url):
            shutil.rmtree(sibling, ignore_errors=True)
        if not _tree_exists(url):
            return
        if not (_is_feature_store(url) or FeatureStore.creation_interrupted(url)):
            raise StoreError(f"{url} is not a residual feature store: not deleting it (remove it "
                             "by hand if it should go)")
        _delete_tree(url)


def _is_feature_store(url: str) -> bool:
    import zarr

    try:
        return zarr.open_group(_zarr_target(url), mode="r").attrs.get("format") == FORMAT_NAME
    except Exception:
        return False


def _tree_exists(url: str) -> bool:
    if _is_local(url):
        path = _local_path(url)
        return path.exists() or path.is_symlink()
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def _delete_tree(url: str) -> None:
    if _is_local(url):
        path = _local_path(url)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        return
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _remote_exists(url: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(f"{path}/zarr.json")


def _sha1(arr: np.ndarray) -> str:
    import hashlib

    return hashlib.sha1(arr.tobytes()).hexdigest()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
