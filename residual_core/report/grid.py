"""The specialisation-performance link across a grid (METHOD §2, the paper's cross-task reading
of experiment 3): for every (model, weights, dataset) cell, how much of the zero-shot accuracy
the top-ranked heads carry, and whether tasks on which a few heads carry more gain more from
ResiDual.

Per cell, from its ``head_selection`` rows (zero ablation; the text classifier's rows where
there are any) and its ``evaluations`` rows:

- ``carried[ranking][keep]`` = test accuracy with the top heads of ``ranking`` kept /
  zero-shot accuracy (the ``all`` reference row); ``R`` is the mean over its seeds.
- ``specialisation`` = the mean over the keep rules of ``(acc_S − mean acc_R) / acc_zero_shot``:
  how much better the task-aligned heads (S, own accuracy) do than random ones, in units of the
  zero-shot accuracy. 0: no head is special for the task.
- ``gain`` = mean test accuracy of ``gain_method`` (default ``residual-star``) − that of
  ``zero-shot``, over seeds.

Across cells, Pearson's and Spearman's correlation of ``specialisation`` with ``gain`` (at least
3 cells with both; else None).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from residual_core.errors import ResidualError
from residual_core.identity import WeightsId
from residual_core.tables import read_table

GAIN_METHOD = "residual-star"
"""The method whose gain over zero-shot the grid report correlates with specialisation."""


@dataclass(frozen=True)
class GridCell:
    """One cell of a grid as the tables name it: ``weights`` is the weights label
    (``WeightsId.label``'s part after the model: a tag, a checkpoint file name or ``random``)."""

    model: str
    pretrained: str | None
    dataset: str

    @property
    def weights(self) -> str:
        return _weights(self.pretrained)

    @property
    def label(self) -> str:
        return f"{self.model}/{self.weights} {self.dataset}"


@dataclass
class CellSummary:
    cell: GridCell
    zero_shot: float
    carried: dict[str, dict[str, float]]  # ranking -> keep rule -> acc / zero-shot
    fractions: dict[str, float]  # keep rule -> heads kept / all heads
    specialisation: float
    gain: float | None
    classifier: str


@dataclass
class GridReport:
    path: Path
    cells: list[CellSummary]
    pearson: float | None
    spearman: float | None
    table: str  # plain text, for printing


def _weights(pretrained: str | None) -> str:
    return WeightsId("m", pretrained).label.split("/", 1)[1]


def _mine(rows: list[dict], cell: GridCell) -> list[dict]:
    return [r for r in rows if r["model"] == cell.model and r["dataset"] == cell.dataset
            and _weights(r.get("pretrained")) == cell.weights]


def summarise_cell(cell: GridCell, selection: list[dict], evaluations: list[dict],
                   gain_method: str = GAIN_METHOD) -> CellSummary:
    """The :class:`CellSummary` of one cell from its tables' rows (see the module docstring)."""
    selection = _mine(selection, cell)
    if not selection:
        raise ResidualError(f"no head_selection rows for {cell.label}: run the grid's align "
                            "stage with head selection")
    classifiers = {r.get("classifier") or "text" for r in selection}
    classifier = "text" if "text" in classifiers else sorted(classifiers)[0]
    selection = [r for r in selection if (r.get("classifier") or "text") == classifier]
    full = [r["test_acc"] for r in selection if r["ranking"] == "all"]
    if not full:
        raise ResidualError(f"{cell.label}: the head_selection rows have no 'all' reference")
    zero_shot = float(full[0])
    ranked = [r for r in selection if r.get("keep") is not None and r["ablation"] == "zero"]
    by: dict[str, dict[str, list[float]]] = {}
    fractions: dict[str, float] = {}
    for r in ranked:
        by.setdefault(r["ranking"], {}).setdefault(r["keep"], []).append(float(r["test_acc"]))
        fractions[r["keep"]] = float(r["fraction"])
    scale = zero_shot if zero_shot > 0 else float("nan")
    carried = {k: {keep: float(np.mean(v)) / scale for keep, v in rules.items()}
               for k, rules in by.items()}
    keeps = [k for k in carried.get("S", {}) if k in carried.get("R", {})]
    specialisation = (float(np.mean([carried["S"][k] - carried["R"][k] for k in keeps]))
                      if keeps else float("nan"))
    evals = [r for r in _mine(evaluations, cell) if (r.get("classifier") or "text") == classifier]
    acc = {m: [r["test_acc"] for r in evals if r["method"] == m] for m in (gain_method,
                                                                           "zero-shot")}
    gain = (float(np.mean(acc[gain_method]) - np.mean(acc["zero-shot"]))
            if all(acc.values()) else None)
    return CellSummary(cell, zero_shot, carried, fractions, specialisation, gain, classifier)


def _correlations(cells: Sequence[CellSummary]) -> tuple[float | None, float | None]:
    pairs = [(c.specialisation, c.gain) for c in cells
             if c.gain is not None and np.isfinite(c.specialisation)]
    if len(pairs) < 3:
        return None, None
    x, y = (np.asarray(v, dtype=np.float64) for v in zip(*pairs))
    if x.std() == 0 or y.std() == 0:
        return None, None
    from scipy.stats import pearsonr, spearmanr

    return float(pearsonr(x, y)[0]), float(spearmanr(x, y)[0])


def _cell_names(cells: Sequence[CellSummary]) -> list[str]:
    """The dataset when every cell has one model and weights (named above), else
    ``model/weights dataset`` with long weights names shortened."""
    if len({(c.cell.model, c.cell.weights) for c in cells}) == 1:
        return [c.cell.dataset for c in cells]
    return [f"{c.cell.model}/{c.cell.weights[:12]} {c.cell.dataset}" for c in cells]


def _text_table(cells: Sequence[CellSummary], keeps: Sequence[str], gain_method: str) -> str:
    names = _cell_names(cells)
    width = max(18, *(len(n) + 2 for n in names))
    head = (f"{'cell':<{width}}{'zero-shot':>10}" + "".join(f"{'S/R@' + k:>14}" for k in keeps)
            + f"{'special.':>10}{'gain':>9}")
    lines = [head, "-" * len(head)]
    for name, c in zip(names, cells):
        parts = []
        for k in keeps:
            s, r = c.carried.get("S", {}).get(k), c.carried.get("R", {}).get(k)
            parts.append(f"{s:.2f}/{r:.2f}" if s is not None and r is not None else "-")
        gain = f"{c.gain:+.3f}" if c.gain is not None else "-"
        lines.append(f"{name:<{width}}{c.zero_shot:>10.3f}"
                     + "".join(f"{p:>14}" for p in parts) + f"{c.specialisation:>10.3f}"
                     + f"{gain:>9}")
    lines.append(f"S/R@k: accuracy with the top k heads by S / at random (mean of R seeds), as a "
                 f"fraction of zero-shot; special.: mean (S - R) over k; gain: {gain_method} - "
                 "zero-shot test accuracy")
    return "\n".join(lines)


def grid_report(store_root: str | Path, cells: Sequence[GridCell], out_dir: str | Path,
                title: str = "Specialisation across the grid",
                gain_method: str = GAIN_METHOD) -> GridReport:
    """Write ``out_dir/grid_report.md``, ``specialisation.csv`` and ``specialisation.png`` (the
    format of :func:`.plots.figure_output`) for
    the ``cells`` from the tables under ``store_root``.

    Raises:
        ResidualError: no cells, or a cell without head-selection rows.
    """
    from residual_core.report.plots import figure_name, plot_specialisation

    if not cells:
        raise ResidualError("a grid report needs at least one cell")
    selection = read_table(store_root, "head_selection").to_pylist()
    try:
        evaluations = read_table(store_root, "evaluations").to_pylist()
    except ResidualError:
        evaluations = []
    summaries = [summarise_cell(c, selection, evaluations, gain_method) for c in cells]
    pearson, spearman = _correlations(summaries)
    keeps = list(dict.fromkeys(k for s in summaries for k in s.carried.get("S", {})))
    table = _text_table(summaries, keeps, gain_method)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figure = figure_name("specialisation")
    plot_specialisation(summaries, out / figure, pearson=pearson, gain_method=gain_method,
                        names=_cell_names(summaries))
    _write_csv(summaries, keeps, out / "specialisation.csv")

    def fmt(v: float | None) -> str:
        return "n/a (fewer than 3 cells with a gain, or a constant)" if v is None else f"{v:.3f}"

    models = sorted({f"`{c.cell.model}` ({c.cell.pretrained or 'random'})" for c in summaries})
    lines = [f"# {title}", "", f"{len(summaries)} cells of {', '.join(models)}; head selection "
             "with zero ablation; classifier per cell as recorded.", "", "```", table, "```", "",
             f"Correlation across cells of specialisation with the {gain_method} gain: Pearson "
             f"{fmt(pearson)}, Spearman {fmt(spearman)}.", "",
             f"![specialisation]({figure})", ""]
    path = out / "grid_report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return GridReport(path, summaries, pearson, spearman, table)


def _write_csv(cells: Sequence[CellSummary], keeps: Sequence[str], path: Path) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["model", "weights", "dataset", "classifier", "zero_shot", "specialisation",
                    "gain"] + [f"{r}@{k}" for r in ("S", "U|T", "R") for k in keeps])
        for c in cells:
            w.writerow([c.cell.model, c.cell.weights, c.cell.dataset, c.classifier,
                        c.zero_shot, c.specialisation, c.gain]
                       + [c.carried.get(r, {}).get(k) for r in ("S", "U|T", "R") for k in keeps])
