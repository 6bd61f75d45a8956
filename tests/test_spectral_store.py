"""The spectral stage on real feature stores: equal to numpy, cached, tables, cluster, CLI."""

import numpy as np
import pytest
import torch
import zarr
from scipy.linalg import subspace_angles

from builders import write_image_folder
from pipelines.cli import main
from residual_core.engines.extract import extract
from residual_core.engines.spectral import SpectralParams, run_spectral, similarity
from residual_core.errors import StoreError
from residual_core.formats.feature_store import FeatureStore
from residual_core.formats.spectral_store import SpectralStore
from residual_core.identity import EMBEDDED_MODEL, WeightsId
from residual_core.layout import Layout
from residual_core.method.decompose import RawContributions, ReadoutMaps, project
from residual_core.method.models import load_model
from residual_core.stages.extract import Params as ExtractParams
from residual_core.tables import read_table, sql


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    folder = write_image_folder(root / "imgs", ["a", "b", "c"], 60, size=32, seed=3)
    tiny = load_model(EMBEDDED_MODEL, None, device="cpu", seed=0)
    urls = {}
    for split in ("train", "test"):
        urls[split] = extract(EMBEDDED_MODEL, None, f"imagefolder:{folder}", split,
                              ExtractParams(batch_size=16, rows_per_chunk=32, num_workers=0, device="cpu"),
                              store_root=root / "st", loaded=tiny, progress=False).url
    return root, folder, urls


def float64_contributions(url):
    """``y`` of every unit projected in float64 from the store's raw arrays and maps (the
    store's own reader projects in float32)."""
    store = FeatureStore.open(url)
    maps = store.maps
    maps = ReadoutMaps(**{k: getattr(maps, k).double() for k in
                          ("head_maps", "head_bias", "resid_map", "gamma_proj", "beta_proj")})
    raw = RawContributions(**{k: torch.from_numpy(np.asarray(store.raw_array(k), np.float64))
                              for k in ("emb", "mlp", "heads", "ln_mean", "ln_inv_std")})
    return project(raw, maps).numpy()


def numpy_pca(x):
    x = x.astype(np.float64)
    mean = x.mean(0)
    cov = np.cov(x, rowvar=False)
    w, v = np.linalg.eigh(cov)
    return mean, w[::-1], v[:, ::-1].T


def test_spectral_store_equals_numpy(stores):
    root, _, urls = stores
    result = run_spectral(urls["train"], progress=False)
    assert result.computed and result.url == Layout.spectral_store(urls["train"])
    spec = SpectralStore.open(result.url)
    y = float64_contributions(urls["train"])
    for u, res in enumerate(spec.results()):
        mean, w, v = numpy_pca(y[:, u])
        np.testing.assert_allclose(res.mean, mean, rtol=1e-12, atol=1e-12)
        big = w > 1e-6 * w[0]
        if not big.any():
            continue
        np.testing.assert_allclose(res.eigenvalues[big], w[big], rtol=1e-9)
        k = int(min(big.sum(), 8))
        gaps = w[:k] - w[1:k + 1]  # compare only subspaces separated by an eigen-gap
        k = max([i + 1 for i in range(k) if gaps[i] > 1e-3 * w[0]], default=0)
        if k:
            assert np.max(subspace_angles(res.components[:k].T, v[:k].T)) < 1e-6


def test_rerun_is_cached_and_params_recompute(stores):
    _, _, urls = stores
    run_spectral(urls["train"], progress=False)
    assert not run_spectral(urls["train"], progress=False).computed
    assert run_spectral(urls["train"], SpectralParams(twonn_max_samples=100),
                        progress=False).computed
    assert run_spectral(urls["train"], progress=False).computed  # back to the default params
    assert run_spectral(urls["train"], progress=False, force=True).computed


def test_tables_rows_and_columns(stores):
    root, _, urls = stores
    run_spectral(urls["train"], progress=False)
    store = FeatureStore.open(urls["train"])
    n_units, dim = len(store.units), store.dims.embed
    stats = read_table(root / "st", "unit_stats", model=EMBEDDED_MODEL,
                       filters={"split": "train"})
    assert stats.num_rows == n_units
    for col in ("model", "pretrained", "dataset", "split", "unit", "layer", "head", "kind",
                "config_hash", "code_version", "created_at", "k90", "k99", "evr1",
                "participation_ratio", "twonn"):
        assert col in stats.column_names, col
    spectra = read_table(root / "st", "spectra", filters={"split": "train"})
    assert spectra.num_rows == n_units * dim
    heads = sql(root / "st", "SELECT max(k90) AS k FROM unit_stats WHERE kind = 'head'")
    assert 1 <= heads.to_pylist()[0]["k"] <= dim
    last = sql(root / "st", "SELECT max(cumulative_evr) AS c FROM spectra WHERE unit = 'L1H1'")
    assert abs(last.to_pylist()[0]["c"] - 1) < 1e-9


def test_local_cluster_matches_local_scheduler(stores):
    _, _, urls = stores
    local = SpectralStore.open(run_spectral(urls["test"], progress=False).url).results()
    run_spectral(urls["test"], n_workers=2, memory_limit="1GB", force=True, progress=False)
    cluster = SpectralStore.open(Layout.spectral_store(urls["test"])).results()
    for a, b in zip(local, cluster):
        np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(a.mean, b.mean, rtol=1e-12, atol=1e-12)


