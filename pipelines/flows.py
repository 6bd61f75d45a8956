"""Prefect flows of the pipeline: thin compositions of the stage tasks of :mod:`pipelines.tasks`.

- :func:`extract_flow`: the feature stores of a model on a dataset's splits.
- :func:`extract_part_flow`: one part of a split's extraction (the runs of the extract-part
  deployment that flows submit with ``extract_parts`` > 1).
- :func:`spectral_flow`: per-unit PCA of one split's store (on a dask cluster when given).
- :func:`align_flow`: every align method × seed (and the head-selection experiment) on
  extracted stores.
- :func:`cell_flow`: everything for one (model, dataset) of a grid.
- :func:`experiment_flow`: a grid (:mod:`pipelines.grid`), cell by cell in this process, or each
  cell as a run of the ``cell`` deployment on the workers of a pool (``distribute=True``).

Parameters are typed (pydantic models of :mod:`pipelines.grid`), so Prefect validates them
before a flow starts; names inside them (models, tags, datasets, methods) are checked by those
models, and a named grid or grid file is loaded and checked before any task runs. Every stage
is incremental: see :mod:`pipelines.tasks` for the cache keys.

Without ``PREFECT_API_URL`` flows run against a temporary local server (ephemeral mode): no
server is needed for the embedded default.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from typing import Any, Callable, Iterable

from prefect import flow, get_run_logger

from residual_core.errors import ResidualError
from residual_core.identity import WORLD_WEIGHTS, parse_weights
from residual_core.layout import SPLITS, Layout
from residual_core.stages import STAGES
from residual_core.stages.align import Inputs as AlignInputs
from residual_core.stages.align import Params as AlignParams
from residual_core.stages.explain import Inputs as ExplainInputs
from residual_core.stages.explain import Params as ExplainParams
from residual_core.stages.extract import Inputs as ExtractInputs
from residual_core.stages.extract import Params as ExtractParams
from residual_core.stages.pretrain import Inputs as PretrainInputs
from residual_core.stages.pretrain import Params as PretrainParams
from residual_core.stages.similarity import Inputs as SimilarityInputs
from residual_core.stages.similarity import Params as SimilarityParams
from residual_core.stages.spectral import Inputs as SpectralInputs
from residual_core.stages.spectral import Params as SpectralParams

from .grid import Cell, Grid, ModelSpec, Settings, Split, Stage, load_grid
from .tasks import Runner, RunOptions, on_stage_runs, run_extract_part

__all__ = ["CELL_DEPLOYMENT", "EXTRACT_PART_DEPLOYMENT", "GridRunError", "align_flow",
           "cell_flow", "compare_flow", "experiment_flow", "extract_flow", "extract_part_flow",
           "spectral_flow"]

CELL_DEPLOYMENT = "cell/residual-cell"
"""The deployment (in ``prefect.yaml``) that ``experiment_flow(distribute=True)`` runs cells on."""
EXTRACT_PART_DEPLOYMENT = "extract-part/residual-extract-part"
"""The deployment (in ``prefect.yaml``) that runs the parts of a split's extraction."""


class GridRunError(ResidualError):
    """Some cells of a grid failed with user errors (missing data, bad stores, ...)."""


class _UserErrorsWithoutTraceback(logging.Filter):
    """Prefect logs a failed run's exception with its traceback; for a user error the message
    says what to fix and a traceback would only bury it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], ResidualError):
            record.exc_info, record.exc_text = None, None
        return True


for _name in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_name).addFilter(_UserErrorsWithoutTraceback())


def _options(store_root: str | None, data_root: str | None, force: list[Stage] | None,
             **dask: Any) -> RunOptions:
    return RunOptions(store_root=store_root, data_root=data_root, force=force or [], **dask)


# ------------------------------------------------------------------------------ stage calls
# Each turns a flow's names into the stage's inputs and runs it through the runner.


def _weights(runner: Runner, model: ModelSpec, params: PretrainParams) -> ModelSpec:
    """``model`` with ``pretrained: world`` replaced by the pretrained checkpoint's path."""
    if model.pretrained != WORLD_WEIGHTS:
        return model
    inputs = PretrainInputs(out_dir=str(runner.layout.checkpoints.resolve()))
    result = runner.run("pretrain", model.label, inputs, params)
    return model.model_copy(update={"pretrained": result.checkpoint})


