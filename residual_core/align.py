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
from fractions import Fraction
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
    "CORRELATION_STATISTICS",
    "DEFAULT_CACHE_BYTES",
    "HEAD_KEEP",
    "HEAD_RANKINGS",
    "HEAD_SCORES",
    "FitResult",
    "StoreFeatures",
    "evaluate",
    "finetune",
    "fit",
    "head_selection",
    "n_kept",
    "rank_heads",
    "zero_shot",
]

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
        "grad_clip": preset.grad_clip, "lambda_init": lambda_init, "init": preset.init,
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


CORRELATION_STATISTICS = ("pearson", "pooled")
"""How :func:`rank_heads` turns the projected head and target values into one score:
``pearson`` (the authors'), ``pooled`` (one correlation over all directions, an option)."""


class _ProjectedCorr:
    """Streaming float64 sums for the correlation of each head with a target, both projected on
    an orthonormal basis ``[K, E]`` (rows): per head and direction, and pooled."""

    def __init__(self, n_heads: int, basis: torch.Tensor):
        self.basis = basis
        k = len(basis)
        self.n = 0
        self.su, self.suu, self.suo = (np.zeros((n_heads, k)) for _ in range(3))
        self.so, self.soo = np.zeros(k), np.zeros(k)

    def add(self, yh: torch.Tensor, target: torch.Tensor) -> None:
        """``yh [b, H, E]``, ``target [b, E]``."""
        u = (yh @ self.basis.T).double()  # [b, H, K]
        o = (target @ self.basis.T).double()  # [b, K]
        self.n += len(o)
        self.su += u.sum(0).numpy()
        self.suu += u.square().sum(0).numpy()
        self.suo += torch.einsum("bhk,bk->hk", u, o).numpy()
        self.so += o.sum(0).numpy()
        self.soo += o.square().sum(0).numpy()

    def correlation(self, statistic: str) -> np.ndarray:
        mu, mo = self.su / self.n, self.so / self.n
        cov = self.suo - self.n * mu * mo  # [H, K], sums of centred products
        var_u = np.clip(self.suu - self.n * mu * mu, 0, None)
        var_o = np.clip(self.soo - self.n * mo * mo, 0, None)
        with np.errstate(invalid="ignore", divide="ignore"):
            if statistic == "pooled":
                corr = cov.sum(1) / np.sqrt(var_u.sum(1) * var_o.sum())
            else:  # per direction, then the mean over the K directions
                corr = (np.nan_to_num(cov / np.sqrt(var_u * var_o), nan=0.0, posinf=0.0,
                                      neginf=0.0)).mean(1)
        return np.nan_to_num(corr, nan=0.0)  # a constant head or target correlates with nothing


def _qr_basis(vectors: np.ndarray) -> torch.Tensor:
    """``[min(E, M), E]``: ``torch.linalg.qr(vectors.T).Q.T`` for ``vectors [M, E]`` (the
    authors' property basis: Gram-Schmidt of the vectors in their order)."""
    q = np.linalg.qr(np.asarray(vectors, dtype=np.float64).T, mode="reduced")[0]
    return torch.as_tensor(q.T, dtype=torch.float32)


HEAD_SCORES = ("S", "U|T", "U", "U-out")
"""The scores :func:`rank_heads` computes (``R`` is random and needs none)."""


