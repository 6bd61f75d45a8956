"""Chaos: ``kill -9`` the pipeline (extract three splits, spectral, align) at seeded random
moments, rerun it to completion, and require exactly what an uninterrupted run writes: every Zarr
array bitwise, every attribute, every table row (timestamps and timings aside)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from builders import write_image_folder
from residual_core.tables import list_tables, read_table

SEED = 20261202
KILLS_PER_STAGE = 2
VOLATILE = {"created_at", "completed_at", "code_version", "fit_seconds", "seconds"}
"""What two equal runs may write differently: when, by which commit, and how fast."""


def pipeline(root: str, folder: str) -> None:
    """The work a child process does (the three stages through their core engines)."""
    from residual_core.engines.align import run_align
    from residual_core.engines.extract import extract
    from residual_core.engines.spectral import SpectralParams, run_spectral
    from residual_core.identity import EMBEDDED_MODEL
    from residual_core.layout import SPLITS
    from residual_core.stages.align import Params as AlignParams
    from residual_core.stages.extract import Params as ExtractParams

    print("extract", flush=True)  # each stage says when it starts
    params = ExtractParams(batch_size=8, rows_per_chunk=16, num_workers=0, device="cpu")
    urls = {split: extract(EMBEDDED_MODEL, None, f"imagefolder:{folder}", split, params,
                           store_root=root, progress=False).url for split in SPLITS}
    print("spectral", flush=True)
    spectral = run_spectral(urls["train"], SpectralParams(twonn_max_samples=200),
                            progress=False).url
    print("align", flush=True)
    run_align(urls["train"], urls["val"], urls["test"],
              AlignParams(methods=("zero-shot", "residual-star", "linear"), seeds=(0, 1),
                          epochs=3, random_seeds=2),
              basis_url=spectral, progress=False)
    print("done", flush=True)


def _child(root: Path, folder: Path) -> subprocess.Popen:
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from test_chaos import pipeline; pipeline({str(root)!r}, {str(folder)!r})")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(proc: subprocess.Popen, stage: str) -> bool:
    """Read the child's stage lines until ``stage`` starts (False: the child ended first)."""
    for line in proc.stdout:
        if line.strip() == stage:
            return True
    return False


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err


def _stores(root: Path) -> dict[str, dict]:
    """Every Zarr store under ``root``: its arrays (bytes, dtype, shape) and attributes."""
    out = {}
    for path in sorted(root.rglob("*.zarr")):
        if any(p.suffix == ".zarr" for p in path.relative_to(root).parents if p != Path(".")):
            continue  # a group inside a store is part of that store
        out[str(path.relative_to(root))] = _group(zarr.open_group(str(path), mode="r"), root)
    return out


def _group(group: zarr.Group, root: Path) -> dict:
    # paths recorded in attributes name the run's root: compare them relative to it
    attrs = json.loads(json.dumps(dict(group.attrs)).replace(str(root), "<root>"))
    entry = {"attrs": {k: v for k, v in attrs.items() if k not in VOLATILE}}
    for name, member in group.members():
        if isinstance(member, zarr.Group):
            entry[name] = _group(member, root)
        else:
            value = member[...]
            entry[name] = (str(value.dtype), value.shape, np.ascontiguousarray(value).tobytes())
    return entry


def _differences(a: dict, b: dict, where: str = "") -> list[str]:
    """The members (arrays, ``attrs.KEY``) of two :func:`_group` entries that differ."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if key == "attrs":
            out += [f"{where}attrs.{k}: {x.get(k)!r} != {y.get(k)!r}"
                    for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
        elif isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{where}{key}/")
        elif x != y:
            out.append(f"{where}{key}")
    return out


def _tables(root: Path) -> dict[str, list]:
    out = {}
    for table in list_tables(root):
        rows = [{k: v for k, v in r.items() if k not in VOLATILE}
                for r in read_table(root, table).to_pylist()]
        out[table] = sorted(repr(sorted(r.items())) for r in rows)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("chaos") / "imgs", ["a", "b", "c"], 40,
                              size=24, seed=5)


def test_seeded_kills_in_every_stage_then_a_rerun_equal_an_uninterrupted_run(folder, tmp_path):
    clean, stages = tmp_path / "clean", ("extract", "spectral", "align", "done")
    proc, started = _child(clean, folder), {}
    for stage in stages:
        assert _wait_for(proc, stage), proc.stderr.read()
        started[stage] = time.perf_counter()
    _finish(proc)
    took = {s: started[n] - started[s] for s, n in zip(stages, stages[1:])}

    # KILLS_PER_STAGE kills inside each stage, at seeded fractions of its uninterrupted time;
    # each killed run starts from what the killed runs before it left
    rng = random.Random(SEED)
    chaos, killed = tmp_path / "chaos", []
    for stage in [s for s in took for _ in range(KILLS_PER_STAGE)]:
        proc = _child(chaos, folder)
        fraction = rng.uniform(0.02, 0.98)
        if not _wait_for(proc, stage):
            _finish(proc)
            continue
        try:
            proc.wait(timeout=fraction * took[stage])  # ended first: nothing left to do
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed.append(f"{stage}@{fraction:.2f}")
        proc.stdout.close()
        proc.stderr.close()
    _finish(_child(chaos, folder))

    assert {k.split("@")[0] for k in killed} == set(took), f"kills landed only in {killed}"
    clean_stores, chaos_stores = _stores(clean), _stores(chaos)
    assert sorted(chaos_stores) == sorted(clean_stores)
    assert len(clean_stores) == 5  # three feature stores, a spectral store, the fit weights
    for name in clean_stores:
        assert _differences(chaos_stores[name], clean_stores[name]) == [], \
            f"{name} differs (kills: {killed})"
    clean_tables = _tables(clean)
    assert set(clean_tables) >= {"spectra", "unit_stats", "evaluations", "head_selection"}
    assert _tables(chaos) == clean_tables, f"tables differ (kills: {killed})"
    print(f"\nchaos: {len(killed)} kills ({', '.join(killed)}); stage seconds "
          f"{ {s: round(t, 1) for s, t in took.items()} }; stores and tables equal")