def _extract(runner: Runner, model: ModelSpec, dataset: str, splits: Iterable[str],
             params: ExtractParams) -> dict[str, str]:
    """Feature store path of each split (``model`` with resolved weights); with
    ``extract_parts`` > 1, a split that is not current is extracted in parts on the workers
    first (:func:`_extract_in_parts`)."""
    urls = {}
    for split in splits:
        inputs = ExtractInputs(model=model.name, pretrained=model.pretrained, dataset=dataset,
                               split=split, store_root=runner.store_root,
                               data_root=runner.options.data_root)
        target = f"{model.label} {dataset} {split}"
        if runner.options.extract_parts > 1 and _extract_in_parts(runner, inputs, params, target):
            # the parts wrote every chunk: the stage run finds nothing to do and records it
            urls[split] = runner.run("extract", target, inputs, params, force=False,
                                     reuse=False).url
        else:
            urls[split] = runner.run("extract", target, inputs, params).url
    return urls


def _extract_in_parts(runner: Runner, inputs: ExtractInputs, params: ExtractParams,
                      target: str) -> bool:
    """Extract the store of ``inputs`` as ``extract_parts`` runs of the extract-part deployment
    at once, unless it is current and not forced (False: nothing submitted)."""
    stage = STAGES["extract"]
    forced = "extract" in runner.forced
    if not forced and stage.is_current(inputs, params):
        return False
    if forced:
        stage.discard(inputs, params)  # once, here, not by every part
    count = runner.options.extract_parts
    runs = _run_on_workers(
        EXTRACT_PART_DEPLOYMENT,
        [(f"extract {target} part {i}/{count}",
          {"inputs": inputs.model_dump(mode="json"), "settings": params.model_dump(mode="json"),
           "part": f"{i}/{count}"},
          [f"model:{inputs.model}", f"dataset:{inputs.dataset}", f"split:{inputs.split}"])
         for i in range(count)],
        desc=f"extract {inputs.split} parts", unit="part")
    failed = [run for run in runs if not run.state.is_completed()]
    if failed:
        raise RuntimeError(f"{len(failed)} of {count} extraction parts of {target} did not "
                           "complete: " + "; ".join(f"{run.name}: {run.state.name} "
                                                    f"({_one_line(run.state.message or '')})"
                                                    for run in failed))
    return True


@flow(name="extract-part")
def extract_part_flow(inputs: ExtractInputs, settings: ExtractParams, part: str
                      ) -> dict[str, Any]:
    """Part ``part`` (``I/P``) of one split's extraction, beside the other parts on other
    workers (the runs a flow with ``extract_parts`` > 1 submits). Returns the part's result."""
    return run_extract_part(inputs, settings, part).model_dump(mode="json")


def _spectral(runner: Runner, feature_url: str, params: SpectralParams, target: str) -> str:
    o = runner.options
    inputs = SpectralInputs(feature_url=feature_url, tables_root=runner.store_root,
                             address=o.dask_address, n_workers=o.dask_workers,
                             memory_limit=o.dask_memory_limit)
    return runner.run("spectral", target, inputs, params).url


def _align(runner: Runner, stores: dict[str, str], spectral_url: str, params: AlignParams,
           target: str) -> list[dict[str, Any]]:
    inputs = AlignInputs(stores=stores, spectral_url=spectral_url,
                          tables_root=runner.store_root, data_root=runner.options.data_root)
    return runner.run("align", target, inputs, params).rows


def _similarity(runner: Runner, spectral_url: str, basis_url: str, evr_threshold: float,
                target: str) -> int:
    inputs = SimilarityInputs(spectral_url=spectral_url, basis_url=basis_url,
                               tables_root=runner.store_root)
    return runner.run("similarity", target, inputs,
                      SimilarityParams(evr_threshold=evr_threshold)).rows


