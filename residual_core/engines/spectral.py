"""The spectral stage's engine: per-unit PCA of a feature store (out of core, on Dask), written to
a spectral store (:mod:`residual_core.formats.spectral_store`) and to the Parquet tables
``spectra`` (one row per unit and component) and ``unit_stats`` (one per unit); the basis
similarity of two spectral stores (two datasets, or two models of one width: ``basis_similarity``);
and the correlation of per-head spectral statistics across two models (``cross_model``).

A rerun with the same feature store and parameters returns the stored result without computing;
a changed feature store or parameter recomputes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Iterator, Sequence

from tqdm.auto import tqdm

from residual_core.errors import StoreError
from residual_core.formats.feature_store import FeatureStore
from residual_core.formats.spectral_store import SPECTRAL_VERSION, SpectralStore, _write_store
from residual_core.identity import WeightsId, config_hash
from residual_core.layout import Layout
from residual_core.method.spectral import (
    basis_similarity_table,
    cross_model_correlations,
    evr_counts,
    head_statistics,
    sample_rows,
    twonn,
    unit_stats,
)
from residual_core.stages.spectral import Params as SpectralParams
from residual_core.stages.spectral import Result
from residual_core.tables import has_rows, write_rows


def spectral_key(feature_config_hash: str, params: SpectralParams) -> str:
    """The config hash of the spectral store of a feature store (by its config hash) with these
    parameters: what the store records, and the spectral stage's identity."""
    return config_hash({"source": feature_config_hash, "params": params.model_dump(),
                        "version": SPECTRAL_VERSION})


def dask_client(address: str | None = None, n_workers: int | None = None,
                memory_limit: str | None = None,
                connect_timeout: float = 5.0) -> contextlib.AbstractContextManager[Any]:
    """A ``dask.distributed`` client for the block: connect to ``address``, or start a
    LocalCluster of ``n_workers`` processes; with neither (or 0 workers), the local threaded
    scheduler.

    The arguments are checked when this is called, before anything starts, so a caller can
    refuse bad options before expensive work (the CLI does, before opening the store). The
    cluster (scheduler, dashboard, workers) listens on 127.0.0.1 only: it runs pickled code.
    An unreachable ``address`` fails after ``connect_timeout`` seconds instead of hanging.
    """
    from residual_core.errors import ResidualError

    if n_workers is not None and n_workers < 0:
        raise ResidualError(f"--dask-workers must be >= 1 worker processes (0 or none: the local "
                            f"threaded scheduler), got {n_workers}")
    if memory_limit is not None and memory_limit != "auto":
        from dask.utils import parse_bytes

        try:
            parse_bytes(memory_limit)
        except (ValueError, TypeError):
            raise ResidualError(f"--dask-memory-limit {memory_limit!r} is not a size: use e.g. 2GB, "
                                "512MiB or auto") from None

    @contextlib.contextmanager
    def client() -> Iterator[Any]:
        if address is None and not n_workers:
            yield None
            return
        from dask.distributed import Client, LocalCluster

        if address is not None:
            try:
                connected = Client(address, timeout=connect_timeout)
            except (OSError, ValueError) as exc:  # refused, timed out, malformed
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ResidualError(f"could not reach the dask scheduler at {address} "
                                    f"({reason}): start it, or check --dask-address") from None
            with connected:
                yield connected
            return
        with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                          host="127.0.0.1", dashboard_address="127.0.0.1:0",
                          memory_limit=memory_limit or "auto") as cluster, \
                Client(cluster) as local:
            yield local

    return client()


