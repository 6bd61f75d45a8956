"""A Markdown report with PNG plots from the result tables of one model over several tasks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .align import rank_heads
from .align_stage import stored_lambdas
from .errors import ResidualError
from .plots import (plot_accuracy_vs_parameters, plot_head_zero_shot, plot_lambda_heatmap,
                    plot_spectra)
from .store import FeatureStore, slug
from .tables import read_table

METHOD_ORDER = ("zero-shot", "coarse", "residual-star", "residual-full", "linear", "finetune")


@dataclass
class Report:
    path: Path
    results_table: str  # plain-text task x method table, for printing


def results_table(rows: Sequence[dict]) -> str:
    """Plain-text table: one line per task, test accuracy (and parameters) per method."""
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in rows)]
    methods += sorted({r["method"] for r in rows} - set(methods))
    best: dict[tuple[str, str], dict] = {}
    for r in rows:  # mean over seeds
        cell = best.setdefault((r["dataset"], r["method"]), {"acc": [], "params": 0})
        cell["acc"].append(r["test_acc"])
        cell["params"] = r["trainable_parameters"]
    tasks = sorted({r["dataset"] for r in rows})
    width = max(14, *(len(m) + 2 for m in methods))
    head = f"{'task':<18}" + "".join(f"{m:>{width}}" for m in methods)
    lines = [head, "-" * len(head)]
    for t in tasks:
        cells = []
        for m in methods:
            c = best.get((t, m))
            cells.append(f"{np.mean(c['acc']):.3f} ({_short(c['params'])})" if c else "-")
        lines.append(f"{t:<18}" + "".join(f"{c:>{width}}" for c in cells))
    lines.append("cells: mean test accuracy over seeds (trainable parameters)")
    return "\n".join(lines)


def _short(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e4 else str(int(n))


def write_report(store_root: str | Path, model: str, task_stores: dict[str, tuple[str, str, str]],
                 out_dir: str | Path, title: str = "ResiDual report") -> Report:
    """Write ``out_dir/report.md`` and its PNGs for ``model`` on the tasks
    ``{dataset: (train_url, val_url, test_url)}`` from the Parquet tables under ``store_root``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    evals = [r for r in read_table(store_root, "evaluations", model=model).to_pylist()
             if r["dataset"] in task_stores]
    if not evals:
        raise ResidualError(f"no evaluations of {model} on {sorted(task_stores)} under "
                            f"{store_root}: run the align stage first")
    table = results_table(evals)
    first_train = FeatureStore.open(next(iter(task_stores.values()))[0])
    n_layers, n_heads, dh = (first_train.dims.layer, first_train.dims.head,
                             first_train.dims.head_dim)

    lines = [f"# {title}", "", f"Model: `{model}` ({first_train.attrs.get('pretrained')}); "
             f"{n_layers} layers × {n_heads} heads (dh = {dh}), embed dim "
             f"{first_train.dims.embed}.", "", "## Test accuracy by task and method", "",
             "```", table, "```", ""]
    plot_accuracy_vs_parameters(evals, out / "accuracy_vs_parameters.png")
    lines += ["![accuracy vs parameters](accuracy_vs_parameters.png)", ""]

    scores = {t: rank_heads(urls[1])["S"] for t, urls in task_stores.items()}
    plot_head_zero_shot(scores, n_layers, n_heads, out / "head_zero_shot.png")
    lines += ["## Head specialisation", "",
              "Per-head zero-shot accuracy (S) on each task's validation split; the top head:", ""]
    for t, s in scores.items():
        top = int(np.argmax(s))
        lines.append(f"- `{t}`: L{top // n_heads}H{top % n_heads} ({s[top]:.3f})")
    lines += ["", "![per-head zero-shot accuracy](head_zero_shot.png)", ""]

    lines += ["## Spectra", ""]
    for t, urls in task_stores.items():
        split = FeatureStore.open(urls[0]).attrs["split"]
        stats = read_table(store_root, "unit_stats", model=model, dataset=t,
                           filters={"split": split}).to_pylist()
        spectra = read_table(store_root, "spectra", model=model, dataset=t,
                             filters={"split": split, "kind": "head"}).to_pylist()
        name = f"spectra_{slug(t)}.png"
        plot_spectra(stats, spectra, out / name, title=t)
        k90 = [r["k90"] for r in stats if r["kind"] == "head"]
        twonn = [r["twonn"] for r in stats if r["kind"] == "head"]
        lines += [f"- `{t}`: head K_90 median {np.median(k90):.0f} (max {max(k90)}), TwoNN median "
                  f"{np.median(twonn):.1f}, of dh = {dh}: ![{t}]({name})"]
    lines.append("")

    lines += ["## Learned λ (residual-star, seed 0)", ""]
    for t, urls in task_stores.items():
        try:
            lam = stored_lambdas(str(Path(urls[0]).parent / "align.zarr"), "residual-star", 0)
        except ResidualError:
            continue
        name = f"lambda_{slug(t)}.png"
        plot_lambda_heatmap(lam, n_layers, n_heads, out / name, title=f"mean |λ| — {t}")
        lines.append(f"![λ {t}]({name})")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return Report(path, table)