@flow(name="compare")
def compare_flow(model: ModelSpec, other: ModelSpec, dataset: str, split: Split = "train",
                 pretrain: PretrainParams = PretrainParams(),
                 other_pretrain: PretrainParams | None = None,
                 extract: ExtractParams = ExtractParams(),
                 spectral: SpectralParams = SpectralParams(), evr_threshold: float = 0.9,
                 store_root: str | None = None, data_root: str | None = None,
                 force: list[Stage] | None = None) -> dict[str, Any]:
    """Two models (or two weights of one) on one dataset split: the principal bases of every
    unit compared (``basis_similarity``, the authors' score included) and, for different
    weights, the per-head spectral statistics correlated across the models (``cross_model``).
    ``other_pretrain``: the other model's world pretraining (default ``pretrain``; another
    seed gives a second embedded model). Returns both spectral stores and the stage runs."""
    runner = Runner(_options(store_root, data_root, force))
    first = _weights(runner, model, pretrain)
    second = _weights(runner, other, other_pretrain or pretrain)
    a, b = (_spectral_of(runner, m, dataset, split, extract, spectral) for m in (first, second))
    _similarity(runner, a, b, evr_threshold, f"{first.label} vs {second.label} {dataset}")
    return {"spectral": [a, b], "weights": [first.pretrained, second.pretrained],
            "runs": runner.runs}


def _explain(runner: Runner, feature_url: str, params: ExplainParams, target: str) -> int:
    inputs = ExplainInputs(feature_url=feature_url, tables_root=runner.store_root)
    return runner.run("explain", target, inputs, params).rows


@flow(name="extract")
def extract_flow(model: ModelSpec, dataset: str, splits: list[Split] = list(SPLITS),
                 settings: ExtractParams = ExtractParams(),
                 pretrain: PretrainParams = PretrainParams(), store_root: str | None = None,
                 data_root: str | None = None, force: list[Stage] | None = None
                 ) -> dict[str, str]:
    """Extract (or reuse) the feature stores of ``model`` on ``dataset``; returns
    ``{split: store path}``."""
    runner = Runner(_options(store_root, data_root, force))
    return _extract(runner, _weights(runner, model, pretrain), dataset, splits, settings)


@flow(name="spectral")
def spectral_flow(model: ModelSpec, dataset: str, split: Split = "train",
                  settings: SpectralParams = SpectralParams(),
                  extract: ExtractParams = ExtractParams(),
                  pretrain: PretrainParams = PretrainParams(), store_root: str | None = None,
                  data_root: str | None = None, force: list[Stage] | None = None,
                  address: str | None = None, n_workers: int | None = None,
                  memory_limit: str | None = None) -> str:
    """Per-unit PCA of the ``split`` store (extracted first if needed); ``address``: a dask
    scheduler to run on, or ``n_workers``: a local cluster of that many processes. Returns the
    spectral store's path."""
    runner = Runner(_options(store_root, data_root, force, dask_address=address,
                             dask_workers=n_workers, dask_memory_limit=memory_limit))
    return _spectral_of(runner, _weights(runner, model, pretrain), dataset, split, extract,
                        settings)


@flow(name="align")
def align_flow(model: ModelSpec, dataset: str, settings: AlignParams = AlignParams(),
               basis: str | None = None, pretrain: PretrainParams = PretrainParams(),
               extract: ExtractParams = ExtractParams(), store_root: str | None = None,
               data_root: str | None = None, force: list[Stage] | None = None
               ) -> list[dict[str, Any]]:
    """Align every method × seed on the extracted train/val/test stores of ``dataset`` with the
    spectral bases of ``basis``'s train split (default: ``dataset``'s); both must have been
    computed (:func:`extract_flow`, :func:`spectral_flow`). ``data_root``: where ``finetune``
    reads the images; ``extract``: the stores' settings (their dtype names them). Returns the
    evaluations."""
    runner = Runner(_options(store_root, data_root, force))
    model = _weights(runner, model, pretrain)

    layout, weights = Layout.of(runner.store_root), parse_weights(model.name, model.pretrained)
    dtype = extract.feature_dtype
    stores = {split: layout.feature_store(weights, dataset, split, dtype) for split in SPLITS}
    bases = Layout.spectral_store(layout.feature_store(weights, basis or dataset, "train", dtype))
    return _align(runner, stores, bases, settings,
                        f"{model.label} {dataset}")


