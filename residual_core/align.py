"""The align stage (METHOD §3): training adapters on cached unit contributions, the baselines, and
the head-selection experiment (METHOD §2).

Training (:func:`fit`) follows the authors' settings: cross-entropy on the frozen classifier's
logits, schedule-free AdamW (``schedulefree.AdamWScheduleFree``, switched with
``optimizer.train()`` / ``optimizer.eval()`` around training and evaluation), the method's
learning rate and batch size (:data:`residual_core.residual.PRESETS`), up to 30 epochs, early
stopping on validation accuracy with patience 5, and the best-validation weights evaluated on
test. There is no augmentation, so training on cached features is exactly training on the frozen
backbone's outputs.

Reproducibility: everything random is drawn from generators seeded by ``seed`` (the ``randn``
λ init, the shuffling), so on the CPU the same seed gives the same weights and accuracies.

Shuffling and memory (:class:`StoreFeatures`): every epoch visits the training rows in one
global seeded permutation (as the authors' ``DataLoader(shuffle=True)``), so a minibatch is a
uniform random subset of the split even when the store is sorted by class. A store's selected
units are cached in RAM when ``N · U_in · E · 4`` bytes fit in ``cache_bytes`` (default 1 GiB,
per store); otherwise they are streamed in windows of the permutation, each gathered from the
row chunks that hold its rows (the next window prefetched while the current one trains). Both
modes draw the same random numbers and visit the rows in the same order, so they train
identically.
"""

from __future__ import annotations

import copy
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import dask
import numpy as np
import schedulefree
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .errors import StoreError
from .identity import WeightsId
from .models import LoadedModel
from .residual import (AlignInputError, KRule, Preset, SpectralBases,
                       UnitAdapter, build_adapter, get_preset)
from .store import FeatureStore
from .zeroshot import accuracy, text_classifier

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "HEAD_KEEP",
    "HEAD_RANKINGS",
    "FitResult",
    "StoreFeatures",
    "evaluate",
    "finetune",
    "fit",
    "head_selection",
    "rank_heads",
    "zero_shot",
]

DEFAULT_CACHE_BYTES = 1 << 30
"""A store's selected units are held in RAM when they take at most this many bytes."""

EVAL_BATCH = 1024  # rows per forward pass when only evaluating

HEAD_RANKINGS = ("S", "U|T", "U", "R")
"""Head rankings of METHOD §2: own zero-shot accuracy, correlation with the output in the text
span, correlation with the output, random."""

HEAD_KEEP: tuple[int | float, ...] = (1, 0.01, 0.05, 0.10, 0.25, 0.50, 0.75, 1.0)
"""How many heads are kept: an int is a count, a float a fraction of all heads (1.0 is the
unablated model, a zero-shot reference)."""


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
        if s.classnames != ref.classnames or not np.array_equal(s.class_weights,
                                                                 ref.class_weights):
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


# ------------------------------------------------------------------------------ training


@dataclass
class FitResult:
    """What :func:`fit` (or :func:`finetune`) did.

    ``params``: the settings used (learning rate, batch size, ablation, stores, ...);
    ``state``: the best-validation trainable weights as numpy arrays (``lambdas`` for ResiDual);
    ``history``: per epoch ``epoch``, ``train_loss``, ``val_acc``, ``seconds``;
    ``fit_seconds``: the whole call (reading or caching the features included).
    """

    method: str
    params: dict[str, Any]
    trainable_parameters: int
    val_acc: float
    test_acc: float
    epochs_run: int
    best_epoch: int
    fit_seconds: float
    seed: int
    basis_dataset: str | None
    state: dict[str, np.ndarray] = field(repr=False)
    history: list[dict[str, float]] = field(default_factory=list, repr=False)


@dataclass
class _Outcome:
    best_val: float
    best_epoch: int
    epochs_run: int
    history: list[dict[str, float]]


