"""The align stage's engine: fit every requested method on a task's cached features and write the
results.

Outputs: the ``evaluations`` Parquet table (one row per method and seed), the ``head_selection``
table, and the learned weights (λ per unit for the ResiDual variants) in an ``align.zarr`` group
next to the task's feature stores (:mod:`residual_core.formats.align_weights`). Bases come from
a spectral store: by default the ImageNet train store of the same model when it exists (the
authors' choice), else the task's own train split; the choice is recorded in every row
(``basis_dataset``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import zarr

from residual_core.engines.spectral import run_spectral
from residual_core.errors import ResidualError
from residual_core.formats.align_weights import _save_weights, save_classifier
from residual_core.formats.feature_store import FeatureStore
from residual_core.formats.spectral_store import SpectralStore
from residual_core.identity import WeightsId, config_hash
from residual_core.layout import Layout, zarr_target
from residual_core.method.adapters import SpectralBases
from residual_core.method.batches import concrete_classifier, task_classifier
from residual_core.method.head_selection import head_selection, rank_heads
from residual_core.method.training import FitResult, finetune, fit
from residual_core.stages.align import Params as AlignParams
from residual_core.stages.align import Result
from residual_core.tables import matching_rows, write_rows

ALIGN_VERSION = 2
"""Bumped when the align stage writes other results: 2: one global shuffle per epoch, head
selection as the authors run it (heads-only kept sets, their keep counts, rankings, reference
rows, test-split means)."""


def load_bases(spectral_url: str) -> SpectralBases:
    """The bases (means, components, eigenvalues of every unit) of a spectral store."""
    spec = SpectralStore.open(spectral_url)
    return SpectralBases.from_pca(spec.results(), spec.units,
                                  f"{spec.attrs['dataset']}:{spec.attrs['split']}",
                                  WeightsId.from_attrs(spec.attrs).as_dict())


def default_basis_url(train_url: str) -> str:
    """The ImageNet-train spectral store of the same model if present, else the task's own."""
    where = Layout.parse_feature_store(train_url)
    if where is not None:
        candidate = Layout.spectral_store(
            where.layout.sibling_feature_store(where, "imagenet", "train"))
        try:
            SpectralStore.open(candidate)
            return candidate
        except ResidualError:
            pass
    return run_spectral(train_url, progress=False).url


def resolve_classifier(params: AlignParams, train_url: str) -> AlignParams:
    """``params`` with ``classifier="auto"`` made concrete for the task
    (:func:`~residual_core.method.batches.concrete_classifier`)."""
    if params.classifier != "auto":
        return params
    return params.model_copy(update={"classifier": concrete_classifier("auto", train_url)})


def align_key(train_url: str, val_url: str, test_url: str, basis_url: str,
              params: AlignParams) -> str:
    """The ``config_hash`` of an align run: its stores' and bases' content, its parameters and
    :data:`ALIGN_VERSION` (written into every row; equal keys mean equal results)."""
    params = resolve_classifier(params, train_url)
    return config_hash({
        "stores": [FeatureStore.open(u).attrs["config_hash"]
                   for u in (train_url, val_url, test_url)],
        "basis": SpectralStore.open(basis_url).attrs["config_hash"],
        "params": params.model_dump(mode="json"),
        "version": ALIGN_VERSION})


def classifier_name(params: AlignParams) -> str:
    """The classifier as the tables name it: ``text``, ``centroid`` (plain class means, the
    authors') or ``centroid-l2``."""
    if params.classifier == "text":
        return "text"
    return "centroid" if params.centroid_norm == "none" else f"centroid-{params.centroid_norm}"


def _fit_settings(method: str, params: AlignParams) -> dict:
    """The parameters that change one fit of ``method`` (zero-shot trains nothing)."""
    names = {"zero-shot": (), "finetune": ("finetune_epochs", "patience")}.get(
        method, ("epochs", "patience", "lambda_init"))
    settings = {k: getattr(params, k) for k in names}
    if method != "zero-shot":  # overrides only: a fit at the preset's values keeps its key
        settings.update({k: v for k in ("lr", "batch_size")
                         if (v := params.setting(k, method)) is not None})
    return settings


def _preset_identity(method: str) -> dict:
    """What the code's preset of ``method`` sets (lr, batch, clipping, init, ...): part of a
    fit's content hash, so a changed preset recomputes its fits (and replaces their rows)."""
    from dataclasses import asdict

    from residual_core.method.adapters import PRESETS

    return {k: v for k, v in asdict(PRESETS[method]).items() if k != "description"}


def _uses_bases(method: str) -> bool:
    from residual_core.method.adapters import PRESETS

    return PRESETS[method].needs_bases