def _run_cell(runner: Runner, cell: Cell, settings: Settings,
              bases: str | None = None) -> list[dict[str, Any]]:
    model = _weights(runner, cell.model, settings.pretrain)
    stores = _extract(runner, model, cell.dataset, SPLITS, settings.extract)
    if bases is None:
        bases = _spectral_of(runner, model, cell.basis_dataset, "train", settings.extract,
                             settings.spectral, stores["train"] if cell.basis is None else None)
    evaluations = _align(runner, stores, bases, settings.align, f"{model.label} {cell.dataset}")
    if settings.explain is not None:
        _explain(runner, stores["train"], settings.explain, f"{model.label} {cell.dataset} train")
    if settings.similarity_evr is not None and cell.basis is not None:
        own = _spectral_of(runner, model, cell.dataset, "train", settings.extract,
                           settings.spectral, stores["train"])
        _similarity(runner, own, bases, settings.similarity_evr, f"{model.label} {cell.dataset}")
    return [{"cell": cell.label, **row} for row in evaluations]


def _spectral_of(runner: Runner, model: ModelSpec, dataset: str, split: str,
                 extract_params: ExtractParams, spectral_params: SpectralParams,
                 store: str | None = None) -> str:
    """The spectral store of ``dataset``'s ``split`` (its feature store extracted first unless
    given)."""
    store = store or _extract(runner, model, dataset, [split], extract_params)[split]
    return _spectral(runner, store, spectral_params, f"{model.label} {dataset} {split}")


@flow(name="cell")
def cell_flow(cell: Cell, settings: Settings, options: RunOptions = RunOptions(),
              bases: str | None = None) -> dict[str, Any]:
    """Every stage of one grid cell: weights, extract train/val/test, the bases (the basis
    dataset's train split; ``bases``: a spectral store already made for it), align (every
    method × seed, head selection), basis similarity. Returns ``{"cell", "runs": [stage runs],
    "evaluations": [align summaries]}``."""
    runner = Runner(options)
    evaluations = _run_cell(runner, cell, settings, bases)
    _publish_fits(f"cell {cell.label}", evaluations)
    return {"cell": cell.label, "runs": runner.runs, "evaluations": evaluations}


FIT_COLUMNS = ("cell", "method", "seed", "trainable_parameters", "val_acc", "test_acc")
"""The columns of a run's summary of its fits (the ``run`` command's table, the artifacts)."""


def _fit_row(row: dict[str, Any]) -> dict[str, Any]:
    """``row``'s :data:`FIT_COLUMNS`, JSON-safe (no NaN)."""
    def safe(v: Any) -> Any:
        return None if isinstance(v, float) and not math.isfinite(v) else v
    return {k: safe(row.get(k)) for k in FIT_COLUMNS}


def _publish_fits(name: str, evaluations: list[dict[str, Any]]) -> None:
    """A cell's fits as a table artifact of its flow run: how a cell run on a worker reports
    its accuracies to the run that submitted it (and what the Prefect UI shows)."""
    from prefect.artifacts import create_table_artifact

    if evaluations:
        create_table_artifact([_fit_row(e) for e in evaluations],
                              description=f"{name}: accuracy per fit")


def _fits_of_runs(client, run_ids: list) -> dict[Any, list[dict[str, Any]]]:
    """The fits each of these flow runs published (:func:`_publish_fits`), by run id."""
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterType,
    )

    artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=run_ids), type=ArtifactFilterType(any_=["table"])))
    fits: dict[Any, list[dict[str, Any]]] = {}
    for a in artifacts:
        rows = json.loads(a.data) if isinstance(a.data, str) else a.data
        fits.setdefault(a.flow_run_id, []).extend(_fit_row(r) for r in rows)
    return fits


