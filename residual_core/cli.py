"""The ``residual`` command line.

Conventions: ``--help`` on every command; user errors (bad names, missing files, mismatched stores)
print one line ``residual: error: ...`` and exit with status 2; 0 means success.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from .errors import ResidualError

EXIT_USAGE = 2


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import EMBEDDED_MODEL, list_models

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
    from .decompose import readout_maps
    from .models import load_model
    from .units import format_unit_table

    loaded = load_model(args.model, args.pretrained, device="cpu")
    maps = readout_maps(loaded.model)
    print(f"{args.model}: L={maps.n_layers} layers, H={maps.n_heads} heads of dh={maps.head_dim}, "
          f"width D={maps.width}, output E={maps.embed_dim}, U={len(maps.units)} units")
    print(format_unit_table(maps.units, limit=None if args.all else 24))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

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
