"""Spectral stores of two models compared: basis similarity across models (the authors' score
included) and the correlation of per-head spectral statistics (the paper's cross-model finding),
on two random-weight tiny models of different seeds."""

import logging

import numpy as np
import pytest
import torch
import zarr
from scipy.stats import pearsonr, spearmanr

from builders import sample_crops
from residual_core.engines.extract import extract
from residual_core.engines.spectral import cross_model_spectra, run_spectral, similarity
from residual_core.errors import StoreError
from residual_core.identity import EMBEDDED_MODEL
from residual_core.method.models import load_model
from residual_core.report.plots import plot_cross_model
from residual_core.stages.extract import Params as ExtractParams
from residual_core.tables import read_table


def _sharpen(model: torch.nn.Module) -> torch.nn.Module:
    """Scale each head's query and key weights by its own factor (the same for every seed): at
    random initialisation attention is nearly uniform and every head ~2-dimensional (K_90 = 2
    throughout, nothing to correlate); sharper heads spread from K_90 2 to 10."""
    with torch.no_grad():
        for l, block in enumerate(model.visual.transformer.resblocks):
            w, n_heads = block.attn.in_proj_weight, block.attn.num_heads
            width = w.shape[1]
            dh = width // n_heads
            for h in range(n_heads):
                factor = 1.0 + 0.5 * (h + n_heads * l)
                w[h * dh:(h + 1) * dh] *= factor  # queries
                w[width + h * dh:width + (h + 1) * dh] *= factor  # keys
    return model