@dataclass(frozen=True)
class AlignPlan:
    """The identities of the fits (and the head-selection rows) an align run asks for.

    ``fits``: per (method, seed), ``(key, hash)``: ``key`` names where its row is kept (the
    task's and the bases' *locations*, the method, its settings, the seed), so that a rerun of
    the same fit replaces its row and fits with other settings or seeds stay beside it;
    ``hash`` is its content identity (the stores' and the bases' config hashes too), written as
    the row's ``config_hash``: a row with the same hash is that fit's result. ``head_selection``
    is the same pair for the head-selection rows (its content identity holds no bases: its mean
    ablation uses the test split's own means, as the authors).
    """

    fits: dict[tuple[str, int], tuple[str, str]]
    head_selection: tuple[str, str]


def plan_align(train_url: str, val_url: str, test_url: str, basis_url: str,
               params: AlignParams) -> AlignPlan:
    """The :class:`AlignPlan` of an align run (reads only the stores' attributes)."""
    params = resolve_classifier(params, train_url)
    stores = [FeatureStore.open(u).attrs["config_hash"] for u in (train_url, val_url, test_url)]
    basis = SpectralStore.open(basis_url).attrs["config_hash"]
    task, where_bases = Layout.location(train_url), Layout.location(basis_url)
    fits = {}
    classifier = classifier_name(params)
    for method in params.methods:
        for seed in params.seeds:
            bases = _uses_bases(method)
            what = {"method": method, "seed": seed, "settings": _fit_settings(method, params),
                    "classifier": classifier}
            fits[method, seed] = (
                "fit-" + config_hash({**what, "task": task,
                                      "basis": where_bases if bases else None}),
                config_hash({**what, "stores": stores, "basis": basis if bases else None,
                             "preset": _preset_identity(method), "version": ALIGN_VERSION}))
    hs = {"random_seeds": params.random_seeds, "classifier": classifier}
    # val and test only (no bases) unless the prototypes come from train
    used = stores if params.classifier == "centroid" else stores[1:]
    head = ("head-selection-" + config_hash({**hs, "task": task, "basis": where_bases}),
            config_hash({**hs, "stores": used, "version": ALIGN_VERSION}))
    return AlignPlan(fits, head)


def run_align(train_url: str, val_url: str, test_url: str, params: AlignParams | None = None, *,
              basis_url: str | None = None, tables_root: str | None = None,
              data_root: str | None = None, progress: bool = True, force: bool = False
              ) -> Result:
    """Fit ``params.methods`` × ``params.seeds`` on the task and write tables and weights.

    Each fit is one row of ``evaluations`` (see :class:`AlignPlan`), written as soon as it is
    done: a fit whose row is already there with the same content identity is reused, not run
    again (a later grid reuses the fits of an earlier one; a killed run keeps its finished
    fits). ``force``: refit every fit of the plan (and redo the head selection), replacing
    their rows one by one as each is done (a killed forced run keeps the old rows of the fits
    it had not reached). ``data_root`` is where ``finetune`` reads the task's images again (it runs the
    backbone; default ``Layout.of().datasets``); the other methods read only the stores.
    """
    start = time.perf_counter()
    params = resolve_classifier(params or AlignParams(), train_url)
    train = FeatureStore.open(train_url)
    model, dataset = train.attrs["model"], train.attrs["dataset"]
    basis_url = basis_url or default_basis_url(train_url)
    plan = plan_align(train_url, val_url, test_url, basis_url, params)
    root = tables_root or Layout.of_store(train_url).root
    done = ({} if force else
            {r.get("config_hash"): r for r in matching_rows(root, "evaluations", model, dataset)})
    weights = Layout.align_weights(train_url)
    group = zarr.open_group(zarr_target(weights), mode="a")
    provenance = {"pretrained": train.attrs.get("pretrained")}
    sizes = {"n_train": train.dims.n, "n_val": FeatureStore.open(val_url).dims.n,
             "n_test": FeatureStore.open(test_url).dims.n,
             "n_classes": len(train.classnames),
             "checkpoint_sha256": train.attrs.get("checkpoint_sha256")}
    bases = None
    name = classifier_name(params)
    computed: list[np.ndarray] = []

    def classifier_of_task() -> np.ndarray:
        """The task's classifier, computed (and saved beside the λ) once, when a fit or the
        head selection first needs it."""
        if not computed:
            computed.append(task_classifier(train, params.classifier, params.centroid_norm))
            save_classifier(group, name, computed[0], train.attrs["config_hash"])
        return computed[0]

    rows = []
    for (method, seed), (key, fit_hash) in plan.fits.items():
        if fit_hash in done:
            rows.append(done[fit_hash])
            continue
        bases = bases or load_bases(basis_url)
        weights_of_task = classifier_of_task()
        result = _fit_one(method, seed, train_url, val_url, test_url, bases, params, data_root,
                          progress, weights_of_task)
        rows.append({**_row(result, train), **sizes, "classifier": name})
        _save_weights(group, result, fit_hash)
        write_rows(root, "evaluations", rows[-1:], key=key,
                   provenance={**provenance, "config_hash": fit_hash})
    hs_rows = []
    hs_key, hs_hash = plan.head_selection
    if params.head_selection:
        hs_rows = ([] if force else
                   matching_rows(root, "head_selection", model, dataset, config_hash=hs_hash))
        if not hs_rows or not matching_rows(root, "head_scores", model, dataset,
                                            config_hash=hs_hash):
            # mean ablation with the test split's means, as the authors
            weights_of_task = classifier_of_task()
            val = FeatureStore.open(val_url)
            scores = rank_heads(val, class_weights=weights_of_task)
            hs_rows = [{"model": model, "dataset": dataset, **r, "classifier": name}
                       for r in head_selection(val, test_url, random_seeds=params.random_seeds,
                                               class_weights=weights_of_task, scores=scores)]
            write_rows(root, "head_scores", _score_rows(val, scores, name), key=hs_key,
                       provenance={**provenance, "config_hash": hs_hash})
            write_rows(root, "head_selection", hs_rows, key=hs_key,
                       provenance={**provenance, "config_hash": hs_hash})
    return Result(rows=rows, weights_url=weights, basis_url=basis_url,
                       seconds=time.perf_counter() - start, head_selection_rows=hs_rows)


