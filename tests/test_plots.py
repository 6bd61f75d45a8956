"""Plots are written as readable PNG files from the shapes the stages produce."""

import numpy as np
from PIL import Image

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