def rank_heads(val_store: FeatureStore | str | Path, *, scores: Sequence[str] = HEAD_SCORES,
               statistic: str = "pearson", cache_bytes: int = DEFAULT_CACHE_BYTES
               ) -> dict[str, np.ndarray]:
    """Per-head scores on a (validation) store, as the authors' experiment 3 scores them.

    Returns ``{score: [L·H] float64}`` in head order (layer-major), higher ranks first:

    - ``S``: the head's own zero-shot accuracy, ``argmax(y_h @ W.T)`` against the labels.
    - ``U``, ``U|T``, ``U-out``: the authors' ``score_unit_correlation`` of the heads
      ``y_h [N, H, E]``: the target is the *sum of the heads* ``s = Σ_h y_h``; both are
      projected on an orthonormal property basis ``B = qr(P.T).Q.T`` and, per head,
      Pearson's correlation over the samples of ``y_h·b_k`` with ``s·b_k`` is averaged over the
      basis directions ``k``. The property ``P`` is: none for ``U`` (``B`` = the identity), the
      class text embeddings (the rows of ``W``) for ``U|T``, and the full outputs
      ``z_n = Σ_u y_un`` of the store for ``U-out``. As the authors compute it, the full
      output enters ``U-out`` only through its basis (Gram-Schmidt of the first outputs in
      store order, all ``E`` directions when ``N ≥ E``); the target is still ``s``.

    Where we deliberately differ: their correlation divides a ``1/N`` covariance by
    ``1/(N−1)`` standard deviations, i.e. it is ``(N−1)/N`` times Pearson's; we return
    Pearson's (a constant factor: every ranking is the same). A direction along which a head
    or the target is constant contributes 0 (theirs would be NaN). ``statistic="pooled"`` is
    an option, not the authors': one correlation of the centred projected values over all
    directions together, ``Σ_k cov_k / sqrt(Σ_k var(y_h·b_k) · Σ_k var(s·b_k))`` (the
    statistic this project used before; rotation-invariant, so ``U`` and ``U-out`` agree).
    Float64 sums, one pass over the store (two with ``U-out``: its basis needs the outputs).
    """
    unknown = [s for s in scores if s not in HEAD_SCORES]
    if unknown:
        raise AlignInputError(f"unknown head scores {unknown}; use {HEAD_SCORES}")
    if statistic not in CORRELATION_STATISTICS:
        raise AlignInputError(f"unknown correlation statistic {statistic!r}; use "
                              f"{CORRELATION_STATISTICS}")
    (store,) = _stores(val=val_store).values()
    heads = [u.index for u in store.units if u.kind == "head"]
    weights = torch.as_tensor(store.class_weights, dtype=torch.float32)
    feats = StoreFeatures(store, range(len(store.units)), cache_bytes=cache_bytes)
    batch = 256  # rows per step: [b, H, E] projections stay small
    bases = {"U": torch.eye(store.dims.embed), "U|T": _qr_basis(store.class_weights)}
    if "U-out" in scores:
        with torch.no_grad():
            outputs = torch.cat([y.sum(1) for y, _ in feats.batches(EVAL_BATCH)])
        bases["U-out"] = _qr_basis(outputs.numpy())
    stats = {s: _ProjectedCorr(len(heads), bases[s]) for s in scores if s != "S"}
    correct = np.zeros(len(heads))
    with torch.no_grad():
        for y, labels in feats.batches(batch):
            yh = y[:, heads]
            if "S" in scores:
                correct += ((yh @ weights.T).argmax(-1) == labels[:, None]).sum(0).numpy()
            target = yh.sum(1)
            for acc in stats.values():
                acc.add(yh, target)
    out = {s: acc.correlation(statistic) for s, acc in stats.items()}
    if "S" in scores:
        out["S"] = correct / feats.n
    return {s: out[s] for s in scores}


HEAD_RANKINGS = ("S", "U|T", "U", "U-out", "R")
"""Head rankings (METHOD §2, the authors' experiment 3): own zero-shot accuracy, correlation in
the class-text basis, correlation, correlation in the full-output basis, random."""

HEAD_KEEP: tuple[int | str, ...] = ("1", "1%", "5%", "10%", "25%", "50%", "75%")
"""How many heads a ranking keeps (the authors' ``greedy_topks``); see :func:`n_kept`."""


