"""Plots (PNG, PDF or SVG) of spectra, λ, per-head zero-shot accuracy, accuracy against
parameters, head selection, and per-head spectral statistics across models."""

from __future__ import annotations

import textwrap
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from residual_core.errors import ResidualError  # noqa: E402


FORMATS = ("png", "pdf", "svg")
"""Figure file formats (``residual report --format``)."""

_OUTPUT = {"format": "png", "dpi": 110}


@contextmanager
def figure_output(format: str = "png", dpi: int = 110) -> Iterator[None]:
    """Within the block, every plot is written as ``format`` at ``dpi`` (raster formats; text
    stays vector in pdf and svg): the report's ``--format`` and ``--dpi``."""
    if format not in FORMATS:
        raise ResidualError(f"unknown figure format {format!r}: use one of {', '.join(FORMATS)}")
    if not 10 <= int(dpi) <= 2400:
        raise ResidualError(f"dpi must lie in 10..2400, got {dpi}")
    before = dict(_OUTPUT)
    _OUTPUT.update(format=format, dpi=int(dpi))
    try:
        yield
    finally:
        _OUTPUT.update(before)


def figure_name(stem: str) -> str:
    """``stem`` with the current figure format's extension (what reports link to)."""
    return f"{stem}.{_OUTPUT['format']}"


