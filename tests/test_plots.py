"""Plots are written as readable PNG files from the shapes the stages produce, with the parts a
paper needs: colour bars, shared scales, error bars, chance lines, legends outside the data."""

import numpy as np
import pytest
from PIL import Image

from residual_core.report import plots
from residual_core.report.plots import (
    plot_accuracy_vs_parameters,
    plot_head_selection,
    plot_head_zero_shot,
    plot_lambda_heatmap,
    plot_spectra,
)


def _png_ok(path):
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
        arr = np.asarray(im.convert("L"))
    assert arr.std() > 5  # not a blank canvas


def test_all_plots(tmp_path):
    stats, spectra = [], []
    for l in range(3):
        for h in range(2):
            unit = f"L{l}H{h}"
            stats.append({"unit": unit, "kind": "head", "layer": l, "head": h, "k90": 3 + l,
                          "twonn": 2.5 + l})
            evr = np.cumsum(np.sort(np.random.default_rng(l).random(8))[::-1])
            for k, c in enumerate(evr / evr[-1]):
                spectra.append({"unit": unit, "kind": "head", "component": k,
                                "cumulative_evr": float(c)})
    _png_ok(plot_spectra(stats, spectra, tmp_path / "s.png", title="t"))
    lambdas = {f"L{l}H{h}": np.arange(1, 4) * (l + h) for l in range(3) for h in range(2)}
    _png_ok(plot_lambda_heatmap(lambdas, 3, 2, tmp_path / "l.png"))
    _png_ok(plot_head_zero_shot({"a": np.linspace(0, 1, 6), "b": np.ones(6) / 2}, 3, 2,
                                tmp_path / "z.png"))
    rows = [{"dataset": d, "method": m, "trainable_parameters": p, "test_acc": a}
            for d in ("x", "y") for m, p, a in (("zero-shot", 0, .3), ("coarse", 6, .6))]
    _png_ok(plot_accuracy_vs_parameters(rows, tmp_path / "a.png"))
    selection = [{"dataset": d, "ranking": rk, "keep": str(n), "n_heads": n, "ablation": a,
                  "test_acc": min(1.0, 0.2 + 0.1 * n + 0.01 * s)}
                 for d in ("x", "y") for rk, s in (("S", 0), ("R", 0), ("R", 1))
                 for n in (1, 2, 4) for a in ("zero", "mean")]
    selection += [{"dataset": d, "ranking": rk, "keep": None, "n_heads": 6, "ablation": a,
                   "test_acc": acc} for d in ("x", "y")
                  for rk, a, acc in (("heads", "zero", .7), ("layers", "zero", .1), ("all", "none", .9))]
    _png_ok(plot_head_selection(selection, tmp_path / "h.png"))


@pytest.fixture
def figures(monkeypatch):
    """The figures the plots write (kept open instead of closed after saving)."""
    kept = []
    monkeypatch.setattr(plots.plt, "close", kept.append)
    return kept


def _images(ax):
    return ax.get_images()


def test_lambda_maps_show_every_component_on_one_scale_across_tasks(figures, tmp_path):
    units = ["emb", "L0.mlp", "L1.mlp", "L0H0", "L0H1", "L1H0", "L1H1"]  # canonical order
    rng = np.random.default_rng(0)
    fit_a = {u: rng.normal(1, 0.5, size=3 + i) for i, u in reversed(list(enumerate(units)))}
    fit_b = {u: 0.1 * v[:2] for u, v in fit_a.items()}
    mean_top, half = plots.lambda_scale([fit_a, fit_b])
    assert mean_top == max(np.abs(v).mean() for f in (fit_a, fit_b) for v in f.values())
    assert half == max(np.abs(v).max() for f in (fit_a, fit_b) for v in f.values())
    for fit in (fit_a, fit_b):
        plots.plot_lambda_heatmap(fit, 2, 2, tmp_path / "l.png", scale=(mean_top, half))
    for fig, fit in zip(figures, (fit_a, fit_b)):
        heads, components = (ax for ax in fig.axes if _images(ax) and ax.get_xlabel())
        (per_head,), (per_component,) = _images(heads), _images(components)
        assert per_head.norm.vmax == mean_top and per_head.norm.vmin == 0
        assert (per_component.norm.vmin, per_component.norm.vmax) == (-half, half)
        grid = per_head.get_array()
        assert grid[1, 0] == pytest.approx(np.abs(fit["L1H0"]).mean())
        matrix = np.ma.filled(per_component.get_array(), np.nan)
        assert matrix.shape == (len(units), max(len(v) for v in fit.values()))
        for i, u in enumerate(units):  # rows in canonical order, λ by component, blank after
            np.testing.assert_array_equal(matrix[i, :len(fit[u])], fit[u])
            assert np.isnan(matrix[i, len(fit[u]):]).all()
        labels = {ax.get_ylabel() for ax in fig.axes}
        assert {"mean |λ|", "λ"} <= labels  # a colour bar on each map


def test_accuracy_has_error_bars_over_seeds_and_its_legend_outside(figures, tmp_path):
    rows = [{"dataset": "x", "method": "coarse", "trainable_parameters": 6, "test_acc": a}
            for a in (0.5, 0.6, 0.7)]
    rows.append({"dataset": "x", "method": "zero-shot", "trainable_parameters": 0,
                 "test_acc": 0.3})
    plots.plot_accuracy_vs_parameters(rows, tmp_path / "a.png")
    (fig,) = figures
    ax = fig.axes[0]
    bars = {int(c.lines[0].get_xdata()[0]): c for c in ax.containers}
    assert set(bars) == {1, 6}  # zero-shot drawn at 1 parameter
    coarse = bars[6]
    assert coarse.lines[0].get_ydata()[0] == pytest.approx(0.6)
    (segment,) = coarse.lines[2][0].get_segments()
    assert [y for _, y in segment] == pytest.approx([0.6 - np.std([.5, .6, .7]),
                                                     0.6 + np.std([.5, .6, .7])])
    assert not bars[1].has_yerr or not bars[1].lines[2]  # one seed: no bar
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    assert legend.x0 >= ax.get_window_extent(renderer).x1  # outside the data


def test_heatmaps_have_colour_bars_with_chance_and_long_titles_wrap(figures, tmp_path):
    long_name = "hf-dataset:/data/a/rather/long/path/of/a/saved/dataset"
    scores = {"colour": np.linspace(0, 1, 6), long_name: np.full(6, 0.5)}
    plots.plot_head_zero_shot(scores, 3, 2, tmp_path / "z.png",
                              chance={"colour": 0.2, long_name: 0.1})
    (fig,) = figures
    panels = [ax for ax in fig.axes if _images(ax)]
    bars = [ax for ax in fig.axes if not _images(ax)]
    assert len(panels) == len(bars) == 2
    assert [ax.get_title() for ax in panels][0] == "colour"
    assert all(len(line) <= 30 for line in panels[1].get_title().splitlines())
    assert panels[1].get_title().replace("\n", "") == long_name
    for bar, chance in zip(bars, (0.2, 0.1)):
        assert [list(line.get_ydata()) for line in bar.lines] == [[chance, chance]]
    selection = [{"dataset": "colour", "ranking": "S", "keep": str(n), "n_heads": n,
                  "ablation": "zero", "test_acc": 0.1 * n} for n in (1, 2)]
    plots.plot_head_selection(selection, tmp_path / "h.png", chance={"colour": 0.2})
    (line,) = [ln for ln in figures[1].axes[0].lines if ln.get_label() == "chance"]
    assert list(line.get_ydata()) == [0.2, 0.2]
