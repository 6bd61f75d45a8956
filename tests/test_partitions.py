"""Partitioned extraction: one split written by many processes at once (``--part I/P``).

The parts run as real ``residual extract`` processes on one store. A child wraps
``FeatureStore.write_chunk`` to log when each chunk's write begins and ends (and to pause after
it, so that a test can ``kill -9`` it between chunks): that is how the tests count writes.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from builders import write_image_folder
from residual_core.errors import StoreError
from residual_core.formats.feature_store import FeatureStore
from residual_core.identity import EMBEDDED_MODEL
from residual_core.stages.extract import Part

ROWS_PER_CHUNK = 8  # 48 train images: 6 row chunks


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("partitions") / "images"
    write_image_folder(root, ["ant", "bee", "cat"], per_class=20)
    return root


def _child(root, folder, part: str | None, log: Path, pause: float = 0.0) -> subprocess.Popen:
    argv = ["extract", "--model", EMBEDDED_MODEL, "--dataset", f"imagefolder:{folder}",
            "--split", "train", "--store-root", str(root), "--batch-size", "8",
            "--rows-per-chunk", str(ROWS_PER_CHUNK), "--num-workers", "0", "--device", "cpu",
            "--quiet"] + ([] if part is None else ["--part", part])
    code = f"""
import os, sys, time
from residual_core.formats.feature_store import FeatureStore
write = FeatureStore.write_chunk
def logged(self, chunk, values, *writer):  # the write waits for the writer process
    with open({str(log)!r}, "a") as f: f.write(f"begin {{chunk}} {{os.getpid()}}\\n")
    write(self, chunk, values, *writer)
    with open({str(log)!r}, "a") as f: f.write(f"end {{chunk}} {{os.getpid()}}\\n")
    time.sleep({pause})
FeatureStore.write_chunk = logged
from pipelines.cli import main
sys.exit(main({argv!r}))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(*procs: subprocess.Popen) -> list[str]:
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        outs.append(out)
    return outs


def _writes(log: Path) -> dict[str, dict[int, int]]:
    """How many writes of each chunk began and ended."""
    counts: dict[str, dict[int, int]] = {"begin": {}, "end": {}}
    for line in log.read_text().splitlines() if log.exists() else []:
        event, chunk, _ = line.split()
        counts[event][int(chunk)] = counts[event].get(int(chunk), 0) + 1
    return counts


def _store_dir(root) -> Path:
    stores = [p for p in Path(str(root).removeprefix("file://")).glob("features/**/*.zarr")]
    assert len(stores) == 1, stores
    return stores[0]


