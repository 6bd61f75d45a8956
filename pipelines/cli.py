"""The ``residual`` command line.

Conventions: ``--help`` on every command; user errors (bad names, missing files, mismatched stores)
print one line ``residual: error: ...`` and exit with status 2; 0 means success.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Sequence, Union, get_args, get_origin

from pipelines.grid import NAMED_GRIDS, STAGES  # light: imports neither torch nor Prefect
from residual_core.errors import ResidualError
from residual_core.formats.tables import TABLES
from residual_core.identity import RANDOM_WEIGHTS, canonical_dataset, canonical_model
from residual_core.stages import StageParams
from residual_core.stages import align as align_stage
from residual_core.stages import explain as explain_stage
from residual_core.stages import extract as extract_stage
from residual_core.stages import spectral as spectral_stage
from residual_core.stages.base import ParamsError

EXIT_USAGE = 2


def _cmd_models(args: argparse.Namespace) -> int:
    import open_clip

    from residual_core.identity import EMBEDDED_MODEL
    from residual_core.method.models import decomposable, list_models

    for name in list_models():
        why = decomposable(name)
        if why is not None and not args.all:
            continue
        mark = "" if why is None else f"  [not decomposable: {why}]"
        if args.pretrained:
            tags = open_clip.list_pretrained_tags_by_model(name)
            embedded = " (embedded, random or local weights)" if name == EMBEDDED_MODEL else ""
            print(f"{name:<40} {', '.join(tags)}{embedded}{mark}")
        else:
            print(f"{name}{mark}")
    from residual_core.method.hf_models import HF_CLASSES, PAPER_HF_MODELS, hf_cache_state

    print(f"\ntransformers towers ({', '.join(HF_CLASSES)}): hf:HUB_ID from the local Hugging "
          "Face cache, or hf:DIR (a save_pretrained folder); never downloaded")
    for name in PAPER_HF_MODELS:
        print(f"{name:<40} {hf_cache_state(name)}" if args.pretrained else name)
    return 0


def _cmd_units(args: argparse.Namespace) -> int:
    from residual_core.method.decompose import readout_maps
    from residual_core.method.models import load_model
    from residual_core.method.units import format_unit_table

    loaded = load_model(args.model, args.pretrained, device="cpu")
    maps = readout_maps(loaded.model)
    print(f"{args.model}: L={maps.n_layers} layers, H={maps.n_heads} heads of dh={maps.head_dim}, "
          f"width D={maps.width}, output E={maps.embed_dim}, U={len(maps.units)} units")
    print(format_unit_table(maps.units, limit=None if args.all else 24))
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _part(text: str) -> extract_stage.Part:
    try:
        return extract_stage.Part.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_extract(args: argparse.Namespace) -> int:
    from residual_core.engines.extract import extract

    result = extract(
        args.model, args.pretrained, args.dataset, args.split,
        _params(extract_stage.Params, args), data_root=args.data_root,
        store_root=args.store_root, verify=args.verify, progress=not args.quiet,
        part=args.part)
    if args.part is None:
        state = ("already complete, nothing computed" if result.was_cached else
                 f"computed {result.computed_chunks} of {result.total_chunks} row chunks "
                 f"({result.rows_computed} images)")
    else:
        state = (f"part {result.part}: computed {result.computed_chunks} row chunks "
                 f"({result.rows_computed} images)"
                 + (f", {result.busy_chunks} being written by another process"
                    if result.busy_chunks else "")
                 + ("; the store is complete" if result.complete else
                    "; the store is incomplete until the other parts finish"))
    print(f"{result.url}: {state} in {result.seconds:.1f} s")
    return 0


def _cmd_spectral(args: argparse.Namespace) -> int:
    from residual_core.engines.spectral import run_spectral

    result = run_spectral(_feature_url(args), _params(spectral_stage.Params, args), address=args.address,
                          n_workers=args.workers, memory_limit=args.memory_limit, force=args.force,
                          progress=not args.quiet)
    state = ("computed" if result.computed else
             "up to date; its missing table rows rewritten from the store"
             if result.rows_rewritten else "up to date, nothing computed")
    print(f"{result.url}: {state} in {result.seconds:.1f} s")
    return 0


def _cmd_align(args: argparse.Namespace) -> int:
    from residual_core.engines.align import default_basis_url, run_align
    from residual_core.identity import parse_weights
    from residual_core.layout import SPLITS, Layout

    params = _params(align_stage.Params, args)  # bad options fail before any store is read
    layout = Layout.of(args.store_root)
    weights = parse_weights(args.model, args.pretrained)
    stores = {split: layout.feature_store(weights, args.dataset, split, args.feature_dtype)
              for split in SPLITS}
    basis = (Layout.spectral_store(layout.feature_store(weights, args.basis, "train",
                                                        args.feature_dtype))
             if args.basis else default_basis_url(stores["train"]))
    result = run_align(stores["train"], stores["val"], stores["test"], params, basis_url=basis,
                       data_root=args.data_root, progress=not args.quiet, force=args.force)
    columns = ("method", "seed", "trainable_parameters", "val_acc", "test_acc")
    print(_render(_arrow([{k: r.get(k) for k in columns} for r in result.rows]), "table", 0),
          end="")
    print(f"bases: {result.basis_url}; {len(result.rows)} fits in {result.seconds:.1f} s "
          + ("(all refitted)" if args.force else "(fits already in the tables are reused)"))
    return 0


def _feature_url(args: argparse.Namespace) -> str:
    """The feature store that ``--model/--pretrained/--dataset/--split/--feature-dtype`` name."""
    from residual_core.identity import parse_weights
    from residual_core.layout import Layout

    return Layout.of(args.store_root).feature_store(parse_weights(args.model, args.pretrained),
                                                   args.dataset, args.split, args.feature_dtype)


def _cmd_explain(args: argparse.Namespace) -> int:
    from residual_core.engines.explain import explain_key, run_explain
    from residual_core.layout import Layout
    from residual_core.tables import read_table

    params = _params(explain_stage.Params, args)
    url = _feature_url(args)
    root = Layout.of(args.store_root).root
    result = run_explain(url, params, tables_root=root, progress=not args.quiet,
                         force=args.force)
    rows = [r for r in read_table(root, "head_texts", model=args.model, dataset=args.dataset,
                                  filters={"split": args.split,
                                           "config_hash": explain_key(url, params)}).to_pylist()
            if r["rank"] < min(3, params.texts_per_head)]
    shown = [{"unit": r["unit"], "rank": r["rank"], "text": r["text"],
              "explained_variance": r["explained_variance"],
              "class_separation": r["class_separation"]}
             for r in sorted(rows, key=lambda r: (r["layer"], r["head"], r["rank"]))]
    print(_render(_arrow(shown), "table", args.limit), end="")
    state = "computed" if result.computed else "up to date, nothing computed"
    print(f"{result.heads} heads, {result.rows} rows in head_texts: {state} in "
          f"{result.seconds:.1f} s")
    return 0


def _cmd_heads(args: argparse.Namespace) -> int:
    from residual_core.engines.explain import concept_heads

    rows = concept_heads(_feature_url(args), args.concept, progress=not args.quiet,
                         rank=args.rank)
    best = [r for c in args.concept for r in [x for x in rows if x["concept"] == c][:args.top]]
    print(_render(_arrow(best), "table", 0), end="")
    return 0


def _cmd_stores(args: argparse.Namespace) -> int:
    from residual_core.errors import StoreError
    from residual_core.formats.feature_store import FeatureStore
    from residual_core.layout import Layout

    layout = Layout.of(args.store_root)
    rows = []
    for url in layout.feature_stores(args.model):
        path = Path(url)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        row = {"store": os.path.relpath(path, layout.root), "state": "unreadable",
               "rows": None, "dtype": None, "mb": round(size / 2**20, 1),
               "spectral": Path(Layout.spectral_store(url)).exists()}
        try:
            store = FeatureStore.open(url, require_complete=False)
            total = store.dims.row_chunk
            done = total - store.pending_chunks().size
            row.update(state="complete" if store.complete else
                       f"incomplete ({done}/{total} chunks)",
                       rows=store.dims.n, dtype=store.attrs.get("feature_dtype"))
        except StoreError as exc:
            row["state"] = f"unreadable: {str(exc)[:60]}"
        rows.append(row)
    if not rows:
        print(f"no feature stores under {layout.root} (run `residual extract` first)")
        return 0
    print(_render(_arrow(rows), args.format, 0), end="")
    return 0


def _cmd_grid(args: argparse.Namespace) -> int:
    from pipelines.grid import load_grid

    grid = load_grid(args.grid, data_root=_dataset_root(args))  # bad: GridError (exit 2)
    if args.action == "show":
        print(grid.model_dump_json(indent=2))
        return 0
    cells = grid.cells()
    print(f"{args.grid}: a valid grid {grid.name!r}: {len(cells)} cells "
          f"({len(grid.models())} models), methods {', '.join(grid.align.methods)}, "
          f"seeds {', '.join(map(str, grid.align.seeds))}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from pipelines.grid import load_grid

    grid = load_grid(args.grid, data_root=_dataset_root(args))  # refused here, before Prefect
    if args.distribute and not os.environ.get("PREFECT_API_URL"):
        raise ResidualError("--distribute runs cells on the workers of a Prefect server: set "
                            "PREFECT_API_URL and deploy prefect.yaml first (see the README)")
    if args.extract_parts > 1 and not args.distribute:
        raise ResidualError("--extract-parts runs the parts on the pool's workers: add "
                            "--distribute (in one process, parts would only take turns; "
                            "`residual extract --part I/P` runs one part anywhere)")
    _default_prefect_home(args.store_root)
    from pipelines.flows import FIT_COLUMNS, count_stage_runs, experiment_flow
    from pipelines.server import temporary_prefect_server

    with temporary_prefect_server():
        report = experiment_flow(grid=grid, force=args.force, store_root=args.store_root,
                                 data_root=args.data_root, distribute=args.distribute,
                                 dask_address=args.dask_address, dask_workers=args.dask_workers,
                                 extract_parts=args.extract_parts)
    cells = report["cells"]
    n_runs, computed = count_stage_runs(report)
    print(f"grid {report['grid']}: {len(cells)} cells; {n_runs} stage runs: {computed} "
          f"computed, {n_runs - computed} cached")
    evaluations = [{**e, "cell": c["cell"]} for c in cells for e in c.get("evaluations", [])]
    columns = FIT_COLUMNS if evaluations else ("cell", "flow_run", "state")
    print(_render(_arrow([{k: r.get(k) for k in columns} for r in evaluations or cells]),
                  "table", 0), end="")
    print("query the result tables with `residual results`")
    return 0




def _cmd_results(args: argparse.Namespace) -> int:
    from residual_core.layout import Layout
    from residual_core.tables import read_table, sql

    root = Layout.of(args.store_root).root
    if args.describe:
        spec = TABLES[args.describe]
        print(f"{spec.name}: {spec.description} (written by the {spec.stage} stage)")
        print(_render(_arrow([{"column": c.name, "type": str(c.type),
                               "description": c.description} for c in spec.columns]),
                      args.format, 0), end="")
        return 0
    if args.sql:
        others = [f"--{k.replace('_', '-')}" for k in ("table", "model", "pretrained",
                                                        "dataset", "method", "group_by",
                                                        "columns") if getattr(args, k)]
        if others:
            raise ResidualError(f"--sql is the whole query: it cannot be combined with "
                                f"{', '.join(others)}")
        tbl = sql(root, args.sql)
    else:
        table = args.table or next(iter(TABLES))
        filters: dict[str, Any] = {"method": args.method} if args.method else {}
        if args.pretrained:  # rows written before `random` was spelled out have null there
            filters["pretrained"] = ([RANDOM_WEIGHTS, None] if args.pretrained == RANDOM_WEIGHTS
                                     else args.pretrained)
        dataset = _table_dataset(root, table, args.dataset) if args.dataset else None
        tbl = read_table(root, table, model=args.model, dataset=dataset, filters=filters)
        group = _column_list(args.group_by, "--group-by")
        if args.columns:
            tbl = _select(tbl, group + [c for c in _column_list(args.columns, "--columns")
                                        if c not in group], table)
        if group:
            tbl = _group_means(tbl, group, table)
    print(_render(tbl, args.format, args.limit), end="")
    return 0


def _table_dataset(root: str, table: str, name: str) -> str:
    """``name`` as ``table`` spells it: itself when the table has rows of it, else the one
    dataset of the table whose short name it is (``pets`` for ``imagefolder:/data/pets``)."""
    from residual_core.identity import parse_dataset
    from residual_core.tables import read_table, table_files

    if table_files(root, table, dataset=name):
        return name
    try:
        names = set(read_table(root, table).column("dataset").to_pylist())
    except ResidualError:  # no table: read_table says so below
        return name
    matches = sorted(d for d in names if parse_dataset(d).short_name == name)
    if len(matches) > 1:
        raise ResidualError(f"--dataset {name!r} is the short name of {len(matches)} datasets "
                            f"in {table!r}: give one of {', '.join(matches)}")
    return matches[0] if matches else name


def _column_list(text: str | None, option: str) -> list[str]:
    if text is None:
        return []
    columns = [c.strip() for c in text.split(",") if c.strip()]
    if not columns:
        raise ResidualError(f"{option} needs column names, e.g. {option} model,method")
    return columns


def _select(tbl, columns: list[str], table: str):
    """The columns of ``tbl``, in this order (a one-line error naming unknown ones)."""
    missing = [c for c in columns if c not in tbl.column_names]
    if missing:
        raise ResidualError(f"table {table!r} has no column {', '.join(map(repr, missing))}; "
                            f"columns: {', '.join(tbl.column_names)}")
    return tbl.select(columns)


def _group_means(tbl, columns: list[str], table: str):
    """One row per group: the group columns, ``count``, and ``mean_<c>`` and ``std_<c>``
    (sample standard deviation, e.g. over seeds; empty for a group of one) of every numeric
    column, sorted by the group columns."""
    import pyarrow as pa
    import pyarrow.compute as pc

    _select(tbl, columns, table)
    numeric = [f.name for f in tbl.schema if f.name not in columns
               and (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))]
    grouped = tbl.group_by(columns).aggregate(
        [(c, "mean") for c in numeric] + [(c, "stddev", pc.VarianceOptions(ddof=1))
                                          for c in numeric] + [([], "count_all")])
    stats = [name for c in numeric for name in (f"{c}_mean", f"{c}_stddev")]
    grouped = grouped.select(columns + ["count_all"] + stats).sort_by(
        [(c, "ascending") for c in columns])
    return grouped.rename_columns(columns + ["count"] + [
        f"{'mean' if n.endswith('_mean') else 'std'}_{n.rsplit('_', 1)[0]}" for n in stats])


def _arrow(rows: list[dict]):
    import pyarrow as pa

    return pa.Table.from_pylist(rows)


def _render(tbl, fmt: str, limit: int | None) -> str:
    """A table as aligned text (floats to 4 significant digits; at most ``limit`` rows,
    default 100), CSV or JSON records (all rows unless ``limit``)."""
    import csv
    import io
    import json
    import math

    rows = tbl.to_pylist()
    if not rows and fmt == "table":
        return "(no rows)\n"
    if limit is None:
        limit = 100 if fmt == "table" else 0
    shown = rows[:limit] if limit else rows
    if fmt == "json":
        def clean(v):  # NaN is not JSON
            return None if isinstance(v, float) and math.isnan(v) else v
        return json.dumps([{k: clean(v) for k, v in r.items()} for r in shown], default=str,
                          indent=1) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=tbl.column_names, lineterminator="\n")
        writer.writeheader()
        writer.writerows(shown)
        return out.getvalue()

    def cell(v) -> str:
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    body = [[cell(r[c]) for c in tbl.column_names] for r in shown]
    widths = [max([len(c)] + [len(b[i]) for b in body]) for i, c in enumerate(tbl.column_names)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(tbl.column_names, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more rows (--limit 0 prints all)")
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _cmd_report(args: argparse.Namespace) -> int:
    from residual_core.layout import Layout
    from residual_core.report.markdown import model_report

    from residual_core.report.plots import figure_output

    with figure_output(args.format, args.dpi):
        if args.grid is not None:
            return _grid_report(args)
        if args.model is None:
            raise ResidualError("report needs --model MODEL (one model's report) or --grid GRID "
                                "(the specialisation report over a grid's cells)")
        report = model_report(Layout.of(args.store_root).root, args.model, args.pretrained,
                              datasets=args.dataset or None, out_dir=args.out,
                              feature_dtype=args.feature_dtype)
    print(report.results_table)
    print(f"report: {report.path}")
    return 0


def _grid_report(args: argparse.Namespace) -> int:
    """``report --grid``: the grid's cells (``pretrained: world`` as the checkpoint its
    pretrain settings name) reported from the tables; nothing is computed."""
    from pipelines.grid import load_grid
    from residual_core.identity import WORLD_WEIGHTS
    from residual_core.layout import Layout
    from residual_core.report.grid import GridCell, grid_report
    from residual_core.stages import pretrain

    grid = load_grid(args.grid, data_root=_dataset_root(args))
    layout = Layout.of(args.store_root)
    world = str(pretrain.checkpoint(pretrain.Inputs(out_dir=str(layout.checkpoints.resolve())),
                                    grid.pretrain))
    cells = [GridCell(c.model.name, world if c.model.pretrained == WORLD_WEIGHTS
                      else c.model.pretrained, c.dataset) for c in grid.cells()]
    out = args.out or layout.reports(f"grid-{grid.name}")
    report = grid_report(layout.root, cells, out, title=f"Specialisation across grid {grid.name}")
    print(report.table)
    print(f"report: {report.path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    _default_prefect_home(args.store_root)
    from pipelines.demo import run_demo
    from pipelines.server import temporary_prefect_server

    with temporary_prefect_server():
        return run_demo(store_root=args.store_root, force=args.force)


def _add_force(p: argparse.ArgumentParser, stages: bool = False) -> None:
    """``--force``, one meaning in every command: recompute even what is up to date. A command
    of several stages takes the first stage to recompute (``--force STAGE``, repeatable: that
    stage and every stage after it); a bare ``--force`` there recomputes every stage."""
    if not stages:
        p.add_argument("--force", action="store_true", help="recompute even if up to date")
        return
    first = next(iter(STAGES))  # every stage comes after the first
    p.add_argument("--force", action="append", nargs="?", const=first, default=[],
                   choices=STAGES, metavar="STAGE",
                   help="recompute even if up to date: STAGE and every stage after it "
                   f"(repeatable; one of {', '.join(STAGES)}); a bare --force: every stage")


def _add_params(p: argparse.ArgumentParser, schema: type[StageParams]) -> None:
    """One option per field of a stage's ``Params``: ``--field-name``, the field's type, choices
    and description; the default (``None``) leaves the schema's default in place."""
    for name, field in schema.model_fields.items():
        kind, choices, many = _option_type(field.annotation)
        shown = (" ".join(map(str, field.default)) if isinstance(field.default, (tuple, list))
                 else field.default)
        default = "" if field.default in (None, {}) else f" (default {shown})"
        kwargs: dict[str, Any] = {"dest": name, "default": None,
                                  "help": f"{field.description}{default}"}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=kind, metavar=name.upper() if choices is None else None,
                          choices=choices)
            if many:
                kwargs["nargs"] = "+"
        p.add_argument(f"--{name.replace('_', '-')}", **kwargs)


