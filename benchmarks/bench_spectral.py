"""Benchmark of the out-of-core per-unit PCA (residual_core.method.spectral.pca_units).

Run: ``python benchmarks/bench_spectral.py [--rows 50000] [--small 20000] [--large 200000]``.

Every measurement runs in its own subprocess, whose peak RSS (``VmHWM``) is reported; the data
sit in zarr v3 stores (float32, chunks ``(4096, 1, 512)``, default Zstd) in a temporary folder that
is removed at the end. Stores were just written, so reads come mostly from the OS page cache:
"read once" measures decompression and dask overhead, the floor for any one-pass method.

1. Time at ``--rows`` × 12 units × 512: the dask PCA (local threaded scheduler) against numpy in
   memory (load the store, then per unit ``np.cov`` + ``eigh``) and scikit-learn's ``PCA`` per unit
   (both with single-threaded BLAS, their fastest setting on a small shared machine), and against
   reading the store once (``da.from_zarr(...).sum().compute()``).
2. Peak memory of the dask PCA as rows grow 10× (``--small`` → ``--large``), each in a fresh
   process. Goal: the peak grows by at most 1.3×.
3. The spectral stage's PCA on feature stores (synthetic, float16, written through the store
   API: every unit of ViT-B/16, ``--stage-rows`` rows, and of the tiny model, 10× as many)
   against one plain read pass of the same store (every raw array decompressed and reduced to
   its maximum; ViT-B/16 at two sizes, whose difference is the cost per row),
   on the local threaded scheduler: the PCA with the scatter accumulated in raw space
   (``FeatureStore.pca``) and the earlier path that projects every row first
   (``pca_units(store.contributions())``). Goal: PCA / read pass <= 1.5.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._timing import print_table  # noqa: E402

UNITS, DIM, CHUNK_ROWS = 12, 512, 4096


def _status_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in MB. Not ``ru_maxrss``: Linux
    carries that over from the parent's RSS at fork time, across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(mode: str, store: str, out: str) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    import dask
    import dask.array as da
    import zarr

    if mode == "sklearn":
        from sklearn.decomposition import PCA
    from residual_core.method.spectral import pca_units

    base = _status_mb("VmRSS")
    load = 0.0
    t0 = time.perf_counter()
    if mode == "dask":
        eigenvalues = np.stack([r.eigenvalues for r in pca_units(da.from_zarr(store))])
    elif mode == "read":
        dask.compute(da.from_zarr(store).sum())
        eigenvalues = None
    else:
        x = zarr.open_array(store, mode="r")[:]
        load = time.perf_counter() - t0
        t0 = time.perf_counter()
        eigenvalues = []
        for u in range(x.shape[1]):
            if mode == "numpy":
                ev, _ = np.linalg.eigh(np.cov(x[:, u], rowvar=False, dtype=np.float64))
                ev = ev[::-1]
            else:
                model = PCA().fit(x[:, u])
                ev, solver = model.explained_variance_, model._fit_svd_solver
            eigenvalues.append(ev)
        eigenvalues = np.stack(eigenvalues)
    compute = time.perf_counter() - t0
    if eigenvalues is not None:
        np.save(out, eigenvalues)
    result = {"load_s": load, "compute_s": compute, "peak_mb": _status_mb("VmHWM"), "base_mb": base}
    if mode == "sklearn":
        result["solver"] = solver
    print(json.dumps(result))


def measure(mode: str, store: Path, tmp: Path, blas_threads: int | None = None) -> dict:
    out = tmp / f"{mode}-{blas_threads}-{store.stem}.npy"
    env = dict(os.environ)
    if blas_threads is not None:
        env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = str(blas_threads)
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(store), str(out)],
        capture_output=True, text=True, check=True, env=env,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["eigenvalues"] = np.load(out) if out.exists() else None
    return result


def write_store(path: Path, rows: int, seed: int = 0) -> Path:
    """A float32 [rows, 12, 512] store with a decaying spectrum; one random batch is repeated
    (the content does not matter for timing, and generating it dominated the write)."""
    import zarr

    rng = np.random.default_rng(seed)
    batch = min(rows, 5 * CHUNK_ROWS)
    scales = (1.0 / np.sqrt(np.arange(1, DIM + 1))).astype(np.float32)
    data = rng.standard_normal((batch, UNITS, DIM), dtype=np.float32) * scales + 1.0
    store = zarr.create_array(
        store=path, shape=(rows, UNITS, DIM), chunks=(CHUNK_ROWS, 1, DIM), dtype="float32"
    )
    for start in range(0, rows, batch):
        stop = min(rows, start + batch)
        store[start:stop] = data[: stop - start]
    return path


def main(argv: Sequence[str] = ()) -> None:
    """Run the benchmark (``argv``: command-line options; none under ``python -m benchmarks``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--small", type=int, default=20_000)
    parser.add_argument("--large", type=int, default=200_000)
    parser.add_argument("--stage-rows", type=int, default=16_384,
                        help="rows of the ViT-B/16 feature store of section 3")
    parser.add_argument("--only-stage", action="store_true", help="only section 3")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # MODE STORE OUT
    args = parser.parse_args(list(argv))
    if args.child:
        child(*args.child)
        return
    if args.only_stage:
        stage_pass(args.stage_rows)
        return

    started = time.perf_counter()
    rows_out = []
    with tempfile.TemporaryDirectory(prefix="bench_spectral_") as tmp_name:
        tmp = Path(tmp_name)

        def run(label: str, mode: str, rows: int, store: Path, blas_threads=None) -> dict:
            result = measure(mode, store, tmp, blas_threads)
            rows_out.append((label, rows, result))
            print(f"  done: {label} ({rows} rows)", file=sys.stderr)
            return result

        main_store = write_store(tmp / "main.zarr", args.rows)
        dask_main = run("dask pca_units", "dask", args.rows, main_store)
        # In-memory baselines with single-threaded BLAS: their fastest setting on a small shared
        # machine (default threading measured 2-4x slower here), so the comparison is
        # conservative. The dask PCA limits BLAS to one thread per dask thread itself.
        numpy_main = run("numpy cov+eigh", "numpy", args.rows, main_store, blas_threads=1)
        sklearn_main = run("sklearn PCA", "sklearn", args.rows, main_store, blas_threads=1)
        read_main = run("read once (sum)", "read", args.rows, main_store)
        shutil.rmtree(main_store)  # disk space for the large store

        small = write_store(tmp / "small.zarr", args.small)
        dask_small = run("dask pca_units", "dask", args.small, small)
        large = write_store(tmp / "large.zarr", args.large)
        dask_large = run("dask pca_units", "dask", args.large, large)

    def total(r: dict) -> float:
        return r["load_s"] + r["compute_s"]

    dask_at = {args.rows: dask_main, args.small: dask_small, args.large: dask_large}
    print(f"\nPer-unit PCA, float32 [N, {UNITS}, {DIM}] zarr stores (all units in one pass); "
          "'/ dask' = total time relative to dask PCA at the same N")
    print_table(
        ["method", "N", "load s", "compute s", "total s", "/ dask", "peak MB", "above imports MB"],
        [
            [label + (f" [{r['solver']}]" if "solver" in r else ""), rows, r["load_s"],
             r["compute_s"], total(r), total(r) / total(dask_at[rows]), round(r["peak_mb"]),
             round(r["peak_mb"] - r["base_mb"])]
            for label, rows, r in rows_out
        ],
    )

    print()
    for label, r in (("numpy cov+eigh", numpy_main), ("sklearn PCA", sklearn_main)):
        print(f"dask time / {label} time (load included): {total(dask_main) / total(r):.2f}")
    print(f"dask PCA time / read-once time: {total(dask_main) / total(read_main):.2f}")
    above = [r["peak_mb"] - r["base_mb"] for r in (dask_small, dask_large)]
    print(f"dask PCA peak RSS, N={args.small} -> N={args.large}: "
          f"{dask_large['peak_mb'] / dask_small['peak_mb']:.2f}x "
          f"(above imports: {above[1] / above[0]:.2f}x); goal <= 1.3x")
    ref = numpy_main["eigenvalues"]
    significant = ref > 1e-9 * ref[:, :1]
    for label, r in (("dask", dask_main), ("sklearn", sklearn_main)):
        diff = np.abs(r["eigenvalues"] - ref)[significant] / ref[significant]
        print(f"{label} eigenvalues vs numpy (float64 cov), max relative diff: {diff.max():.1e}")
    print(f"benchmark wall time: {time.perf_counter() - started:.0f} s")
    stage_pass(args.stage_rows)


def _timed(fn, repeats: int = 2) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls, and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def stage_pass(vit_rows: int) -> None:
    """Section 3: the spectral stage's PCA against one read pass of the same feature store."""
    import dask
    from threadpoolctl import threadpool_limits

    from benchmarks._synthetic import write_in_parts
    from residual_core.formats.feature_store import ROW_FIELDS, FeatureStore
    from residual_core.method.spectral import pca_units

    table = []
    timed: dict[str, list[tuple[int, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_spectral_stage_") as tmp_name:
        for shape_name, rows in (("vit-b-16", vit_rows), ("vit-b-16", 2 * vit_rows),
                                 ("tiny", 10 * vit_rows)):
            url = str(Path(tmp_name) / shape_name / "train.zarr")
            write_in_parts(url, rows, shape_name)
            store = FeatureStore.open(url)
            size = sum(f.stat().st_size for f in Path(url).rglob("*") if f.is_file())

            def read_pass():
                dask.compute(*(store.raw_array(name).max() for name in ROW_FIELDS))

            t_read, _ = _timed(read_pass, 3)
            t_raw, fast = _timed(store.pca)
            with threadpool_limits(limits=1, user_api="blas"):
                t_projected, slow = _timed(lambda: pca_units(store.contributions()), 1)
            diff = max(float(np.abs(a.eigenvalues - b.eigenvalues).max() / a.eigenvalues[0])
                       for a, b in zip(fast, slow) if a.eigenvalues[0] > 0)
            table.append([shape_name, rows, len(store.units), size / 1e6, t_read, t_raw,
                          t_projected, t_raw / t_read, t_projected / t_read, t_projected / t_raw,
                          f"{diff:.1e}"])
            timed.setdefault(shape_name, []).append((rows, t_read, t_raw, t_projected))
            shutil.rmtree(Path(url).parent)
    (n1, read1, raw1, proj1), (n2, read2, raw2, proj2) = timed["vit-b-16"]
    d_read, d_raw, d_proj = read2 - read1, raw2 - raw1, proj2 - proj1
    # the difference of the two sizes: what more rows cost, without the per-unit eigensolves
    table.append(["vit-b-16", f"{n2 - n1} more", "", "", d_read, d_raw, d_proj, d_raw / d_read,
                  d_proj / d_read, d_proj / d_raw, ""])
    print("\n3. The spectral stage's PCA on float16 feature stores (every unit) / one read pass "
          "of the same store, local threaded scheduler; best of 2 (PCA) and 3 (read); the "
          "'more' row is the difference of the two ViT-B/16 sizes (per row, without fixed costs)")
    print_table(["store", "rows", "units", "MB on disk", "read pass s", "PCA raw-space s",
                 "PCA projected s", "raw / read (goal <= 1.5)", "projected / read",
                 "speed-up", "max eigenvalue diff / top"], table)

if __name__ == "__main__":
    main(sys.argv[1:])
