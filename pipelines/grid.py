"""Experiment grids as typed data: which models run on which datasets with which methods, and the
settings of every stage.

A :class:`Grid` is a list of :class:`Sweep` blocks (each a models × datasets product with an
optional basis dataset) plus grid-wide stage settings (:class:`Settings`: align methods, seeds
and training, extraction, spectral, pretraining, basis similarity). Everything is a pydantic model:
names (models, pretrained tags, datasets, methods) and types are checked when a grid is built,
so a wrong grid is refused before any stage runs. Grids are JSON files
(``Grid.model_dump_json()``) or one of the named grids of :data:`NAMED_GRIDS` (JSON files too,
in ``pipelines/grids/``; ``residual grid show NAME`` prints one with every setting):

- ``paper``: the open_clip models and the ten datasets of METHOD §4 with ImageNet train as the
  basis dataset, plus the embedded world (``residual-tiny`` pretrained on the synthetic world,
  its five ``world/*`` tasks);
- ``demo``: the embedded world only (runs offline on a CPU in minutes);
- ``smoke``: ``residual-tiny`` with random weights on one world task, two cheap methods (checks
  that a server/worker setup runs flows end to end).

This module imports neither Prefect nor, until a grid is validated, torch: the CLI builds its
parser from it and validates a grid before starting any flow.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from residual_core.errors import ResidualError
from residual_core.identity import (
    EMBEDDED_MODEL,
    HF_MODEL_PREFIX,
    WORLD_WEIGHTS,
    WeightsId,
    canonical_dataset,
    canonical_model,
    is_hf_model,
)
from residual_core.stages import STAGES
from residual_core.stages.align import Params as AlignParams
from residual_core.stages.explain import Params as ExplainParams
from residual_core.stages.extract import Params as ExtractParams
from residual_core.stages.extract import Split
from residual_core.stages.pretrain import Params as PretrainParams
from residual_core.stages.spectral import Params as SpectralParams

__all__ = ["NAMED_GRIDS", "STAGES", "Cell", "Grid", "GridError", "ModelSpec", "Settings", "Split",
           "Stage", "Sweep", "load_grid", "validation_message"]

Stage = Literal[tuple(STAGES)]  # type: ignore[valid-type]
"""A stage name (what ``--force`` names)."""



class GridError(ResidualError):
    """A grid that cannot be loaded: unknown name, unreadable file, invalid content."""


class _Frozen(BaseModel):
    """Immutable, no unknown fields (a typo in a grid file is an error, not a silent default)."""

    model_config = ConfigDict(frozen=True, extra="forbid")



def _world_tasks() -> tuple[str, ...]:
    from residual_core.world.rendering import TASKS  # importing it registers the world/* datasets

    return TASKS


def _check_dataset(name: str, info: ValidationInfo) -> str:
    """A registered dataset or an existing ``imagefolder:PATH`` (reads no image); a bare
    ``imagefolder:NAME`` is the folder under the dataset root (:func:`load_grid`'s
    ``data_root``, default ``<data>/datasets``), spelled with its absolute path."""
    from residual_core.datasets import dataset_info
    from residual_core.layout import Layout

    _world_tasks()
    root = (info.context or {}).get("data_root") or Layout.of().datasets
    name = canonical_dataset(name, root)
    try:
        dataset_info(name)
    except ResidualError as exc:  # pydantic reports ValueErrors as validation errors
        raise ValueError(str(exc)) from None
    return name


class ModelSpec(_Frozen):
    """An open_clip architecture and its weights: a pretrained tag, a checkpoint file, ``None``
    (random weights, seeded) or :data:`WORLD_WEIGHTS` for the embedded model; or a
    ``transformers`` tower ``hf:HUB_ID`` / ``hf:DIR`` (no ``pretrained``: the name holds the
    weights; they are looked up when the cell runs)."""

    name: str
    pretrained: str | None = None

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        from residual_core.method.models import list_models

        if is_hf_model(name):
            if not name[len(HF_MODEL_PREFIX):].strip():
                raise ValueError(f"{name!r} names no model: use hf:HUB_ID or hf:DIR")
            return canonical_model(name)
        known = list_models()
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown model {name!r}.{hint} (`residual models` lists them)")
        return name

    @model_validator(mode="after")
    def _known_weights(self) -> "ModelSpec":
        import open_clip

        tag = self.pretrained
        if is_hf_model(self.name):
            if tag is not None:
                raise ValueError(f"{self.name}: hf: models carry their weights in the name; "
                                 f"drop pretrained ({tag!r})")
            return self
        if tag is None or os.path.isfile(tag) or open_clip.get_pretrained_cfg(self.name, tag):
            return self
        if tag == WORLD_WEIGHTS:
            if self.name != EMBEDDED_MODEL:
                raise ValueError(f"pretrained {WORLD_WEIGHTS!r} (synthetic-world weights) exists "
                                 f"only for {EMBEDDED_MODEL}, not {self.name}")
            return self
        tags = open_clip.list_pretrained_tags_by_model(self.name)
        raise ValueError(f"unknown pretrained tag or missing checkpoint file {tag!r} for "
                         f"{self.name}; known tags: {', '.join(tags) or 'none'}")

    @property
    def label(self) -> str:
        """``name/tag``, ``name/<checkpoint file name>`` or ``name/random``."""
        return WeightsId(self.name, self.pretrained).label


class Settings(_Frozen):
    """Stage settings shared by every cell of a grid."""

    align: AlignParams = AlignParams()
    extract: ExtractParams = ExtractParams()
    spectral: SpectralParams = SpectralParams()
    pretrain: PretrainParams = PretrainParams()
    explain: ExplainParams | None = None
    """When set, every cell's train store is explained in text (table ``head_texts``)."""
    similarity_evr: float | None = Field(None, gt=0, le=1)
    """When set, the bases of each cell's own train split are compared with those of its sweep's
    basis dataset (basis similarity at this EVR truncation, table ``basis_similarity``); cells
    without a basis dataset have nothing to compare."""


