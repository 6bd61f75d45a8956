"""Prefect tasks of the pipeline stages, and :class:`Runner`, which runs them incrementally.

Each stage is one task around one residual_core function. Tasks exchange store paths (strings)
and small summaries, never arrays; the stores and the Parquet tables are the data.

===========  ========================================  ==========================================
stage        residual_core call                        output
===========  ========================================  ==========================================
pretrain     ``pretrain.pretrain_embedded``            checkpoint file (``pretrained: world``)
extract      ``extract.extract``                       feature store of one split
spectral     ``spectral_store.run_spectral``           spectral store + ``spectra``,
                                                       ``unit_stats`` rows
align        ``align_stage.run_align``                 ``evaluations`` and ``head_selection``
                                                       rows, ``align.zarr`` (λ)
similarity   ``spectral_store.similarity``             ``basis_similarity`` rows
===========  ========================================  ==========================================

Incremental reruns. A stage's cache key (:func:`stage_key`) hashes its name, its version in
:data:`STAGE_VERSIONS` (bump it when the stage's code changes what it writes) and the formats
of residual_core it reads or writes, the *content identity* of its inputs (the upstream store's
``config_hash`` attribute, a fingerprint of an ``imagefolder:`` dataset, a checkpoint's sha256),
the stage parameters that change its output, and where the output goes. Task results are
persisted (``persist_result=True``) under ``<store root>/prefect-results``, so a task whose key
has a record there is not run again (state ``Cached``) in any process that sees that folder.

The key cannot contain the output's existence (that changes during the run: the next run would
miss), so :meth:`Runner.run` checks the output before calling a task (exists, complete, made
from these inputs) and refreshes the cache (``refresh_cache=True``) when it is not there.
``force`` refreshes the named stages and every stage downstream of them (:data:`DEPENDS_ON`);
a forced stage also discards its existing output, so it really recomputes.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

from prefect import task
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from residual_core.align_stage import ALIGN_VERSION, align_key, run_align
from residual_core.errors import ResidualError, StoreError
from residual_core.extract import extract
from residual_core.identity import config_hash, parse_dataset, parse_weights
from residual_core.layout import Layout, is_local, local_path
from residual_core.models import LoadedModel, default_device, load_model
from residual_core.pretrain import checkpoint_path, pretrain_embedded
from residual_core.spectral_store import SPECTRAL_VERSION, SpectralStore, run_spectral, similarity
from residual_core.store import DECOMPOSITION_VERSION, SCHEMA_VERSION, FeatureStore
from residual_core.tables import read_table

from .grid import (WORLD_WEIGHTS, AlignSettings, ExtractSettings, ModelSpec, PretrainSettings,
                   SpectralSettings, Stage)

__all__ = ["DEPENDS_ON", "STAGE_VERSIONS", "RunOptions", "Runner", "forced_stages", "stage_key"]

STAGE_VERSIONS: dict[str, int] = {"pretrain": 1, "extract": 1, "spectral": 1, "align": 1,
                                  "similarity": 1}
"""Bump a stage's version when its code changes what it writes: its cached results are then
ignored (and those of the stages that read its output, through their input identities)."""

DEPENDS_ON: dict[str, tuple[str, ...]] = {
    "pretrain": (),
    "extract": ("pretrain",),
    "spectral": ("extract",),
    "align": ("extract", "spectral"),
    "similarity": ("spectral",),
}
"""The stages each stage reads the output of (for ``force``)."""


def forced_stages(force: Iterable[str]) -> frozenset[str]:
    """The stages in ``force`` and every stage that depends on them, directly or not."""
    forced = set(force)
    while True:
        more = {s for s, deps in DEPENDS_ON.items() if forced.intersection(deps)} - forced
        if not more:
            return frozenset(forced)
        forced |= more


def _interactive() -> bool:
    """Progress bars only on a terminal: a worker's or a test's captured output gets log lines."""
    return sys.stderr.isatty()


def _log() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:  # a stage body called outside a task run
        return logging.getLogger("residual.pipelines")


def _dump(value: Any) -> Any:
    """JSON-able form of a parameter (pydantic models as their fields)."""
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


# ------------------------------------------------------------------------------ identities


def _store_hash(url: str) -> str:
    """Content identity of a feature store: its config hash (the store must be complete)."""
    return FeatureStore.open(url).attrs["config_hash"]


def _spectral_hash(url: str) -> str:
    """Content identity of a spectral store (its feature store's, its parameters, its version)."""
    return SpectralStore.open(url).attrs["config_hash"]


def _weights_identity(model: str, pretrained: str | None) -> dict:
    return parse_weights(model, pretrained).as_dict()


def _feature_url(model: str, pretrained: str | None, dataset: str, split: str,
                 store_root: str) -> str:
    return Layout.of(store_root).feature_store(parse_weights(model, pretrained), dataset, split)


def _matching_rows(root: str, table: str, model: str, dataset: str,
                   **values: Any) -> list[dict[str, Any]]:
    """Rows of ``table`` of ``model`` on ``dataset`` with these column values (none when the
    table or one of the columns does not exist yet)."""
    try:
        return read_table(root, table, model=model, dataset=dataset, filters=values).to_pylist()
    except ResidualError:
        return []


def _checkpoint_path(settings: PretrainSettings, out_dir: str) -> Path:
    """Where :func:`pretrain_embedded` writes the checkpoint of these settings."""
    return checkpoint_path(out_dir, seed=settings.seed, steps=settings.steps,
                           batch_size=settings.batch_size)


def _remove_store(url: str) -> None:
    """Delete a store (``force``): the stage then recomputes it from scratch."""
    if is_local(url):
        shutil.rmtree(local_path(url), ignore_errors=True)
        return
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


# ------------------------------------------------------------------------------ stages
# Each stage: identity(**inputs) -> JSON-able dict (hashed into the cache key),
# output_ok(**inputs) -> bool (its output is there and made from these inputs), and the body.


def _pretrain_identity(settings: PretrainSettings, out_dir: str, **_) -> dict:
    return {"checkpoint": str(_checkpoint_path(settings, out_dir))}  # name hashes the config


def _pretrain_ok(settings: PretrainSettings, out_dir: str, **_) -> bool:
    return _checkpoint_path(settings, out_dir).is_file()


def pretrain_stage(settings: PretrainSettings, out_dir: str, force: bool = False) -> str:
    """Pretrain the embedded model on the synthetic world; returns the checkpoint path."""
    if force:
        _checkpoint_path(settings, out_dir).unlink(missing_ok=True)
    path = pretrain_embedded(out_dir, seed=settings.seed, steps=settings.steps,
                             batch_size=settings.batch_size, progress=_interactive())
    _log().info("checkpoint %s", path)
    return str(path)


def _extract_identity(model: str, pretrained: str | None, dataset: str, split: str,
                      settings: ExtractSettings, store_root: str, **_) -> dict:
    layout, ref = Layout.of(store_root), parse_dataset(dataset)
    return {"store": _feature_url(model, pretrained, dataset, split, store_root),
            "weights": _weights_identity(model, pretrained), "dataset": dataset,
            "dataset_content": ref.content_identity(cache=layout.manifest(ref)),
            "feature_dtype": settings.feature_dtype, "rows_per_chunk": settings.rows_per_chunk,
            "formats": [DECOMPOSITION_VERSION, SCHEMA_VERSION]}


def _extract_ok(model: str, pretrained: str | None, dataset: str, split: str, store_root: str,
                **_) -> bool:
    try:
        FeatureStore.open(_feature_url(model, pretrained, dataset, split, store_root))
        return True
    except StoreError:
        return False


@lru_cache(maxsize=1)
def _loaded(model: str, pretrained: str | None, device: str, weights: object) -> LoadedModel:
    """The last model loaded by this process (``weights``: its identity, so that a rewritten
    checkpoint file is loaded again): the splits of a cell, and the cells of one model in a
    process, load it once."""
    return load_model(model, pretrained, device=device)


def extract_stage(model: str, pretrained: str | None, dataset: str, split: str,
                  settings: ExtractSettings, store_root: str, data_root: str | None = None,
                  force: bool = False) -> str:
    """Write (or resume) the feature store of one split; returns its path."""
    if force:
        _remove_store(_feature_url(model, pretrained, dataset, split, store_root))
    loaded = _loaded(model, pretrained, settings.device or default_device(),
                     parse_weights(model, pretrained))
    result = extract(model, pretrained, dataset, split, data_root=data_root,
                     store_root=store_root, loaded=loaded, batch_size=settings.batch_size,
                     num_workers=settings.num_workers, device=settings.device,
                     feature_dtype=settings.feature_dtype, rows_per_chunk=settings.rows_per_chunk,
                     progress=_interactive())
    _log().info("%s: computed %d of %d row chunks (%d images) in %.1f s", result.url,
                result.computed_chunks, result.total_chunks, result.rows_computed, result.seconds)
    return result.url


def _spectral_identity(feature_url: str, settings: SpectralSettings, tables_root: str,
                       **_) -> dict:
    return {"features": _store_hash(feature_url), "feature_url": feature_url,
            "params": _dump(settings), "format": SPECTRAL_VERSION, "tables_root": tables_root}


def _spectral_ok(feature_url: str, settings: SpectralSettings, tables_root: str, **_) -> bool:
    """The spectral store is complete, made from this feature store with these parameters, and
    its table rows exist."""
    try:
        attrs = SpectralStore.open(Layout.spectral_store(feature_url)).attrs
        features = _store_hash(feature_url)
    except StoreError:
        return False
    return (attrs.get("feature_config_hash") == features and attrs.get("params") == _dump(settings)
            and bool(_matching_rows(tables_root, "unit_stats", attrs["model"],
                                    attrs["dataset"], config_hash=attrs["config_hash"])))


def spectral_stage(feature_url: str, settings: SpectralSettings, tables_root: str,
                   address: str | None = None, n_workers: int | None = None,
                   memory_limit: str | None = None, force: bool = False) -> str:
    """Per-unit PCA of a feature store (on a dask cluster when given); returns the spectral
    store's path."""
    # run_spectral skips an up-to-date store without looking at the tables: rewrite them too
    # when they were deleted
    redo = force or not _spectral_ok(feature_url, settings, tables_root)
    result = run_spectral(feature_url, settings.params(), address=address, n_workers=n_workers,
                          memory_limit=memory_limit, tables_root=tables_root, force=redo,
                          progress=_interactive())
    _log().info("%s: %s in %.1f s", result.url, "computed" if result.computed else "up to date",
                result.seconds)
    return result.url


def _align_identity(stores: dict[str, str], spectral_url: str, settings: AlignSettings,
                    tables_root: str, **_) -> dict:
    return {"stores": {split: _store_hash(url) for split, url in sorted(stores.items())},
            "bases": _spectral_hash(spectral_url), "params": _dump(settings),
            "format": ALIGN_VERSION, "tables_root": tables_root}


def _align_ok(stores: dict[str, str], spectral_url: str, settings: AlignSettings,
              tables_root: str, **_) -> bool:
    """The task's ``evaluations`` rows are those of these inputs (run_align replaces a task's
    rows on every run, so rows of other parameters mean it must run again) and cover every
    requested (method, seed); its ``head_selection`` rows exist when asked for."""
    try:
        attrs = FeatureStore.open(stores["train"]).attrs
        key = align_key(stores["train"], stores["val"], stores["test"], spectral_url,
                        settings.params())
    except StoreError:
        return False
    model, dataset = attrs["model"], attrs["dataset"]
    done = {(r["method"], r["seed"])
            for r in _matching_rows(tables_root, "evaluations", model, dataset, config_hash=key)}
    return ({(m, s) for m in settings.methods for s in settings.seeds} <= done
            and (not settings.head_selection
                 or bool(_matching_rows(tables_root, "head_selection", model, dataset,
                                        config_hash=key))))


def align_stage(stores: dict[str, str], spectral_url: str, settings: AlignSettings,
                tables_root: str, data_root: str | None = None, force: bool = False
                ) -> list[dict[str, Any]]:
    """Fit every method × seed on a task's stores with the bases of ``spectral_url``; writes
    the ``evaluations`` (and ``head_selection``) rows and returns the evaluations."""
    result = run_align(stores["train"], stores["val"], stores["test"], settings.params(),
                       basis_url=spectral_url, tables_root=tables_root, data_root=data_root,
                       progress=_interactive())
    for row in result.rows:
        _log().info("%s seed %d: val %.4f, test %.4f (%d parameters)", row["method"],
                    row["seed"], row["val_acc"], row["test_acc"], row["trainable_parameters"])
    return result.rows


def _similarity_identity(spectral_url: str, basis_url: str, evr_threshold: float,
                         tables_root: str, **_) -> dict:
    return {"a": _spectral_hash(spectral_url), "b": _spectral_hash(basis_url),
            "evr": evr_threshold, "tables_root": tables_root}


def _similarity_ok(spectral_url: str, basis_url: str, evr_threshold: float, tables_root: str,
                   **_) -> bool:
    try:
        a, b = SpectralStore.open(spectral_url).attrs, SpectralStore.open(basis_url).attrs
    except StoreError:
        return False
    return bool(_matching_rows(tables_root, "basis_similarity", a["model"], a["dataset"],
                               other_dataset=b["dataset"], evr_threshold=evr_threshold))


def similarity_stage(spectral_url: str, basis_url: str, evr_threshold: float, tables_root: str,
                     force: bool = False) -> int:
    """Basis similarity of every unit between a dataset's bases and the basis dataset's;
    writes ``basis_similarity`` rows, returns their number."""
    return len(similarity(spectral_url, basis_url, evr_threshold, tables_root=tables_root))


@dataclass(frozen=True)
class _StageSpec:
    identity: Callable[..., dict]
    output_ok: Callable[..., bool]
    body: Callable[..., Any]


_STAGES: dict[str, _StageSpec] = {
    "pretrain": _StageSpec(_pretrain_identity, _pretrain_ok, pretrain_stage),
    "extract": _StageSpec(_extract_identity, _extract_ok, extract_stage),
    "spectral": _StageSpec(_spectral_identity, _spectral_ok, spectral_stage),
    "align": _StageSpec(_align_identity, _align_ok, align_stage),
    "similarity": _StageSpec(_similarity_identity, _similarity_ok, similarity_stage),
}


def stage_key(stage: str, inputs: dict[str, Any]) -> str:
    """The cache key of ``stage`` run on ``inputs`` (its task's keyword arguments)."""
    identity = _STAGES[stage].identity(**inputs)
    return f"{stage}-" + config_hash({"stage": stage, "version": STAGE_VERSIONS[stage],
                                      "identity": identity})


def _make_task(stage: str):
    # Prefect calls the key function with the task run context and the call's arguments
    return task(_STAGES[stage].body, name=stage, persist_result=True,
                cache_key_fn=lambda _context, parameters: stage_key(stage, parameters))


TASKS = {stage: _make_task(stage) for stage in _STAGES}
"""The Prefect task of each stage (``result_storage`` and ``refresh_cache`` are set per call by
:meth:`Runner.run`)."""


# ------------------------------------------------------------------------------ running


class RunOptions(BaseModel):
    """Where a run reads and writes, what it forces, and the dask cluster of the spectral stage.

    ``store_root``: feature/spectral stores, Parquet tables, checkpoints and Prefect results
    (default ``$RESIDUAL_DATA_ROOT`` or ``./data``); ``data_root``: the datasets (default
    ``<RESIDUAL_DATA_ROOT or data>/datasets``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    store_root: str | None = None
    data_root: str | None = None
    force: list[Stage] = Field(default_factory=list)
    dask_address: str | None = None
    dask_workers: int | None = Field(None, ge=1)
    dask_memory_limit: str | None = None

    def resolved(self) -> "RunOptions":
        """Local roots made absolute, so that every worker and every key sees the same path."""
        def absolute(path: str | None) -> str | None:
            return str(Path(path).expanduser().resolve()) if path and is_local(path) else path
        return self.model_copy(update={
            "store_root": absolute(self.store_root or Layout.of().root),
            "data_root": absolute(self.data_root)})


@dataclass
class Runner:
    """Runs stage tasks for a flow, incrementally (see the module docstring), and records what
    each did in :attr:`runs` (``stage``, ``target``, ``state``: ``Completed`` or ``Cached``)."""

    options: RunOptions
    runs: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.options = self.options.resolved()

    @property
    def store_root(self) -> str:
        return self.options.store_root

    @cached_property
    def forced(self) -> frozenset[str]:
        return forced_stages(self.options.force)

    def run(self, stage: str, target: str, **inputs: Any) -> Any:
        """Run (or reuse) one stage task; returns its result, raises its error."""
        forced = stage in self.forced
        refresh = forced or not _STAGES[stage].output_ok(**inputs)
        task_ = TASKS[stage].with_options(
            task_run_name=f"{stage}: {target}", refresh_cache=refresh,
            result_storage=Layout.of(self.store_root).prefect_results.resolve())
        state = task_(**inputs, force=forced, return_state=True)
        result = state.result()  # raises the stage's exception if it failed
        self.runs.append({"stage": stage, "target": target, "state": state.name})
        return result

    # ---------------------------------------------------------------- stages, by what they do
    def weights(self, model: ModelSpec, settings: PretrainSettings) -> ModelSpec:
        """``model`` with ``pretrained: world`` replaced by the pretrained checkpoint's path."""
        if model.pretrained != WORLD_WEIGHTS:
            return model
        path = self.run("pretrain", model.label, settings=settings,
                        out_dir=str(Layout.of(self.store_root).checkpoints.resolve()))
        return model.model_copy(update={"pretrained": path})

    def extract(self, model: ModelSpec, dataset: str, splits: Iterable[str],
                settings: ExtractSettings) -> dict[str, str]:
        """Feature store path of each split (``model`` with resolved weights)."""
        return {split: self.run("extract", f"{model.label} {dataset} {split}", model=model.name,
                                pretrained=model.pretrained, dataset=dataset, split=split,
                                settings=settings, store_root=self.store_root,
                                data_root=self.options.data_root)
                for split in splits}

    def spectral(self, feature_url: str, settings: SpectralSettings, target: str) -> str:
        o = self.options
        return self.run("spectral", target, feature_url=feature_url, settings=settings,
                        tables_root=self.store_root, address=o.dask_address,
                        n_workers=o.dask_workers, memory_limit=o.dask_memory_limit)

    def align(self, stores: dict[str, str], spectral_url: str, settings: AlignSettings,
              target: str) -> list[dict[str, Any]]:
        return self.run("align", target, stores=stores, spectral_url=spectral_url,
                        settings=settings, tables_root=self.store_root,
                        data_root=self.options.data_root)

    def similarity(self, spectral_url: str, basis_url: str, evr_threshold: float,
                   target: str) -> int:
        return self.run("similarity", target, spectral_url=spectral_url, basis_url=basis_url,
                        evr_threshold=evr_threshold, tables_root=self.store_root)