def _files(store: Path) -> dict[str, bytes]:
    """Every file of a store but its metadata documents (which hold timestamps)."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.name != "zarr.json"}


def _assert_same_store(store: Path, reference: Path) -> None:
    assert FeatureStore.open(str(store)).complete
    got, want = _files(store), _files(reference)
    assert sorted(got) == sorted(want)
    different = [name for name in want if got[name] != want[name]]
    assert not different, f"files differ: {different}"
    a, b = zarr.open_group(str(store), mode="r"), zarr.open_group(str(reference), mode="r")
    for name, arr in b.members(max_depth=None):
        if isinstance(arr, zarr.Array):
            np.testing.assert_array_equal(a[name][...], arr[...], err_msg=name)


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):
    """The store one uninterrupted process writes, and how it wrote it."""
    root = tmp_path_factory.mktemp("one-part")
    log = root / "writes.log"
    _finish(_child(root, folder, None, log))
    return _store_dir(root), _writes(log)


# ------------------------------------------------------------------------ the parts
def test_a_part_is_i_of_p_and_the_parts_cover_every_chunk_once():
    assert Part.parse("2/8") == Part(2, 8) and str(Part(2, 8)) == "2/8"
    for n_chunks in (1, 5, 6, 7, 1000):
        for count in (1, 2, 3, 8, 13):
            owned = [c for i in range(count) for c in Part(i, count).chunks(n_chunks)]
            assert owned == list(range(n_chunks)), (n_chunks, count)
    for bad in ("3/2", "0/0", "-1/2", "1", "a/b", "1/2/3"):
        with pytest.raises(ValueError, match="part"):
            Part.parse(bad)


def test_the_cli_refuses_a_part_that_does_not_exist(capsys):
    from pipelines.cli import main

    for bad in ("3/2", "0/0", "x"):
        with pytest.raises(SystemExit) as exit_:
            main(["extract", "--model", EMBEDDED_MODEL, "--dataset", "cifar10", "--split",
                  "val", "--part", bad])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "argument --part" in err and "I/P" in err and "Traceback" not in err


@pytest.mark.parametrize("count, root_kind", [(2, "path"), (3, "file-url")])
def test_parts_in_separate_processes_write_the_store_of_one_part(folder, reference, tmp_path,
                                                               count, root_kind):
    store_ref, one = reference
    assert sorted(one["end"]) == list(range(6)) and set(one["end"].values()) == {1}
    root = tmp_path / "parts"
    root_arg = f"file://{root}" if root_kind == "file-url" else root
    log = tmp_path / "writes.log"
    outs = _finish(*[_child(root_arg, folder, f"{i}/{count}", log) for i in range(count)])
    writes = _writes(log)
    assert writes["begin"] == writes["end"] == {c: 1 for c in range(6)}
    _assert_same_store(_store_dir(root), store_ref)
    assert sum("the store is complete" in out for out in outs) >= 1, outs


def test_a_part_killed_at_several_points_then_rerun_rewrites_no_finished_chunk(
        folder, reference, tmp_path):
    store_ref, _ = reference
    root, log = tmp_path / "killed", tmp_path / "writes.log"
    other = _child(root, folder, "1/2", log)  # part 1 runs to its end meanwhile
    kills = []
    for ends in (1, 2):  # kill part 0 after its first chunk, then after its second in all
        part0 = _child(root, folder, "0/2", log, pause=1.5)
        deadline = time.monotonic() + 240
        while sum(_writes(log)["end"].get(c, 0) for c in range(3)) < ends:
            assert part0.poll() is None, part0.communicate()[1]
            assert time.monotonic() < deadline, "part 0 wrote nothing"
            time.sleep(0.05)
        part0.send_signal(signal.SIGKILL)
        part0.wait()
        kills.append(ends)
    _finish(other)
    store = _store_dir(root)
    assert not FeatureStore.open(str(store), require_complete=False).complete
    left = 3 - sum(_writes(log)["end"].get(c, 0) for c in range(3))  # 1 unless a kill was late
    assert left >= 1
    [out] = _finish(_child(root, folder, "0/2", log))
    assert f"computed {left} row chunks" in out and "the store is complete" in out, out
    writes = _writes(log)
    assert writes["end"] == {c: 1 for c in range(6)}, f"kills after {kills}: {writes}"
    _assert_same_store(store, store_ref)


def test_two_processes_on_the_same_part_never_write_one_chunk_twice(folder, reference, tmp_path):
    store_ref, _ = reference
    root, log = tmp_path / "same", tmp_path / "writes.log"
    outs = _finish(*[_child(root, folder, "0/1", log, pause=0.2) for _ in range(2)])
    writes = _writes(log)
    assert writes["begin"] == writes["end"] == {c: 1 for c in range(6)}, writes
    assert any("being written by another process" in out or "computed 0 row chunks" in out
               for out in outs), outs
    _assert_same_store(_store_dir(root), store_ref)


# ------------------------------------------------------------------------ in one process
def _extract(folder, root, part=None, tiny=None):
    from residual_core.engines.extract import extract
    from residual_core.stages.extract import Params

    params = Params(batch_size=8, rows_per_chunk=ROWS_PER_CHUNK, num_workers=0, device="cpu")
    return extract(EMBEDDED_MODEL, None, f"imagefolder:{folder}", "train", params,
                   store_root=root, progress=False, part=part, loaded=tiny)


@pytest.fixture(scope="module")
def tiny():
    from residual_core.method.models import load_model

    return load_model(EMBEDDED_MODEL, None, device="cpu")


def test_a_part_count_changed_half_way_is_handled(folder, tiny, tmp_path):
    """2 parts, one of them done, then 3 parts: no finished chunk is rewritten."""
    first = _extract(folder, tmp_path / "a", Part(0, 2), tiny)
    assert (first.computed_chunks, first.complete) == (3, False)
    rest = [_extract(folder, tmp_path / "a", Part(i, 3), tiny) for i in range(3)]
    assert [r.computed_chunks for r in rest] == [0, 1, 2]  # 3/3 of chunks 0-1 were done
    assert [r.complete for r in rest] == [False, False, True]
    whole = _extract(folder, tmp_path / "b", None, tiny)
    _assert_same_store(_store_dir(tmp_path / "a"), _store_dir(tmp_path / "b"))
    assert whole.complete and whole.part == "0/1"


def test_a_store_of_the_old_layout_takes_one_writer_at_a_time(folder, tiny, tmp_path,
                                                               monkeypatch):
    """Stores made before partitioned extraction keep every ``done`` flag in one chunk."""
    from residual_core.formats import feature_store
    from residual_core.formats.claims import store_claims

    old = feature_store.SCHEMA["done"].__class__(("row_chunk",), "uint8", False)
    monkeypatch.setitem(feature_store.SCHEMA, "done", old)
    result = _extract(folder, tmp_path, Part(0, 2), tiny)
    assert FeatureStore.open(result.url, require_complete=False).shared_done
    with store_claims(result.url) as other:
        other.hold_store(exclusive=False)  # another part writing
        with pytest.raises(StoreError, match="being written by another extraction"):
            _extract(folder, tmp_path, Part(1, 2), tiny)
    assert _extract(folder, tmp_path, Part(1, 2), tiny).complete


# ------------------------------------------------------------------------ leases (fsspec)
def test_leases_exclude_other_owners_and_expire_when_the_owner_dies():
    from residual_core.formats.claims import LeaseClaims

    url = "memory://leases-test/features/store.zarr"
    a = LeaseClaims(url, ttl=0.6, settle=0.01)
    b = LeaseClaims(url, ttl=0.6, settle=0.01)
    assert a.claim_many(range(4)) == [0, 1, 2, 3]
    assert b.claim_many(range(6)) == [4, 5]
    time.sleep(1.0)  # a's heartbeat keeps its leases past their first expiry
    assert b.claim_many(range(4)) == []
    a.release(1)
    assert b.claim(1)
    a._stop.set()  # a dies: no more heartbeats, nothing released
    time.sleep(0.8)
    assert b.claim_many([0, 2, 3]) == [0, 2, 3]
    with b.metadata():
        assert not a._take("metadata")
    b.close()


def test_a_partitioned_extraction_on_an_fsspec_store(folder, tiny):
    root = "memory://partitions-test"
    parts = [_extract(folder, root, Part(i, 2), tiny) for i in range(2)]
    assert [p.computed_chunks for p in parts] == [3, 3]
    assert [p.complete for p in parts] == [False, True]
    store = FeatureStore.open(parts[1].url)
    assert store.complete and not store.pending_chunks().size