def _train_loop(module: nn.Module, logits_of: Callable[[Any], torch.Tensor],
                train_epoch: Callable[[torch.Generator], Iterator[tuple[Any, torch.Tensor]]],
                val_accuracy: Callable[[], float], *, lr: float, epochs: int, patience: int,
                grad_clip: float | None, seed: int, progress: bool, desc: str) -> _Outcome:
    """Schedule-free AdamW with early stopping; leaves ``module`` at its best-validation weights
    (the optimizer's evaluation weights, i.e. after ``optimizer.eval()``)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params or epochs <= 0:
        module.eval()
        return _Outcome(val_accuracy(), 0, 0, [])
    optimizer = schedulefree.AdamWScheduleFree(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    best_val, best_epoch, best = -math.inf, 0, None
    history: list[dict[str, float]] = []
    bar = tqdm(range(1, epochs + 1), desc=desc, disable=not progress, dynamic_ncols=True)
    for epoch in bar:
        start = time.perf_counter()
        module.train()
        optimizer.train()
        loss_sum, seen = 0.0, 0
        for x, labels in train_epoch(generator):
            loss = F.cross_entropy(logits_of(x), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            loss_sum += float(loss.detach()) * len(labels)
            seen += len(labels)
        optimizer.eval()  # swap in the averaged weights that schedule-free evaluates
        module.eval()
        acc = val_accuracy()
        history.append({"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "val_acc": acc,
                        "seconds": time.perf_counter() - start})
        bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.4f}", val=f"{acc:.4f}")
        if acc > best_val:
            best_val, best_epoch = acc, epoch
            best = [p.detach().clone() for p in params]
        elif epoch - best_epoch >= patience:
            break
    bar.close()
    with torch.no_grad():
        for p, b in zip(params, best):
            p.copy_(b)
    return _Outcome(best_val, best_epoch, len(history), history)


def _to(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], device
        ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    return ((y.to(device), labels.to(device)) for y, labels in batches)


@torch.no_grad()
def evaluate(module: UnitAdapter, features: StoreFeatures, batch_size: int = EVAL_BATCH) -> float:
    """Top-1 accuracy of ``module`` on every row of ``features`` (in store order)."""
    module.eval()
    device = module.class_weights.device
    logits = torch.cat([module.logits(y.to(device)).cpu()
                        for y, _ in features.batches(batch_size)])
    return accuracy(logits, features.labels)


def fit(method: str | Preset, train_store: FeatureStore | str | Path,
        val_store: FeatureStore | str | Path, test_store: FeatureStore | str | Path,
        bases: SpectralBases | None = None, *, seed: int = 0, epochs: int = 30,
        patience: int = 5, lr: float | None = None, batch_size: int | None = None,
        lambda_init: str = "ones", ablation: str | None = None,
        adapt: Mapping[str, KRule] | None = None, add_mean: bool = False,
        cache_bytes: int = DEFAULT_CACHE_BYTES, buffer_chunks: int = 4,
        device: str | torch.device = "cpu", progress: bool = True) -> FitResult:
    """Train a method on cached features and evaluate it (METHOD §3).

    Args:
        method: a preset name (``residual-star``, ``residual-full``, ``coarse``, ``linear``,
            ``zero-shot``) or a :class:`Preset`.
        train_store, val_store, test_store: stores (or their URLs) of one model and one dataset.
        bases: spectral bases of the same model (spectral variants, ``mean`` ablation); usually
            fitted on another dataset (ImageNet train in the paper).
        seed: seeds the shuffling and the ``randn`` init.
        epochs, patience: at most ``epochs``; stop after ``patience`` epochs without a better
            validation accuracy.
        lr, batch_size: default to the preset's (0.8 / 64 for ResiDual variants, 1e-3 / 128 and
            gradient clipping 1.0 for the linear adapter).
        lambda_init, ablation, adapt, add_mean: see :func:`residual.build_adapter`.
        cache_bytes, buffer_chunks: see :class:`StoreFeatures` (memory only: the visiting
            order, one global permutation per epoch, depends on ``seed`` alone).
        device: where the module runs (features are read on the CPU and moved per batch);
            results are bit-reproducible on the CPU.
        progress: show a progress bar over epochs.

    Returns:
        :class:`FitResult` with the best-validation weights' validation and test accuracy.

    Raises:
        UnknownPresetError: unknown method.
        StoreError: stores of different models, towers, datasets or classifiers.
        BasisMismatchError: bases of another model.
        AlignInputError: labels outside the class list; bad options.
    """
    preset = get_preset(method)
    stores = _stores(train=train_store, val=val_store, test=test_store)
    train = stores["train"]
    if bases is not None:
        bases.check_compatible(train)  # the other splits are of the same model
    start = time.perf_counter()
    torch.manual_seed(seed)
    module = build_adapter(preset, train.units, train.class_weights, bases,
                           head_dim=train.dims.head_dim, ablation=ablation, adapt=adapt,
                           add_mean=add_mean, lambda_init=lambda_init, seed=seed).to(device)
    feats = {k: StoreFeatures(s, module.input_units, cache_bytes=cache_bytes,
                              buffer_chunks=buffer_chunks) for k, s in stores.items()}
    lr = preset.lr if lr is None else lr
    batch_size = preset.batch_size if batch_size is None else batch_size
    outcome = _train_loop(
        module, module.logits, lambda g: _to(feats["train"].batches(batch_size, g), device),
        lambda: evaluate(module, feats["val"]), lr=lr, epochs=epochs, patience=patience,
        grad_clip=preset.grad_clip, seed=seed, progress=progress, desc=preset.name)
    test_acc = evaluate(module, feats["test"])
    params = {
        "lr": lr, "batch_size": batch_size, "epochs": epochs, "patience": patience,
        "grad_clip": preset.grad_clip, "lambda_init": lambda_init,
        "ablation": getattr(module, "ablation", None), "add_mean": add_mean,
        "adapt": repr(dict(preset.adapt if adapt is None else adapt)),
        "model": train.attrs.get("model"), "pretrained": train.attrs.get("pretrained"),
        "dataset": train.attrs.get("dataset"), "n_train": feats["train"].n,
        "in_memory": feats["train"].in_memory, "device": str(device),
        **{f"{k}_store": s.url for k, s in stores.items()},
    }
    return FitResult(preset.name, params, module.trainable_parameters(), outcome.best_val,
                     test_acc, outcome.epochs_run, outcome.best_epoch,
                     time.perf_counter() - start, seed,
                     bases.basis_dataset if bases is not None else None, _weights(module),
                     outcome.history)


def _weights(module: UnitAdapter) -> dict[str, np.ndarray]:
    """Trainable weights, plus ``lambda/<unit>`` per adapted unit for the λ variants."""
    state = module.state()
    if hasattr(module, "lambdas_by_unit"):
        state.update({f"lambda/{k}": v for k, v in module.lambdas_by_unit().items()})
    return state


def zero_shot(store: FeatureStore | str | Path, *,
              cache_bytes: int = DEFAULT_CACHE_BYTES) -> float:
    """Zero-shot accuracy of a store: ``argmax((Σ_u y_u) @ class_weights.T)`` against labels."""
    (store,) = _stores(store=store).values()
    module = build_adapter("zero-shot", store.units, store.class_weights)
    return evaluate(module, StoreFeatures(store, module.input_units, cache_bytes=cache_bytes))


# ------------------------------------------------------------------------------ fine-tuning


def finetune(loaded: LoadedModel, train_dataset: Dataset, val_dataset: Dataset,
             test_dataset: Dataset | None = None, *, class_weights=None, seed: int = 0,
             epochs: int = 30, patience: int = 5, lr: float | None = None,
             batch_size: int | None = None, progress: bool = True) -> FitResult:
    """Full fine-tuning baseline: every weight of the image tower trained, the zero-shot text
    classifier frozen, ``logits = visual(images) @ class_weights.T``; settings of the
    ``finetune`` preset (lr 1e-5, batch 128, grad-clip 1.0) and the same loop as :func:`fit`.

    Runs the backbone online (on the model's device), so it is practical on a CPU only for tiny
    models. ``loaded`` is not modified: a copy of its image tower is trained.

    Args:
        loaded: the model (e.g. :func:`models.load_model`).
        train_dataset, val_dataset, test_dataset: datasets of ``(image [3, H, W], label)``
            with the model's eval transform (``load_dataset(..., transform=loaded.preprocess)``).
        class_weights: ``[C, E]`` classifier; default: built from ``train_dataset.info``'s class
            names and templates with the model's text tower.
        seed, epochs, patience, lr, batch_size, progress: as :func:`fit`.

    Returns:
        :class:`FitResult`; ``state`` is the best-validation image tower's state dict (numpy),
        ``test_acc`` NaN without a test set.
    """
    preset = get_preset("finetune")
    if class_weights is None:
        info = getattr(train_dataset, "info", None)
        if info is None:
            raise AlignInputError("pass class_weights, or datasets with an .info (class names "
                                  "and templates) such as load_dataset's")
        class_weights = text_classifier(loaded.model, loaded.tokenizer, info.classnames,
                                        info.templates).weights
    device = loaded.device
    weights = torch.as_tensor(np.asarray(class_weights), dtype=torch.float32).to(device)
    for ds in (train_dataset, val_dataset, test_dataset):
        labels = np.asarray(getattr(ds, "labels", []))
        if labels.size and (labels.min() < 0 or labels.max() >= len(weights)):
            raise AlignInputError(f"labels outside the {len(weights)} classes in {ds!r}")
    torch.manual_seed(seed)
    visual = copy.deepcopy(loaded.model.visual).float()
    for p in visual.parameters():
        p.requires_grad_(True)
    lr = preset.lr if lr is None else lr
    batch_size = preset.batch_size if batch_size is None else batch_size

    def logits_of(images: torch.Tensor) -> torch.Tensor:
        return visual(images.to(device)) @ weights.T

    def train_epoch(generator: torch.Generator):
        loader = DataLoader(train_dataset, batch_size=batch_size, shuffle=True,
                            generator=generator, num_workers=0)
        return ((images, labels.to(device)) for images, labels in loader)

    @torch.no_grad()
    def dataset_accuracy(ds: Dataset) -> float:
        visual.eval()
        pairs = [(logits_of(x).cpu(), y) for x, y in DataLoader(ds, batch_size=batch_size)]
        return accuracy(torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]))

    start = time.perf_counter()
    outcome = _train_loop(visual, logits_of, train_epoch, lambda: dataset_accuracy(val_dataset),
                          lr=lr, epochs=epochs, patience=patience, grad_clip=preset.grad_clip,
                          seed=seed, progress=progress, desc=preset.name)
    test_acc = dataset_accuracy(test_dataset) if test_dataset is not None else float("nan")
    params = {"lr": lr, "batch_size": batch_size, "epochs": epochs, "patience": patience,
              "grad_clip": preset.grad_clip, **loaded.weights.as_dict(),
              "n_train": len(train_dataset)}
    return FitResult(preset.name, params, sum(p.numel() for p in visual.parameters()),
                     outcome.best_val, test_acc, outcome.epochs_run, outcome.best_epoch,
                     time.perf_counter() - start, seed, None,
                     {k: v.detach().cpu().numpy() for k, v in visual.state_dict().items()},
                     outcome.history)


# ------------------------------------------------------------------------------ head selection


class _CorrStats:
    """Streaming sums for the centred correlation of each head with the output (float64)."""

    def __init__(self, n_heads: int, dim: int):
        self.n = 0
        self.sy = np.zeros((n_heads, dim))
        self.sz = np.zeros(dim)
        self.syz = np.zeros(n_heads)
        self.syy = np.zeros(n_heads)
        self.szz = 0.0

    def add(self, yh: torch.Tensor, z: torch.Tensor) -> None:
        """``yh [b, H, d]``, ``z [b, d]``."""
        self.n += len(z)
        self.sy += yh.sum(0).double().numpy()
        self.sz += z.sum(0).double().numpy()
        self.syz += torch.einsum("bhd,bd->h", yh, z).double().numpy()
        self.syy += yh.square().sum((0, 2)).double().numpy()
        self.szz += float(z.double().square().sum())

    def correlation(self) -> np.ndarray:
        my, mz = self.sy / self.n, self.sz / self.n
        cov = self.syz - self.n * my @ mz
        var_y = self.syy - self.n * (my * my).sum(1)
        var_z = self.szz - self.n * float(mz @ mz)
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = cov / np.sqrt(np.clip(var_y, 0, None) * max(var_z, 0.0))
        return np.nan_to_num(corr, nan=0.0)  # a constant head or output correlates with nothing


def _text_span(class_weights: np.ndarray) -> torch.Tensor:
    """``[r, E]`` orthonormal basis of the span of the class text embeddings (rows of W)."""
    _, s, vt = np.linalg.svd(np.asarray(class_weights, dtype=np.float64), full_matrices=False)
    rank = int((s > s.max() * max(class_weights.shape) * np.finfo(np.float32).eps).sum())
    return torch.as_tensor(vt[:rank], dtype=torch.float32)


def rank_heads(val_store: FeatureStore | str | Path, *,
               cache_bytes: int = DEFAULT_CACHE_BYTES) -> dict[str, np.ndarray]:
    """Per-head scores on a (validation) store, in head order (layer-major), one pass over it.

    Returns ``{"S", "U|T", "U"}`` -> ``[L·H]`` float64 scores (higher ranks first) and ``"mean"``
    -> ``[L·H, E]`` each head's mean contribution on the store:

    - ``S``: the head's own zero-shot accuracy, ``argmax(y_h @ W.T)`` against the labels.
    - ``U``: the correlation of the head's contribution with the output ``z = Σ_u y_u``, defined
      as the cosine similarity of the centred ``[N, E]`` matrices, i.e. Pearson's correlation
      of the flattened centred values::

          corr(h) = Σ_n ⟨y_hn − ȳ_h, z_n − z̄⟩ / sqrt(Σ_n ‖y_hn − ȳ_h‖² · Σ_n ‖z_n − z̄‖²)

      (means over the store's samples; one pass with float64 sums; 0 for a constant head).
    - ``U|T``: the same after projecting ``y_h`` and ``z`` onto the span of the class text
      embeddings (an orthonormal basis of the rows of ``W``): only the variation the classifier
      can see counts.
    """
    (store,) = _stores(val=val_store).values()
    heads = [u.index for u in store.units if u.kind == "head"]
    weights = torch.as_tensor(store.class_weights, dtype=torch.float32)
    span = _text_span(store.class_weights)
    feats = StoreFeatures(store, range(len(store.units)), cache_bytes=cache_bytes)
    correct = np.zeros(len(heads))
    full, text = _CorrStats(len(heads), store.dims.embed), _CorrStats(len(heads), len(span))
    with torch.no_grad():
        for y, labels in feats.batches(EVAL_BATCH):
            yh, z = y[:, heads], y.sum(1)
            correct += ((yh @ weights.T).argmax(-1) == labels[:, None]).sum(0).numpy()
            full.add(yh, z)
            text.add(yh @ span.T, z @ span.T)
    return {"S": correct / feats.n, "U|T": text.correlation(), "U": full.correlation(),
            "mean": full.sy / full.n}


def _n_kept(keep: int | float, n_heads: int) -> int:
    if isinstance(keep, (int, np.integer)):
        return min(int(keep), n_heads)
    return max(1, min(n_heads, int(math.floor(keep * n_heads + 0.5))))


def head_selection(val_store: FeatureStore | str | Path, test_store: FeatureStore | str | Path,
                   *, bases: SpectralBases | None = None,
                   rankings: Sequence[str] = HEAD_RANKINGS,
                   keep: Sequence[int | float] = HEAD_KEEP,
                   ablations: Sequence[str] = ("zero", "mean"), random_seeds: int = 10,
                   seed: int = 0, cache_bytes: int = DEFAULT_CACHE_BYTES) -> list[dict[str, Any]]:
    """The specialisation-performance experiment (METHOD §2): keep the top heads of a ranking,
    remove the rest, measure test accuracy.

    Heads are ranked on ``val_store`` by :func:`rank_heads` (ties by head order) or at random
    (``R``: ``random_seeds`` permutations, ``default_rng([seed, r])``). For each ranking and
    ``keep`` (an int: that many heads; a float: that fraction of all heads, rounded, at least 1)
    the other heads are removed by ``zero`` ablation (dropped) or ``mean`` ablation (replaced
    by their mean: the basis mean when ``bases`` are given, else their mean on ``val_store``);
    ``emb`` and MLPs are kept (``sum``). The test store is read once: logits are linear in the
    units, so every setting is scored from per-unit logits.

    Returns:
        One row per (ranking, random seed, keep, ablation): ``ranking``, ``seed`` (``R`` only,
        else None), ``keep`` (as given), ``n_heads``, ``fraction`` (kept / all heads),
        ``ablation``, ``test_acc``.
    """
    unknown = [r for r in rankings if r not in HEAD_RANKINGS]
    if unknown:
        raise AlignInputError(f"unknown rankings {unknown}; use {HEAD_RANKINGS}")
    bad = [a for a in ablations if a not in ("zero", "mean")]
    if bad:
        raise AlignInputError(f"head selection ablations are 'zero' and 'mean', got {bad}")
    stores = _stores(val=val_store, test=test_store)
    test = stores["test"]
    heads = [u.index for u in test.units if u.kind == "head"]
    n_heads = len(heads)
    scores = rank_heads(stores["val"], cache_bytes=cache_bytes)
    if bases is not None:
        bases.check_compatible(test)
        means = np.stack([bases.mean[bases.position(h)] for h in heads])
    else:
        means = scores["mean"]

    settings: list[tuple[str, int | None, int | float]] = []  # (ranking, seed, keep)
    masks = []
    for ranking in rankings:
        orders = ([(None, np.argsort(-scores[ranking], kind="stable"))] if ranking != "R" else
                  [(r, np.random.default_rng([seed, r]).permutation(n_heads))
                   for r in range(random_seeds)])
        for r_seed, order in orders:
            for k in keep:
                mask = np.zeros(n_heads, dtype=np.float32)
                mask[order[:_n_kept(k, n_heads)]] = 1
                settings.append((ranking, r_seed, k))
                masks.append(mask)
    mask_t = torch.as_tensor(np.stack(masks))  # [S, H]
    weights = torch.as_tensor(test.class_weights, dtype=torch.float32)
    mean_logits = torch.as_tensor(means, dtype=torch.float32) @ weights.T  # [H, C]
    removed_mean = (1 - mask_t) @ mean_logits  # [S, C], added by the mean ablation
    others = [u.index for u in test.units if u.kind != "head"]
    feats = StoreFeatures(test, others + heads, cache_bytes=cache_bytes)
    correct = {a: torch.zeros(len(settings), dtype=torch.long) for a in ablations}
    # rows per step so that the [b, S, C] logits stay near 64 MB
    step = max(1, (16 << 20) // (len(settings) * weights.shape[0]))
    with torch.no_grad():
        for y, labels in feats.batches(step):
            unit_logits = y @ weights.T  # [b, U, C]
            base = unit_logits[:, :len(others)].sum(1)  # [b, C]
            kept = torch.einsum("bhc,sh->bsc", unit_logits[:, len(others):], mask_t)
            for a in ablations:
                logits = base[:, None] + kept + (removed_mean if a == "mean" else 0)
                correct[a] += (logits.argmax(-1) == labels[:, None]).sum(0)
    rows = []
    for i, (ranking, r_seed, k) in enumerate(settings):
        n_kept = _n_kept(k, n_heads)
        for a in ablations:
            # keep as text: 1 (one head) and 1.0 (all heads) would both become 1.0 in Parquet
            rows.append({"ranking": ranking, "seed": r_seed, "keep": str(k), "n_heads": n_kept,
                         "fraction": n_kept / n_heads, "ablation": a,
                         "test_acc": float(correct[a][i]) / feats.n})
    return rows
