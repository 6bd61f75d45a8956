"""A Markdown report with PNG plots from the result tables of one model over several tasks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from residual_core.errors import ResidualError
from residual_core.formats.align_weights import stored_lambdas
from residual_core.formats.feature_store import FeatureStore
from residual_core.identity import FEATURE_DTYPES, RANDOM_WEIGHTS, parse_weights, slug
from residual_core.layout import SPLITS, Layout
from residual_core.method.batches import task_classifier
from residual_core.method.head_selection import rank_heads
from residual_core.report.plots import (
    figure_name,
    lambda_scale,
    plot_accuracy_vs_parameters,
    plot_cross_model,
    plot_head_selection,
    plot_head_zero_shot,
    plot_lambda_heatmap,
    plot_spectra,
)
from residual_core.tables import read_table

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


def _classifier(row: dict) -> str:
    return row.get("classifier") or "text"  # rows written before the column: text


def _method_label(row: dict) -> str:
    """``method``, or ``method@classifier`` for a fit with class prototypes."""
    c = _classifier(row)
    return row["method"] if c == "text" else f"{row['method']}@{c}"


def _short(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e4 else str(int(n))


def write_report(store_root: str | Path, model: str, task_stores: dict[str, tuple[str, str, str]],
                 out_dir: str | Path, title: str = "ResiDual report") -> Report:
    """Write ``out_dir/report.md`` and its PNGs for ``model`` on the tasks
    ``{dataset: (train_url, val_url, test_url)}`` from the Parquet tables under ``store_root``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first_train = FeatureStore.open(next(iter(task_stores.values()))[0])
    weights = _weights_label(first_train.attrs.get("pretrained"))
    evals = [r for r in read_table(store_root, "evaluations", model=model).to_pylist()
             if r["dataset"] in task_stores and _weights_label(r.get("pretrained")) == weights]
    if not evals:
        raise ResidualError(f"no evaluations of {model} on {sorted(task_stores)} under "
                            f"{store_root}: run the align stage first")
    evals = [{**r, "method": _method_label(r)} for r in evals]
    table = results_table(evals)
    n_layers, n_heads, dh = (first_train.dims.layer, first_train.dims.head,
                             first_train.dims.head_dim)

    lines = [f"# {title}", "", f"Model: `{model}` ({first_train.attrs.get('pretrained')}); "
             f"{n_layers} layers × {n_heads} heads (dh = {dh}), embed dim "
             f"{first_train.dims.embed}.", "", "## Test accuracy by task and method", "",
             "```", table, "```", ""]
    plot_accuracy_vs_parameters(evals, out / figure_name("accuracy_vs_parameters"))
    lines += [f"![accuracy vs parameters]({figure_name('accuracy_vs_parameters')})", ""]

    scores = {t: rank_heads(urls[1], scores=("S",),
                            class_weights=task_classifier(urls[0], "auto"))["S"]
              for t, urls in task_stores.items()}
    chance = {r["dataset"]: 1.0 / r["n_classes"] for r in evals if r.get("n_classes")}
    plot_head_zero_shot(scores, n_layers, n_heads, out / figure_name("head_zero_shot"),
                        chance=chance)
    lines += ["## Head specialisation", "",
              "Per-head zero-shot accuracy (S) on each task's validation split; the top head:", ""]
    for t, s in scores.items():
        top = int(np.argmax(s))
        lines.append(f"- `{t}`: L{top // n_heads}H{top % n_heads} ({s[top]:.3f})")
    lines += ["", f"![per-head zero-shot accuracy]({figure_name('head_zero_shot')})", ""]
    lines += _head_texts(store_root, model, weights, scores, n_heads)

    try:
        selection = [r for r in read_table(store_root, "head_selection", model=model).to_pylist()
                     if r["dataset"] in task_stores
                     and _weights_label(r.get("pretrained")) == weights]
    except ResidualError:  # head selection not run
        selection = []
    if selection:  # one classifier's curves: text where there are text rows
        shown = "text" if any(_classifier(r) == "text" for r in selection) else \
            _classifier(selection[0])
        selection = [r for r in selection if _classifier(r) == shown]
        plot_head_selection(selection, out / figure_name("head_selection"), chance=chance)
        lines += ["## Head selection", "",
                  "Test accuracy with only the top-ranked heads kept (rankings on val: S own "
                  "accuracy, U|T / U / U-out correlations, R random), everything else ablated "
                  f"({shown} classifier):", "",
                  f"![head selection]({figure_name('head_selection')})", ""]

    lines += ["## Spectra", ""]
    by_spectrum: dict[tuple, list[str]] = {}  # tasks whose train splits are the same images
    tables: dict[tuple, tuple[list[dict], list[dict]]] = {}
    for t, urls in task_stores.items():
        split = FeatureStore.open(urls[0]).attrs["split"]
        try:  # a task aligned on another dataset's bases may have no spectra of its own
            stats, spectra = ([r for r in read_table(store_root, table, model=model, dataset=t,
                                                     filters=filters).to_pylist()
                               if _weights_label(r.get("pretrained")) == weights]
                              for table, filters in (("unit_stats", {"split": split}),
                                                     ("spectra", {"split": split, "kind": "head"})))
        except ResidualError:
            continue
        if not stats:
            continue
        key = tuple(sorted((r["unit_index"], r["total_variance"], r["twonn"]) for r in stats))
        by_spectrum.setdefault(key, []).append(t)
        tables[key] = (stats, spectra)
    for key, tasks in by_spectrum.items():
        stats, spectra = tables[key]
        name = figure_name(f"spectra_{slug(tasks[0])}")
        shared = " (the same train images)" if len(tasks) > 1 else ""
        plot_spectra(stats, spectra, out / name, title=", ".join(tasks) + shared)
        k90 = [r["k90"] for r in stats if r["kind"] == "head"]
        twonn = [r["twonn"] for r in stats if r["kind"] == "head"]
        lines += [f"- {', '.join(f'`{t}`' for t in tasks)}{shared}: head K_90 median "
                  f"{np.median(k90):.0f} (max {max(k90)}), TwoNN median {np.median(twonn):.1f}, "
                  f"of dh = {dh}: ![spectra]({name})"]
    lines.append("")
    lines += _across_models(store_root, model, weights, out)

    lines += ["## Learned λ (residual-star, seed 0)", "",
              "Mean |λ| per head and λ per principal component, on one colour scale for every "
              "task:", ""]
    fits = {}
    for t, urls in task_stores.items():
        try:
            fits[t] = stored_lambdas(Layout.align_weights(urls[0]), "residual-star", 0)
        except ResidualError:
            continue
    scale = lambda_scale(list(fits.values()))
    for t, lam in fits.items():
        name = figure_name(f"lambda_{slug(t)}")
        plot_lambda_heatmap(lam, n_layers, n_heads, out / name, title=f"learned λ — {t}",
                            scale=scale)
        lines.append(f"![λ {t}]({name})")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return Report(path, table)


