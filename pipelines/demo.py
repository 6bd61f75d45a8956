"""The main job on the embedded default: the whole pipeline through the Prefect flows.

pretrain the embedded tiny CLIP on the synthetic world -> extract every task's splits ->
spectral -> align with every method -> tables; then print the results table, check the
decomposition's exactness on the trained model, and write a report under ``data/reports/``.
Every stage is cached: a second run only reads results.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from residual_core.datasets import load_dataset
from residual_core.identity import EMBEDDED_MODEL, WORLD_WEIGHTS
from residual_core.layout import Layout
from residual_core.method.decompose import decompose
from residual_core.method.models import load_model
from residual_core.report.grid import GridCell, grid_report
from residual_core.report.markdown import model_report
from residual_core.world.rendering import TASKS


COMPARE_TASK = TASKS[1]
"""The task whose train split the two embedded models are compared on (all five tasks share the
same images)."""


def exactness_check(checkpoint: str, task: str, n: int = 64) -> float:
    """Max relative error of ``Σ_u y_u`` against ``encode_image`` on ``n`` test images."""
    loaded = load_model(EMBEDDED_MODEL, checkpoint, device="cpu")
    data = load_dataset(task, "test", transform=loaded.preprocess)
    images = torch.stack([data[i][0] for i in range(min(n, len(data)))])
    dec = decompose(loaded.model, images)
    with torch.inference_mode():
        ref = loaded.model.encode_image(images).float()
    return float(((dec.contributions.sum(1) - ref).norm(dim=-1) / ref.norm(dim=-1)).max())


def run_demo(store_root: str | None = None, force: list[str] | None = None) -> int:
    """Run the ``demo`` grid through :func:`pipelines.flows.experiment_flow`; print and report."""
    from pipelines.flows import compare_flow, count_stage_runs, experiment_flow
    from pipelines.grid import ModelSpec
    from residual_core.stages.pretrain import Params as PretrainParams

    layout = Layout.of(store_root)
    root = Path(layout.root)
    start = time.perf_counter()
    result = experiment_flow(grid="demo", force=force, store_root=str(root))
    # a second embedded model (pretraining seed 1) for the analyses across models
    world = ModelSpec(name=EMBEDDED_MODEL, pretrained=WORLD_WEIGHTS)
    compared = compare_flow(world, world, COMPARE_TASK, other_pretrain=PretrainParams(seed=1),
                            store_root=str(root), force=force)
    seconds = time.perf_counter() - start
    n_runs, computed = count_stage_runs(result)
    n_runs += len(compared["runs"])
    computed += sum(r["state"] != "Cached" for r in compared["runs"])
    (model,) = result["models"]
    checkpoint = model["pretrained"]
    report = model_report(root, EMBEDDED_MODEL, checkpoint, datasets=TASKS,
                          out_dir=layout.reports("demo"), title="ResiDual on the embedded world")
    across = grid_report(root, [GridCell(EMBEDDED_MODEL, checkpoint, t) for t in TASKS],
                         layout.reports("demo"), title="Specialisation across the world's tasks")
    err = exactness_check(checkpoint, TASKS[0])
    print(f"\npipeline: {n_runs} stage runs, {computed} computed, {n_runs - computed} cached, "
          f"{seconds:.0f} s")
    print(f"model: {EMBEDDED_MODEL} pretrained on the world ({checkpoint})\n")
    print(report.results_table)
    print(f"\nexactness on the trained model: max ||sum_u y_u - encode_image|| / ||encode_image||"
          f" = {err:.2e} ({'OK' if err < 1e-4 else 'FAILED'}, tolerance 1e-4)")
    r = "n/a" if across.pearson is None else f"{across.pearson:.2f}"
    print(f"specialisation vs residual-star gain across the {len(TASKS)} tasks: Pearson {r} "
          f"({across.path})")
    print(f"report: {report.path}")
    return 0 if err < 1e-4 else 1
