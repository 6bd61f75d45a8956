"""The pretrain stage: the embedded model pretrained on the synthetic world
(:func:`residual_core.world.pretraining.pretrain_embedded`), for ``pretrained: world``.

Its key is the checkpoint's path, whose name hashes the whole training config and the seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from residual_core.stages.base import Stage, StageInputs, StageParams, StageResult


class Params(StageParams):
    """Pretraining of the embedded model (``None`` keeps
    :class:`residual_core.world.pretraining.PretrainConfig`'s value)."""

    seed: int = Field(0, description="seeds the initialisation, the samples and the captions")
    steps: int | None = Field(None, ge=1, description="training steps")
    batch_size: int | None = Field(None, ge=2, description="image-caption pairs per step")


class Inputs(StageInputs):
    """Where checkpoints live."""

    out_dir: str


class Result(StageResult):
    checkpoint: str


def checkpoint(inputs: Inputs, params: Params) -> Path:
    """Where the checkpoint of these parameters is written."""
    from residual_core.world.pretraining import checkpoint_path

    return checkpoint_path(inputs.out_dir, seed=params.seed, steps=params.steps,
                           batch_size=params.batch_size)


def identity(inputs: Inputs, params: Params) -> dict[str, Any]:
    return {"checkpoint": str(checkpoint(inputs, params))}


def is_current(inputs: Inputs, params: Params) -> bool:
    return checkpoint(inputs, params).is_file()


def run(inputs: Inputs, params: Params, progress: bool = False, force: bool = False
        ) -> Result:
    from residual_core.world.pretraining import pretrain_embedded

    path = pretrain_embedded(inputs.out_dir, seed=params.seed, steps=params.steps,
                             batch_size=params.batch_size, progress=progress)
    return Result(checkpoint=str(path))


def discard(inputs: Inputs, params: Params) -> None:
    checkpoint(inputs, params).unlink(missing_ok=True)


STAGE = Stage("pretrain", 1, (), Params, Inputs, Result, identity, is_current, run, discard,
              summary=("checkpoint",))