def _write_crops(root, n):
    for i, crop in enumerate(sample_crops(n, 32, seed=0)):
        (root / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        crop.save(root / "ab"[i % 2] / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Spectral stores of one image folder's train split (crops of real photographs) under two
    tiny models: random weights of seeds 0 and 1, attention sharpened per head, each saved as
    a checkpoint (two weights of one architecture)."""
    root = tmp_path_factory.mktemp("cross")
    folder = _write_crops(root / "imgs", 120)
    params = ExtractParams(batch_size=32, rows_per_chunk=64, num_workers=0, device="cpu")
    ckpts, urls = [], []
    for seed in (0, 1):
        ckpt = root / f"seed{seed}.pt"
        model = _sharpen(load_model(EMBEDDED_MODEL, None, device="cpu", seed=seed).model)
        torch.save(model.state_dict(), ckpt)
        loaded = load_model(EMBEDDED_MODEL, str(ckpt), device="cpu")
        feats = extract(EMBEDDED_MODEL, str(ckpt), f"imagefolder:{folder}", "train", params,
                        store_root=root / "st", loaded=loaded, progress=False).url
        ckpts.append(loaded.pretrained)
        urls.append(run_spectral(feats, progress=False).url)
    return root, ckpts, urls


def _copy_with(url, dst, units=None, width=None):
    """A copy of a spectral store keeping only ``units`` (names) and/or the first ``width``
    output dimensions (bases cut, not orthonormal any more: only the checks are exercised)."""
    src = zarr.open_group(url, mode="r")
    out = zarr.open_group(str(dst), mode="w")
    keep = [i for i, u in enumerate(src.attrs["units"]) if units is None or u["name"] in units]
    for name in ("mean", "components", "eigenvalues", "twonn"):
        value = src[name][...][keep]
        if width is not None and name != "twonn":
            value = value[..., :width, :width] if name == "components" else value[..., :width]
        out.create_array(name, shape=value.shape, dtype="float64")[...] = value
    attrs = dict(src.attrs)
    attrs["units"] = [dict(u, index=j) for j, u in
                      enumerate(u for i, u in enumerate(src.attrs["units"]) if i in keep)]
    attrs["n_units"] = len(keep)
    if width is not None:
        attrs["embed_dim"] = width
    out.attrs.update(attrs)
    return str(dst)


def test_basis_similarity_across_models(models, tmp_path):
    root, (ckpt_a, ckpt_b), (a, b) = models
    rows = similarity(a, b, tables_root=str(tmp_path))
    assert len(rows) == 21  # emb, 4 MLPs, 16 heads of residual-tiny
    heads = [r for r in rows if r["unit"].startswith("L") and "mlp" not in r["unit"]]
    assert all(0 <= r["authors"] <= 1 + 1e-12 for r in heads)
    assert all(0 <= r["similarity"] <= 1 + 1e-12 for r in heads)
    assert max(r["authors"] for r in heads) < 0.999  # two random models: not the same bases
    same = similarity(a, a, tables_root=str(tmp_path))
    assert all(abs(r["authors"] - 1) < 1e-9 for r in same if r["k_a"])
    table = read_table(tmp_path, "basis_similarity").to_pylist()
    assert len(table) == 42
    cross = [r for r in table if r["other_pretrained"] == ckpt_b]
    assert len(cross) == 21 and {r["pretrained"] for r in table} == {ckpt_a}
    assert {r["other_model"] for r in table} == {EMBEDDED_MODEL}
    assert {r["other_pretrained"] for r in table} == {ckpt_a, ckpt_b}


def test_basis_similarity_compares_the_units_both_have_and_says_so(models, tmp_path, caplog):
    _, _, (a, b) = models
    kept = {"emb", "L0.mlp", "L0H0", "L0H1", "L1H0", "L1H1", "L2H0"}
    small = _copy_with(b, tmp_path / "small.spectral.zarr", units=kept)
    with caplog.at_level(logging.WARNING):
        rows = similarity(a, small, tables_root=str(tmp_path))
    assert [r["unit"] for r in rows] == ["emb", "L0.mlp", "L0H0", "L0H1", "L1H0", "L1H1", "L2H0"]
    full = {r["unit"]: r for r in similarity(a, b, tables_root=str(tmp_path))}
    assert all(r["authors"] == full[r["unit"]]["authors"] for r in rows[1:])
    (message,) = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert "comparing the 7 units both have" in message and "14 only in" in message


@pytest.mark.parametrize("compare", [similarity, cross_model_spectra])
def test_a_width_mismatch_is_refused_in_one_line(models, tmp_path, compare):
    _, _, (a, b) = models
    narrow = _copy_with(b, tmp_path / "narrow.spectral.zarr", width=32)
    with pytest.raises(StoreError, match="width 64.*width 32") as err:
        compare(a, narrow, tables_root=str(tmp_path))
    assert "\n" not in str(err.value)


def _independent_head_values(url):
    """Per-head K_90, TwoNN and cumulative EVR at 1, 2, 4, ..., 32 read from the Zarr arrays."""
    group = zarr.open_group(url, mode="r")
    eig, dims = group["eigenvalues"][...], group["twonn"][...]
    out = {}
    for u in group.attrs["units"]:
        if u["kind"] != "head":
            continue
        lam = eig[u["index"]]
        cum = np.cumsum(lam) / lam.sum()
        k90 = next(i + 1 for i, c in enumerate(cum) if c >= 0.9 - 1e-12)
        out[u["name"]] = (k90, dims[u["index"]], cum[[0, 1, 3, 7, 15, 31]])
    return out


def test_cross_model_correlations_equal_scipy_on_values_read_from_the_stores(models, tmp_path):
    root, (ckpt_a, ckpt_b), (a, b) = models
    result = cross_model_spectra(a, b, tables_root=str(tmp_path))
    va, vb = _independent_head_values(a), _independent_head_values(b)
    heads = sorted(va)
    assert sorted(result["heads"]) == heads and len(heads) == 16
    assert result["only_a"] == result["only_b"] == []
    assert result["counts"] == (1, 2, 4, 8, 16, 32)
    expected = {
        "k90": ([va[h][0] for h in heads], [vb[h][0] for h in heads]),
        "twonn": ([va[h][1] for h in heads], [vb[h][1] for h in heads]),
        "cumulative_evr": (np.concatenate([va[h][2] for h in heads]),
                           np.concatenate([vb[h][2] for h in heads])),
    }
    for name, (x, y) in expected.items():
        got = result["statistics"][name]
        assert np.ptp(x) > 0 and np.ptp(y) > 0, name  # a real correlation, not NaN
        assert got["pearson"] == pytest.approx(pearsonr(x, y)[0], rel=1e-9, abs=1e-12), name
        assert got["spearman"] == pytest.approx(spearmanr(x, y)[0], rel=1e-9, abs=1e-12), name
        assert got["n_heads"] == 16
    table = read_table(tmp_path, "cross_model").to_pylist()
    assert sorted(r["statistic"] for r in table) == ["cumulative_evr", "k90", "twonn"]
    for r in table:
        assert (r["model"], r["other_model"]) == (EMBEDDED_MODEL, EMBEDDED_MODEL)
        assert (r["pretrained"], r["other_pretrained"]) == (ckpt_a, ckpt_b)
        assert r["split"] == "train" and r["dataset"].startswith("imagefolder:")
        assert r["pearson"] == result["statistics"][r["statistic"]]["pearson"]
        assert r["config_hash"] and r["code_version"] and r["created_at"]
    cross_model_spectra(a, b, tables_root=str(tmp_path))  # a rerun replaces its rows
    assert read_table(tmp_path, "cross_model").num_rows == 3


def test_cross_model_matches_the_heads_both_have_and_refuses_another_split(models, tmp_path,
                                                                           caplog):
    _, _, (a, b) = models
    kept = {"emb", "L0H0", "L0H1", "L1H2", "L2H3", "L3H0"}
    small = _copy_with(b, tmp_path / "small.spectral.zarr", units=kept)
    with caplog.at_level(logging.WARNING):
        result = cross_model_spectra(a, small, tables_root=str(tmp_path))
    assert result["heads"] == ["L0H0", "L0H1", "L1H2", "L2H3", "L3H0"]
    assert len(result["only_a"]) == 11 and result["only_b"] == []
    assert any("comparing the 5 heads both have" in r.getMessage() for r in caplog.records)
    other = zarr.open_group(small, mode="r+")
    other.attrs["split"] = "test"
    with pytest.raises(StoreError, match="one dataset and split") as err:
        cross_model_spectra(a, small, tables_root=str(tmp_path))
    assert "\n" not in str(err.value)


def test_plot_cross_model_writes_a_png(models, tmp_path):
    _, _, (a, b) = models
    result = cross_model_spectra(a, b, tables_root=str(tmp_path))
    path = plot_cross_model(result["stats_a"], result["stats_b"], tmp_path / "fig" / "x.png",
                            label_a="seed 0", label_b="seed 1")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
