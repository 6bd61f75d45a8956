"""Partitioned extraction and the spectral stage at scale.

1. One split written by 1 process against 2 parts in 2 processes: each configuration runs
   ``residual extract`` as real processes on a fresh store (the same images, the tiny model, no
   DataLoader workers), timed from launch until the last process exits, so model loading is
   counted in every process. Goal: 2 parts in <= 0.6x the wall time of 1 (the best 1-part
   configuration: 1 torch thread, or one per core), with the same bytes on disk.
2. A synthetic store of 100k and 1M rows with one ViT-B head's shapes (dh 64, width 768, E 512:
   units emb, L0H0, L0.mlp; float16; rows of rank-8 signal plus noise), written straight
   through the store API by 2 parts in 2 processes (claims, done flags, finalisation as in
   extraction, no model), then PCA'd by the spectral stage on a LocalCluster of 2 one-thread
   workers: seconds, bytes on disk and the peak memory of each worker. Goal: the workers' peak
   stays flat (<= 1.3x) as rows grow 10x. ``python -m benchmarks.bench_partitions --rows
   100000,1000000`` chooses the sizes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from benchmarks._synthetic import SHAPES, write_in_parts
from benchmarks._timing import print_table
from residual_core.identity import EMBEDDED_MODEL

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from builders import write_image_folder  # noqa: E402


def _run(folder: Path, root: Path, parts: int, threads: int) -> tuple[float, float]:
    """(wall seconds from launch to the last exit, the longest part's own extraction
    seconds as it reports them: model loaded, until its last chunk is written)"""
    argv = [sys.executable, "-m", "pipelines.cli", "extract", "--model", EMBEDDED_MODEL,
            "--dataset", f"imagefolder:{folder}", "--split", "train", "--store-root", str(root),
            "--batch-size", "64", "--rows-per-chunk", "256", "--num-workers", "0",
            "--device", "cpu", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    procs = [subprocess.Popen(argv + (["--part", f"{i}/{parts}"] if parts > 1 else []), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(parts)]
    seconds = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode:
            raise RuntimeError(err)
        seconds.append(float(re.search(r" in ([0-9.]+) s$", out.strip()).group(1)))
    return time.perf_counter() - start, max(seconds)


def _bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in (root / "features").rglob("*") if f.is_file())


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _at_scale(tmp: Path, n: int) -> list[object]:
    from dask.distributed import Client, LocalCluster

    from residual_core.engines.spectral import SpectralParams, run_spectral

    url = str(tmp / f"synthetic-{n}" / "features" / "train.zarr")
    start = time.perf_counter()
    write_in_parts(url, n, "vit-b-head", parts=2)
    t_write = time.perf_counter() - start
    size = sum(f.stat().st_size for f in Path(url).rglob("*") if f.is_file())
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="4GB",
                      host="127.0.0.1", dashboard_address=None) as cluster, \
            Client(cluster) as client:
        start = time.perf_counter()
        run_spectral(url, SpectralParams(twonn_max_samples=5000), address=cluster.scheduler_address,
                     tables_root=str(tmp / f"synthetic-{n}"), progress=False)
        t_pca = time.perf_counter() - start
        peaks = sorted(client.run(_peak_mb).values())
    return [n, t_write, size / 1e9, t_pca, n / t_pca, peaks[-1], peaks[0]]


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_partitions")
    parser.add_argument("--rows", default="100000,1000000",
                        help="row counts of the synthetic stores (default 100000,1000000)")
    parser.add_argument("--skip-extract", action="store_true", help="only the synthetic stores")
    args = parser.parse_args(argv or [])
    tmp = Path(tempfile.mkdtemp(prefix="bench-partitions-"))
    if not args.skip_extract:
        _extract_parts(tmp)
    rows = []
    for n in (int(r) for r in args.rows.split(",")):
        rows.append(_at_scale(tmp, n))
        shutil.rmtree(tmp / f"synthetic-{n}")
    print(f"\n2. synthetic stores (1 head of ViT-B shapes, 3 units, float16, "
          f"{SHAPES['vit-b-head'].rows_per_chunk} rows per "
          "chunk) written by 2 parts in 2 processes, then PCA'd on a LocalCluster of 2 "
          "one-thread workers")
    print_table(["rows", "write s (2 parts)", "GB on disk", "spectral s", "rows/s",
                 "peak MB, worker max", "peak MB, worker min"], rows)
    if len(rows) > 1:
        print(f"peak memory of the busiest worker, {rows[-1][0]:,} rows / {rows[0][0]:,} rows: "
              f"{rows[-1][5] / rows[0][5]:.2f}x (goal <= 1.3x)")
    shutil.rmtree(tmp, ignore_errors=True)


def _extract_parts(tmp: Path) -> None:
    per_class = 10000  # enough that compute, not process start (~8 s of imports here), dominates
    folder = write_image_folder(tmp / "imgs", ["a", "b", "c", "d"], per_class, size=32)
    cores = os.cpu_count() or 1
    configs = [("1 part", 1, 1), (f"1 part, {cores} threads", 1, cores), ("2 parts", 2, 1)]
    times: dict[str, list[tuple[float, float]]] = {label: [] for label, _, _ in configs}
    sizes: dict[str, int] = {}
    for rep in range(3):  # interleaved, so drifting load hits every configuration alike
        for label, parts, threads in configs:
            root = tmp / f"{label.replace(' ', '-').replace(',', '')}-{rep}"
            times[label].append(_run(folder, root, parts, threads))
            sizes[label] = _bytes(root)
    median = {label: sorted(ts)[1] for label, ts in times.items()}  # by wall time
    best_one = min(median[label][0] for label, parts, _ in configs if parts == 1)
    n = int(0.8 * 4 * per_class)
    print(f"1 part against 2 parts in 2 processes, {EMBEDDED_MODEL}, {n} train images, batch 64, "
          f"256 rows per chunk, {cores} cores, median of 3 (wall time incl. process start)")
    print_table(["configuration", "torch threads/process", "wall s", "longest part's extract s",
                 "images/s (wall)", "MB on disk", "wall vs best 1 part (goal 2 parts <= 0.6)"],
                [[label, threads, median[label][0], median[label][1], n / median[label][0],
                  sizes[label] / 1e6, median[label][0] / best_one]
                 for label, _, threads in configs])


if __name__ == "__main__":
    main(sys.argv[1:])
