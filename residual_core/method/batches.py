"""Minibatches of cached unit contributions (:class:`StoreFeatures`), held in RAM or streamed from a
feature store, and the checks that a task's stores belong together.

Shuffling and memory: every epoch visits the training rows in one global seeded permutation (as
the authors' ``DataLoader(shuffle=True)``), so a minibatch is a uniform random subset of the
split even when the store is sorted by class. A store's selected units are cached in RAM when
``N · U_in · E · 4`` bytes fit in ``cache_bytes`` (default 1 GiB, per store); otherwise they are
streamed in windows of the permutation, each gathered from the row chunks that hold its rows (the
next window prefetched while the current one trains). Both modes draw the same random numbers and
visit the rows in the same order, so they train identically.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import dask
import numpy as np
import torch

from residual_core.errors import StoreError
from residual_core.formats.feature_store import FeatureStore
from residual_core.identity import WeightsId
from residual_core.method.adapters import AlignInputError

DEFAULT_CACHE_BYTES = 1 << 30
"""A store's selected units are held in RAM when they take at most this many bytes."""

EVAL_BATCH = 1024  # rows per forward pass when only evaluating


# ------------------------------------------------------------------------------ features


class StoreFeatures:
    """Minibatches ``(y [B, U_in, E] float32, labels [B] int64)`` of some units of a store.

    Shuffling (``batches`` with a generator) draws one global permutation of all rows per epoch,
    ``torch.randperm(N, generator=generator)``, and visits the rows in that order, as the authors'
    ``DataLoader(shuffle=True)`` does: every minibatch is a uniform random subset of the split,
    whatever order the store's rows are in (stores keep the source order, and several sources
    are sorted by class).

    Memory: the selected units are held in RAM when ``N · U_in · E · 4`` bytes fit in
    ``cache_bytes``, and a batch is a gather of the cached rows. Otherwise they are streamed in
    *windows*: consecutive slices of the epoch's permutation, as many whole chunks of rows as
    two of them fit in ``cache_bytes`` (at least ``buffer_chunks`` chunks). A window is
    gathered by reading every row chunk that holds one of its rows (``buffer_chunks`` chunks at
    a time, in parallel), keeping those rows and dropping the rest; the next window is read
    while the current one trains (so about ``cache_bytes`` plus ``buffer_chunks`` chunks are
    held). Why windows as large as memory allows rather than chunk-sized gathers: the rows of a
    window of a uniform permutation are spread over nearly every chunk, and a chunk is read
    whole (it is one compressed shard), so each window costs about one pass over the store; the
    fewest passes per epoch (``⌈N / window⌉``) come from the largest windows that fit. Both
    modes visit the rows in the same order, so they train identically.

    Args:
        store: an open feature store.
        units: unit indices, in the column order wanted (a module's ``input_units``).
        cache_bytes: hold the data in RAM when ``N · U_in · E · 4`` bytes fit in it; when
            streaming, the memory for the two windows.
        buffer_chunks: streaming mode: row chunks read at a time, and the least window size in
            chunks.
    """

    def __init__(self, store: FeatureStore, units: Sequence[int], *,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, buffer_chunks: int = 4):
        self.store = store
        self.units = list(units)
        self.labels = torch.from_numpy(np.asarray(store.labels, dtype=np.int64))
        self.n = len(self.labels)
        self.rows_per_chunk = store.dims.rows_per_chunk
        self.buffer_chunks = max(1, int(buffer_chunks))
        self._y = store.contributions(self.units)  # lazy, blocks = row chunks
        row_bytes = len(self.units) * store.dims.embed * 4
        self._cache = (torch.from_numpy(self._y.compute()) if self.n * row_bytes <= cache_bytes
                       else None)
        # streaming: whole chunks of rows per window (two windows in cache_bytes)
        budget_chunks = int(cache_bytes) // (2 * row_bytes * self.rows_per_chunk)
        self.window = max(self.buffer_chunks, budget_chunks) * self.rows_per_chunk

    @property
    def in_memory(self) -> bool:
        return self._cache is not None

    def order(self, generator: torch.Generator | None) -> torch.Tensor:
        """The rows of an epoch in visiting order: a global permutation drawn from
        ``generator``, the store order without one."""
        if generator is None:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=generator)

    def _gather(self, rows: np.ndarray) -> torch.Tensor:
        """``[len(rows), U_in, E]`` of the given rows in the given order, reading each row chunk
        that holds one of them once (``buffer_chunks`` chunks in parallel, dask)."""
        out = np.empty((len(rows), len(self.units), self.store.dims.embed), dtype=np.float32)
        chunk_of = rows // self.rows_per_chunk
        by_chunk = np.argsort(chunk_of, kind="stable")
        chunks, starts = np.unique(chunk_of[by_chunk], return_index=True)
        ends = np.append(starts[1:], len(rows))
        for i in range(0, len(chunks), self.buffer_chunks):
            group = range(i, min(i + self.buffer_chunks, len(chunks)))
            parts = dask.compute(*[self._y[self.store.chunk_rows(int(chunks[j]))]
                                   for j in group])
            for j, part in zip(group, parts):
                where = by_chunk[starts[j]:ends[j]]  # positions in the window
                out[where] = part[rows[where] - int(chunks[j]) * self.rows_per_chunk]
        return torch.from_numpy(out)

    def _buffers(self, generator: torch.Generator | None) -> Iterator[tuple[torch.Tensor, ...]]:
        order = self.order(generator)
        if self._cache is not None:  # gathers of a few chunks' worth of rows at a time
            step = self.buffer_chunks * self.rows_per_chunk
            for s in range(0, self.n, step):
                if generator is None:  # store order: a view without a copy
                    part = slice(s, min(s + step, self.n))
                    yield self._cache[part], self.labels[part]
                else:
                    rows = order[s:s + step]
                    yield self._cache[rows], self.labels[rows]
            return
        windows = [order[s:s + self.window].numpy() for s in range(0, self.n, self.window)]
        with ThreadPoolExecutor(max_workers=1) as reader:  # read the next window while training
            pending = reader.submit(self._gather, windows[0]) if windows else None
            for i, rows in enumerate(windows):
                y = pending.result()
                if i + 1 < len(windows):
                    pending = reader.submit(self._gather, windows[i + 1])
                yield y, self.labels[torch.from_numpy(rows)]

    def batches(self, batch_size: int, generator: torch.Generator | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of minibatches: shuffled with ``generator``, in store order without; the
        last batch may be smaller."""
        carry: tuple[torch.Tensor, torch.Tensor] | None = None
        for y, labels in self._buffers(generator):
            if carry is not None:
                y, labels = torch.cat([carry[0], y]), torch.cat([carry[1], labels])
            full = len(y) // batch_size * batch_size
            for s in range(0, full, batch_size):
                yield y[s:s + batch_size], labels[s:s + batch_size]
            carry = (y[full:], labels[full:]) if full < len(y) else None
        if carry is not None:
            yield carry


# ------------------------------------------------------------------------------ checks


def concrete_classifier(classifier: str, train_store: FeatureStore | str | Path) -> str:
    """``classifier`` with ``auto`` made concrete for the task: ``text`` when the train store's
    model has a text tower, else ``centroid`` (vision-only ViT, DINOv2)."""
    if classifier != "auto":
        return classifier
    return "text" if _open(train_store).text_tower else "centroid"


def task_classifier(train_store: FeatureStore | str | Path, classifier: str = "text",
                    normalize: str = "none", *, cache_bytes: int = DEFAULT_CACHE_BYTES
                    ) -> np.ndarray:
    """The frozen ``[C, E]`` classifier of a task (:data:`.zeroshot.CLASSIFIERS`): the train
    store's zero-shot text classifier (``text``), or the class prototypes of its encodings
    (``centroid``: the per-class mean of ``Σ_u y_u``, the model's output, with ``normalize``
    one of :data:`.zeroshot.CENTROID_NORMS`; read in row chunks, float64 sums); ``auto``: text
    when the store's model has a text tower, else centroid."""
    from residual_core.method.zeroshot import CLASSIFIERS, class_sums, prototypes

    if classifier not in (*CLASSIFIERS, "auto"):
        raise AlignInputError(f"unknown classifier {classifier!r}; use one of "
                              f"{', '.join(CLASSIFIERS)} or auto")
    store = _open(train_store)
    classifier = concrete_classifier(classifier, store)
    if classifier == "text":
        return store.class_weights
    _check_labels(store)
    n_class = len(store.classnames)
    sums = torch.zeros(n_class, store.dims.embed, dtype=torch.float64)
    counts = torch.zeros(n_class, dtype=torch.long)
    feats = StoreFeatures(store, range(len(store.units)), cache_bytes=cache_bytes)
    for y, labels in feats.batches(EVAL_BATCH):
        s, c = class_sums(y.double().sum(1), labels, n_class)
        sums += s
        counts += c
    return prototypes(sums, counts, normalize).numpy()


def _open(store: FeatureStore | str | Path) -> FeatureStore:
    return store if isinstance(store, FeatureStore) else FeatureStore.open(store)


def _check_same_task(stores: Mapping[str, FeatureStore]) -> None:
    """All splits must come from one model (same weights, same tower) and one dataset."""
    (ref_name, ref), *others = stores.items()
    for name, s in others:
        for key in WeightsId.FIELDS + ("dataset",):
            if s.attrs.get(key) != ref.attrs.get(key):
                raise StoreError(
                    f"the {name} store ({s.url}) has {key} {s.attrs.get(key)!r}, the {ref_name} "
                    f"store ({ref.url}) {ref.attrs.get(key)!r}: all splits must come from one "
                    "model and one dataset")
        a, b = s.dims, ref.dims
        if (a.layer, a.head, a.head_dim, a.width, a.embed) != \
                (b.layer, b.head, b.head_dim, b.width, b.embed):
            raise StoreError(f"the {name} store ({s.url}) has another tower than the {ref_name} "
                             f"store ({ref.url}): {a} vs {b}")
        texts = s.text_tower and ref.text_tower
        if s.classnames != ref.classnames or s.text_tower != ref.text_tower or (
                texts and not np.array_equal(s.class_weights, ref.class_weights)):
            raise StoreError(f"the {name} store ({s.url}) has another zero-shot classifier "
                             f"(class names or prompts) than the {ref_name} store ({ref.url})")


def _check_labels(store: FeatureStore) -> None:
    labels, n_class = store.labels, store.dims.n_class
    bad = labels[(labels < 0) | (labels >= n_class)]
    if bad.size:
        raise AlignInputError(
            f"{store.url}: labels {sorted(set(bad.tolist()))[:10]} are outside its {n_class} "
            f"classes (0..{n_class - 1}); the store's labels do not match its class list")


def _stores(**stores: FeatureStore | str | Path) -> dict[str, FeatureStore]:
    opened = {name: _open(s) for name, s in stores.items()}
    _check_same_task(opened)
    for s in opened.values():
        _check_labels(s)
    return opened
