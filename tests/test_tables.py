"""Parquet result tables: partitioning, atomic replacement by key, filters and SQL."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from residual_core.errors import ResidualError
from residual_core.tables import list_tables, read_table, sql, table_files, write_rows


def rows(model, dataset, n, method="residual-star"):
    return [{"model": model, "dataset": dataset, "method": method, "unit": f"L0H{i}",
             "value": float(i)} for i in range(n)]


def test_partitioned_write_and_pruned_read(tmp_path):
    write_rows(tmp_path, "evals", rows("ViT-B-16", "world/color", 3) + rows("tiny", "cifar10", 2),
               key="run1", provenance={"config_hash": "abc"})
    files = table_files(tmp_path, "evals")
    assert len(files) == 2 and all(f.name == "part-run1.parquet" for f in files)
    only = table_files(tmp_path, "evals", model="ViT-B-16")
    assert len(only) == 1 and "world-color" in str(only[0])
    tbl = read_table(tmp_path, "evals", dataset="world/color")
    assert tbl.num_rows == 3 and set(tbl.column("dataset").to_pylist()) == {"world/color"}
    assert {"code_version", "created_at", "config_hash"} <= set(tbl.column_names)
    assert list_tables(tmp_path) == ["evals"]


def test_same_key_replaces_other_key_appends(tmp_path):
    write_rows(tmp_path, "evals", rows("m", "d", 3), key="a")
    write_rows(tmp_path, "evals", rows("m", "d", 2), key="a")
    assert read_table(tmp_path, "evals").num_rows == 2
    write_rows(tmp_path, "evals", rows("m", "d", 4, method="coarse"), key="b")
    assert read_table(tmp_path, "evals").num_rows == 6
    assert read_table(tmp_path, "evals", filters={"method": "coarse"}).num_rows == 4
    assert not list((tmp_path / "tables").rglob("*.partial"))


def test_sql_over_tables(tmp_path):
    write_rows(tmp_path, "evals", rows("m1", "d", 3) + rows("m2", "d", 5), key="k")
    out = sql(tmp_path, "SELECT model, count(*) AS n, sum(value) AS s FROM evals "
                        "GROUP BY model ORDER BY model").to_pylist()
    assert out == [{"model": "m1", "n": 3, "s": 3.0}, {"model": "m2", "n": 5, "s": 10.0}]
    with pytest.raises(ResidualError, match="SQL error"):
        sql(tmp_path, "SELECT nope FROM evals")


def test_errors(tmp_path):
    with pytest.raises(ResidualError, match="no 'evals' table"):
        read_table(tmp_path, "evals")
    with pytest.raises(ResidualError, match="partition columns"):
        write_rows(tmp_path, "evals", [{"model": "m", "value": 1.0}], key="k")
    write_rows(tmp_path, "evals", rows("m", "d", 1), key="k")
    with pytest.raises(ResidualError, match="no column 'nope'"):
        read_table(tmp_path, "evals", filters={"nope": 1})


def test_files_are_complete_parquet(tmp_path):
    (path,) = write_rows(tmp_path, "evals", rows("m", "d", 7), key="k")
    assert pq.read_metadata(path).num_rows == 7


def test_result_tables_are_conformed_to_their_spec(tmp_path):
    import pyarrow.parquet as pq

    from residual_core.formats.tables import TABLES

    spec = TABLES["evaluations"]
    (path,) = write_rows(tmp_path, "evaluations", [{"model": "m", "dataset": "d",
                                                    "method": "linear", "seed": 1,
                                                    "test_acc": 1}], key="k")
    schema = pq.read_schema(path)
    assert schema.names == [c.name for c in spec.columns]  # declared order, absent ones null
    assert schema.field("test_acc").type == pa.float64()  # the int 1 cast to the declared type
    assert schema.field("test_acc").metadata[b"description"].decode() == next(
        c.description for c in spec.columns if c.name == "test_acc")
    row = read_table(tmp_path, "evaluations").to_pylist()[0]
    assert row["test_acc"] == 1.0 and row["val_acc"] is None and row["method"] == "linear"
    with pytest.raises(ResidualError, match=r"undeclared columns \['tset_acc'\]"):
        write_rows(tmp_path, "evaluations", [{"model": "m", "dataset": "d", "tset_acc": 1.0}],
                   key="k")
    with pytest.raises(ResidualError, match="column 'seed' of type string is not int64"):
        write_rows(tmp_path, "evaluations", [{"model": "m", "dataset": "d", "seed": "one"}],
                   key="k")


def test_describe_prints_every_column_of_a_table(capsys):
    from pipelines.cli import main
    from residual_core.formats.tables import TABLES

    for name, spec in TABLES.items():
        assert main(["results", "--describe", name, "--format", "json"]) == 0
        out = capsys.readouterr().out
        rows = json.loads(out[out.index("\n") + 1:])
        assert [r["column"] for r in rows] == [c.name for c in spec.columns]
        assert all(r["description"] for r in rows)


def test_created_at_is_a_timestamp_and_older_string_files_still_read(tmp_path):
    from datetime import datetime, timezone

    from residual_core.formats.tables import TABLES

    row = {"model": "m", "dataset": "d", "method": "zero-shot", "seed": 0, "test_acc": 0.5}
    write_rows(tmp_path, "evaluations", [row], key="new")
    (path,) = table_files(tmp_path, "evaluations")
    assert pq.read_schema(path).field("created_at").type == pa.timestamp("ms", tz="UTC")
    # a file of an older version: created_at as ISO text, an undeclared column, one missing
    old = TABLES["evaluations"].conform(pa.Table.from_pylist([{**row, "seed": 1}]))
    old = old.drop_columns(["created_at", "n_train"]).append_column(
        "created_at", pa.array(["2026-01-02T03:04:05+00:00"])).append_column(
        "retired", pa.array(["x"]))
    pq.write_table(old, path.with_name("part-old.parquet"))
    got = sorted(read_table(tmp_path, "evaluations").to_pylist(), key=lambda r: r["seed"])
    assert got[1]["created_at"] == datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert isinstance(got[0]["created_at"], datetime) and got[1]["n_train"] is None
    assert "retired" not in got[0]
    (count,) = sql(tmp_path, "SELECT count(*) AS n FROM evaluations WHERE created_at > "
                   "TIMESTAMP '2026-01-01'").to_pylist()
    assert count["n"] == 2