def _rows(store_root, table: str, model: str, weights: str, **filters) -> list[dict]:
    """``table``'s rows of ``model`` with these weights (none when the table does not exist)."""
    try:
        rows = read_table(store_root, table, model=model,
                          filters=filters or None).to_pylist()
    except ResidualError:
        return []
    return [r for r in rows if _weights_label(r.get("pretrained")) == weights]


def _across_models(store_root, model: str, weights: str, out: Path) -> list[str]:
    """The "across models" section: per-head spectral statistics of these weights against each
    other model they were compared with (table ``cross_model``), with a scatter plot and the
    authors' basis similarity; none without ``cross_model`` rows."""
    pairs: dict[tuple, list[dict]] = {}
    for r in _rows(store_root, "cross_model", model, weights):
        pairs.setdefault((r["other_model"], r["other_pretrained"], r["dataset"], r["split"]),
                         []).append(r)
    if not pairs:
        return []
    lines = ["## Across models", "",
             "Per-head spectral statistics of this model against another one on the same "
             "images (heads matched by name); the paper reports correlations of about 0.97 "
             "between CLIP models.", ""]
    for k, ((other, other_weights, dataset, split), rows) in enumerate(sorted(pairs.items())):
        label = f"{other} ({Path(str(other_weights)).name})"
        lines += [f"Against {label} on `{dataset}` ({split}):", "", "| statistic | Pearson | "
                  "Spearman | heads |", "|---|---|---|---|"]
        lines += [f"| {r['statistic']} | {r['pearson']:.3f} | {r['spearman']:.3f} | "
                  f"{r['n_heads']} |" for r in sorted(rows, key=lambda r: r["statistic"])]
        sims = [r["authors"] for r in _rows(store_root, "basis_similarity", model, weights,
                                            dataset=dataset, split=split)
                if r.get("other_pretrained") == other_weights and r.get("authors") is not None
                and r["unit"].startswith("L") and "H" in r["unit"]]
        if sims:
            lines += ["", f"Basis similarity of each head with its namesake (the authors' "
                      f"normalised spectral cosine, 90% EVR): mean {np.mean(sims):.3f}, "
                      f"min {np.min(sims):.3f}, max {np.max(sims):.3f} over {len(sims)} heads."]
        stats = []
        for w, m in ((weights, model), (_weights_label(other_weights), other)):
            heads = [r for r in _rows(store_root, "unit_stats", m, w, dataset=dataset,
                                      split=split) if r["kind"] == "head"]
            stats.append({s: {r["unit"]: r[s] for r in heads} for s in ("k90", "twonn")})
        if all(s["k90"] for s in stats):
            name = figure_name(f"cross_model_{k}")
            plot_cross_model(*stats, out / name, label_a="this model", label_b="the other")
            lines += ["", f"![across models]({name})"]
        lines.append("")
    return lines


