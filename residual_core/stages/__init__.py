"""The stages of the pipeline, one module each, and the stage graph derived from them.

=========== ============================================ =====================================
stage       module (engine it runs)                      outputs
=========== ============================================ =====================================
pretrain    :mod:`.pretrain` (``pretrain_embedded``)     checkpoint file (``pretrained: world``)
extract     :mod:`.extract` (``extract.extract``)        feature store of one split
spectral    :mod:`.spectral` (``run_spectral``)          spectral store, ``spectra`` and
                                                         ``unit_stats`` rows
align       :mod:`.align` (``run_align``)                ``evaluations``, ``head_selection``
                                                         rows, ``align.zarr``
similarity  :mod:`.similarity` (``similarity``)          ``basis_similarity`` rows
explain     :mod:`.explain` (``run_explain``)            ``head_texts`` rows
=========== ============================================ =====================================

Each module declares ``Params`` (one schema for the core, the grid files and the CLI),
``Inputs``, ``Result`` and a :class:`~.base.Stage` (``STAGE``): its key, when it is current, how
it runs and how its output is discarded. Adding a stage is a new module here and one line in
:data:`STAGES`. Stage modules import their engines (torch, zarr) only when they run.
"""

from __future__ import annotations

from typing import Iterable

from residual_core.stages import align, explain, extract, pretrain, similarity, spectral
from residual_core.stages.base import RUN_ONLY, Stage, StageInputs, StageParams, StageResult

__all__ = ["RUN_ONLY", "STAGES", "Stage", "StageInputs", "StageParams", "StageResult",
           "downstream"]

STAGES: dict[str, Stage] = {s.name: s for s in (pretrain.STAGE, extract.STAGE, spectral.STAGE,
                                                align.STAGE, similarity.STAGE,
                                                explain.STAGE)}
"""Every stage by name, in an order where each comes after the stages it reads."""


def downstream(names: Iterable[str]) -> frozenset[str]:
    """The stages in ``names`` and every stage that reads their outputs, directly or not."""
    unknown = set(names) - set(STAGES)
    if unknown:
        raise KeyError(f"unknown stages {sorted(unknown)}; stages: {', '.join(STAGES)}")
    closed = set(names)
    while True:
        more = {s.name for s in STAGES.values() if closed.intersection(s.reads)} - closed
        if not more:
            return frozenset(closed)
        closed |= more