def cell_tags(grid: str, cell: Cell) -> list[str]:
    """The tags of a cell's flow run, locally and on workers: ``grid:``, ``model:``,
    ``dataset:`` (filter runs by them in the Prefect UI)."""
    return [f"grid:{grid}", f"model:{cell.model.label}", f"dataset:{cell.dataset}"]


def _run_cells_here(cells: list[Cell], settings: Settings, options: RunOptions,
                    bases: dict[tuple, str], grid: str) -> list[dict[str, Any]]:
    """Each cell as a subflow of this run, one after the other, named and tagged like a
    distributed cell (on a terminal a bar counts the cells, and the stages done and computed
    so far); a failed cell does not stop the others."""
    from prefect import tags
    from tqdm import tqdm

    out = []
    done = {"stages": 0, "computed": 0}
    with tqdm(total=len(cells), desc="cells", unit="cell", disable=None) as bar:
        def stage_done(run: dict[str, Any]) -> None:
            done["stages"] += 1
            done["computed"] += run["state"] != "Cached"
            bar.set_postfix_str(f"stages {done['stages']} ({done['computed']} computed), "
                                f"last {run['stage']}: {run['state']}")

        with on_stage_runs(stage_done):
            for cell in cells:
                with tags(*cell_tags(grid, cell)):
                    state = cell_flow.with_options(flow_run_name=f"cell {cell.label}")(
                        cell=cell, settings=settings, options=options,
                        bases=bases.get((cell.model, cell.basis)), return_state=True)
                value = state.result(raise_on_failure=False)
                out.append(value if state.is_completed() else
                           {"cell": cell.label, "state": state.name, "error": value})
                bar.update()
    return out


def _run_cells_on_workers(cells: list[Cell], settings: Settings, options: RunOptions,
                          bases: dict[tuple, str], deployment: str, grid: str,
                          poll_seconds: float = 5.0) -> list[dict[str, Any]]:
    """Each cell as a run of ``deployment`` (:func:`_run_on_workers`); each completed cell's
    fits are read back from the artifact its run published. Stores and tables must be on
    storage every worker sees (``store_root``)."""
    from prefect.client.orchestration import get_client

    def show_stages(client, submitted: list, bar) -> None:
        done = [r for runs in _stage_runs(client, [r.id for r in submitted]).values()
                for r in runs]
        computed = sum(r["state"] != "Cached" for r in done)
        bar.set_postfix_str(f"stages {len(done)} ({computed} computed)"
                            + (f", last {done[-1]['stage']}: {done[-1]['state']}" if done else ""))

    runs = _run_on_workers(
        deployment,
        [(f"cell {cell.label}",
          {"cell": cell.model_dump(mode="json"), "settings": settings.model_dump(mode="json"),
           "options": options.model_dump(mode="json"),
           "bases": bases.get((cell.model, cell.basis))},
          cell_tags(grid, cell)) for cell in cells],
        desc="cells on workers", unit="cell", poll_seconds=poll_seconds, on_poll=show_stages)
    with get_client(sync_client=True) as client:
        fits = _fits_of_runs(client, [run.id for run in runs])
        stages = _stage_runs(client, [run.id for run in runs])
    return [{"cell": cell.label, "flow_run": run.name, "state": run.state.name,
             "runs": stages.get(run.id, []),
             **({"evaluations": fits.get(run.id, [])} if run.state.is_completed()
                else {"error": run.state.message})}
            for cell, run in zip(cells, runs)]


