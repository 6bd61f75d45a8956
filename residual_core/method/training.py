"""Training adapters on cached unit contributions (METHOD §3), the baselines, and fine-tuning.

Training (:func:`fit`) follows the authors' settings: cross-entropy on the frozen classifier's
logits, schedule-free AdamW (``schedulefree.AdamWScheduleFree``, switched with
``optimizer.train()`` / ``optimizer.eval()`` around training and evaluation), the method's
learning rate and batch size (:data:`residual_core.method.adapters.PRESETS`), up to 30 epochs, early
stopping on validation accuracy with patience 5, and the best-validation weights evaluated on
test. There is no augmentation, so training on cached features is exactly training on the frozen
backbone's outputs (:mod:`residual_core.method.batches` feeds them).

Reproducibility: everything random is drawn from generators seeded by ``seed`` (the ``randn``
λ init, the shuffling), so on the CPU the same seed gives the same weights and accuracies.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import schedulefree
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from residual_core.formats.feature_store import FeatureStore
from residual_core.method.adapters import (
    AlignInputError,
    KRule,
    Preset,
    SpectralBases,
    UnitAdapter,
    build_adapter,
    get_preset,
)
from residual_core.method.batches import DEFAULT_CACHE_BYTES, EVAL_BATCH, StoreFeatures, _stores
from residual_core.method.models import LoadedModel
from residual_core.method.towers import image_encoder
from residual_core.method.zeroshot import accuracy, text_classifier

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
        class_weights: np.ndarray | None = None,
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
        class_weights: the frozen ``[C, E]`` classifier (default: the train store's text
            classifier; :func:`.batches.task_classifier` makes class prototypes).
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
    weights = train.class_weights if class_weights is None else class_weights
    module = build_adapter(preset, train.units, weights, bases,
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


def zero_shot(store: FeatureStore | str | Path, *, class_weights: np.ndarray | None = None,
              cache_bytes: int = DEFAULT_CACHE_BYTES) -> float:
    """Zero-shot accuracy of a store: ``argmax((Σ_u y_u) @ class_weights.T)`` against labels
    (``class_weights``: default the store's text classifier)."""
    (store,) = _stores(store=store).values()
    weights = store.class_weights if class_weights is None else class_weights
    module = build_adapter("zero-shot", store.units, weights)
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
    visual = copy.deepcopy(image_encoder(loaded.model)).float()
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
