"""The explain stage: every head of a feature store described in text (TextSpan or SOMP over a
text dictionary embedded by the model's own text tower), table ``head_texts``
(:func:`residual_core.engines.explain.run_explain`).

Its key covers the feature store's config hash, the dictionary's content (SHA-1 of its lines),
the method and its parameters, so an edited dictionary or a re-extracted store is explained
again and an unchanged one never is.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from residual_core.errors import StoreError
from residual_core.stages.base import Stage, StageInputs, StageParams, StageResult

EXPLAIN_METHODS = ("textspan", "somp")


class Params(StageParams):
    """How heads are explained."""

    method: Literal[EXPLAIN_METHODS] = Field(
        "textspan", description="textspan (Gandelsman et al., ICLR 2024) or somp (the ResiDual "
        "authors' simultaneous orthogonal matching pursuit)")
    dictionary: str = Field(
        "textspan", description="text dictionary: textspan (3,498 general descriptions), world "
        "(the embedded world's vocabulary), a text file (one description a line) or "
        "FILE.parquet:COLUMN")
    texts_per_head: int = Field(5, ge=1, description="descriptions picked per head")
    rank: int = Field(80, ge=1, description="TextSpan: principal directions of a head that the "
                      "texts are projected on (at most the embedding width)")
    units: tuple[str, ...] = Field(
        (), description="heads to explain, e.g. L3H2 L10H0 (or L3H2,L10H0); default every head. "
        "Their rows sit beside those of a run over every head")

    @field_validator("units", mode="before")
    @classmethod
    def _unit_list(cls, value: Any) -> Any:
        """``"L3H2,L1H0"`` or ``["L3H2,L1H0", "L2H1"]``: the names, each once, in order."""
        items = [value] if isinstance(value, str) else list(value or ())
        names = [n.strip() for item in items for n in str(item).split(",") if n.strip()]
        return tuple(dict.fromkeys(names))


class Inputs(StageInputs):
    """The feature store whose heads are explained, and the root of the tables."""

    feature_url: str
    tables_root: str


class Result(StageResult):
    """What an explain run wrote."""

    rows: int
    heads: int
    computed: bool
    seconds: float


def identity(inputs: Inputs, params: Params) -> dict[str, Any]:
    from residual_core.engines.explain import explain_key

    return {"rows": explain_key(inputs.feature_url, params), "tables_root": inputs.tables_root}


def is_current(inputs: Inputs, params: Params) -> bool:
    from residual_core.engines.explain import is_explained

    try:
        return is_explained(inputs.feature_url, params, inputs.tables_root)
    except StoreError:
        return False


def run(inputs: Inputs, params: Params, progress: bool = False, force: bool = False
        ) -> Result:
    from residual_core.engines.explain import run_explain

    return run_explain(inputs.feature_url, params, tables_root=inputs.tables_root,
                       progress=progress, force=force)


def discard(inputs: Inputs, params: Params) -> None:
    """Nothing to delete: a forced run recomputes and replaces its rows (same row key)."""


STAGE = Stage("explain", 1, ("extract",), Params, Inputs, Result, identity, is_current, run,
              discard, summary=("rows", "heads", "computed", "seconds"))
