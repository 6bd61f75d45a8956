"""The ``residual`` command line.

Conventions: ``--help`` on every command; user errors (bad names, missing files, mismatched stores)
print one line ``residual: error: ...`` and exit with status 2; 0 means success.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from residual_core.errors import ResidualError

EXIT_USAGE = 2


def _cmd_models(args: argparse.Namespace) -> int:
    from residual_core.models import EMBEDDED_MODEL, list_models

    import open_clip

    for name in list_models():
        if args.pretrained:
            tags = open_clip.list_pretrained_tags_by_model(name)
            embedded = " (embedded, random or local weights)" if name == EMBEDDED_MODEL else ""
            print(f"{name:<40} {', '.join(tags)}{embedded}")
        else:
            print(name)
    return 0


def _cmd_units(args: argparse.Namespace) -> int:
    from residual_core.decompose import readout_maps
    from residual_core.models import load_model
    from residual_core.units import format_unit_table

    loaded = load_model(args.model, args.pretrained, device="cpu")
    maps = readout_maps(loaded.model)
    print(f"{args.model}: L={maps.n_layers} layers, H={maps.n_heads} heads of dh={maps.head_dim}, "
          f"width D={maps.width}, output E={maps.embed_dim}, U={len(maps.units)} units")
    print(format_unit_table(maps.units, limit=None if args.all else 24))
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from residual_core.extract import extract

    result = extract(
        args.model, args.pretrained, args.dataset, args.split, data_root=args.data_root,
        store_root=args.store_root, batch_size=args.batch_size, num_workers=args.workers,
        device=args.device, feature_dtype=args.dtype, rows_per_chunk=args.rows_per_chunk,
        verify=args.verify, progress=not args.quiet)
    state = ("already complete, nothing computed" if result.was_cached else
             f"computed {result.computed_chunks} of {result.total_chunks} row chunks "
             f"({result.rows_computed} images)")
    print(f"{result.url}: {state} in {result.seconds:.1f} s")
    return 0


def _cmd_spectral(args: argparse.Namespace) -> int:
    from residual_core.extract import feature_store_url
    from residual_core.spectral_store import SpectralParams, run_spectral

    url = feature_store_url(args.model, args.pretrained, args.dataset, args.split, args.store_root)
    params = SpectralParams(twonn_max_samples=args.twonn_samples, seed=args.seed)
    result = run_spectral(url, params, address=args.address, n_workers=args.workers,
                          memory_limit=args.memory_limit, force=args.force,
                          progress=not args.quiet)
    state = "computed" if result.computed else "up to date, nothing computed"
    print(f"{result.url}: {state} in {result.seconds:.1f} s")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import run_demo

    return run_demo(batch_size=args.batch_size, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``residual`` command (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="residual",
        description="ResiDual feature-caching pipeline: decompose CLIP image towers into residual "
        "units, cache them, analyse their spectra and align them.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="run the main job end to end on the embedded default",
                       description="Run the main job on the embedded default model and data.")
    p.add_argument("--batch-size", type=int, default=16, help="images to decompose (default 16)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("extract", help="write the feature store of a model on a dataset split",
                       description="Decompose every image of a dataset split and write the "
                       "per-unit features to a chunked, resumable Zarr store. Rerunning the same "
                       "command resumes an interrupted run and does nothing for a complete store.")
    p.add_argument("--model", required=True, help="open_clip architecture, e.g. ViT-B-16")
    p.add_argument("--pretrained", default=None,
                   help="pretrained tag or checkpoint path (default: random weights)")
    p.add_argument("--dataset", required=True,
                   help="registered dataset (e.g. cifar10) or imagefolder:PATH")
    p.add_argument("--split", required=True, choices=["train", "val", "test"])
    p.add_argument("--data-root", default=None, help="dataset root (default data/datasets)")
    p.add_argument("--store-root", default=None, help="store root folder or URL (default data)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                   help="storage dtype of the raw features (default float32)")
    p.add_argument("--rows-per-chunk", type=int, default=1024,
                   help="rows per chunk: the unit of writing and resuming (default 1024)")
    p.add_argument("--verify", action="store_true",
                   help="decode written chunks first and recompute damaged ones")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("spectral", help="per-unit PCA and intrinsic dimension of a feature store",
                       description="Per-unit PCA (out of core, Dask), spectra statistics and TwoNN "
                       "intrinsic dimension of an extracted feature store; writes a spectral Zarr "
                       "store next to it and the Parquet tables spectra and unit_stats.")
    p.add_argument("--model", required=True, help="open_clip architecture, e.g. ViT-B-16")
    p.add_argument("--pretrained", default=None, help="pretrained tag or checkpoint path")
    p.add_argument("--dataset", required=True, help="dataset name (as extracted)")
    p.add_argument("--split", default="train", choices=["train", "val", "test"])
    p.add_argument("--store-root", default=None, help="store root folder or URL (default data)")
    p.add_argument("--address", default=None, help="dask.distributed scheduler address")
    p.add_argument("--workers", type=int, default=None,
                   help="start a LocalCluster with this many worker processes")
    p.add_argument("--memory-limit", default=None, help="per-worker memory limit, e.g. 2GB")
    p.add_argument("--twonn-samples", type=int, default=50_000,
                   help="rows subsampled for TwoNN (default 50000)")
    p.add_argument("--seed", type=int, default=42, help="TwoNN subsample seed (default 42)")
    p.add_argument("--force", action="store_true", help="recompute even if up to date")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_spectral)

    p = sub.add_parser("models", help="list the open_clip architectures (and pretrained tags)",
                       description="List architecture names known to open_clip.")
    p.add_argument("--pretrained", action="store_true", help="also list each one's pretrained tags")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("units", help="print the residual unit table of a model",
                       description="Print the residual units (emb, L{l}.mlp, L{l}H{h}) of a model.")
    p.add_argument("--model", required=True, help="open_clip architecture, e.g. ViT-B-16")
    p.add_argument("--pretrained", default=None,
                   help="pretrained tag or checkpoint path (default: random weights)")
    p.add_argument("--all", action="store_true", help="print every unit, not the first 24")
    p.set_defaults(func=_cmd_units)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ResidualError as exc:
        print(f"residual: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("residual: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
