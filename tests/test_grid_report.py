"""The grid report (issue 12 §5): per-cell S vs R shares of the zero-shot accuracy, the
specialisation score, the ResiDual gain and their correlation across cells, on rows whose
expected summaries are computed by hand; and ``residual report --grid`` on a real grid run."""

import csv

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr

from residual_core.errors import ResidualError
from residual_core.report.grid import GridCell, grid_report, summarise_cell
from residual_core.tables import write_rows

MODEL = "residual-tiny"


def _selection(dataset: str, zero_shot: float, s: dict, r: dict, pretrained="random",
               classifier="text") -> list[dict]:
    """head_selection rows of one cell: the 'all' reference, S per keep rule, R (two seeds
    per rule, given as pairs)."""
    fractions = {"1": 1 / 16, "25%": 4 / 16}
    rows = [{"model": MODEL, "dataset": dataset, "pretrained": pretrained, "ranking": "all",
             "keep": None, "n_heads": 16, "fraction": 1.0, "ablation": "none",
             "test_acc": zero_shot, "classifier": classifier}]
    for keep, acc in s.items():
        rows += [{"model": MODEL, "dataset": dataset, "pretrained": pretrained, "ranking": "S",
                  "keep": keep, "n_heads": int(fractions[keep] * 16),
                  "fraction": fractions[keep], "ablation": a, "test_acc": acc if a == "zero"
                  else 0.0, "classifier": classifier} for a in ("zero", "mean")]
    for keep, accs in r.items():
        rows += [{"model": MODEL, "dataset": dataset, "pretrained": pretrained, "ranking": "R",
                  "seed": i, "keep": keep, "n_heads": int(fractions[keep] * 16),
                  "fraction": fractions[keep], "ablation": "zero", "test_acc": acc,
                  "classifier": classifier} for i, acc in enumerate(accs)]
    return rows


def _evals(dataset: str, zero_shot: float, star: list[float], pretrained="random") -> list:
    rows = [{"model": MODEL, "dataset": dataset, "pretrained": pretrained,
             "method": "zero-shot", "seed": 0, "test_acc": zero_shot, "classifier": "text"}]
    rows += [{"model": MODEL, "dataset": dataset, "pretrained": pretrained,
              "method": "residual-star", "seed": i, "test_acc": a, "classifier": "text"}
             for i, a in enumerate(star)]
    return rows


CELLS = {  # dataset: zero-shot, S by keep, R pairs by keep, residual-star seeds
    "t1": (0.5, {"1": 0.4, "25%": 0.5}, {"1": [0.1, 0.3], "25%": [0.2, 0.4]}, [0.7, 0.8]),
    "t2": (0.8, {"1": 0.2, "25%": 0.6}, {"1": [0.2, 0.2], "25%": [0.4, 0.4]}, [0.85, 0.85]),
    "t3": (0.4, {"1": 0.4, "25%": 0.4}, {"1": [0.0, 0.0], "25%": [0.1, 0.1]}, [0.9, 0.9]),
    "t4": (0.6, {"1": 0.3, "25%": 0.6}, {"1": [0.3, 0.3], "25%": [0.3, 0.3]}, [0.6, 0.7]),
}


@pytest.fixture
def tables(tmp_path):
    for d, (zs, s, r, star) in CELLS.items():
        write_rows(tmp_path, "head_selection", _selection(d, zs, s, r), key=f"hs-{d}")
        write_rows(tmp_path, "evaluations", _evals(d, zs, star), key=f"ev-{d}")
    return tmp_path


def _expected(d):
    zs, s, r, star = CELLS[d]
    spec = np.mean([(s[k] - np.mean(r[k])) / zs for k in s])
    return spec, np.mean(star) - zs


def test_cell_summary_by_hand(tables):
    from residual_core.tables import read_table

    sel = read_table(tables, "head_selection").to_pylist()
    ev = read_table(tables, "evaluations").to_pylist()
    c = summarise_cell(GridCell(MODEL, None, "t1"), sel, ev)
    assert c.zero_shot == 0.5 and c.classifier == "text"
    assert c.carried["S"] == pytest.approx({"1": 0.8, "25%": 1.0})
    assert c.carried["R"] == pytest.approx({"1": 0.4, "25%": 0.6})  # mean over seeds / zs
    assert c.fractions == {"1": 1 / 16, "25%": 0.25}
    assert c.specialisation == pytest.approx(0.4) == pytest.approx(_expected("t1")[0])
    assert c.gain == pytest.approx(0.25)


def test_grid_report_table_csv_plot_and_correlation(tables, tmp_path):
    cells = [GridCell(MODEL, "random", d) for d in CELLS]
    report = grid_report(tables, cells, tmp_path / "out")
    spec, gain = zip(*(_expected(d) for d in CELLS))
    assert [c.specialisation for c in report.cells] == pytest.approx(list(spec))
    assert [c.gain for c in report.cells] == pytest.approx(list(gain))
    assert report.pearson == pytest.approx(pearsonr(spec, gain)[0])
    assert report.spearman == pytest.approx(spearmanr(spec, gain)[0])
    assert (tmp_path / "out" / "specialisation.png").stat().st_size > 10_000
    text = report.path.read_text()
    assert f"Pearson {report.pearson:.3f}" in text and "specialisation.png" in text
    assert "0.80/0.40" in report.table  # t1: S/R at keep 1
    with open(tmp_path / "out" / "specialisation.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["dataset"] for r in rows] == list(CELLS)
    assert float(rows[0]["S@1"]) == pytest.approx(0.8)


def test_fewer_than_three_cells_have_no_correlation_and_a_missing_cell_is_named(tables,
                                                                                 tmp_path):
    report = grid_report(tables, [GridCell(MODEL, None, "t1"), GridCell(MODEL, None, "t2")],
                         tmp_path / "two")
    assert report.pearson is None and "n/a" in report.path.read_text()
    with pytest.raises(ResidualError, match="no head_selection rows for residual-tiny/random "
                                            "nope"):
        grid_report(tables, [GridCell(MODEL, None, "nope")], tmp_path / "x")
    with pytest.raises(ResidualError, match="no head_selection rows"):  # other weights
        grid_report(tables, [GridCell(MODEL, "/ckpt/other.pt", "t1")], tmp_path / "y")


def test_text_rows_are_preferred_over_centroid_rows(tmp_path):
    write_rows(tmp_path, "head_selection", _selection("t1", 0.5, {"1": 0.4}, {"1": [0.1, 0.3]}),
               key="text")
    write_rows(tmp_path, "head_selection",
               _selection("t1", 0.9, {"1": 0.9}, {"1": [0.0, 0.0]}, classifier="centroid"),
               key="centroid")
    report = grid_report(tmp_path, [GridCell(MODEL, None, "t1")], tmp_path / "out")
    (c,) = report.cells
    assert c.classifier == "text" and c.zero_shot == 0.5 and c.gain is None


def test_a_cell_at_zero_accuracy_has_no_share_but_still_plots(tmp_path):
    write_rows(tmp_path, "head_selection", _selection("t0", 0.0, {"1": 0.0}, {"1": [0.0, 0.0]}),
               key="zero")
    report = grid_report(tmp_path, [GridCell(MODEL, None, "t0")], tmp_path / "out")
    assert np.isnan(report.cells[0].specialisation)
    assert (tmp_path / "out" / "specialisation.png").is_file()