def n_kept(keep: int | str, n_heads: int) -> int:
    """Heads kept by a keep rule, as the authors count them (``H`` = all heads):
    an int or a digit string is that count (at most ``H``); ``"p%"`` is ``max(1, ⌊p·H/100⌋)``,
    except ``"1%"``, which is ``max(2, ⌊H/100⌋)`` (the authors' rule: 1% of 144 heads is 2)."""
    text = str(keep).strip()
    if isinstance(keep, (int, np.integer)) and not isinstance(keep, bool) or text.isdigit():
        count = int(text)
        if count < 1:
            raise AlignInputError(f"keep {keep!r}: keep at least one head")
        return min(count, n_heads)
    if text.endswith("%"):
        try:
            p = Fraction(text[:-1])
        except (ValueError, ZeroDivisionError):
            p = None
        if p is not None and 0 < p <= 100:
            return min(n_heads, max(2 if p == 1 else 1, math.floor(p * n_heads / 100)))
    raise AlignInputError(f"keep {keep!r}: use a head count (e.g. 1) or a percentage of all "
                          "heads (e.g. '5%')")


def _reference_masks(units) -> list[tuple[str, np.ndarray, tuple[str, ...]]]:
    """The authors' reference ablations: ``(name, kept-unit mask, ablations)``."""
    kind = np.array([u.kind for u in units])
    layer = np.array([u.layer if u.layer is not None else -1 for u in units])
    is_head = kind == "head"
    refs = [("heads", is_head, ("zero", "mean")), ("layers", ~is_head, ("zero", "mean")),
            ("all", np.ones(len(units), dtype=bool), ("none",))]
    for l in range(int(layer[is_head].max()) + 1 if is_head.any() else 0):
        refs.append((f"layer{l}", is_head & (layer == l), ("zero", "mean")))
        refs.append((f"upto_layer{l}", is_head & (layer <= l), ("zero", "mean")))
    return refs