def _score_rows(val: FeatureStore, scores: dict, classifier: str) -> list[dict]:
    """``head_scores`` rows: one per head of the validation store, its scores as columns."""
    heads = [u for u in val.units if u.kind == "head"]
    return [{"model": val.attrs["model"], "dataset": val.attrs["dataset"],
             "split": val.attrs.get("split"), "feature_config_hash": val.attrs["config_hash"],
             "unit": u.name, "unit_index": u.index, "kind": u.kind, "layer": u.layer,
             "head": u.head, **{k: float(v[i]) for k, v in scores.items()},
             "statistic": "pearson", "classifier": classifier}
            for i, u in enumerate(heads)]


def _fit_one(method, seed, train_url, val_url, test_url, bases, params, data_root,
             progress, class_weights) -> FitResult:
    if method == "finetune":
        return _finetune(train_url, val_url, test_url, seed, params, data_root, progress,
                         class_weights)
    return fit(method, train_url, val_url, test_url, bases, seed=seed, epochs=params.epochs,
               patience=params.patience, lambda_init=params.lambda_init,
               lr=params.setting("lr", method),
               batch_size=params.setting("batch_size", method),
               class_weights=class_weights, progress=progress)


def _finetune(train_url, val_url, test_url, seed, params, data_root, progress,
              class_weights) -> FitResult:
    """Full fine-tuning runs the backbone online: reload the model and the datasets."""
    from residual_core.datasets import load_dataset
    from residual_core.method.models import load_model

    train = FeatureStore.open(train_url)
    attrs = train.attrs
    loaded = load_model(attrs["model"], attrs["pretrained"], device="cpu")
    if loaded.checkpoint_sha256 != attrs.get("checkpoint_sha256"):
        raise ResidualError(f"the checkpoint {attrs['pretrained']} changed since extraction")
    skip = bool(attrs["config"].get("skip_bad_images", False))  # the split the store holds
    data = {s: load_dataset(attrs["dataset"], FeatureStore.open(u).attrs["split"],
                            data_root=data_root, transform=loaded.preprocess,
                            skip_bad_images=skip)
            for s, u in (("train", train_url), ("val", val_url), ("test", test_url))}
    return finetune(loaded, data["train"], data["val"], data["test"],
                    class_weights=class_weights, seed=seed, epochs=params.finetune_epochs,
                    patience=params.patience, lr=params.setting("lr", "finetune"),
                    batch_size=params.setting("batch_size", "finetune"), progress=progress)


def _row(result: FitResult, train: FeatureStore) -> dict:
    p = result.params
    settings = {k: p.get(k) for k in ("lr", "batch_size", "epochs", "patience", "grad_clip",
                                      "ablation", "lambda_init", "init", "add_mean", "adapt")}
    return {
        "model": train.attrs["model"], "dataset": train.attrs["dataset"],
        "method": result.method, "preset_params": json.dumps(settings, default=str),
        "trainable_parameters": int(result.trainable_parameters),
        "val_acc": float(result.val_acc), "test_acc": float(result.test_acc),
        "epochs": int(result.epochs_run), "best_epoch": int(result.best_epoch),
        "fit_seconds": float(result.fit_seconds), "seed": int(result.seed),
        "basis_dataset": result.basis_dataset,
    }