def _option_type(annotation: Any) -> tuple[type, tuple | None, bool]:
    """``(type, choices, several values)`` of a field's annotation."""
    many = False
    if get_origin(annotation) is dict:  # METHOD=VALUE pairs, parsed by the schema
        return str, None, True
    if get_origin(annotation) in (tuple, list):
        annotation, many = get_args(annotation)[0], True
    if get_origin(annotation) is Annotated:  # e.g. StrictInt
        annotation = get_args(annotation)[0]
    if get_origin(annotation) is Union:  # X | None
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if get_origin(annotation) is Literal:
        choices = get_args(annotation)
        return type(choices[0]), choices, many
    for base in (bool, int, float, str):
        if annotation is base or (isinstance(annotation, type) and issubclass(annotation, base)):
            return base, None, many
    return str, None, many


def _params(schema: type[StageParams], args: argparse.Namespace) -> StageParams:
    """The stage's ``Params`` from the options given; a bad value is a one-line error naming
    its option."""
    given = {name: getattr(args, name) for name in schema.model_fields
             if getattr(args, name, None) is not None}
    try:
        return schema(**given)
    except ParamsError as exc:
        problems = "; ".join(f"--{field.split('.')[0].replace('_', '-')}: {msg}"
                             for field, msg in exc.problems)
        raise ResidualError(f"invalid option: {problems}") from None


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--model`` and ``--pretrained``: a model fully named by architecture and weights."""
    p.add_argument("--model", required=True,
                   help="open_clip architecture (e.g. ViT-B-16), or a transformers tower "
                   "hf:HUB_ID | hf:DIR (e.g. hf:facebook/dinov2-large; README: Models)")
    p.add_argument("--pretrained", default=None,
                   help="pretrained tag or checkpoint path (default: random weights; not used "
                   "with hf: models, whose name holds their weights)")


def _add_store_dtype(p: argparse.ArgumentParser) -> None:
    """``--feature-dtype`` of a command that reads feature stores: it names which ones."""
    field = extract_stage.Params.model_fields["feature_dtype"]
    p.add_argument("--feature-dtype", default=field.default, choices=get_args(field.annotation),
                   help=f"dtype the stores were extracted in (default {field.default})")


def _add_feature_store_arguments(p: argparse.ArgumentParser) -> None:
    """The options that name one feature store (read by :func:`_feature_url`)."""
    _add_model_arguments(p)
    p.add_argument("--dataset", required=True, help="dataset name (as extracted)")
    p.add_argument("--split", default="train", choices=["train", "val", "test"])
    _add_store_dtype(p)
    p.add_argument("--store-root", default=None, help="store root folder or URL (default data)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``residual`` command (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="residual",
        description="ResiDual feature-caching pipeline: decompose CLIP image towers into residual "
        "units, cache them, analyse their spectra and align them.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="run the main job end to end on the embedded default",
                       description="Pretrain the embedded tiny CLIP on the synthetic world, then "
                       "extract, spectral and align every world task through the Prefect flows "
                       "(a temporary local Prefect server that stops with the command, unless "
                       "PREFECT_API_URL names one), print the results and write a report under "
                       "<store-root>/reports/demo. Cached stages are not recomputed.")
    p.add_argument("--store-root", default=None, help="store root (default data)")
    _add_force(p, stages=True)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("extract", help="write the feature store of a model on a dataset split",
                       description="Decompose every image of a dataset split and write the "
                       "per-unit features to a chunked, resumable Zarr store. Rerunning the same "
                       "command resumes an interrupted run and does nothing for a complete store. "
                       "Splits (stratified, seed 42): a paper dataset's val is carved from its "
                       "official train (10%; svhn, dtd, stanford_cars, imagenet 20%), eurosat and "
                       "sun397 are drawn 80/10/10; imagefolder:PATH is 80/10/10 of PATH/<class>/ "
                       "or PATH/train + PATH/test (+ PATH/val, else 10% of train), with fractions, "
                       "seed, class names and templates from an optional PATH/dataset.json.")
    _add_model_arguments(p)
    p.add_argument("--dataset", required=True,
                   help="registered dataset (e.g. cifar10), imagefolder:PATH (a bare relative "
                   "PATH is under --data-root; ./PATH the current directory), or "
                   "hf-dataset:NAMESPACE/NAME|PATH[?image=COL&label=COL] (README: Datasets)")
    p.add_argument("--split", required=True, choices=["train", "val", "test"])
    p.add_argument("--data-root", default=None, help="dataset root (default data/datasets)")
    p.add_argument("--store-root", default=None, help="store root folder or URL (default data)")
    _add_params(p, extract_stage.Params)
    p.add_argument("--verify", action="store_true",
                   help="decode written chunks first and recompute damaged ones")
    p.add_argument("--part", type=_part, default=None, metavar="I/P",
                   help="extract only part I of P (counted from 0) of the split's row chunks, "
                   "while other processes or machines extract the others on the same store "
                   "(e.g. a SLURM array: --part $SLURM_ARRAY_TASK_ID/8); the last part to "
                   "finish marks the store complete, and the store is the same for any P")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("spectral", help="per-unit PCA and intrinsic dimension of a feature store",
                       description="Per-unit PCA (out of core, Dask), spectra statistics and TwoNN "
                       "intrinsic dimension of an extracted feature store; writes a spectral Zarr "
                       "store next to it and the Parquet tables spectra and unit_stats.")
    _add_feature_store_arguments(p)
    # --dask-*: the same names as `residual run` (extract's --num-workers are DataLoader workers)
    p.add_argument("--dask-address", dest="address", default=None,
                   help="dask.distributed scheduler address (must answer within 5 s)")
    p.add_argument("--dask-workers", dest="workers", type=int, default=None,
                   help="start a LocalCluster (on 127.0.0.1) with this many worker processes, "
                   ">= 1 (default or 0: the local threaded scheduler)")
    p.add_argument("--dask-memory-limit", dest="memory_limit", default=None,
                   help="per-worker memory limit of that LocalCluster, e.g. 2GB, 512MiB or auto")
    _add_params(p, spectral_stage.Params)
    _add_force(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    def spectral(args: argparse.Namespace) -> int:
        """Bad Dask options are refused before the feature store is opened: dask_client checks
        them when called and starts nothing until entered."""
        from residual_core.engines.spectral import dask_client

        dask_client(args.address, args.workers, args.memory_limit)
        return _cmd_spectral(args)
    p.set_defaults(func=spectral)

    p = sub.add_parser("align", help="fit ResiDual and the baselines on a task's feature stores",
                       description="Fit the align methods (ResiDual variants and baselines) on "
                       "the train/val/test feature stores of a model on a dataset (extract all "
                       "three first) and write one evaluations row per fit and the fits' weights. "
                       "A fit whose row is already in the tables with the same inputs and "
                       "settings is reused, not run again (--force refits it).")
    _add_model_arguments(p)
    p.add_argument("--dataset", required=True, help="dataset name (as extracted)")
    _add_store_dtype(p)
    p.add_argument("--basis", default=None, metavar="DATASET",
                   help="dataset whose train spectral store gives the principal bases (run "
                   "`residual spectral` on it first; default: imagenet if present, else the "
                   "task's own train split)")
    p.add_argument("--data-root", default=None,
                   help="dataset root, read again only by finetune (default data/datasets)")
    p.add_argument("--store-root", default=None, help="store root folder or URL (default data)")
    _add_params(p, align_stage.Params)
    _add_force(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_align)

    p = sub.add_parser("explain", help="describe every head of a feature store in text",
                       description="Explain every attention head of an extracted feature store "
                       "in text: TextSpan or SOMP over a dictionary embedded by the model's own "
                       "text tower (cached). Writes the head_texts table and prints each head's "
                       "top descriptions. Rerunning with the same store, dictionary and settings "
                       "computes nothing.")
    _add_feature_store_arguments(p)
    _add_params(p, explain_stage.Params)
    _add_force(p)
    p.add_argument("--limit", type=int, default=60, help="rows to print (0: all; default 60)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser("heads", help="rank the heads by how much of a concept they carry",
                       description="Rank every attention head by the variance of its "
                       "contributions along a text's direction (the model's text tower embeds "
                       "it), e.g. --concept 'a red digit'.")
    _add_feature_store_arguments(p)
    p.add_argument("--concept", action="append", required=True, metavar="TEXT",
                   help="a text whose direction is scored (repeatable)")
    p.add_argument("--top", type=int, default=10, help="heads shown per concept (default 10)")
    p.add_argument("--rank", type=int, default=None, metavar="R",
                   help="also score the concept within each head's top-R principal directions "
                   "(span_variance, span_fraction) and rank by that")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_heads)

    p = sub.add_parser("run", help="run an experiment grid incrementally (Prefect flows)",
                       description="Run an experiment grid: every (model, dataset) cell through "
                       "extract, spectral, align (and head selection), as Prefect flows. Stages "
                       "whose inputs, parameters and code did not change are not recomputed. "
                       "Without PREFECT_API_URL the flows run against a temporary local Prefect "
                       "server (no setup needed; on 127.0.0.1, it stops with this command however "
                       "the command ends).")
    p.add_argument("--grid", default="demo",
                   help=f"{', '.join(NAMED_GRIDS)} or a grid JSON file (default demo: the "
                   "embedded world, offline)")
    _add_force(p, stages=True)
    p.add_argument("--data-root", default=None, help="dataset root (default data/datasets)")
    p.add_argument("--store-root", default=None,
                   help="stores, tables, checkpoints, Prefect results (default data)")
    p.add_argument("--distribute", action="store_true",
                   help="run each cell on the workers of the residual-pool work pool (needs a "
                   "Prefect server and the residual-cell deployment)")
    p.add_argument("--extract-parts", type=_positive, default=1, metavar="P",
                   help="with --distribute: extract each split that is not current as P parts "
                   "at once, each a run of the residual-extract-part deployment on the pool's "
                   "workers (default 1)")
    p.add_argument("--dask-address", default=None,
                   help="dask.distributed scheduler for the spectral stage")
    p.add_argument("--dask-workers", type=int, default=None,
                   help="or a local dask cluster of this many processes")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("stores", help="list the feature stores under a store root",
                       description="Every feature store under the store root: its path (model/"
                       "weights/dataset/split), state, rows, dtype, size on disk and whether its "
                       "spectral store exists.")
    p.add_argument("--model", default=None, help="only the stores of this model")
    p.add_argument("--store-root", default=None, help="store root folder (default data)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table",
                   help="output format (default table)")
    p.set_defaults(func=_cmd_stores)

    p = sub.add_parser("grid", help="print a grid with every setting, or check a grid file",
                       description="show: print a grid (a named one or a file) as JSON with "
                       "every setting spelled out, a template to copy and edit (the fields are "
                       "the stages' parameters, as their commands' options). validate: check "
                       "a grid file and say what it would run, without running anything.")
    p.add_argument("action", choices=["show", "validate"])
    p.add_argument("grid", metavar="GRID", help=f"{', '.join(NAMED_GRIDS)} or a grid JSON file")
    p.set_defaults(func=_cmd_grid)

    p = sub.add_parser("results", help="query the result tables (Parquet)",
                       description="Print rows of a result table, filtered, or grouped (count, mean "
                       "and standard deviation of every numeric column per group), or the answer of a SQL query "
                       "over the tables (DuckDB; each table is a table of its name, read into "
                       "memory; the query cannot touch any file).")
    p.add_argument("--table", choices=list(TABLES), default=None,
                   help="table to read (default evaluations)")
    p.add_argument("--describe", choices=list(TABLES), default=None, metavar="TABLE",
                   help=f"print the columns of TABLE, their types and meaning (one of "
                   f"{', '.join(TABLES)})")
    p.add_argument("--model", default=None, help="only rows of this model")
    p.add_argument("--pretrained", default=None,
                   help=f"only rows of these weights (a tag, a checkpoint path, or "
                   f"{RANDOM_WEIGHTS})")
    p.add_argument("--dataset", default=None,
                   help="only rows of this dataset (one given as files also by its short name: "
                   "pets for imagefolder:/data/pets, eurosat for hf-dataset:tanganke/eurosat)")
    p.add_argument("--method", default=None, help="only rows of this align method")
    p.add_argument("--columns", default=None, metavar="COLS",
                   help="comma-separated columns to show, in this order")
    p.add_argument("--group-by", default=None, metavar="COLS",
                   help="comma-separated columns: one row per group with its count and the "
                   "mean and standard deviation (over seeds, say) of every numeric column")
    p.add_argument("--sql", default=None, metavar="QUERY",
                   help="a SQL query over the tables instead of the options above; it may "
                   "only read the tables (an in-memory copy of those it names): COPY, EXPORT, "
                   "read_csv/read_parquet/glob, ATTACH, INSTALL/LOAD and SET are refused")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table",
                   help="output format (default table)")
    p.add_argument("--limit", type=int, default=None,
                   help="rows to print (default: 100 for table, all for csv/json; 0: all)")
    p.add_argument("--store-root", default=None, help="root of the tables (default data)")
    p.set_defaults(func=_cmd_results)

    p = sub.add_parser("report", help="write a Markdown report with plots for an evaluated model",
                       description="From the result tables: the task x method table, accuracy "
                       "against parameters, per-head zero-shot accuracy, head spectra and "
                       "K_90/TwoNN by layer, and λ heatmaps, as report.md and PNGs.")
    p.add_argument("--model", default=None,
                   help="open_clip architecture (e.g. ViT-B-16) or hf:HUB_ID | hf:DIR "
                   "(one model's report)")
    p.add_argument("--grid", default=None, metavar="GRID",
                   help="instead of --model: a named grid or grid file; writes the "
                   "specialisation report over its cells (top heads' share of zero-shot "
                   "accuracy, S vs R, and its correlation with the residual-star gain)")
    p.add_argument("--pretrained", default=None,
                   help="pretrained tag, checkpoint path or 'random' (default: the only weights "
                   "evaluated)")
    p.add_argument("--dataset", action="append", default=[], metavar="DATASET",
                   help="a task to report (repeatable; default: every evaluated task)")
    _add_store_dtype(p)
    p.add_argument("--store-root", default=None,
                   help="root of the stores and tables (default data)")
    p.add_argument("--out", default=None,
                   help="output folder (default <store-root>/reports/<model>-<weights>)")
    p.add_argument("--format", choices=("png", "pdf", "svg"), default="png",
                   help="figure file format (default png; pdf and svg keep text as vectors)")
    p.add_argument("--dpi", type=int, default=110, help="resolution of raster figures "
                   "(default 110; 300 for print)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("models", help="list the models the tool decomposes (open_clip "
                       "architectures, transformers towers)",
                       description="List the open_clip architectures whose image tower the "
                       "tool decomposes exactly (--all: every one open_clip knows, the others "
                       "marked), then the transformers model types and the paper's hf: models "
                       "(--pretrained: whether each is in the local Hugging Face cache).")
    p.add_argument("--pretrained", action="store_true", help="also list each one's pretrained tags")
    p.add_argument("--all", action="store_true",
                   help="also list the architectures whose image tower cannot be decomposed "
                   "(timm and ResNet towers, attention pooling, ...), marked with the reason")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("units", help="print the residual unit table of a model",
                       description="Print the residual units (emb, L{l}.mlp, L{l}H{h}) of a model.")
    _add_model_arguments(p)
    p.add_argument("--all", action="store_true", help="print every unit, not the first 24")
    p.set_defaults(func=_cmd_units)
    return parser


def _default_prefect_home(store_root: str | None) -> None:
    """Ephemeral Prefect (no ``PREFECT_API_URL``) keeps its run history under the data root,
    ``<root>/prefect``, unless ``PREFECT_HOME`` is set: one project's runs are not mixed with
    another's in ``~/.prefect``. Call it before Prefect is first imported (it reads it then)."""
    from residual_core.layout import Layout, is_local, local_path

    if os.environ.get("PREFECT_HOME") or os.environ.get("PREFECT_API_URL"):
        return
    root = Layout.of(store_root).check_root().root
    if is_local(root):
        home = local_path(root).resolve() / "prefect"
        home.mkdir(parents=True, exist_ok=True)
        os.environ["PREFECT_HOME"] = str(home)