class Sweep(_Frozen):
    """Every model on every dataset; the spectral bases come from ``basis``'s train split
    (``None``: each dataset's own train split)."""

    models: list[ModelSpec] = Field(min_length=1)
    datasets: list[str] = Field(min_length=1)
    basis: str | None = None

    @field_validator("datasets")
    @classmethod
    def _known_datasets(cls, names: list[str], info: ValidationInfo) -> list[str]:
        return [_check_dataset(n, info) for n in names]

    @field_validator("basis")
    @classmethod
    def _known_basis(cls, name: str | None, info: ValidationInfo) -> str | None:
        return None if name is None else _check_dataset(name, info)


class Cell(_Frozen):
    """One (model, dataset) of a grid: extract its splits, fit the bases, align."""

    model: ModelSpec
    dataset: str
    basis: str | None = None

    @property
    def basis_dataset(self) -> str:
        return self.basis or self.dataset

    @property
    def label(self) -> str:
        return f"{self.model.label} on {self.dataset}"


class Grid(Settings):
    """A named experiment grid: sweeps of models × datasets, methods and stage settings."""

    name: str = "custom"
    sweeps: list[Sweep] = Field(min_length=1)

    def settings(self) -> Settings:
        """The stage settings alone (what each cell needs)."""
        return Settings.model_validate(self.model_dump(include=set(Settings.model_fields)))

    def cells(self) -> list[Cell]:
        """Every (model, dataset) of the sweeps, in order, each once."""
        seen: dict[tuple, Cell] = {}
        for sweep in self.sweeps:
            for model in sweep.models:
                for dataset in sweep.datasets:
                    seen.setdefault((model, dataset), Cell(model=model, dataset=dataset,
                                                           basis=sweep.basis))
        return list(seen.values())

    def models(self) -> list[ModelSpec]:
        return list(dict.fromkeys(c.model for c in self.cells()))


# ------------------------------------------------------------------------------ named grids

GRIDS_DIR = Path(__file__).parent / "grids"
"""The named grids, as data: ``<name>.json`` files in the same format as a user's grid file."""

NAMED_GRIDS = ("paper", "demo", "smoke")
"""The named grids (each is ``GRIDS_DIR/<name>.json``)."""


def named_grid_file(name: str) -> Path:
    """The JSON file of a named grid (a one-line error for an unknown name)."""
    if name not in NAMED_GRIDS:
        raise GridError(f"unknown grid {name!r}: use {', '.join(NAMED_GRIDS)} or a JSON file")
    return GRIDS_DIR / f"{name}.json"


def validation_message(exc: ValidationError) -> str:
    """One line naming each invalid field and why (for the CLI and flow errors)."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


def load_grid(grid: "Grid | str | dict", data_root: str | os.PathLike | None = None) -> Grid:
    """A grid from a :class:`Grid`, a dict, a named grid (:data:`NAMED_GRIDS`) or a JSON file.
    ``data_root``: the dataset root against which a bare ``imagefolder:NAME`` is resolved
    (default ``<data>/datasets``).

    Raises :class:`GridError` (one line) for an unknown name, an unreadable file or an invalid
    grid.
    """
    if isinstance(grid, Grid):
        return grid
    if isinstance(grid, str):
        path = named_grid_file(grid) if grid in NAMED_GRIDS else Path(grid)
        if grid in NAMED_GRIDS or grid.endswith(".json") or os.path.isfile(grid):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))  # JSON is UTF-8
            except UnicodeDecodeError as exc:
                raise GridError(f"cannot read grid file {grid}: it is not UTF-8 text ({exc}); "
                                "a grid file is JSON (Grid.model_dump_json())") from None
            except (OSError, json.JSONDecodeError) as exc:
                raise GridError(f"cannot read grid file {grid}: {exc}") from None
        else:
            raise GridError(f"unknown grid {grid!r}: use {', '.join(NAMED_GRIDS)} or a JSON file")
    else:
        data = grid
    try:
        return Grid.model_validate(data, context={"data_root": data_root})
    except ValidationError as exc:
        raise GridError(f"invalid grid: {validation_message(exc)}") from None
