"""The similarity stage: basis similarity of every unit between a task's own bases and those of
its basis dataset (:func:`residual_core.engines.spectral.similarity`), table ``basis_similarity``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from residual_core.errors import StoreError
from residual_core.stages.base import Stage, StageInputs, StageParams, StageResult


class Params(StageParams):
    """Basis-similarity parameters."""

    evr_threshold: float = Field(0.9, gt=0, le=1,
                                 description="cumulative EVR at which each basis is truncated")


class Inputs(StageInputs):
    """The two spectral stores (of one model, or of two models of one output width) and the
    root of the tables."""

    spectral_url: str
    basis_url: str
    tables_root: str


class Result(StageResult):
    rows: int
    cross_model_rows: int = 0


def _hashes(inputs: Inputs) -> tuple[str, str]:
    from residual_core.formats.spectral_store import SpectralStore

    return tuple(SpectralStore.open(u).attrs["config_hash"]
                 for u in (inputs.spectral_url, inputs.basis_url))


def identity(inputs: Inputs, params: Params) -> dict[str, Any]:
    from residual_core.engines.spectral import similarity_key

    return {"rows": similarity_key(*_hashes(inputs), params.evr_threshold),
            "tables_root": inputs.tables_root}


def _across_models(inputs: Inputs) -> bool:
    """Whether the two stores are of different weights (then the per-head spectral statistics
    are correlated across the models too, table ``cross_model``)."""
    from residual_core.formats.spectral_store import SpectralStore
    from residual_core.identity import WeightsId

    a, b = (WeightsId.from_attrs(SpectralStore.open(u).attrs)
            for u in (inputs.spectral_url, inputs.basis_url))
    return a != b


def is_current(inputs: Inputs, params: Params) -> bool:
    from residual_core.engines.spectral import cross_model_key
    from residual_core.formats.spectral_store import SpectralStore
    from residual_core.tables import has_rows

    try:
        attrs = SpectralStore.open(inputs.spectral_url).attrs
        key = identity(inputs, params)["rows"]
        across = _across_models(inputs)
    except StoreError:
        return False
    who = (inputs.tables_root, attrs["model"], attrs["dataset"])
    if not has_rows(who[0], "basis_similarity", *who[1:], config_hash=key):
        return False
    return not across or has_rows(who[0], "cross_model", *who[1:],
                                  config_hash=cross_model_key(*_hashes(inputs)))


def run(inputs: Inputs, params: Params, progress: bool = False, force: bool = False
        ) -> Result:
    from residual_core.engines.spectral import cross_model_spectra, similarity

    rows = similarity(inputs.spectral_url, inputs.basis_url, params.evr_threshold,
                      tables_root=inputs.tables_root)
    cross = (cross_model_spectra(inputs.spectral_url, inputs.basis_url,
                                 tables_root=inputs.tables_root)["rows"]
             if _across_models(inputs) else [])
    return Result(rows=len(rows), cross_model_rows=len(cross))


def discard(inputs: Inputs, params: Params) -> None:
    """Nothing to delete: a rerun replaces its rows (same key)."""


STAGE = Stage("similarity", 2, ("spectral",), Params, Inputs, Result, identity, is_current, run,
              discard, summary=("rows", "cross_model_rows"))
