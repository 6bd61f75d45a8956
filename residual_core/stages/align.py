"""The align stage: every method × seed on a task's cached features, and the head-selection
experiment (:func:`residual_core.engines.align.run_align`); tables ``evaluations`` and
``head_selection``, λ per unit in the task's ``align.zarr``.

Its key is the align run's own config hash (:func:`~residual_core.engines.align.align_key`: the
stores' and the bases' content, the parameters, the format version). Rows are kept per fit
(:class:`~residual_core.engines.align.AlignPlan`): it is current when every requested
(method, seed) has its row with the same content identity and, when asked for, the
``head_selection`` rows exist; fits already in the tables are reused, not run again.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, StrictInt, field_validator

from residual_core.errors import StoreError
from residual_core.stages.base import Stage, StageInputs, StageParams, StageResult

DEFAULT_METHODS = ("zero-shot", "residual-star", "residual-full", "coarse", "linear")
"""What the align stage fits by default: every method that trains on cached features
(``finetune`` is opt-in: it runs the backbone)."""


class Params(StageParams):
    """Settings of one align run (all part of its key)."""

    methods: tuple[str, ...] = Field(DEFAULT_METHODS, min_length=1,
                                     description="align methods (presets) to fit")
    seeds: tuple[StrictInt, ...] = Field((0,), min_length=1, description="seeds of every fit")
    epochs: int = Field(30, ge=0, description="maximum training epochs")
    patience: int = Field(5, ge=1, description="early-stopping patience (epochs without a "
                          "better validation accuracy)")
    lambda_init: Literal["ones", "randn"] = Field("ones", description="initial λ")
    lr: dict[str, float] = Field(
        {}, description="learning rate per method, METHOD=LR (or one LR for every trained "
        "method); default each method's preset (ResiDual 0.8, linear 1e-3, finetune 1e-5)")
    batch_size: dict[str, int] = Field(
        {}, description="minibatch size per method, METHOD=N (or one N for every trained "
        "method); default each method's preset (64, finetune 128)")
    finetune_epochs: int = Field(30, ge=0, description="maximum epochs of finetune")
    classifier: Literal["auto", "text", "centroid"] = Field(
        "auto", description="frozen classifier of every method: text (the zero-shot text "
        "classifier), centroid (per-class mean of the train encodings, the authors' "
        "CentroidClassifier for towers without text) or auto (text when the model has a text "
        "tower, else centroid)")
    centroid_norm: Literal["none", "l2"] = Field(
        "none", description="centroid classifier: none (the authors' plain class means) or l2 "
        "(unit-norm prototypes)")
    head_selection: bool = Field(True, description="also run the head-selection experiment")
    random_seeds: int = Field(10, ge=1, description="seeds of the random head ranking (R)")

    @field_validator("lr", "batch_size", mode="before")
    @classmethod
    def _per_method(cls, value: Any, info) -> Any:
        """``0.1`` / ``"0.1"`` (every method), ``["residual-star=0.5", ...]`` (the command
        line) or ``{"residual-star": 0.5}`` (a grid file): a dict keyed by method or ``*``."""
        from residual_core.method.adapters import PRESETS

        number = float if info.field_name == "lr" else int
        if value is None:
            return {}
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, (list, tuple)):
            pairs = {}
            for item in value:
                key, sep, text = str(item).rpartition("=")
                pairs[key if sep else "*"] = text
            value = pairs
        if not isinstance(value, dict):
            raise ValueError(f"expected METHOD=VALUE pairs or one value, got {value!r}")
        out = {}
        for key, v in value.items():
            if key != "*" and key not in PRESETS:
                raise ValueError(f"unknown method {key!r}; known methods: {', '.join(PRESETS)}")
            try:
                if number is int and isinstance(v, float) and not v.is_integer():
                    raise ValueError(v)
                out[key] = number(v)
            except (TypeError, ValueError):
                what = "a number" if number is float else "an integer"
                raise ValueError(f"{key}: {v!r} is not {what}") from None
            if out[key] <= 0:
                raise ValueError(f"{key}: must be positive, got {v!r}")
        return out

    def setting(self, name: str, method: str) -> float | int | None:
        """The ``lr`` or ``batch_size`` override of ``method`` (None: its preset's)."""
        values = getattr(self, name)
        return values.get(method, values.get("*"))

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: tuple[str, ...]) -> tuple[str, ...]:
        from residual_core.method.adapters import (
            PRESETS,  # torch: only once a grid or call is validated
        )

        unknown = [m for m in methods if m not in PRESETS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known methods: {', '.join(PRESETS)}")
        return methods


class Inputs(StageInputs):
    """A task's train/val/test stores, the spectral store of its bases, the root of the tables
    and where ``finetune`` reads the images (``data_root``)."""

    stores: dict[Literal["train", "val", "test"], str]
    spectral_url: str
    tables_root: str
    data_root: str | None = None

    @field_validator("stores")
    @classmethod
    def _three_splits(cls, stores: dict) -> dict:
        if set(stores) != {"train", "val", "test"}:
            raise ValueError(f"align needs the train, val and test stores, got {sorted(stores)}")
        return stores


class Result(StageResult):
    """Each fit's evaluation row, the head-selection rows, where the weights went."""

    rows: list[dict[str, Any]]
    weights_url: str
    basis_url: str
    seconds: float
    head_selection_rows: list[dict[str, Any]] = Field(default_factory=list)


def _key(inputs: Inputs, params: Params) -> str:
    from residual_core.engines.align import align_key

    s = inputs.stores
    return align_key(s["train"], s["val"], s["test"], inputs.spectral_url, params)


def identity(inputs: Inputs, params: Params) -> dict[str, Any]:
    return {"config_hash": _key(inputs, params), "tables_root": inputs.tables_root}


def is_current(inputs: Inputs, params: Params) -> bool:
    """Every requested fit has its row (same content identity), and the head-selection rows
    exist when asked for."""
    from residual_core.engines.align import plan_align
    from residual_core.formats.feature_store import FeatureStore
    from residual_core.tables import matching_rows

    s = inputs.stores
    try:
        attrs = FeatureStore.open(s["train"]).attrs
        plan = plan_align(s["train"], s["val"], s["test"], inputs.spectral_url, params)
    except StoreError:
        return False
    rows = {table: {r.get("config_hash") for r in matching_rows(
                inputs.tables_root, table, attrs["model"], attrs["dataset"])}
            for table in ("evaluations", "head_selection")}
    return ({h for _, h in plan.fits.values()} <= rows["evaluations"]
            and (not params.head_selection or plan.head_selection[1] in rows["head_selection"]))


def run(inputs: Inputs, params: Params, progress: bool = False, force: bool = False
        ) -> Result:
    from residual_core.engines.align import run_align

    s = inputs.stores
    return run_align(s["train"], s["val"], s["test"], params, basis_url=inputs.spectral_url,
                     tables_root=inputs.tables_root, data_root=inputs.data_root,
                     progress=progress, force=force)


def discard(inputs: Inputs, params: Params) -> None:
    """Nothing to delete: a forced run refits and replaces the task's rows and weights."""


STAGE = Stage("align", 2, ("extract", "spectral"), Params, Inputs, Result, identity, is_current,
              run, discard, summary=("weights_url", "seconds"))
