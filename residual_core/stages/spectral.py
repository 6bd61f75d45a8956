"""The spectral stage: per-unit PCA, spectra statistics and TwoNN of a feature store
(:func:`residual_core.engines.spectral.run_spectral`), its spectral store and its table rows.

Its key is the spectral store's own config hash (:func:`~residual_core.engines.spectral.spectral_key`
of the feature store's config hash and the parameters); it is current when that store is
complete and both tables it writes (``spectra``, ``unit_stats``) hold its rows.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from residual_core.errors import StoreError
from residual_core.layout import Layout, remove_tree
from residual_core.stages.base import Stage, StageInputs, StageParams, StageResult

TABLES = ("spectra", "unit_stats")
"""The tables the stage writes (every one must hold its rows for it to be current)."""


class Params(StageParams):
    """Spectral-stage parameters (all part of its key)."""

    twonn_max_samples: int = Field(50_000, ge=3,
                                   description="rows subsampled (seeded) for TwoNN")
    twonn_discard_fraction: float = Field(0.1, ge=0, lt=1,
                                          description="fraction of the largest distance "
                                          "ratios TwoNN discards")
    seed: int = Field(42, description="seed of the TwoNN subsample")


class Inputs(StageInputs):
    """A feature store, the root of the tables, and the dask cluster to run on (run-only:
    ``address`` of a scheduler, or ``n_workers`` local processes of ``memory_limit`` each)."""

    feature_url: str
    tables_root: str | None = None
    address: str | None = None
    n_workers: int | None = Field(None, ge=1)
    memory_limit: str | None = None

    @property
    def url(self) -> str:
        return Layout.spectral_store(self.feature_url)

    @property
    def root(self) -> str:
        return self.tables_root or Layout.of_store(self.feature_url).root


class Result(StageResult):
    """The spectral store, whether it was computed now, and whether its table rows were
    (re)written now (from the store, when only they were missing)."""

    url: str
    feature_url: str
    computed: bool
    rows_rewritten: bool = False
    seconds: float


def _feature_hash(feature_url: str) -> str:
    from residual_core.formats.feature_store import FeatureStore

    return FeatureStore.open(feature_url).attrs["config_hash"]


def identity(inputs: Inputs, params: Params) -> dict[str, Any]:
    from residual_core.engines.spectral import spectral_key

    return {"config_hash": spectral_key(_feature_hash(inputs.feature_url), params),
            "store": inputs.url, "tables_root": inputs.root}


def is_current(inputs: Inputs, params: Params) -> bool:
    from residual_core.engines.spectral import has_table_rows
    from residual_core.formats.spectral_store import SpectralStore

    try:
        store = SpectralStore.open(inputs.url)
        key = identity(inputs, params)["config_hash"]
    except StoreError:
        return False
    return store.attrs.get("config_hash") == key and has_table_rows(store, inputs.root)


def run(inputs: Inputs, params: Params, progress: bool = False, force: bool = False
        ) -> Result:
    from residual_core.engines.spectral import run_spectral

    # run_spectral reuses an up-to-date store and rewrites whichever of its rows are missing
    return run_spectral(inputs.feature_url, params, address=inputs.address,
                        n_workers=inputs.n_workers, memory_limit=inputs.memory_limit,
                        tables_root=inputs.root, progress=progress, force=force)


def discard(inputs: Inputs, params: Params) -> None:
    remove_tree(inputs.url)


STAGE = Stage("spectral", 1, ("extract",), Params, Inputs, Result, identity, is_current, run,
              discard, summary=("url", "computed", "seconds"))