def run_spectral(feature_url: str, params: SpectralParams | None = None, *,
                 address: str | None = None, n_workers: int | None = None,
                 memory_limit: str | None = None, tables_root: str | None = None,
                 force: bool = False, progress: bool = True) -> Result:
    """Compute (or reuse) the spectral store of a feature store and write its Parquet tables.

    Args:
        feature_url: a complete feature store.
        params: TwoNN settings and seed (:class:`SpectralParams`).
        address: a ``dask.distributed`` scheduler address to run on.
        n_workers: start a LocalCluster of this many worker processes instead.
        memory_limit: per-worker memory limit for that LocalCluster (e.g. ``"1GB"``).
        tables_root: root of the Parquet tables (default: the store root, ``data/``).
        force: recompute even when an up-to-date result exists.
    """
    start = time.perf_counter()
    params = params or SpectralParams()
    features = FeatureStore.open(feature_url)
    url = Layout.spectral_store(feature_url)
    key = spectral_key(features.attrs["config_hash"], params)
    root = tables_root or Layout.of_store(feature_url).root
    if not force:
        with contextlib.suppress(StoreError):
            existing = SpectralStore.open(url)
            if existing.attrs.get("config_hash") == key:
                # a kill between the store and its rows, or a deleted table: rewrite the rows
                # from the store (no PCA, no TwoNN)
                rewritten = not has_table_rows(existing, root)
                if rewritten:
                    _write_table_rows(existing, feature_url, root)
                return Result(url=url, feature_url=feature_url, computed=False,
                                      rows_rewritten=rewritten,
                                      seconds=time.perf_counter() - start)

    with dask_client(address, n_workers, memory_limit):
        results = features.pca()
        dims = _twonn_all(features, params, progress)
    _write_store(url, features, results, dims, key, params)
    _write_table_rows(SpectralStore.open(url), feature_url, root)
    return Result(url=url, feature_url=feature_url, computed=True, rows_rewritten=True,
                          seconds=time.perf_counter() - start)


def has_table_rows(store: "SpectralStore", root: str) -> bool:
    """Whether every table of the spectral stage holds this spectral store's rows."""
    from residual_core.stages.spectral import TABLES

    a = store.attrs
    return all(has_rows(root, table, a["model"], a["dataset"], config_hash=a["config_hash"])
               for table in TABLES)


def _write_table_rows(store: "SpectralStore", feature_url: str, root: str) -> None:
    """Write the ``spectra`` and ``unit_stats`` rows of a complete spectral store (everything
    they hold is in the store, so a lost table is rewritten without recomputing)."""
    a = store.attrs
    provenance = {"pretrained": a.get("pretrained"), "split": a.get("split"),
                  "config_hash": a["config_hash"],
                  "feature_config_hash": a["feature_config_hash"]}
    base = {"model": a["model"], "dataset": a["dataset"]}
    dims = store.twonn()
    spectra_rows, stats_rows = [], []
    for unit, res, dim in zip(store.units, store.results(), dims):
        stats = unit_stats(res.eigenvalues)
        ident = {**base, "unit": unit.name, "unit_index": unit.index, "kind": unit.kind,
                 "layer": unit.layer, "head": unit.head}
        stats_rows.append({**ident, "k90": stats["k90"], "k99": stats["k99"],
                           "evr1": stats["evr1"], "participation_ratio":
                           stats["participation_ratio"], "total_variance":
                           stats["total_variance"], "twonn": float(dim),
                           "n_samples": res.n_samples})
        spectra_rows += [{**ident, "component": int(i), "eigenvalue": float(lam), "evr": float(e),
                          "cumulative_evr": float(c)}
                         for i, (lam, e, c) in enumerate(zip(res.eigenvalues, stats["evr"],
                                                             stats["cumulative_evr"]))]
    # Keyed by where the feature store lives: a rerun (other parameters, or the store
    # re-extracted with another configuration) replaces that store's rows.
    rows_key = "spectral-" + config_hash({"features": Layout.location(feature_url)})
    write_rows(root, "spectra", spectra_rows, key=rows_key, provenance=provenance)
    write_rows(root, "unit_stats", stats_rows, key=rows_key, provenance=provenance)