def _unit_order(unit: str) -> tuple[int, int]:
    layer, head = unit[1:].split("H")
    return int(layer), int(head)


def _head_texts(store_root, model: str, weights: str, scores: dict[str, np.ndarray],
                n_heads: int) -> list[str]:
    """The "heads in text" section: the top descriptions of each task's best heads (by S), and
    every head's top 3 (once for tasks whose train images are the same); none without rows."""
    try:
        rows = [r for r in read_table(store_root, "head_texts", model=model).to_pylist()
                if r["dataset"] in scores and _weights_label(r.get("pretrained")) == weights]
    except ResidualError:  # the explain stage was not run
        return []
    if not rows:
        return []
    method = "textspan" if any(r["method"] == "textspan" for r in rows) else rows[0]["method"]
    rows = [r for r in rows if r["method"] == method]
    # one dictionary per task (the one that explains the most heads), one pick per head and
    # rank (the newest: a run of some heads sits beside a run of every head)
    heads_of: dict[tuple[str, str], set[str]] = {}
    for r in rows:
        heads_of.setdefault((r["dataset"], r["dictionary"]), set()).add(r["unit"])
    chosen: dict[str, str] = {}
    for (dataset, dictionary), heads in sorted(heads_of.items()):
        if len(heads) > len(heads_of.get((dataset, chosen.get(dataset, "")), ())):
            chosen[dataset] = dictionary
    rows = [r for r in rows if chosen[r["dataset"]] == r["dictionary"]]
    newest: dict[tuple[str, str, int], dict] = {}
    for r in sorted(rows, key=lambda r: str(r.get("created_at"))):
        newest[(r["dataset"], r["unit"], r["rank"])] = r
    texts: dict[tuple[str, str], list[tuple[int, str, float, float | None]]] = {}
    for r in newest.values():
        texts.setdefault((r["dataset"], r["unit"]), []).append(
            (r["rank"], r["text"], r["explained_variance"], r.get("class_separation")))
    dictionaries = ", ".join(sorted({f"`{d}`" for d in chosen.values()}))
    lines = ["## Heads in text", "",
             f"Each head's top descriptions ({method} over {dictionaries}; in brackets the "
             "share of the head's variance each explains and η², the share of the variance "
             "along it that the task's classes account for: near 1, the description's "
             "direction separates the classes), for the three heads with the best zero-shot "
             "accuracy (S) on each task:", ""]

    def pick(text: str, ev: float, eta2: float | None) -> str:
        return f"{text} ({ev:.0%}" + ("" if eta2 is None else f", η² {eta2:.2f}") + ")"

    for t, s in scores.items():
        for i in np.argsort(-s, kind="stable")[:3]:
            unit = f"L{i // n_heads}H{i % n_heads}"
            picks = sorted(texts.get((t, unit), []))[:3]
            if picks:
                lines.append(f"- `{t}` {unit} (S {s[i]:.3f}): "
                             + "; ".join(pick(*p[1:]) for p in picks))
    groups: dict[tuple, list[str]] = {}
    for t in scores:
        per = tuple(sorted(((u, tuple(x[1] for x in sorted(v)[:3]))
                            for (d, u), v in texts.items() if d == t),
                           key=lambda p: _unit_order(p[0])))
        if per:
            groups.setdefault(per, []).append(t)
    for per, tasks in groups.items():
        lines += ["", f"Every head's top 3 on {', '.join(f'`{t}`' for t in tasks)}:", "",
                  "| head | descriptions |", "|---|---|"]
        lines += [f"| {u} | {'; '.join(ts)} |" for u, ts in per]
    return lines + [""]


