"""Result tables in Parquet: long format, provenance columns, partitioned, written atomically.

Layout: ``{root}/tables/{table}/{model}/{dataset}/part-{key}.parquet`` (path parts are slugs;
the real names are columns). A query for one model or dataset opens only that folder. ``key``
names what produced the rows (e.g. a stage's config hash): writing the same key again replaces
those rows, so reruns never duplicate them. Files are written to a hidden temporary name in the
same folder and renamed into place, so no reader ever sees a half-written file.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from residual_core import __version__
from residual_core.errors import ResidualError
from residual_core.formats.tables import TABLES
from residual_core.identity import slug
from residual_core.layout import Layout

PARTITION_KEYS = ("model", "dataset")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Package version plus the git commit when running from a checkout (``0.1.0+g1a2b3c4``)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+g{sha}" if sha else __version__


def tables_root(root: str | Path) -> Path:
    return Layout.of(root).tables


def write_rows(root: str | Path, table: str, rows: Sequence[dict[str, Any]] | pa.Table, *,
               key: str, provenance: dict[str, Any] | None = None) -> list[Path]:
    """Write ``rows`` to ``table``, one file per (model, dataset) partition, replacing ``key``'s rows.

    Every row must have ``model`` and ``dataset``; ``provenance`` columns (e.g. pretrained,
    config_hash) are added to every row, as are ``code_version`` and ``created_at``. The rows of
    a result table are conformed to its :class:`~residual_core.formats.tables.TableSpec`
    (undeclared columns refused, absent ones null); a table without a spec (the storage layer's
    own tests) is written as given.
    """
    tbl = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows))
    if tbl.num_rows == 0:
        return []
    missing = [k for k in PARTITION_KEYS if k not in tbl.column_names]
    if missing:
        raise ResidualError(f"rows for table {table!r} lack the partition columns {missing}")
    extra = {"code_version": code_version(),
             "created_at": datetime.now(timezone.utc).replace(microsecond=0),
             **(provenance or {})}
    for name, value in extra.items():
        if name not in tbl.column_names:
            tbl = tbl.append_column(name, pa.array([value] * tbl.num_rows))
    if table in TABLES:  # a result table: its declared columns, in order, typed, described
        tbl = TABLES[table].conform(tbl)
    written = []
    models, datasets = tbl.column("model").to_pylist(), tbl.column("dataset").to_pylist()
    for model, dataset in sorted(set(zip(models, datasets))):
        mask = pa.array([m == model and d == dataset for m, d in zip(models, datasets)],
                        type=pa.bool_())
        folder = tables_root(root) / table / slug(str(model)) / slug(str(dataset))
        written.append(_atomic_write(tbl.filter(mask), folder / f"part-{slug(key)}.parquet"))
    return written


def _atomic_write(tbl: pa.Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.partial"
    try:
        pq.write_table(tbl, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def table_files(root: str | Path, table: str, model: str | None = None,
                dataset: str | None = None) -> list[Path]:
    """The Parquet files of ``table``, only those of ``model``/``dataset`` when given."""
    base = tables_root(root) / table
    pattern = f"{slug(model) if model else '*'}/{slug(dataset) if dataset else '*'}/part-*.parquet"
    return sorted(base.glob(pattern))


def read_table(root: str | Path, table: str, *, model: str | None = None,
               dataset: str | None = None, filters: dict[str, Any] | None = None) -> pa.Table:
    """Read ``table`` (pruned to one model/dataset when given), optionally filtering on columns.

    Safe while a writer replaces partitions: every file is one whole version (see
    :func:`_read_files`). Raises :class:`ResidualError` when the table has no files at all or a
    file is not readable Parquet.
    """
    tbl = _load(root, table, model, dataset)
    if tbl is None:
        scope = " and ".join(f"{k} {v}" for k, v in (("model", model), ("dataset", dataset)) if v)
        raise ResidualError(f"no {table!r} table under {tables_root(root)}"
                            f"{' for ' + scope if scope else ''} (run the stage that writes it "
                            "first)")
    conditions = dict(filters or {})
    conditions.update({k: v for k, v in (("model", model), ("dataset", dataset)) if v})
    for column, value in conditions.items():
        if column not in tbl.column_names:
            raise ResidualError(f"table {table!r} has no column {column!r}; columns: "
                                f"{', '.join(tbl.column_names)}")
        values = value if isinstance(value, (list, tuple, set)) else [value]
        mask = pa.array([v in values for v in tbl.column(column).to_pylist()], type=pa.bool_())
        tbl = tbl.filter(mask)
    return tbl


_LIST_ATTEMPTS = 5


def _writing_stage(table: str) -> str | None:
    """The stage whose rerun rewrites a table's files (a `--force` name of `residual run`)."""
    return TABLES[table].stage if table in TABLES else None


