"""Run every benchmark module (``python -m benchmarks [NAME ...]``; a NAME selects the modules
whose name contains it, e.g. ``extract-gpu``)."""

import importlib
import pkgutil
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    names = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
                   if m.name.startswith("bench_"))
    # `extract-gpu` names bench_extract_gpu
    wanted = [n for n in names if not argv or any(a.replace("-", "_") in n for a in argv)]
    for name in wanted:
        print(f"\n## {name}")
        importlib.import_module(f"benchmarks.{name}").main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