def _twonn_all(features: FeatureStore, params: SpectralParams, progress: bool) -> list[float]:
    """TwoNN per unit on the same row subsample; each unit reads and projects only its own raw
    chunks (slicing the all-units array would project every head for every unit)."""
    out = []
    for u in tqdm(range(len(features.units)), desc="twonn", unit="unit", disable=not progress):
        rows = sample_rows(features.contributions(units=[u]), 0,
                           max_samples=params.twonn_max_samples, seed=params.seed)
        out.append(twonn(rows, params.twonn_discard_fraction, params.twonn_max_samples,
                         params.seed))
    return out


def _comparable(a: SpectralStore, b: SpectralStore) -> None:
    """Refuse, in one line, two spectral stores whose bases live in output spaces of different
    widths (nothing to compare)."""
    ea, eb = (int(s.group["components"].shape[-1]) for s in (a, b))
    if ea != eb:
        raise StoreError(f"cannot compare {_label(a)} (width {ea}) with {_label(b)} (width {eb}): "
                         "their principal bases live in output spaces of different widths")


def _label(store: SpectralStore) -> str:
    a = store.attrs
    return f"{WeightsId.from_attrs(a).label} {a.get('dataset')}/{a.get('split')}"


def _common(names_a: list[str], names_b: list[str], what: str, a: SpectralStore,
            b: SpectralStore) -> list[str]:
    """The names both have (in ``a``'s order); a warning names those left out, an error when
    none are shared."""
    in_b, in_a = set(names_b), set(names_a)
    common = [n for n in names_a if n in in_b]
    if not common:
        raise StoreError(f"{_label(a)} and {_label(b)} have no {what} in common")
    only_a = [n for n in names_a if n not in in_b]
    only_b = [n for n in names_b if n not in in_a]
    if only_a or only_b:
        logging.getLogger(__name__).warning(
            "comparing the %d %s both have; left out: %d only in %s (%s), %d only in %s (%s)",
            len(common), what, len(only_a), _label(a), ", ".join(only_a) or "-", len(only_b),
            _label(b), ", ".join(only_b) or "-")
    return common


def similarity(spectral_a: str, spectral_b: str, evr_threshold: float = 0.9,
               tables_root: str | None = None) -> list[dict]:
    """Basis similarity of every unit between two spectral stores (two datasets or splits of one
    model, or two models of one output width); the rows are also written to the
    ``basis_similarity`` Parquet table (partition: the first store's model and dataset).

    Units are matched by name; when the unit tables differ (other depth or head count), only
    the units both have are compared and a warning names the others. Stores of different
    output widths are refused (:class:`StoreError`, one line).
    """
    a, b = SpectralStore.open(spectral_a), SpectralStore.open(spectral_b)
    _comparable(a, b)
    names_a, names_b = [u.name for u in a.units], [u.name for u in b.units]
    common = _common(names_a, names_b, "units", a, b)
    res_a, res_b = a.results(), b.results()
    index_a = {n: i for i, n in enumerate(names_a)}
    index_b = {n: i for i, n in enumerate(names_b)}
    rows = basis_similarity_table([res_a[index_a[n]] for n in common],
                                  [res_b[index_b[n]] for n in common], common, evr_threshold)
    extra = {"model": a.attrs["model"], "dataset": a.attrs["dataset"],
             "other_model": b.attrs["model"], "other_pretrained": b.attrs.get("pretrained"),
             "other_dataset": b.attrs["dataset"], "split": a.attrs["split"],
             "other_split": b.attrs["split"], "evr_threshold": evr_threshold}
    rows = [{**extra, **r} for r in rows]
    key = similarity_key(a.attrs["config_hash"], b.attrs["config_hash"], evr_threshold)
    rows_key = "similarity-" + config_hash({"a": Layout.location(spectral_a),
                                            "b": Layout.location(spectral_b), "t": evr_threshold})
    write_rows(tables_root or Layout.of_store(a.attrs["feature_store"]).root, "basis_similarity",
               rows, key=rows_key, provenance={"pretrained": a.attrs.get("pretrained"),
                                               "config_hash": key})
    return rows


# 2: the rows gained the authors' score and the other model's columns (older rows lack them).
_SIMILARITY_VERSION = 2