def _weights_label(pretrained: str | None) -> str:
    """The tables' ``pretrained`` value of some weights (rows written before it was never null
    have null for random weights)."""
    return pretrained or RANDOM_WEIGHTS


def model_report(store_root: str | Path, model: str, pretrained: str | None = None,
                 datasets: Sequence[str] | None = None, out_dir: str | Path | None = None,
                 title: str | None = None, feature_dtype: str = FEATURE_DTYPES[0]) -> Report:
    """:func:`write_report` for every task on which ``model`` was evaluated under ``store_root``.

    Args:
        store_root: the root of the stores and tables (local).
        model, pretrained: the evaluated model; ``pretrained`` is a tag, a checkpoint path or
            :data:`RANDOM_WEIGHTS`, and may be omitted when one set of weights was evaluated.
        datasets: the tasks to report (default: every evaluated task of those weights).
        out_dir: default ``<store_root>/reports/<model>-<weights>``.
        feature_dtype: the dtype of the feature stores the plots read (their path).

    Raises:
        ResidualError: no evaluations, several weights and no ``pretrained``, unknown weights or
            tasks (the message lists what was evaluated).
    """
    rows = read_table(store_root, "evaluations", model=model).to_pylist()
    by_weights: dict[str, set[str]] = {}
    for r in rows:
        by_weights.setdefault(_weights_label(r.get("pretrained")), set()).add(r["dataset"])
    labels = {w: None if w == RANDOM_WEIGHTS else w for w in by_weights}
    if not labels:
        raise ResidualError(f"no evaluations of {model} under {store_root}: run the align stage "
                            f"first (`residual run`)")
    if pretrained is None:
        if len(labels) > 1:
            raise ResidualError(f"{model} was evaluated with several weights: pass one of "
                                f"{', '.join(sorted(labels))}")
        pretrained = next(iter(labels))
    key = pretrained if pretrained in labels else str(Path(pretrained).resolve())
    if key not in labels:
        raise ResidualError(f"no evaluations of {model} with weights {pretrained!r}; evaluated: "
                            f"{', '.join(sorted(labels))}")
    weights = labels[key]
    evaluated = sorted(by_weights[key])
    unknown = sorted(set(datasets or ()) - set(evaluated))
    if unknown:
        raise ResidualError(f"{model} ({key}) was not evaluated on {', '.join(unknown)}; "
                            f"evaluated: {', '.join(evaluated)}")
    layout, weights_id = Layout.of(store_root), parse_weights(model, weights)
    stores = {t: tuple(layout.feature_store(weights_id, t, s, feature_dtype) for s in SPLITS)
              for t in (datasets or evaluated)}
    out = out_dir or layout.reports(f"{model}-{Path(key).name}")
    return write_report(store_root, model, stores, out,
                        title=title or f"ResiDual report: {model} ({Path(key).name})")