def test_similarity_between_splits(stores):
    root, _, urls = stores
    a = run_spectral(urls["train"], progress=False).url
    b = run_spectral(urls["test"], progress=False).url
    self_rows = similarity(a, a)
    heads = [r for r in self_rows if r["unit"].startswith("L")]
    assert all(abs(r["similarity"] - 1) < 1e-9 for r in heads if r["k_a"] > 0)
    rows = similarity(a, b)
    assert all(0 <= r["similarity"] <= 1 + 1e-9 for r in rows)
    table = read_table(root / "st", "basis_similarity")
    assert table.num_rows == 2 * len(rows)  # the self-comparison and train-vs-test
    assert set(table.column("other_split").to_pylist()) == {"train", "test"}


def test_incomplete_or_foreign_spectral_store(stores, tmp_path):
    _, _, urls = stores
    url = run_spectral(urls["train"], progress=False).url
    zarr.open_group(url, mode="r+").attrs["state"] = "incomplete"
    with pytest.raises(StoreError, match="incomplete"):
        SpectralStore.open(url)
    assert run_spectral(urls["train"], progress=False).computed  # an incomplete one is redone
    with pytest.raises(StoreError, match="no feature store"):
        run_spectral(str(tmp_path / "none.zarr"), progress=False)


def test_cli_spectral(stores, capsys):
    root, folder, urls = stores
    args = ["--model", EMBEDDED_MODEL, "--dataset", f"imagefolder:{folder}", "--split", "train",
            "--store-root", str(root / "st"), "--quiet"]
    assert Layout.of(root / "st").feature_store(
        WeightsId(EMBEDDED_MODEL), f"imagefolder:{folder}", "train") == urls["train"]
    assert main(["spectral", *args]) == 0
    assert main(["spectral", *args]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["spectral", *args[:3], "imagefolder:/nope", "--store-root", str(root)]) == 2


_VOLATILE = {"created_at", "code_version"}


def _rows(root, table):
    rows = read_table(root, table, filters={"split": "train"}).to_pylist()
    return sorted(({k: v for k, v in r.items() if k not in _VOLATILE} for r in rows),
                  key=lambda r: (r["unit_index"], r.get("component", -1)))


@pytest.mark.parametrize("lost", ["spectra", "unit_stats"])
def test_lost_table_is_rewritten_from_the_store_without_recomputing(stores, monkeypatch, lost):
    """A kill between the complete spectral store and its rows (or a deleted table) must not
    leave a stage that says "up to date" with rows missing for good."""
    import shutil

    import residual_core.engines.spectral as spectral_store
    from residual_core.tables import tables_root

    root, _, urls = stores
    run_spectral(urls["train"], progress=False)
    before = {t: _rows(root / "st", t) for t in ("spectra", "unit_stats")}
    shutil.rmtree(tables_root(root / "st") / lost)

    def no_pca(*a, **k):
        raise AssertionError("the rows are in the store: nothing may be recomputed")

    monkeypatch.setattr(FeatureStore, "pca", no_pca)
    monkeypatch.setattr(spectral_store, "twonn", no_pca)
    result = run_spectral(urls["train"], progress=False)
    assert not result.computed and result.rows_rewritten
    assert {t: _rows(root / "st", t) for t in before} == before
    again = run_spectral(urls["train"], progress=False)
    assert not again.computed and not again.rows_rewritten


def test_twonn_is_kept_in_the_spectral_store(stores):
    root, _, urls = stores
    spec = SpectralStore.open(run_spectral(urls["train"], progress=False).url)
    stats = {r["unit"]: r["twonn"] for r in _rows(root / "st", "unit_stats")}
    assert [stats[u.name] for u in spec.units] == spec.twonn().tolist()
    assert np.isfinite(spec.twonn()).all() and (spec.twonn() > 0).all()


def test_cli_spectral_finds_the_store_of_its_dtype(stores, tmp_path, capsys):
    root, folder, urls = stores
    tiny = load_model(EMBEDDED_MODEL, None, device="cpu", seed=0)
    half = extract(EMBEDDED_MODEL, None, f"imagefolder:{folder}", "train",
                   ExtractParams(batch_size=16, rows_per_chunk=32, num_workers=0, device="cpu",
                                 feature_dtype="float16"),
                   store_root=tmp_path, loaded=tiny, progress=False).url
    args = ["spectral", "--model", EMBEDDED_MODEL, "--dataset", f"imagefolder:{folder}",
            "--store-root", str(tmp_path), "--quiet"]
    assert main(args) == 2  # no float32 store there
    assert "no feature store" in capsys.readouterr().err
    assert main([*args, "--feature-dtype", "float16"]) == 0
    spec = SpectralStore.open(Layout.spectral_store(half))
    assert spec.attrs["feature_config_hash"] == FeatureStore.open(half).attrs["config_hash"]


def test_stores_lists_every_feature_store_with_its_state(stores, tmp_path, capsys):
    import json as _json

    root, folder, urls = stores
    run_spectral(urls["train"], progress=False)
    assert main(["stores", "--store-root", str(root / "st"), "--format", "json"]) == 0
    listed = {r["store"].rsplit("/", 1)[-1]: r for r in _json.loads(capsys.readouterr().out)}
    assert {"train.zarr", "test.zarr"} <= set(listed)  # spectral stores are not feature stores
    train = listed["train.zarr"]
    assert train["state"] == "complete" and train["dtype"] == "float32" and train["spectral"]
    assert train["rows"] == FeatureStore.open(urls["train"]).dims.n and train["mb"] > 0
    assert main(["stores", "--store-root", str(root / "st"), "--model", "nope"]) == 0
    assert "no feature stores" in capsys.readouterr().out
    text = repr(FeatureStore.open(urls["train"]))
    assert f"{train['rows']} rows x 21 units" in text and "complete" in text
    assert ".contributions()" in text
