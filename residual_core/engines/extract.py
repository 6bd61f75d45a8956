"""The extract stage: run a model over a dataset split and write its feature store.

Resumable and safe: rows are processed in the store's row chunks; a chunk is marked done only
after its data is written, so a run killed at any point (even ``kill -9``) loses at most the
chunks in flight, and the same command resumes with the missing chunks only. Batches never
cross chunk boundaries, so a resumed store is identical to an uninterrupted run's. A complete
store is never recomputed; a store written with another configuration is an error. One split
can be extracted in parts by many processes at once (``part=``): each row chunk is claimed
before it is written (:mod:`residual_core.formats.claims`), so no two processes write the same
chunk, and the last part to finish marks the store complete; :func:`remove_store` is refused
while any part writes. Creating a store is atomic, and what a killed creation left is deleted by
the next run.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from residual_core.datasets import SplitDataset, load_dataset
from residual_core.errors import StoreError
from residual_core.formats.claims import StoreClaims, store_claims
from residual_core.formats.row_chunks import WriterProcess
from residual_core.formats.feature_store import (
    DECOMPOSITION_VERSION,
    FORMAT_NAME,
    SCHEMA_VERSION,
    FeatureStore,
    StoreDims,
)
from residual_core.identity import WeightsId, config_hash, parse_dataset, parse_weights
from residual_core.layout import Layout, is_local, local_path, remove_tree, zarr_target
from residual_core.method.decompose import (
    RAW_FIELDS,
    ReadoutMaps,
    decompose,
    encode,
    readout_maps,
)
from residual_core.method.models import LoadedModel, default_device, load_model
from residual_core.method.towers import read_tower
from residual_core.method.zeroshot import text_classifier
from residual_core.stages.extract import Params as ExtractParams
from residual_core.stages.extract import Part, Result

ExtractResult = Result
"""What :func:`extract` returns (the extract stage's result)."""


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


def store_config(weights: WeightsId, dataset: str, split: str, indices: np.ndarray,
                 labels: np.ndarray, params: ExtractParams,
                 dataset_content: dict[str, Any] | None = None) -> dict[str, Any]:
    """What determines a store's content (its config hash covers exactly this).

    The split's sample ids *and labels* are part of it: a loader whose label mapping changes
    (e.g. SUN397's classes mapped by name instead of by index) makes its stores stale instead of
    serving old labels.

    ``dataset_content``: the content identity of a dataset given as files
    (:meth:`~residual_core.identity.DatasetRef.content_identity`), so that an edited image (or
    an ``hf-dataset:`` saved again) makes the store stale; registered datasets are named by
    their name and split indices.
    """
    extra = {} if dataset_content is None else {"dataset_content": dataset_content}
    # Only where it can change what is read (a dataset given as files), and only when set, so
    # that registered datasets in the same grid and stores made before it keep their hash.
    if params.skip_bad_images and dataset_content is not None:
        extra["skip_bad_images"] = True
    if params.precision != "fp32":  # only when set: fp32 stores keep the hash they had
        extra["precision"] = params.precision
    return {
        **weights.as_dict(),
        **extra,
        "dataset": dataset,
        "split": split,
        "n_samples": int(len(indices)),
        "indices_sha1": _sha1(np.ascontiguousarray(indices, dtype=np.int64)),
        "labels_sha1": _sha1(np.ascontiguousarray(labels, dtype=np.int64)),
        "feature_dtype": params.feature_dtype,
        "rows_per_chunk": params.rows_per_chunk,
        "decomposition_version": DECOMPOSITION_VERSION,
        "schema_version": SCHEMA_VERSION,
    }


def _config(weights: WeightsId, dataset: str, split: str, data: SplitDataset,
            params: ExtractParams, layout: Layout) -> dict[str, Any]:
    ref = parse_dataset(dataset)
    return store_config(weights, dataset, split, data.indices, data.labels, params,
                        ref.content_identity(cache=layout.manifest(ref)))


def store_config_hash(weights: WeightsId, dataset: str, split: str, params: ExtractParams, *,
                      data_root: str | Path | None = None,
                      store_root: str | Path | None = None) -> str:
    """The config hash :func:`extract` gives the store of these arguments, without loading the
    model (the dataset's listing gives the split's sample ids; an ``imagefolder:`` dataset's
    images are decoded once per process to find unreadable ones)."""
    layout = Layout.of(store_root).check_root()
    data = load_dataset(dataset, split, data_root=data_root, download=params.download,
                        skip_bad_images=params.skip_bad_images)
    return config_hash(_config(weights, dataset, split, data, params, layout))


@functools.lru_cache(maxsize=1)
def _loaded_model(model: str, pretrained: str | None, device: str,
                  weights: WeightsId) -> LoadedModel:
    return load_model(model, pretrained, device=device)


def loaded_model(model: str, pretrained: str | None, device: str | None = None) -> LoadedModel:
    """The model, loaded once per process for consecutive calls with the same weights (the
    splits of a task; a rewritten checkpoint file has another identity and is loaded again)."""
    return _loaded_model(model, pretrained, device or default_device(),
                         parse_weights(model, pretrained))


def extract(
    model: str,
    pretrained: str | None,
    dataset: str,
    split: str,
    params: ExtractParams | None = None,
    *,
    data_root: str | Path | None = None,
    store_root: str | Path | None = None,
    verify: bool = False,
    progress: bool = True,
    loaded: LoadedModel | None = None,
    part: Part | None = None,
) -> ExtractResult:
    """Extract (or resume, or reuse) the feature store of ``model/pretrained`` on ``dataset/split``.

    Args:
        model, pretrained: open_clip name and tag / checkpoint path / None (random weights).
        dataset, split: a registered dataset name (or ``imagefolder:PATH``,
            ``hf-dataset:SOURCE``) and ``train|val|test``.
        params: batch size, storage dtype, rows per chunk, unreadable images left out or
            refused, whether torchvision may download the dataset, DataLoader workers, device
            (:class:`residual_core.stages.extract.Params`).
        data_root: where datasets live (default ``Layout.of().datasets``).
        store_root: local folder or fsspec URL under which stores live (default ``data/``).
        verify: check every array first: recompute damaged row chunks (decoded, labels and
            indices compared with the dataset's), rewrite damaged read-out maps and text
            classifier (recomputed from the model), rebuild a corrupt ``done``.
        progress: show a progress bar (images/s and ETA).
        loaded: an already loaded model (skips loading; must match ``model``/``pretrained``).
        part: extract only this part's row chunks (:class:`~residual_core.stages.extract.Part`),
            while other processes or machines extract the other parts of the same store; the
            last to finish marks the store complete. Default: the whole split.

    Returns:
        :class:`ExtractResult`; ``computed_chunks == 0`` when the store was already complete
        (or the part's chunks were done or being written by another process: ``busy_chunks``).
    """
    start = time.perf_counter()
    params = params or ExtractParams()
    part = part or Part()
    layout = Layout.of(store_root).check_root()
    with _writer(params, layout) as writer:  # started first: it imports while the model loads
        return _extract(model, pretrained, dataset, split, params, layout, data_root, verify,
                        progress, loaded, part, start, writer)


@contextlib.contextmanager
def _writer(params: ExtractParams, layout: Layout) -> Iterator[WriterProcess | None]:
    """A :class:`WriterProcess` for ``writer="process"`` and a local store, else None (the
    writer thread writes itself)."""
    if params.writer != "process" or not is_local(layout.root):
        yield None
        return
    with WriterProcess() as process:
        yield process


def _extract(model, pretrained, dataset, split, params, layout, data_root, verify, progress,
             loaded, part, start, writer) -> ExtractResult:
    if loaded is None:
        loaded = load_model(model, pretrained, device=params.device or default_device())
    data = load_dataset(dataset, split, data_root=data_root, transform=loaded.preprocess,
                        download=params.download, skip_bad_images=params.skip_bad_images)
    config = _config(loaded.weights, dataset, split, data, params, layout)
    chash = config_hash(config)
    rows_per_chunk, feature_dtype = params.rows_per_chunk, params.feature_dtype
    url = layout.feature_store(loaded.weights, dataset, split, feature_dtype)
    with store_claims(url) as claims:
        claims.hold_store(exclusive=verify)  # verifying rewrites flags other parts write
        with claims.metadata():
            store = _open_or_create(url, loaded, data, config, chash, rows_per_chunk,
                                    feature_dtype)
            if store.shared_done:  # an older store's flags share one chunk: one writer only
                claims.hold_store(exclusive=True)
            if verify:
                store.repair_fixed(*_fixed_content(loaded, data.info))
                store.mark_pending(store.verify(labels=data.labels, indices=data.indices))
        pending, busy = claim_part(store, claims, part)
        rows, check = _compute(store, loaded, data, pending, params, progress,
                               written=claims.release, writer=writer)
        if check is not None:
            with claims.metadata():  # the first part to compute records it
                store.refresh()
                if "exactness" not in store.attrs:
                    store.set_attrs(exactness=check)
        complete = finalize_when_done(store, claims)
    return ExtractResult(url=url, computed_chunks=len(pending), total_chunks=store.dims.row_chunk,
                         rows_computed=rows, seconds=time.perf_counter() - start, part=str(part),
                         busy_chunks=busy, complete=complete)


def claim_part(store: FeatureStore, claims: StoreClaims, part: Part) -> tuple[np.ndarray, int]:
    """Claim the unfinished row chunks of ``part``: returns those this process now holds (to
    write, then release) and how many others another process holds."""
    mine = np.intersect1d(np.array(part.chunks(store.dims.row_chunk), dtype=np.int64),
                          store.pending_chunks())
    claimed = claims.claim_many(mine)
    # a chunk another process finished between reading the flags and claiming it
    pending = np.intersect1d(np.array(claimed, dtype=np.int64), store.pending_chunks())
    for chunk in set(claimed) - set(pending.tolist()):
        claims.release(chunk)
    return pending, len(mine) - len(claimed)


def finalize_when_done(store: FeatureStore, claims: StoreClaims) -> bool:
    """Mark the store complete if every row chunk is done (whichever part finishes last does
    it, exactly once); returns whether the store is complete."""
    with claims.metadata():
        store.refresh()
        if not store.complete and not len(store.pending_chunks()):
            store.finalize()
    return store.complete


def _fixed_content(loaded: LoadedModel, info) -> tuple[ReadoutMaps, dict[str, np.ndarray]]:
    """The read-out maps and the text classifier: the fixed arrays, derived from the model. A
    vision-only model (ViT, DINOv2) has no text classifier: its array stays NaN (the store's
    ``text_tower`` attribute is false, and align uses class prototypes)."""
    maps = readout_maps(loaded.model)
    if not loaded.has_text_tower:
        return maps, {"class_weights": np.full((len(info.classnames), maps.embed_dim), np.nan,
                                               dtype=np.float32)}
    classifier = text_classifier(loaded.model, loaded.tokenizer, info.classnames, info.templates)
    return maps, {"class_weights": classifier.weights.numpy()}


def _clear_interrupted_creation(url: str) -> None:
    """Delete what a killed creation left (the writer lock is held: none is in progress)."""
    for sibling in FeatureStore.temporary_siblings(url):
        shutil.rmtree(sibling, ignore_errors=True)
    if FeatureStore.creation_interrupted(url):
        remove_tree(url)


def _open_or_create(url, loaded, data, config, chash, rows_per_chunk, feature_dtype) -> FeatureStore:
    _clear_interrupted_creation(url)
    exists = local_path(url).exists() if is_local(url) else _remote_exists(url)
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
    if data.skipped:
        logging.getLogger(__name__).warning(
            "%s: leaving out %d unreadable images (store attribute skipped_images): %s",
            url, len(data.skipped), ", ".join(data.skipped[:5]))
    maps, text = _fixed_content(loaded, info)
    image_size = read_tower(loaded.model).image_size  # None: any size (DINOv2)
    dims = StoreDims(n=len(data), layer=maps.n_layers, head=maps.n_heads, head_dim=maps.head_dim,
                     width=maps.width, embed=maps.embed_dim, n_class=len(info.classnames),
                     n_template=len(info.templates), rows_per_chunk=rows_per_chunk)
    attrs = {
        **{k: config[k] for k in ("model", "pretrained", "checkpoint_sha256", "dataset", "split")},
        "config": config,
        "config_hash": chash,
        "decomposition_version": DECOMPOSITION_VERSION,
        "units": [u.as_dict() for u in maps.units],
        "skipped_images": list(data.skipped),
        "classnames": list(info.classnames),
        "templates": list(info.templates),
        "image_size": None if image_size is None else list(image_size),
        "text_tower": loaded.has_text_tower,
        "versions": {p: _version(p) for p in ("torch", "open_clip_torch", "transformers", "zarr",
                                               "numpy")},
        "residual_version": _version("residual"),
    }
    return FeatureStore.create(
        url, dims=dims, feature_dtype=feature_dtype, attrs=attrs, maps=maps, text=text,
        labels=np.asarray(data.labels, dtype=np.int64),
        indices=np.asarray(data.indices, dtype=np.int64))


def _autocast(device: torch.device, precision: str):
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype)