def similarity_key(a_config_hash: str, b_config_hash: str, evr_threshold: float) -> str:
    """The key of the basis-similarity rows of two spectral stores (by their config hashes)."""
    return config_hash({"a": a_config_hash, "b": b_config_hash, "t": evr_threshold,
                        "v": _SIMILARITY_VERSION})


def cross_model_key(a_config_hash: str, b_config_hash: str,
                    counts: Sequence[int] | None = None) -> str:
    """The key of the cross-model rows of two spectral stores (by their config hashes);
    ``counts`` ``None``: the default EVR counts (recorded as such)."""
    return config_hash({"a": a_config_hash, "b": b_config_hash,
                        "counts": None if counts is None else list(counts), "v": 1})


def cross_model_spectra(spectral_a: str, spectral_b: str, counts: Sequence[int] | None = None,
                        tables_root: str | None = None) -> dict:
    """Correlate per-head spectral statistics of two models on one dataset (the paper's
    cross-model finding): Pearson and Spearman correlation of the heads' ``k90``, TwoNN, and
    cumulative EVR curves (read after each of ``counts`` components, default
    :func:`~residual_core.method.spectral.evr_counts` of the width, concatenated over heads).

    Heads are matched by name (``L{l}H{h}``); only the heads both models have count, and a
    warning names the others. The rows (one per statistic) are written to the ``cross_model``
    table (partition: the first store's model and dataset).

    Args:
        spectral_a, spectral_b: spectral stores of one dataset and split, of two models (or
            weights) of one output width.
        counts: component counts of the EVR curves, each in ``1..width``.
        tables_root: root of the Parquet tables (default: the first store's root).

    Returns:
        ``heads``, ``only_a``, ``only_b`` (names), ``statistics`` (statistic -> ``pearson``,
        ``spearman``, ``n_heads``, ``n_values``), ``counts``, ``stats_a`` / ``stats_b``
        (statistic -> head -> value, for :func:`residual_core.report.plots.plot_cross_model`)
        and ``rows`` (as written).

    Raises:
        StoreError: different widths, datasets or splits, or no heads in common (one line).
    """
    a, b = SpectralStore.open(spectral_a), SpectralStore.open(spectral_b)
    _comparable(a, b)
    for field in ("dataset", "split"):
        if a.attrs.get(field) != b.attrs.get(field):
            raise StoreError(f"cross-model spectra compare two models on one dataset and split; "
                             f"got {_label(a)} and {_label(b)}")
    width = int(a.group["components"].shape[-1])
    key = cross_model_key(a.attrs["config_hash"], b.attrs["config_hash"], counts)
    counts = tuple(int(c) for c in (evr_counts(width) if counts is None else counts))
    stats = []
    for store in (a, b):
        heads = [u for u in store.units if u.kind == "head"]
        eig, dims = store.group["eigenvalues"], store.twonn()
        stats.append(head_statistics({u.name: eig[u.index] for u in heads},
                                     {u.name: float(dims[u.index]) for u in heads}, counts))
    stats_a, stats_b = stats
    _common(list(stats_a["k90"]), list(stats_b["k90"]), "heads", a, b)
    result = cross_model_correlations(stats_a, stats_b)
    base = {"model": a.attrs["model"], "dataset": a.attrs["dataset"], "split": a.attrs["split"],
            "other_model": b.attrs["model"], "other_pretrained": b.attrs.get("pretrained")}
    rows = [{**base, "statistic": name, "pearson": s["pearson"], "spearman": s["spearman"],
             "n_heads": s["n_heads"]} for name, s in result["statistics"].items()]
    rows_key = "cross-model-" + config_hash({"a": Layout.location(spectral_a),
                                             "b": Layout.location(spectral_b)})
    write_rows(tables_root or Layout.of_store(a.attrs["feature_store"]).root, "cross_model",
               rows, key=rows_key, provenance={"pretrained": a.attrs.get("pretrained"),
                                               "config_hash": key})
    return {**result, "counts": counts, "stats_a": stats_a, "stats_b": stats_b, "rows": rows}