def _dataset_root(args: argparse.Namespace) -> str:
    """The dataset root of a command: ``--data-root``, else ``<store root>/datasets``."""
    from residual_core.layout import Layout

    return getattr(args, "data_root", None) or str(Layout.of(getattr(args, "store_root", None))
                                                   .datasets)


def _canonical_datasets(args: argparse.Namespace) -> None:
    """``imagefolder:NAME`` (a folder under the dataset root) spelled with its absolute path in
    every dataset argument, as the stores and tables name it."""
    for attr in ("dataset", "basis"):
        value = getattr(args, attr, None)
        if isinstance(value, str):
            setattr(args, attr, canonical_dataset(value, _dataset_root(args)))
        elif isinstance(value, list):
            setattr(args, attr, [canonical_dataset(v, _dataset_root(args)) for v in value])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Prefect's temporary (ephemeral) server can take longer than its 20 s default to start on a
    # small, busy machine; Prefect reads this when it is first imported, below.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # The temporary server's telemetry logs an ERROR on every run where there is no internet.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        if getattr(args, "model", None):  # hf:./dir and hf:/abs/dir are one model
            args.model = canonical_model(args.model)
        _canonical_datasets(args)
        return func(args)
    except ResidualError as exc:
        print(f"residual: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("residual: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `residual results | head`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