def head_selection(val_store: FeatureStore | str | Path, test_store: FeatureStore | str | Path,
                   *, bases: SpectralBases | None = None,
                   rankings: Sequence[str] = HEAD_RANKINGS,
                   keep: Sequence[int | str] = HEAD_KEEP,
                   ablations: Sequence[str] = ("zero", "mean"), references: bool = True,
                   statistic: str = "pearson", random_seeds: int = 10, seed: int = 0,
                   cache_bytes: int = DEFAULT_CACHE_BYTES) -> list[dict[str, Any]]:
    """The specialisation-performance experiment (METHOD §2) as the authors run it
    (``experiments/experiment3.py``): keep the top heads of a ranking, ablate every other unit,
    measure test accuracy.

    Heads are scored on ``val_store`` by :func:`rank_heads` (``S``, ``U|T``, ``U``, ``U-out``)
    or at random (``R``: ``random_seeds`` draws, scores ``torch.randn(H)`` from a generator
    seeded ``seed + r``, so ``seed=0`` gives the authors' seeds 0..9), and the top
    :func:`n_kept` heads kept (ties by head order). A kept set holds heads only: ``emb`` and
    every MLP are ablated too, as the authors' ``Residual.ablate(keep_units=topk_units)`` does.
    ``zero`` ablation drops the other units; ``mean`` ablation replaces each by its mean over
    the ablated (test) split, as the authors (``bases`` given: the bases' means instead, a
    deliberate option). With ``references`` also the authors' reference rows: ``heads`` (all
    heads), ``layers`` (``emb`` + MLPs), ``all`` (every unit, nothing ablated: ablation
    ``none``, the zero-shot model), and per layer ``l`` ``layer{l}`` (its heads) and
    ``upto_layer{l}`` (the heads of layers ``0..l``). Logits are linear in the units, so every
    setting is scored from per-unit logits of one read of the test store (two with ``mean``:
    the means first).

    Returns:
        One row per setting and ablation: ``ranking`` (a ranking or a reference name),
        ``seed`` (``R`` only, else None), ``keep`` (the rule as text, e.g. ``"1%"``; None for
        references), ``n_heads`` (heads kept), ``fraction`` (kept / all heads), ``ablation``,
        ``mean_source`` (mean ablation: where the means come from, e.g. ``test`` or
        ``bases:imagenet:train``; else None), ``statistic``, ``test_acc``.
    """
    unknown = [r for r in rankings if r not in HEAD_RANKINGS]
    if unknown:
        raise AlignInputError(f"unknown rankings {unknown}; use {HEAD_RANKINGS}")
    bad = [a for a in ablations if a not in ("zero", "mean")]
    if bad:
        raise AlignInputError(f"head selection ablations are 'zero' and 'mean', got {bad}")
    if random_seeds < 1 and "R" in rankings:
        raise AlignInputError(f"random_seeds must be at least 1, got {random_seeds}")
    stores = _stores(val=val_store, test=test_store)
    test = stores["test"]
    units = test.units
    heads = np.array([u.index for u in units if u.kind == "head"])
    n_heads = len(heads)
    counts = [(str(k), n_kept(k, n_heads)) for k in keep]  # refuse a bad rule before any work
    scores = rank_heads(stores["val"], scores=[r for r in rankings if r != "R"],
                        statistic=statistic, cache_bytes=cache_bytes)

    # settings: (ranking, seed, keep, kept-unit mask over all units, ablations)
    settings: list[tuple[str, int | None, str | None, np.ndarray, tuple[str, ...]]] = []
    for ranking in rankings:
        orders = ([(None, np.argsort(-scores[ranking], kind="stable"))] if ranking != "R" else
                  [(r, np.argsort(-torch.randn(n_heads, generator=torch.Generator()
                                               .manual_seed(seed + r)).numpy(), kind="stable"))
                   for r in range(random_seeds)])
        for r_seed, order in orders:
            for label, count in counts:
                mask = np.zeros(len(units), dtype=bool)
                mask[heads[order[:count]]] = True
                settings.append((ranking, r_seed, label, mask, tuple(ablations)))
    if references:
        settings += [(name, None, None, mask, tuple(a for a in abl if a in ablations or
                                                    a == "none"))
                     for name, mask, abl in _reference_masks(units)]

    weights = torch.as_tensor(test.class_weights, dtype=torch.float32)
    feats = StoreFeatures(test, range(len(units)), cache_bytes=cache_bytes)
    mean_source = None
    if "mean" in ablations:
        if bases is not None:
            bases.check_compatible(test)
            means = torch.as_tensor(np.stack([bases.mean[bases.position(u.index)]
                                              for u in units]), dtype=torch.float32)
            mean_source = f"bases:{bases.basis_dataset}"
        else:  # the authors: the means of the split being ablated
            with torch.no_grad():
                means = sum(y.double().sum(0) for y, _ in feats.batches(EVAL_BATCH))
            means = (means / feats.n).float()
            mean_source = str(test.attrs.get("split", "test"))
        mean_logits = means @ weights.T  # [U, C]
    mask_t = torch.as_tensor(np.stack([s[3] for s in settings]), dtype=torch.float32)  # [S, U]
    removed_mean = (1 - mask_t) @ mean_logits if "mean" in ablations else None  # [S, C]
    correct = {a: torch.zeros(len(settings), dtype=torch.long) for a in ("zero", "mean")}
    # rows per step so that the [b, S, C] logits stay near 64 MB
    step = max(1, (16 << 20) // (len(settings) * weights.shape[0]))
    with torch.no_grad():
        for y, labels in feats.batches(step):
            kept = torch.einsum("buc,su->bsc", y @ weights.T, mask_t)  # [b, S, C]
            for a in {"zero", *ablations}:  # zero scores the "all" reference (none) too
                logits = kept + removed_mean if a == "mean" else kept
                correct[a] += (logits.argmax(-1) == labels[:, None]).sum(0)
    rows = []
    for i, (ranking, r_seed, label, mask, abl) in enumerate(settings):
        kept_heads = int(mask[heads].sum())
        for a in abl:
            hits = correct["zero" if a == "none" else a][i]  # none: nothing to ablate
            rows.append({"ranking": ranking, "seed": r_seed, "keep": label,
                         "n_heads": kept_heads, "fraction": kept_heads / n_heads,
                         "ablation": a, "mean_source": mean_source if a == "mean" else None,
                         "statistic": statistic, "test_acc": float(hits) / feats.n})
    return rows
