"""What a stage declares: its parameters, its inputs, its result, how its output is named and
when it is current. The orchestration layer (``pipelines``) runs any :class:`Stage` the same way.

This module imports neither torch nor zarr: the CLI builds its options from the ``Params`` of
every stage, and a light command must stay light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from residual_core.errors import ResidualError
from residual_core.identity import config_hash

__all__ = ["RUN_ONLY", "ParamsError", "Stage", "StageInputs", "StageParams", "StageResult"]

RUN_ONLY = {"identity": False}
"""``Field(json_schema_extra=RUN_ONLY)``: a parameter that changes how a stage runs (batch size,
device, workers), not what it writes, so it is not part of the stage's key."""


class _Frozen(BaseModel):
    """Immutable, no unknown fields (a typo in a grid file or a call is an error)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ParamsError(ResidualError, ValueError):
    """Invalid stage parameters, in one line; ``problems``: ``(field, message)`` pairs."""

    def __init__(self, stage: str, problems: list[tuple[str, str]]):
        self.stage, self.problems = stage, problems
        super().__init__("invalid parameters: "
                         + "; ".join(f"{stage}.{field}: {msg}" for field, msg in problems))


class StageParams(_Frozen):
    """A stage's parameters: one schema for the core, the grid files and the CLI options (each
    field's ``description`` is its help text). Built directly, bad values raise
    :class:`ParamsError` (inside a grid, the grid's validation names them)."""

    def __init__(self, **data: Any):
        try:
            super().__init__(**data)
        except ValidationError as exc:
            problems = [(".".join(str(p) for p in e["loc"]) or "(all)",
                         e["msg"].removeprefix("Value error, ")) for e in exc.errors()]
            raise ParamsError(type(self).__module__.rsplit(".", 1)[-1], problems) from None

    def identity(self) -> dict[str, Any]:
        """The parameters that change what the stage writes (its key covers exactly these)."""
        extra = {name: f.json_schema_extra or {} for name, f in type(self).model_fields.items()}
        return {k: v for k, v in self.model_dump(mode="json").items()
                if extra[k].get("identity", True)}


class StageInputs(_Frozen):
    """What a stage reads and where it writes (store URLs, roots, names), as JSON-able fields."""


class StageResult(BaseModel):
    """What a stage returns: small and JSON-able (paths and counts, never arrays), so that it
    can be recorded as JSON and read back without running any code."""

    model_config = ConfigDict(extra="forbid")


P = TypeVar("P", bound=StageParams)
I = TypeVar("I", bound=StageInputs)  # noqa: E741
R = TypeVar("R", bound=StageResult)


@dataclass(frozen=True)
class Stage(Generic[I, P, R]):
    """One stage of the pipeline, as its module declares it.

    Attributes:
        name: what ``--force`` and the logs call it.
        version: bump it when the stage's code changes what it writes; its keys change, so its
            recorded results are no longer used.
        reads: the stages whose outputs it reads (the stage graph; ``force`` follows it).
        identity: ``(inputs, params) -> dict``: the content identity of what it would write
            (upstream content hashes, the output's location); with ``params.identity()`` and
            ``version`` it makes :meth:`key`.
        is_current: ``(inputs, params) -> bool``: every output exists and was made from exactly
            these inputs and parameters.
        run: ``(inputs, params, progress, force) -> Result``: make (or resume) the outputs;
            ``force``: recompute those that are current too (results kept as table rows, e.g.
            align's fits, are recomputed and replaced, never deleted first).
        discard: ``(inputs, params) -> None``: before a forced run, delete the stores that
            ``run`` would resume from (a no-op for stages whose outputs are table rows).
        summary: the fields of its ``Result`` that a run's log line shows.
    """

    name: str
    version: int
    reads: tuple[str, ...]
    Params: type[P]
    Inputs: type[I]
    Result: type[R]
    identity: Callable[[I, P], dict[str, Any]]
    is_current: Callable[[I, P], bool]
    run: Callable[[I, P, bool, bool], R]
    discard: Callable[[I, P], None]
    summary: tuple[str, ...] = ()

    def key(self, inputs: I, params: P) -> str:
        """The stage's key on these inputs: equal keys mean equal outputs."""
        return f"{self.name}-" + config_hash({
            "stage": self.name, "version": self.version,
            "identity": self.identity(inputs, params), "params": params.identity()})