def exactness(model, images: torch.Tensor, precision: str, maps: ReadoutMaps) -> dict[str, Any]:
    """How exact the decomposition of ``images`` is at ``precision``: the largest deviation
    of the unit sum from the model's forward pass at that precision and from its float32
    forward pass, relative to the largest entry of the forward output."""
    with _autocast(read_tower(model).anchor.device, precision):
        total = decompose(model, images, maps=maps).contributions.sum(1).float()
        own = encode(model, images).float()
    fp32 = encode(model, images).float()

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    return {"precision": precision, "rows": int(len(images)),
            "sum_vs_forward": relative(total, own), "sum_vs_fp32_forward": relative(total, fp32)}


def _compute(store: FeatureStore, loaded: LoadedModel, data, pending: np.ndarray,
             params: ExtractParams, progress: bool,
             written: Callable[[int], None] = lambda chunk: None,
             writer: WriterProcess | None = None) -> tuple[int, dict[str, Any] | None]:
    """Decompose the rows of ``pending`` chunks (in ``params.precision``); a writer thread
    writes chunks behind compute (through ``writer`` when given) and calls ``written(chunk)``
    after each. Returns the rows
    computed and, when the store has none yet, the :func:`exactness` of the first batch."""
    if not len(pending):
        return 0, None
    batch_size, num_workers = params.batch_size, params.num_workers
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
    check = None
    with ThreadPoolExecutor(max_workers=1) as thread, \
            tqdm(total=total, unit="img", disable=not progress, desc="extract",
                 dynamic_ncols=True) as bar:
        for images, _ in loader:
            if check is None and "exactness" not in store.attrs:
                check = exactness(loaded.model, images, params.precision, maps)
            with _autocast(loaded.device, params.precision):
                raw = decompose(loaded.model, images, maps=maps).raw
            buffer.append({k: _to_numpy(getattr(raw, k), dtype, k) for k in RAW_FIELDS})
            filled += len(images)
            bar.update(len(images))
            rows = store.chunk_rows(chunk)
            if filled == rows.stop - rows.start:
                block = {k: np.concatenate([b[k] for b in buffer]) for k in RAW_FIELDS}
                block["labels"] = np.asarray(data.labels[rows], dtype=np.int64)
                block["indices"] = np.asarray(data.indices[rows], dtype=np.int64)
                # chunks queue behind the one being written up to a budget (the writer may
                # still be starting), then compute waits for it
                _drain(writes, keep=max(1, min(8, QUEUED_BYTES // _nbytes(block))))
                writes.append(thread.submit(_write, store, chunk, block, written, writer))
                buffer, filled = [], 0
                chunk = int(next(chunk_iter, -1))
        _drain(writes, keep=0)
    return total, check


def _write(store: FeatureStore, chunk: int, block: dict[str, np.ndarray],
           written: Callable[[int], None], writer: WriterProcess | None) -> None:
    store.write_chunk(chunk, block, writer)
    written(chunk)


QUEUED_BYTES = 256 << 20
"""The most bytes of computed row chunks that wait for the writer (at least one chunk)."""


def _nbytes(block: dict[str, np.ndarray]) -> int:
    return max(1, sum(v.nbytes for v in block.values()))


def _drain(writes: list[Future], keep: int) -> None:
    while len(writes) > keep:
        writes.pop(0).result()  # re-raises a failed write here


def _to_numpy(t: torch.Tensor, dtype: np.dtype, name: str) -> np.ndarray:
    arr = t.detach().cpu().numpy()
    return arr if name.startswith("ln_") else arr.astype(dtype, copy=False)


def remove_store(url: str) -> None:
    """Delete the feature store at ``url`` (local path or fsspec URL), e.g. to force re-extraction.

    Holds the store lock exclusively: deleting a store while an extraction (or any part of one)
    writes it would crash that run, so it is refused instead (fsspec URLs have no store lock,
    see :mod:`residual_core.formats.claims`). Refuses to delete anything that is not a feature
    store (or what a killed creation left).
    """
    url = str(url)
    if is_local(url) and not local_path(url).parent.is_dir():
        return  # nothing there (and no folder to create for the lock)
    with store_claims(url) as claims, claims.metadata():
        claims.hold_store(exclusive=True)
        for sibling in FeatureStore.temporary_siblings(url):
            shutil.rmtree(sibling, ignore_errors=True)
        if not _tree_exists(url):
            return
        if not (_is_feature_store(url) or FeatureStore.creation_interrupted(url)):
            raise StoreError(f"{url} is not a residual feature store: not deleting it (remove it "
                             "by hand if it should go)")
        remove_tree(url)


def _is_feature_store(url: str) -> bool:
    import zarr

    try:
        return zarr.open_group(zarr_target(url), mode="r").attrs.get("format") == FORMAT_NAME
    except Exception:
        return False


def _tree_exists(url: str) -> bool:
    if is_local(url):
        path = local_path(url)
        return path.exists() or path.is_symlink()
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


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
