"""Hardening of the result tables: whole versions under concurrent replacement, one-line errors
for corrupt files, SQL that cannot touch the file system. Real files, real DuckDB, real
processes."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.cli import main
from residual_core.errors import ResidualError
from residual_core.tables import read_table, write_rows

REPO = Path(__file__).resolve().parents[1]

# Rewrites one partition key of model m in a tight loop through write_rows (temporary file +
# os.replace): version i has rows_of(i) rows, all marked version=i, so a reader can tell a mixed
# read. Meanwhile model m2's partition gets a new key and loses the previous one (a file that
# vanishes between listing and reading).
WRITER = textwrap.dedent("""
    import sys, time
    from residual_core.tables import table_files, write_rows
    root, iterations, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    deadline = time.monotonic() + seconds
    for i in range(1, iterations + 1):
        n = 50 + (i * 37) % 400
        write_rows(root, "churn", [{"model": "m", "dataset": "d", "version": i, "value": float(j),
                                    "note": f"row {j} of version {i}" * (1 + i % 3)}
                                   for j in range(n)],
                   key="same")
        (new,) = write_rows(root, "churn", [{"model": "m2", "dataset": "d", "version": i,
                                              "value": 0.0, "note": ""}] * 3, key=f"k{i}")
        for old in table_files(root, "churn", model="m2"):
            if old != new:
                old.unlink()
        if time.monotonic() > deadline:
            break
""")


def rows_of(version: int) -> int:
    return 50 + (version * 37) % 400


def rows(model, dataset, n, method="coarse"):
    return [{"model": model, "dataset": dataset, "method": method, "seed": i,
             "test_acc": 0.5 + i / 100} for i in range(n)]


def test_reads_see_one_whole_version_while_another_process_replaces_the_partition(tmp_path):
    write_rows(tmp_path, "churn", [{"model": "m", "dataset": "d", "version": 0, "value": 0.0,
                                    "note": ""}] * rows_of(0), key="same")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")])}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), "3000", "30"],
                              cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while read_table(tmp_path, "churn").column("version")[0].as_py() == 0:  # writer started
            assert writer.poll() is None, writer.stderr.read()
            assert time.monotonic() < deadline
        failures, versions = [], set()
        for i in range(300):
            try:
                tbl = read_table(tmp_path, "churn")
            except Exception as exc:  # noqa: BLE001  (every failure is a defect here)
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            by_model = {}
            for model, version in zip(*tbl.select(["model", "version"]).to_pydict().values()):
                by_model.setdefault(model, []).append(version)
            marks = set(by_model["m"])
            if len(marks) != 1 or len(by_model["m"]) != rows_of(next(iter(marks))):
                failures.append(f"mixed read: versions {sorted(marks)[:5]}, "
                                f"{len(by_model['m'])} rows")
            other = by_model.get("m2", [])
            if any(other.count(v) != 3 for v in other):
                failures.append(f"partial m2 files: {other}")
            versions |= marks
            if writer.poll() is not None:
                break
        assert writer.poll() is None or writer.returncode == 0, writer.stderr.read()
    finally:
        writer.kill()
        writer.wait()
    assert not failures, f"{len(failures)} bad reads, e.g. {failures[:3]}"
    assert len(versions) > 5  # the reads really raced the writer


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_corrupt_partition_is_one_line_naming_the_file_and_the_fix(tmp_path, capsys, damage):
    write_rows(tmp_path, "evaluations", rows("a", "d", 3), key="ok")
    (bad,) = write_rows(tmp_path, "evaluations", rows("b", "d", 50), key="bad")
    data = bad.read_bytes()
    bad.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(500),
                     "empty": b""}[damage])
    with pytest.raises(ResidualError) as err:
        read_table(tmp_path, "evaluations")
    message = str(err.value)
    assert "\n" not in message and str(bad) in message and "rerun" in message
    code = main(["results", "--store-root", str(tmp_path)])
    out, err_text = capsys.readouterr()
    assert code == 2 and out == ""
    (line,) = err_text.strip().splitlines()
    assert line.startswith("residual: error:") and str(bad) in line and "delete" in line
    assert read_table(tmp_path, "evaluations", model="a").num_rows == 3  # others still read