def _stage_runs(client, flow_run_ids: list) -> dict[Any, list[dict[str, Any]]]:
    """The finished stage runs of each of these flow runs (say, cells on workers), by run id,
    in the order they started: records as a local cell reports them (``stage``, ``target``,
    ``state``: ``Completed`` or ``Cached``), read from their task runs."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    runs, page = [], 200
    while True:  # the API answers at most a page of task runs per call
        got = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(flow_run_ids))),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=page, offset=len(runs))
        runs += got
        if len(got) < page:
            break
    out: dict[Any, list[dict[str, Any]]] = {}
    for run in runs:
        stage, sep, target = run.name.partition(": ")  # the Runner names them "stage: target"
        if sep and stage in STAGES and run.state is not None and run.state.is_completed():
            out.setdefault(run.flow_run_id, []).append(
                {"stage": stage, "target": target, "state": run.state.name})
    return out


def _run_on_workers(deployment: str, jobs: list[tuple[str, dict[str, Any], list[str]]],
                    desc: str, unit: str, poll_seconds: float = 5.0,
                    on_poll: Callable[[Any, list, Any], None] | None = None) -> list:
    """Each ``(name, parameters, tags)`` of ``jobs`` as a run of ``deployment`` (picked up by
    any worker of its pool), all submitted at once, then waited for (a progress bar counts
    the finished ones, and ``on_poll(client, runs, bar)`` may add to it at each poll; a
    warning says when no worker is online). Returns the runs, final.
    Interrupted (Ctrl-C), it cancels the runs it submitted: a scheduled one at once, a running
    one through its worker."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelled, Cancelling
    from tqdm import tqdm

    submitted: list = []
    with get_client(sync_client=True) as client:
        bar = tqdm(total=len(jobs), desc=desc, unit=unit, disable=None)
        try:
            for name, parameters, tags in jobs:
                submitted.append(run_deployment(deployment, parameters=parameters, timeout=0,
                                                flow_run_name=name, tags=tags))
            _warn_without_workers(client, deployment, len(jobs), unit)
            while True:
                runs = [client.read_flow_run(run.id) for run in submitted]
                final = sum(run.state is not None and run.state.is_final() for run in runs)
                bar.update(final - bar.n)
                if on_poll is not None:
                    on_poll(client, submitted, bar)
                if final == len(runs):
                    return runs
                time.sleep(poll_seconds)
        except KeyboardInterrupt:  # the user stops the run: so do its runs, wherever they are
            # a fresh client: the interrupt may have cut a request of ``client`` short
            with get_client(sync_client=True) as fresh:
                for run in submitted:
                    state = fresh.read_flow_run(run.id).state
                    if state is None or state.is_scheduled() or state.is_pending():
                        fresh.set_flow_run_state(run.id, Cancelled(message="run interrupted"),
                                                 force=True)
                    elif not state.is_final():
                        fresh.set_flow_run_state(run.id, Cancelling(message="run interrupted"),
                                                 force=True)
            raise
        finally:
            bar.close()


def _warn_without_workers(client, deployment: str, n_runs: int, unit: str) -> None:
    """Say so when no worker polls the deployment's pool: the runs would wait silently."""
    from prefect.client.schemas.objects import WorkerStatus

    pool = client.read_deployment_by_name(deployment).work_pool_name
    workers = client.read_workers_for_work_pool(pool) if pool else []
    if not any(w.status == WorkerStatus.ONLINE for w in workers):
        get_run_logger().warning(
            "no worker is online in work pool %r: the %d %s runs wait until one starts "
            "(`prefect worker start --pool %s`)", pool, n_runs, unit, pool)


def _one_line(error: Any) -> str:
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    return first if isinstance(error, (str, ResidualError)) else f"{type(error).__name__}: {first}"


def _raise_failures(records: list[dict[str, Any]]) -> None:
    failed = [r for r in records if "error" in r]
    if not failed:
        return
    message = (f"{len(failed)} of {len(records)} cells failed: "
               + "; ".join(f"{r['cell']}: {_one_line(r['error'])}" for r in failed))
    if all(isinstance(r["error"], ResidualError) for r in failed):
        raise GridRunError(message)
    raise RuntimeError(message)


