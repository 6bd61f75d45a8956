"""One Prefect task for every stage of :mod:`residual_core.stages`, and :class:`Runner`, which
runs them incrementally.

The task body validates nothing and decides nothing: it discards the stage's output when forced,
runs the stage and returns its result. What a stage reads, writes, how its output is named and
when it is current is declared by the stage itself (:class:`residual_core.stages.Stage`).

Incremental reruns. :meth:`Runner.run` asks the stage whether its output is current
(``Stage.is_current``: every output exists and was made from exactly these inputs and
parameters) and reads the JSON record of the stage's key (``Stage.key``) under
``<root>/stage-records``; when both are there, the task returns the recorded result as a
``Cached`` state without running the stage. Records are plain JSON validated by the stage's
``Result`` schema, so a damaged or tampered record is ignored (the stage runs again), never
executed: Prefect's own result persistence, which pickles, is off. ``force`` runs the named
stages and every stage downstream of them, each discarding its output first.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from prefect.states import Completed
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from residual_core.layout import Layout, is_local
from residual_core.stages import STAGES, StageInputs, StageParams, StageResult, downstream

from .grid import Stage

__all__ = ["RunOptions", "Runner", "run_extract_part", "run_stage"]


def _interactive() -> bool:
    """Progress bars only on a terminal: a worker's or a test's captured output gets log lines."""
    return sys.stderr.isatty()


def _log() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:  # a stage body called outside a task run
        return logging.getLogger("residual.pipelines")


@task(name="stage", persist_result=False, cache_policy=NO_CACHE)
def run_stage(stage: str, inputs: StageInputs, params: StageParams, force: bool = False,
              cached: StageResult | None = None) -> Any:
    """Run one stage (``cached``: its recorded result, returned as a ``Cached`` state)."""
    if cached is not None:
        return Completed(name="Cached", data=cached)
    spec = STAGES[stage]
    if force:
        spec.discard(inputs, params)
    result = spec.run(inputs, params, _interactive(), force)
    _log().info("%s: %s", stage, result.model_dump_json(include=set(spec.summary) or None))
    return result


@task(name="extract part", persist_result=False, cache_policy=NO_CACHE)
def run_extract_part(inputs: StageInputs, params: StageParams, part: str) -> StageResult:
    """Extract part ``part`` (``I/P``) of one split's store."""
    from residual_core.stages.extract import Part, run

    return run(inputs, params, _interactive(), part=Part.parse(part))


def _read_record(path: Path, schema: type[StageResult]) -> StageResult | None:
    try:
        return schema.model_validate_json(path.read_bytes())
    except (OSError, ValueError, ValidationError):  # missing, damaged or foreign: run again
        return None


def _write_record(path: Path, result: StageResult) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text(result.model_dump_json())
    os.replace(tmp, path)  # readers see a whole record or none


class RunOptions(BaseModel):
    """Where a run reads and writes, what it forces, and the dask cluster of the spectral stage.

    ``store_root``: feature/spectral stores, Parquet tables, checkpoints and stage records
    (default ``$RESIDUAL_DATA_ROOT`` or ``./data``); ``data_root``: the datasets (default
    ``<store root>/datasets``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    store_root: str | None = None
    data_root: str | None = None
    force: list[Stage] = Field(default_factory=list)
    dask_address: str | None = None
    dask_workers: int | None = Field(None, ge=1)
    dask_memory_limit: str | None = None
    extract_parts: int = Field(1, ge=1, description=(
        "extract each split that is not current as this many parts at once, each a run of "
        "the extract-part deployment on the pool's workers (needs a Prefect server)"))

    def resolved(self) -> "RunOptions":
        """Local roots made absolute, so that every worker and every key sees the same path."""
        def absolute(path: str | None) -> str | None:
            return str(Path(path).expanduser().resolve()) if path and is_local(path) else path
        return self.model_copy(update={"store_root": absolute(Layout.of(self.store_root).root),
                                       "data_root": absolute(self.data_root)})


_STAGE_LISTENERS: list[Callable[[dict[str, Any]], None]] = []


@contextmanager
def on_stage_runs(listener: Callable[[dict[str, Any]], None]) -> Iterator[None]:
    """Within the block, ``listener`` is called with each stage run's record (``stage``,
    ``target``, ``state``) as a :class:`Runner` of this process finishes it (a progress bar)."""
    _STAGE_LISTENERS.append(listener)
    try:
        yield
    finally:
        _STAGE_LISTENERS.remove(listener)


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
    def layout(self) -> Layout:
        return Layout.of(self.store_root)

    @cached_property
    def forced(self) -> frozenset[str]:
        return downstream(self.options.force)

    def run(self, stage: str, target: str, inputs: StageInputs, params: StageParams,
            force: bool | None = None, reuse: bool = True) -> Any:
        """Run (or reuse) one stage; returns its result, raises its error. ``force``: override
        whether the stage is forced; ``reuse=False``: run it even if current (to record what
        other runs just computed for it)."""
        spec = STAGES[stage]
        forced = stage in self.forced if force is None else force
        record = self.layout.stage_records / f"{spec.key(inputs, params)}.json"
        cached = None
        if reuse and not forced and spec.is_current(inputs, params):
            cached = _read_record(record, spec.Result)
        state = run_stage.with_options(name=stage, task_run_name=f"{stage}: {target}")(
            stage, inputs, params, force=forced, cached=cached, return_state=True)
        result = state.result()  # raises the stage's exception if it failed
        if cached is None:
            _write_record(record, result)
        self.runs.append({"stage": stage, "target": target, "state": state.name})
        for listener in _STAGE_LISTENERS:
            listener(self.runs[-1])
        return result