def _save(fig, path: str | Path) -> Path:
    path = Path(path).with_suffix(f".{_OUTPUT['format']}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=_OUTPUT["dpi"], bbox_inches="tight")  # legends outside are kept
    plt.close(fig)
    return path


def _wrap(title: str, width: int = 30) -> str:
    """A panel title in lines of at most ``width`` characters (long dataset names otherwise run
    into the next panel)."""
    return textwrap.fill(title, width, break_on_hyphens=False)


def _grid(values: Mapping[str, float], n_layers: int, n_heads: int) -> np.ndarray:
    grid = np.full((n_layers, n_heads), np.nan)
    for l in range(n_layers):
        for h in range(n_heads):
            grid[l, h] = values.get(f"L{l}H{h}", np.nan)
    return grid


def _heatmap(ax, grid: np.ndarray, title: str, cmap: str, fmt: str = "{:.2f}", vmin=None,
             vmax=None):
    im = ax.imshow(grid, cmap=cmap, aspect="auto", vmin=vmin, vmax=vmax)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    ax.set_xticks(range(grid.shape[1]))
    ax.set_yticks(range(grid.shape[0]))
    if grid.size <= 64:  # annotate small grids (the embedded model's 4x4)
        for (l, h), v in np.ndenumerate(grid):
            if np.isfinite(v):
                dark = np.mean(im.cmap(im.norm(v))[:3]) < 0.5  # light text on dark cells
                ax.text(h, l, fmt.format(v), ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
    return im


def plot_spectra(stats_rows: Sequence[dict], spectra_rows: Sequence[dict], path: str | Path,
                 title: str = "") -> Path:
    """Heads' cumulative explained variance, and K_90 / TwoNN by layer."""
    heads = [r for r in stats_rows if r["kind"] == "head"]
    n_layers = max(r["layer"] for r in heads) + 1
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    cmap = plt.get_cmap("viridis")
    curves: dict[str, list[tuple[int, float]]] = {}
    for r in spectra_rows:
        if r["kind"] == "head":
            curves.setdefault(r["unit"], []).append((r["component"], r["cumulative_evr"]))
    layer_of = {r["unit"]: r["layer"] for r in heads}
    for unit, pts in curves.items():
        pts.sort()
        k = [p[0] + 1 for p in pts]
        ax1.plot(k, [p[1] for p in pts], color=cmap(layer_of[unit] / max(n_layers - 1, 1)),
                 lw=0.8, alpha=0.8)
    ax1.axhline(0.9, color="gray", ls="--", lw=0.8)
    ax1.set_xscale("log")
    ax1.set_xlabel("components")
    ax1.set_ylabel("cumulative explained variance")
    ax1.set_title("head spectra (colour = layer)")
    layers = np.arange(n_layers)
    for key, marker, label in (("k90", "o", "K_90"), ("twonn", "s", "TwoNN")):
        values = [[r[key] for r in heads if r["layer"] == l] for l in layers]
        ax2.plot(layers, [np.mean(v) for v in values], marker=marker, label=f"{label} (mean)")
        ax2.fill_between(layers, [np.min(v) for v in values], [np.max(v) for v in values],
                         alpha=0.15)
    ax2.set_xlabel("layer")
    ax2.set_xticks(layers)
    ax2.set_ylabel("dimension")
    ax2.set_title("head dimensionality by layer (band = min..max)")
    ax2.legend()
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_lambda_heatmap(lambdas: Mapping[str, np.ndarray], n_layers: int, n_heads: int,
                        path: str | Path, title: str = "learned λ",
                        scale: tuple[float, float] | None = None) -> Path:
    """Learned λ of one fit: left, mean |λ| of each head (layer × head); right, λ of every
    unit per principal component (rows: units in canonical order, emb, MLPs, heads; columns:
    components, blank past a unit's basis), signed on a scale centred at 0.

    Args:
        lambdas: unit name -> λ_u (one weight per kept component).
        scale: ``(top of the mean |λ| scale, half-range of the λ scale)``; the report passes one
            scale for all of a model's tasks so that their maps compare. Default: this fit's.
    """
    from residual_core.method.units import unit_table

    canonical = [u.name for u in unit_table(n_layers, n_heads)]
    units = [u for u in canonical if u in lambdas] + [u for u in lambdas if u not in canonical]
    k = max((len(v) for v in lambdas.values()), default=0)
    per_component = np.full((len(units), max(k, 1)), np.nan)
    for i, u in enumerate(units):
        per_component[i, :len(lambdas[u])] = lambdas[u]
    mean_top, half = scale or lambda_scale([lambdas])
    mags = {u: float(np.mean(np.abs(v))) for u, v in lambdas.items() if len(v)}
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(2.4 + 0.7 * n_heads + min(8.0, 2.0 + 0.08 * k),
                       max(2.6, 1.0 + 0.6 * n_layers)),
        gridspec_kw={"width_ratios": [0.7 * n_heads + 1.0, min(8.0, 2.0 + 0.08 * k)]})
    im = _heatmap(left, _grid(mags, n_layers, n_heads), "mean |λ| per head", "magma", vmin=0,
                  vmax=mean_top)
    fig.colorbar(im, ax=left, label="mean |λ|")
    im = right.imshow(per_component, cmap="RdBu_r", vmin=-half, vmax=half, aspect="auto",
                      interpolation="nearest")
    right.set_xlabel("principal component")
    right.set_title("λ per principal component")
    step = max(1, len(units) // 24)  # at most ~24 unit labels
    right.set_yticks(range(0, len(units), step), units[::step], fontsize=6)
    fig.colorbar(im, ax=right, label="λ")
    fig.suptitle(title)
    return _save(fig, path)


def lambda_scale(fits: Sequence[Mapping[str, np.ndarray]]) -> tuple[float, float]:
    """One colour scale for several fits' λ maps (:func:`plot_lambda_heatmap`): the largest
    mean |λ| of a unit, and the largest |λ|, over all of them."""
    values = [np.abs(np.asarray(v, dtype=float)) for fit in fits for v in fit.values() if len(v)]
    if not values:
        return 1.0, 1.0
    return (max(float(v.mean()) for v in values) or 1.0, max(float(v.max()) for v in values) or 1.0)


def plot_accuracy_vs_parameters(eval_rows: Sequence[dict], path: str | Path) -> Path:
    """Test accuracy against trainable parameters, one marker per method, one colour per task:
    the mean over a fit's seeds, its error bar their standard deviation (none for one seed)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    tasks = sorted({r["dataset"] for r in eval_rows})
    methods = sorted({r["method"] for r in eval_rows})
    markers = dict(zip(methods, "o^sDvP*X<>"))
    colors = dict(zip(tasks, plt.get_cmap("tab10").colors))
    seeds: dict[tuple, list[float]] = {}
    for r in eval_rows:
        key = (r["dataset"], r["method"], max(int(r["trainable_parameters"]), 1))
        seeds.setdefault(key, []).append(float(r["test_acc"]))
    for (task, method, params), accs in sorted(seeds.items()):
        ax.errorbar(params, np.mean(accs), yerr=np.std(accs) if len(accs) > 1 else None,
                    marker=markers[method], ls="", color=colors[task], ms=6, alpha=0.85,
                    capsize=3)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (zero-shot drawn at 1)")
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    handles = [plt.Line2D([], [], marker=markers[m], ls="", color="gray", label=m)
               for m in methods]
    handles += [plt.Line2D([], [], marker="o", ls="", color=colors[t], label=t) for t in tasks]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0),
              borderaxespad=0, frameon=False)  # outside the data
    ax.set_title("accuracy against trainable parameters")
    return _save(fig, path)


def plot_head_zero_shot(scores: Mapping[str, np.ndarray], n_layers: int, n_heads: int,
                        path: str | Path, chance: Mapping[str, float] | None = None) -> Path:
    """Per-head zero-shot accuracy ``[L·H]`` (layer-major) for each task, side by side, each
    with a colour bar on 0..1 marked at the task's chance accuracy (``chance``: task -> 1 / the
    number of classes) where it is given."""
    tasks = list(scores)
    fig, axes = plt.subplots(1, len(tasks), figsize=(0.6 + 3.2 * len(tasks), 2.9), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        grid = np.asarray(scores[task], dtype=float).reshape(n_layers, n_heads)
        im = _heatmap(ax, grid, _wrap(task), "Blues", fmt="{:.2f}", vmin=0, vmax=1)
        bar = fig.colorbar(im, ax=ax, fraction=0.08)
        if chance and task in chance:
            bar.ax.axhline(chance[task], color="crimson", lw=1.5)
            bar.set_label("accuracy (red: chance)", fontsize=7)
    fig.suptitle("per-head zero-shot accuracy (S)")
    return _save(fig, path)


def plot_head_selection(rows: Sequence[dict], path: str | Path, ablation: str = "zero",
                        chance: Mapping[str, float] | None = None) -> Path:
    """Head selection (the authors' experiment 3), one panel per task: test accuracy against the
    number of kept heads, one line per ranking (``R``: mean over its seeds, the band its range),
    the reference sets (``heads``, ``layers``, ``all``) and the task's chance accuracy
    (``chance``: task -> 1 / the number of classes, where given) as horizontal lines."""
    tasks = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(0.8 + 3.4 * len(tasks), 3.4),
                             squeeze=False, sharey=True)
    for ax, task in zip(axes[0], tasks):
        mine = [r for r in rows if r["dataset"] == task]
        ranked = [r for r in mine if r.get("keep") is not None and r["ablation"] == ablation]
        for ranking in sorted({r["ranking"] for r in ranked}):
            by_n: dict[int, list[float]] = {}
            for r in ranked:
                if r["ranking"] == ranking:
                    by_n.setdefault(int(r["n_heads"]), []).append(float(r["test_acc"]))
            n = sorted(by_n)
            mean = [np.mean(by_n[k]) for k in n]
            (line,) = ax.plot(n, mean, marker="o", ms=3, label=ranking)
            if any(len(v) > 1 for v in by_n.values()):
                ax.fill_between(n, [min(by_n[k]) for k in n], [max(by_n[k]) for k in n],
                                color=line.get_color(), alpha=0.15, lw=0)
        for ref, style in (("heads", ":"), ("layers", "-."), ("all", "--")):
            acc = [r["test_acc"] for r in mine if r["ranking"] == ref
                   and r["ablation"] in (ablation, "none")]
            if acc:
                ax.axhline(acc[0], color="gray", ls=style, lw=1, label=f"{ref} (reference)")
        if chance and task in chance:
            ax.axhline(chance[task], color="crimson", ls=":", lw=1, label="chance")
        ax.set_xscale("log")
        counts = sorted({int(r["n_heads"]) for r in ranked})
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.minorticks_off()
        ax.set_xlabel("heads kept")
        ax.set_title(_wrap(task), fontsize=9)
    axes[0][0].set_ylabel(f"test accuracy ({ablation} ablation)")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7,
               frameon=False)  # outside the data
    fig.suptitle("head selection: heads ranked on val, the rest (and emb, MLPs) ablated")
    return _save(fig, path)


def plot_cross_model(stats_a: Mapping[str, Mapping[str, float]],
                     stats_b: Mapping[str, Mapping[str, float]], path: str | Path,
                     label_a: str = "model A", label_b: str = "model B") -> Path:
    """Per-head K_90 and TwoNN of model A against model B (heads matched by name, colour =
    layer), the y = x diagonal dashed, the Pearson and Spearman correlation in each title.

    Args:
        stats_a, stats_b: statistic -> head name -> value, with at least ``k90`` and
            ``twonn`` (``stats_a`` / ``stats_b`` of
            :func:`residual_core.engines.spectral.cross_model_spectra`).
        label_a, label_b: the models' names on the axes.
    """
    import re

    from residual_core.method.spectral import correlation

    heads = [h for h in stats_a["k90"] if h in stats_b["k90"]]
    layers = np.array([int(m.group(1)) if (m := re.match(r"L(\d+)H\d+$", h)) else 0
                       for h in heads])
    n_layers = int(layers.max(initial=0)) + 1
    norm = matplotlib.colors.BoundaryNorm(np.arange(-0.5, n_layers), plt.get_cmap("viridis").N)
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 4.2), layout="constrained")
    panels = (("k90", "K_90", "components"), ("twonn", "TwoNN", "intrinsic dimension"))
    for ax, (key, name, unit) in zip(axes, panels):
        x = np.array([stats_a[key][h] for h in heads], dtype=float)
        y = np.array([stats_b[key][h] for h in heads], dtype=float)
        # heads with equal (integer) K_90 overlap: a count is written next to stacked markers
        sc = ax.scatter(x, y, c=layers, cmap="viridis", norm=norm, s=28, alpha=0.8,
                        edgecolors="white", linewidths=0.5)
        stacked: dict[tuple[float, float], int] = {}
        for point in zip(x, y):
            stacked[point] = stacked.get(point, 0) + 1
        for (px, py), count in stacked.items():
            if count > 1:
                ax.annotate(f"×{count}", (px, py), xytext=(4, 3), textcoords="offset points",
                            fontsize=7)
        if x.size:
            lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
            pad = 0.05 * (hi - lo or 1)
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="gray", ls="--", lw=0.8)
        corr = correlation(x, y)
        ax.set_title(f"{name}: Pearson r = {corr['pearson']:.3f}, "
                     f"Spearman ρ = {corr['spearman']:.3f}\n({len(heads)} heads)", fontsize=9)
        ax.set_xlabel(f"{name} of {label_a} ({unit})")
        ax.set_ylabel(f"{name} of {label_b} ({unit})")
    fig.colorbar(sc, ax=axes, label="layer", ticks=range(n_layers))
    fig.suptitle("per-head spectral structure across models")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_OUTPUT["dpi"], bbox_inches="tight")  # constrained layout
    plt.close(fig)
    return path


def plot_specialisation(cells: Sequence, path: str | Path, pearson: float | None = None,
                        gain_method: str = "residual-star",
                        names: Sequence[str] | None = None) -> Path:
    """The grid report's figure (:mod:`residual_core.report.grid`): left, per cell, the fraction
    of its zero-shot accuracy the top heads carry against the fraction of heads kept (S solid,
    R dashed, one colour per cell); right, each cell's specialisation against its gain."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    colours = plt.get_cmap("tab10")
    names = list(names) if names is not None else [c.cell.label for c in cells]
    for i, c in enumerate(cells):
        colour = colours(i % 10)
        for ranking, style in (("S", "-"), ("R", "--")):
            rules = c.carried.get(ranking, {})
            keeps = sorted(rules, key=lambda k: c.fractions[k])
            if keeps:
                left.plot([c.fractions[k] for k in keeps], [rules[k] for k in keeps], ls=style,
                          marker="o", ms=3, color=colour,
                          label=names[i] if ranking == "S" else None)
    left.axhline(1.0, color="gray", lw=0.8, ls=":")
    if any(np.isfinite(v) for c in cells for rules in c.carried.values() for v in rules.values()):
        left.set_xscale("log")  # (a cell with zero-shot accuracy 0 has no finite share)
        ticks = sorted({f for c in cells for f in c.fractions.values()})
        left.set_xticks(ticks, [f"{100 * f:.0f}%" if f >= 0.1 else f"{100 * f:.1f}%"
                                for f in ticks], fontsize=7)
        left.minorticks_off()
    left.set_xlabel("fraction of heads kept (zero ablation)")
    left.set_ylabel("accuracy / zero-shot accuracy")
    left.set_title("top heads by S (solid) vs random (dashed)", fontsize=9)
    fig.legend(*left.get_legend_handles_labels(), loc="lower center", ncol=min(5, len(cells)),
               fontsize=7, frameon=False, bbox_to_anchor=(0.5, -0.08))  # outside the data
    with_gain = [c for c in cells if c.gain is not None and np.isfinite(c.specialisation)]
    for i, c in enumerate(cells):
        if c in with_gain:
            right.scatter(c.specialisation, c.gain, color=colours(i % 10), s=18)
            right.annotate(names[i], (c.specialisation, c.gain), fontsize=6,
                           xytext=(3, 3), textcoords="offset points")
    right.axhline(0.0, color="gray", lw=0.8, ls=":")
    right.set_xlabel("specialisation: mean (S - R) / zero-shot")
    right.set_ylabel(f"{gain_method} - zero-shot test accuracy")
    r = "n/a" if pearson is None else f"{pearson:.2f}"
    right.set_title(f"specialisation vs gain (Pearson {r})", fontsize=9)
    return _save(fig, path)
