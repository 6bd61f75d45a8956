"""Hardening of the result tables: whole versions under concurrent replacement, one-line errors
for corrupt files, SQL that cannot touch the file system. Real files, real DuckDB, real
processes."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipelines.cli import main
from residual_core.errors import ResidualError
from residual_core.tables import read_table, sql, table_files, write_rows

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
                if i % 10 == 9:  # the SQL path reads through the same reader
                    tbl = sql(tmp_path, "SELECT model, version FROM churn")
                else:
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
    with pytest.raises(ResidualError, match="rerun"):
        sql(tmp_path, "SELECT count(*) FROM evaluations")
    code = main(["results", "--store-root", str(tmp_path)])
    out, err_text = capsys.readouterr()
    assert code == 2 and out == ""
    (line,) = err_text.strip().splitlines()
    assert line.startswith("residual: error:") and str(bad) in line and "delete" in line
    assert read_table(tmp_path, "evaluations", model="a").num_rows == 3  # others still read


@pytest.fixture
def two_tables(tmp_path):
    write_rows(tmp_path, "evaluations", rows("a", "d", 3) + rows("b", "d", 2), key="k")
    write_rows(tmp_path, "unit_stats", [{"model": m, "dataset": "d", "k90": k}
                                        for m, k in (("a", 7), ("b", 9))], key="k")
    return tmp_path


def snapshot(root):
    """Every file under the root with its bytes (the tables, and anything a query wrote)."""
    return {p: p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


SECRET = "top-secret-line"
REFUSED = [  # (statement, path it must not create, relative to the root)
    ("COPY (SELECT 1 AS a) TO '{root}/out.csv'", "out.csv"),
    ("COPY evaluations TO '{root}/tables/evaluations/a/d/part-copy.parquet' (FORMAT parquet)",
     "tables/evaluations/a/d/part-copy.parquet"),
    ("EXPORT DATABASE '{root}/export'", "export"),
    ("ATTACH '{root}/other.duckdb' AS other", "other.duckdb"),
    ("SELECT 1; COPY (SELECT 1 AS a) TO '{root}/second.csv'", "second.csv"),
    ("SET enable_external_access = true; COPY (SELECT 1 AS a) TO '{root}/on.csv'", "on.csv"),
    ("RESET enable_external_access; COPY (SELECT 1 AS a) TO '{root}/reset.csv'", "reset.csv"),
    ("SET lock_configuration = false", None),
    ("SELECT * FROM read_csv('{root}/secret.csv')", None),
    ("SELECT * FROM read_text('{root}/secret.csv')", None),
    ("SELECT * FROM '{root}/secret.csv'", None),
    ("SELECT * FROM glob('{root}/*')", None),
    ("SELECT * FROM read_parquet('{root}/tables/evaluations/*/*/*.parquet')", None),
    ("INSTALL httpfs", None),
    ("LOAD httpfs", None),
]


@pytest.mark.parametrize("statement, creates", REFUSED, ids=[s for s, _ in REFUSED])
def test_sql_refuses_every_file_system_access_as_one_line(two_tables, statement, creates):
    root = two_tables
    (root / "secret.csv").write_text(f"name\n{SECRET}\n")
    before = snapshot(root)
    with pytest.raises(ResidualError) as err:
        sql(root, statement.format(root=root))
    message = str(err.value)
    assert "\n" not in message and SECRET not in message
    assert creates is None or not (root / creates).exists()
    assert snapshot(root) == before  # nothing written, the tables unchanged


def test_sql_reads_the_tables_group_by_and_join(two_tables):
    out = sql(two_tables, "SELECT e.model, count(*) AS n, max(s.k90) AS k90 FROM evaluations e "
                          "JOIN unit_stats s USING (model, dataset) GROUP BY e.model "
                          "ORDER BY e.model").to_pylist()
    assert out == [{"model": "a", "n": 3, "k90": 7}, {"model": "b", "n": 2, "k90": 9}]


def test_sql_changes_to_a_table_stay_in_memory(two_tables):
    before = snapshot(two_tables)
    assert sql(two_tables, "INSERT INTO evaluations SELECT * FROM evaluations").num_rows == 1
    assert sql(two_tables, "DROP TABLE evaluations").num_rows == 0
    assert snapshot(two_tables) == before
    assert read_table(two_tables, "evaluations").num_rows == 5


def test_results_sql_refusal_exits_2_with_one_line(two_tables, capsys):
    target = two_tables / "tables" / "evaluations" / "a" / "d" / "part-x.parquet"
    code = main(["results", "--store-root", str(two_tables), "--sql",
                 f"COPY evaluations TO '{target}' (FORMAT parquet)"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and not target.exists()
    (line,) = err.strip().splitlines()
    assert line.startswith("residual: error:") and "only read the tables" in line
    assert len(table_files(two_tables, "evaluations")) == 2


def _spectral(capsys, root, *args) -> tuple[int, str]:
    code = main(["spectral", "--model", "residual-tiny", "--dataset", "never-extracted",
                 "--store-root", str(root), "--quiet", *args])
    out, err = capsys.readouterr()
    assert out == ""
    return code, err


@pytest.mark.parametrize("args, message", [
    (["--dask-workers", "-1"], "--dask-workers must be >= 1"),
    (["--dask-workers", "-1", "--dask-address", "tcp://127.0.0.1:1"], "--dask-workers must be >= 1"),
    (["--dask-memory-limit", "banana"], "--dask-memory-limit 'banana' is not a size"),
    (["--dask-workers", "2", "--dask-memory-limit", "2 parsecs"], "--dask-memory-limit '2 parsecs' is not a size"),
])
def test_spectral_refuses_bad_dask_options_in_one_line_before_opening_the_store(
        tmp_path, capsys, args, message):
    code, err = _spectral(capsys, tmp_path, *args)
    (line,) = err.strip().splitlines()
    assert code == 2 and line.startswith("residual: error:") and message in line


@pytest.mark.parametrize("args", [["--dask-workers", "0"], ["--dask-memory-limit", "2GB"],
                                  ["--dask-memory-limit", "auto"]])
def test_spectral_accepts_good_dask_options_and_reaches_the_store(tmp_path, capsys, args):
    code, err = _spectral(capsys, tmp_path, *args)
    (line,) = err.strip().splitlines()
    assert code == 2 and "never-extracted" in line  # refused for the missing store only


def test_dask_client_without_workers_or_address_is_the_threaded_scheduler():
    from residual_core.engines.spectral import dask_client

    for n_workers in (None, 0):
        with dask_client(n_workers=n_workers) as client:
            assert client is None


def test_an_unreachable_scheduler_fails_within_seconds_in_one_line():
    import socket

    from residual_core.engines.spectral import dask_client

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(ResidualError) as err:
        with dask_client(address=f"tcp://127.0.0.1:{port}"):
            pass
    assert time.monotonic() - start < 15
    message = str(err.value)
    assert "\n" not in message and "could not reach the dask scheduler" in message
    assert f"127.0.0.1:{port}" in message


def _listening(processes) -> set[tuple[str, int]]:
    import psutil

    found = set()
    for proc in processes:
        try:
            found |= {(c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN}
        except psutil.Error:  # a process that just ended
            pass
    return found


def test_the_local_cluster_listens_on_loopback_only():
    import psutil

    from residual_core.engines.spectral import dask_client

    me = psutil.Process()
    before = _listening([me])
    with dask_client(n_workers=1) as client:
        opened = _listening([me, *me.children(recursive=True)]) - before
        info = client.scheduler_info()
        dashboard = client.dashboard_link
    assert info["address"].startswith("tcp://127.0.0.1:")
    assert all(w.startswith("tcp://127.0.0.1:") for w in info["workers"])
    assert dashboard.startswith("http://127.0.0.1:")
    assert opened and {ip for ip, _ in opened} == {"127.0.0.1"}, opened