@flow(name="experiment")
def experiment_flow(grid: Grid | str = "paper", force: list[Stage] | None = None,
                    store_root: str | None = None, data_root: str | None = None,
                    distribute: bool = False, cell_deployment: str = CELL_DEPLOYMENT,
                    dask_address: str | None = None, dask_workers: int | None = None,
                    dask_memory_limit: str | None = None, extract_parts: int = 1
                    ) -> dict[str, Any]:
    """Run a grid: every (model, dataset) cell through every stage, incrementally.

    Args:
        grid: a :class:`~pipelines.grid.Grid`, a named grid (``paper``, ``demo``, ``smoke``) or
            a grid JSON file.
        force: stages to recompute, with everything downstream of them (``spectral`` reruns
            align and similarity too).
        store_root, data_root: see :class:`~pipelines.tasks.RunOptions`.
        distribute: run each cell as a flow run of ``cell_deployment`` on the workers of its
            pool (needs a Prefect server, the deployment, and a store root every worker sees);
            default: every cell in this process.
        dask_address, dask_workers, dask_memory_limit: dask cluster of the spectral stage.
        extract_parts: extract each split that is not current as this many parts at once,
            each a run of the extract-part deployment on the pool's workers (the bases here,
            a cell's splits in its cell); 1: in the process that needs the store.

    Returns:
        ``{"grid", "models": [each model as run: name, pretrained (a world checkpoint's path)],
        "cells": [per cell: runs and evaluations, or its flow run's state],
        "runs": [stage runs done here]}``. Raises :class:`GridRunError` naming the failed
        cells after every cell has been tried.
    """
    runner = Runner(_options(store_root, data_root, force, dask_address=dask_address,
                             dask_workers=dask_workers, dask_memory_limit=dask_memory_limit,
                             extract_parts=extract_parts))
    # names and types are checked before any task runs
    grid = load_grid(grid, data_root=data_root or Layout.of(store_root).datasets)
    settings = grid.settings()
    # Inputs several cells share are made first, here, so that cells running in parallel on
    # several workers never write (or force) the same output.
    weights = {m: _weights(runner, m, settings.pretrain) for m in grid.models()}
    cells = [c.model_copy(update={"model": weights[c.model]}) for c in grid.cells()]
    bases = {(model, basis): _spectral_of(runner, model, basis, "train", settings.extract,
                                          settings.spectral)
             for model, basis in dict.fromkeys((c.model, c.basis) for c in cells if c.basis)}
    if distribute:
        records = _run_cells_on_workers(cells, settings, runner.options, bases, cell_deployment,
                                        grid.name)
    else:
        records = _run_cells_here(cells, settings, runner.options, bases, grid.name)
    _publish_results(grid.name, records)
    _raise_failures(records)
    return {"grid": grid.name, "models": [m.model_dump() for m in weights.values()],
            "cells": records, "runs": runner.runs}


def results_artifact_key(grid: str) -> str:
    """The key of a grid's results artifact (lower-case letters, digits and dashes)."""
    return "results-" + re.sub(r"[^a-z0-9-]+", "-", grid.lower()).strip("-")


def _publish_results(grid: str, records: list[dict[str, Any]]) -> None:
    """The run's results as a Prefect table artifact: one row per fit of every cell (run here
    or on workers), and one per failed cell with its state."""
    from prefect.artifacts import create_table_artifact

    rows = [_fit_row({**e, "cell": r["cell"]}) for r in records for e in r.get("evaluations", [])]
    failed = [{**_fit_row({"cell": r["cell"]}), "state": r.get("state")}
              for r in records if "error" in r]
    if rows or failed:
        create_table_artifact(rows + failed, key=results_artifact_key(grid),
                              description=f"grid {grid}: test accuracy per fit")


def count_stage_runs(report: dict[str, Any]) -> tuple[int, int]:
    """``(stage runs, computed)`` of an :func:`experiment_flow` result (the rest were cached)."""
    runs = report["runs"] + [r for c in report["cells"] for r in c.get("runs", [])]
    return len(runs), sum(r["state"] != "Cached" for r in runs)