def _load(root: str | Path, table: str, model: str | None = None,
          dataset: str | None = None) -> pa.Table | None:
    """All rows of ``table``'s files (of ``model``/``dataset``), or None when it has none."""
    tables = _read_files(root, table, model, dataset)
    if not tables:
        return None
    if table in TABLES:  # files of older versions: the declared columns and types
        try:
            tables = [TABLES[table].conform(t, strict=False) for t in tables]
        except ResidualError as exc:
            raise ResidualError(f"{exc}: rerun the {_writing_stage(table) or 'writing'} stage "
                                "with --force") from None
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ResidualError(f"the files of table {table!r} under {tables_root(root)} have "
                            f"incompatible columns ({str(exc).splitlines()[0]}): rerun the "
                            f"{_writing_stage(table) or 'writing'} stage with --force") from None


def _read_files(root: str | Path, table: str, model: str | None,
                dataset: str | None) -> list[pa.Table]:
    """Each file of the listing, whole. pyarrow opens a path more than once per read (footer,
    then pages), so a concurrent ``os.replace`` could hand it parts of two versions; one open
    handle pins one version. A listed file that vanished (its key deleted meanwhile) means the
    listing is stale: list again, keeping the files already read."""
    read: dict[Path, pa.Table] = {}
    for attempt in range(_LIST_ATTEMPTS):
        files = table_files(root, table, model, dataset)
        try:
            for path in files:
                if path not in read:
                    read[path] = _read_file(path, table)
            return [read[path] for path in files]
        except FileNotFoundError:
            time.sleep(0.01 * attempt)
    raise ResidualError(f"the files of table {table!r} under {tables_root(root)} kept vanishing "
                        f"while being read ({_LIST_ATTEMPTS} listings): is something deleting "
                        "them? Retry when it has finished")


def _read_file(path: Path, table: str) -> pa.Table:
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        # one thread: partitions are small, and Arrow's pool can abort the process at exit
        # (apache/arrow#34314: "terminate called without an active exception")
        return pq.read_table(pa.BufferReader(data), use_threads=False)
    except (pa.ArrowException, OSError) as exc:  # truncated, garbage, empty
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        stage = _writing_stage(table)
        fix = (f"rerun the {stage} stage with --force (`residual run --force {stage}`)" if stage
               else f"rerun the stage that writes the {table!r} table")
        raise ResidualError(f"{path} is not a readable Parquet file ({reason}): {fix}, or "
                            "delete the file") from None


def list_tables(root: str | Path) -> list[str]:
    base = tables_root(root)
    return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.exists() else []


# Set before the query runs, locked last: the query cannot turn any of them back.
_SANDBOX = ("SET python_enable_replacements = false",  # no Python variables as tables
            "SET autoinstall_known_extensions = false", "SET autoload_known_extensions = false",
            "SET temp_directory = ''",  # no spill files
            "SET enable_external_access = false",  # no files, URLs, ATTACH, INSTALL/LOAD
            "SET lock_configuration = true")


def sql(root: str | Path, query: str, tables: Iterable[str] | None = None) -> pa.Table:
    """Run SQL (DuckDB) over the tables, each visible as a table of its name.

    A query may only read the tables. Each table the query names is read (whole versions, see
    :func:`read_table`) into an in-memory database, and the connection is then cut off from the
    file system and its settings locked: COPY, EXPORT, read_csv/read_parquet/glob, ATTACH,
    INSTALL/LOAD and SET are refused with a :class:`ResidualError`. INSERT, UPDATE or DROP
    change only that in-memory copy, never the files.
    """
    import duckdb

    con = duckdb.connect(":memory:")
    try:
        for name in tables or list_tables(root):
            if not re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", query, re.IGNORECASE):
                continue  # not named by the query: not worth reading
            tbl = _load(root, name)
            if tbl is not None:
                con.register("_residual_load", tbl)
                con.execute(f'CREATE TABLE "{name.replace(chr(34), chr(34) * 2)}" AS '
                            "SELECT * FROM _residual_load")
                con.unregister("_residual_load")
        for setting in _SANDBOX:
            con.execute(setting)
        try:
            result = con.sql(query)
            return result.to_arrow_table() if result is not None else pa.table({})
        except duckdb.Error as exc:
            refused = isinstance(exc, duckdb.PermissionException) or "locked" in str(exc)
            hint = ("; a --sql query may only read the tables (no files, URLs, ATTACH, "
                    "INSTALL/LOAD or SET)" if refused else "")
            raise ResidualError(f"SQL error: {str(exc).splitlines()[0]}{hint}") from None
    finally:
        con.close()


def matching_rows(root: str | Path, table: str, model: str, dataset: str,
                  **values: Any) -> list[dict[str, Any]]:
    """The rows of ``table`` of ``model`` on ``dataset`` with these column values (none when the
    table or one of the columns does not exist yet)."""
    try:
        return read_table(root, table, model=model, dataset=dataset, filters=values).to_pylist()
    except ResidualError:
        return []


def has_rows(root: str | Path, table: str, model: str, dataset: str, **values: Any) -> bool:
    """Whether :func:`matching_rows` finds any."""
    return bool(matching_rows(root, table, model, dataset, **values))
