"""The align stage end to end on stores: tables, stored λ, default bases."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from builders import write_image_folder
from residual_core.engines import align as align_engine
from residual_core.engines.align import AlignParams, run_align
from residual_core.engines.extract import extract
from residual_core.formats.align_weights import stored_lambdas
from residual_core.formats.feature_store import FeatureStore
from residual_core.identity import EMBEDDED_MODEL
from residual_core.layout import Layout
from residual_core.method.models import load_model
from residual_core.stages.extract import Params as ExtractParams
from residual_core.tables import read_table


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    folder = write_image_folder(root / "imgs", ["a", "b", "c"], 50, size=32, seed=5)
    tiny = load_model(EMBEDDED_MODEL, None, device="cpu", seed=0)
    urls = [extract(EMBEDDED_MODEL, None, f"imagefolder:{folder}", s,
                    ExtractParams(batch_size=16, rows_per_chunk=32, num_workers=0, device="cpu"),
                    store_root=root / "st", loaded=tiny, progress=False).url for s in ("train", "val", "test")]
    return root, urls


PARAMS = AlignParams(methods=("zero-shot", "residual-star", "coarse"), seeds=(0, 1), epochs=4,
                     patience=2, random_seeds=2)


def test_run_align_writes_tables_and_weights(task):
    root, urls = task
    result = run_align(*urls, PARAMS, progress=False)
    assert result.basis_url == Layout.spectral_store(urls[0])  # no ImageNet store: own train
    evals = read_table(root / "st", "evaluations")
    assert evals.num_rows == 6
    assert set(evals.column("method").to_pylist()) == {"zero-shot", "residual-star", "coarse"}
    for col in ("model", "pretrained", "dataset", "method", "preset_params",
                "trainable_parameters", "val_acc", "test_acc", "epochs", "fit_seconds", "seed",
                "basis_dataset", "config_hash", "code_version", "created_at"):
        assert col in evals.column_names, col
    assert set(evals.column("pretrained").to_pylist()) == {"random"}  # never null
    from residual_core.formats.feature_store import FeatureStore

    sizes = [FeatureStore.open(u).dims.n for u in urls]
    assert sum(sizes) == 150  # 3 classes x 50 images, split 80/10/10
    assert {(r["n_train"], r["n_val"], r["n_test"], r["n_classes"], r["checkpoint_sha256"])
            for r in evals.to_pylist()} == {(*sizes, 3, None)}
    zs = [r for r in evals.to_pylist() if r["method"] == "zero-shot"]
    assert all(r["trainable_parameters"] == 0 for r in zs)
    coarse = [r for r in evals.to_pylist() if r["method"] == "coarse"]
    assert all(r["trainable_parameters"] == 16 for r in coarse)  # 4 layers x 4 heads
    lambdas = stored_lambdas(result.weights_url, "residual-star", seed=1)
    assert set(lambdas) == {f"L{l}H{h}" for l in range(4) for h in range(4)}
    star = [r for r in evals.to_pylist() if r["method"] == "residual-star" and r["seed"] == 1][0]
    assert sum(v.size for v in lambdas.values()) == star["trainable_parameters"]
    hs = read_table(root / "st", "head_selection")
    assert hs.num_rows == len(result.head_selection_rows) > 0
    kept = {(r["ranking"], r["keep"], r["n_heads"]) for r in hs.to_pylist()}
    assert {("S", "1", 1), ("S", "1%", 2), ("R", "75%", 12), ("heads", None, 16),
            ("layers", None, 0), ("all", None, 16)} <= kept
    # head_scores: one row per head, the scores rank_heads gives on val
    from residual_core.method.head_selection import rank_heads

    scores = read_table(root / "st", "head_scores").to_pylist()
    expected = rank_heads(urls[1])
    assert [r["unit"] for r in scores] == [f"L{l}H{h}" for l in range(4) for h in range(4)]
    for key in ("S", "U|T", "U", "U-out"):
        assert [r[key] for r in scores] == pytest.approx(list(expected[key]))
    assert {r["split"] for r in scores} == {"val"} and {r["classifier"] for r in scores} == {
        "text"}
    top = max(scores, key=lambda r: r["S"])["unit"]
    assert next(r for r in hs.to_pylist() if (r["ranking"], r["keep"]) == ("S", "1"))[
        "heads"] == top
    # A run of a subset reuses its fits and keeps every other fit's row.
    again = run_align(*urls, AlignParams(methods=("zero-shot",), head_selection=False),
                      progress=False)
    assert [(r["method"], r["seed"]) for r in again.rows] == [("zero-shot", 0)]
    assert read_table(root / "st", "evaluations").num_rows == 6


def test_centroid_classifier_is_the_train_class_means_and_sits_beside_text(task):
    """classifier=centroid: every method and head selection score with the per-class means of
    the train split's outputs (checked against numpy); its rows sit beside the text rows."""
    root, urls = task
    train, test = FeatureStore.open(urls[0]), FeatureStore.open(urls[2])
    out = np.asarray(train.contributions().sum(axis=1).compute(), dtype=np.float64)
    means = np.stack([out[train.labels == c].mean(0) for c in range(3)])
    test_out = np.asarray(test.contributions().sum(axis=1).compute(), dtype=np.float64)
    expected = {"centroid": means,
                "centroid-l2": means / np.linalg.norm(means, axis=1, keepdims=True)}
    for norm, name in (("none", "centroid"), ("l2", "centroid-l2")):
        params = AlignParams(methods=("zero-shot", "coarse"), seeds=(0,), epochs=2, patience=1,
                             random_seeds=1, classifier="centroid", centroid_norm=norm)
        result = run_align(*urls, params, progress=False)
        zs = [r for r in result.rows if r["method"] == "zero-shot"][0]
        reference = float(((test_out @ expected[name].T).argmax(1) == test.labels).mean())
        assert zs["classifier"] == name and zs["test_acc"] == pytest.approx(reference)
        everything = [r for r in result.head_selection_rows if r["ranking"] == "all"][0]
        assert everything["classifier"] == name
        assert everything["test_acc"] == pytest.approx(reference)
    evals = read_table(root / "st", "evaluations").to_pylist()
    by = {(r["method"], r["seed"], r["classifier"]) for r in evals}
    assert {("zero-shot", 0, "text"), ("zero-shot", 0, "centroid"),
            ("zero-shot", 0, "centroid-l2"), ("coarse", 0, "centroid")} <= by
    hs = {r["classifier"] for r in read_table(root / "st", "head_selection").to_pylist()}
    assert {"text", "centroid", "centroid-l2"} <= hs


def test_every_file_the_stages_write_has_its_tables_declared_schema(task):
    import pyarrow.parquet as pq

    from residual_core.formats.tables import TABLES
    from residual_core.tables import list_tables, table_files

    root, urls = task
    run_align(*urls, PARAMS, progress=False)
    written = list_tables(root / "st")
    assert {"evaluations", "head_selection", "spectra", "unit_stats"} <= set(written)
    for table in written:
        for path in table_files(root / "st", table):
            assert pq.read_schema(path).remove_metadata() == \
                TABLES[table].schema.remove_metadata(), path


def test_fits_are_kept_side_by_side_and_reused(task, monkeypatch):
    import residual_core.engines.align as align_stage

    root, urls = task
    fits = []
    real = align_stage._fit_one
    monkeypatch.setattr(align_stage, "_fit_one", lambda *a, **k: fits.append(a[:2]) or real(*a, **k))
    star = dict(methods=("residual-star",), epochs=2, head_selection=False)
    run_align(*urls, AlignParams(seeds=(0, 1, 2), **star), progress=False)
    run_align(*urls, AlignParams(seeds=(0,), **star), progress=False)  # all reused
    run_align(*urls, AlignParams(seeds=(0,), **{**star, "epochs": 3}), progress=False)
    assert fits == [("residual-star", 0), ("residual-star", 1), ("residual-star", 2),
                    ("residual-star", 0)]
    rows = [r for r in read_table(root / "st", "evaluations").to_pylist()
            if r["method"] == "residual-star" and '"epochs": 2' in r["preset_params"]]
    assert sorted(r["seed"] for r in rows) == [0, 1, 2]  # seed 0 alone did not drop 1 and 2


def test_rows_of_a_reextracted_store_are_replaced_not_doubled(tmp_path):
    from residual_core.engines.spectral import run_spectral

    folder = write_image_folder(tmp_path / "imgs", ["a", "b"], 20, size=32, seed=3)
    tiny = load_model(EMBEDDED_MODEL, None, device="cpu", seed=0)
    root = tmp_path / "st"

    def extract_all(rows_per_chunk):
        params = ExtractParams(batch_size=16, rows_per_chunk=rows_per_chunk, num_workers=0,
                               device="cpu")
        return [extract(EMBEDDED_MODEL, None, f"imagefolder:{folder}", s, params,
                        store_root=root, loaded=tiny, progress=False).url
                for s in ("train", "val", "test")]

    params = AlignParams(methods=("zero-shot", "coarse"), epochs=1, random_seeds=1)
    counts = []
    for rows_per_chunk in (16, 8):
        urls = extract_all(rows_per_chunk)
        run_spectral(urls[0], progress=False)
        run_align(*urls, params, progress=False)
        counts.append({t: read_table(root, t).num_rows
                       for t in ("spectra", "unit_stats", "evaluations", "head_selection")})
        for url in urls:  # the user re-extracts with another configuration
            shutil.rmtree(url)
    assert counts[0] == counts[1] and counts[0]["evaluations"] == 2
    hashes = {r["config_hash"] for r in read_table(root, "unit_stats").to_pylist()}
    assert len(hashes) == 1  # only the new store's rows


def test_imagenet_bases_are_the_default_when_present(task):
    root, urls = task
    own = Layout.spectral_store(urls[0])
    run_align(*urls, AlignParams(methods=("zero-shot",), head_selection=False), progress=False)
    imagenet = Path(urls[0]).parents[1] / "imagenet" / "train.spectral.zarr"
    shutil.copytree(own, imagenet)
    try:
        result = run_align(*urls, AlignParams(methods=("zero-shot",), head_selection=False),
                           progress=False)
        assert result.basis_url == str(imagenet)
    finally:
        shutil.rmtree(imagenet.parent)


def test_report_from_tables(task, tmp_path):
    from residual_core.report.markdown import write_report

    root, urls = task
    run_align(*urls, PARAMS, progress=False)  # head-selection rows (fits reused when present)
    run_align(*urls, AlignParams(methods=("zero-shot", "residual-star"), epochs=2,
                                 head_selection=False), progress=False)
    dataset = read_table(root / "st", "evaluations").column("dataset")[0].as_py()
    report = write_report(root / "st", EMBEDDED_MODEL, {dataset: tuple(urls)}, tmp_path / "rep")
    text = report.path.read_text()
    assert "residual-star" in report.results_table and "zero-shot" in report.results_table
    for png in ("accuracy_vs_parameters.png", "head_zero_shot.png", "head_selection.png"):
        assert (tmp_path / "rep" / png).stat().st_size > 1000 and png in text
    assert list((tmp_path / "rep").glob("lambda_*.png")) and "K_90 median" in text
    assert "## Heads in text" not in text and "## Across models" not in text
    # with the heads explained: each task's three best heads with their top descriptions
    from residual_core.engines.explain import run_explain
    from residual_core.stages.explain import Params as ExplainParams

    words = tmp_path / "words.txt"
    words.write_text("\n".join(["a red thing", "a blue thing", "stripes", "dots", "a cat"]))
    run_explain(urls[0], ExplainParams(dictionary=str(words), texts_per_head=2, rank=4),
                tables_root=str(root / "st"))
    text = write_report(root / "st", EMBEDDED_MODEL, {dataset: tuple(urls)},
                        tmp_path / "rep").path.read_text()
    section = text.split("## Heads in text")[1].split("\n## ")[0]
    assert section.count(f"- `{dataset}` L") == 3 and section.count("| L") == 16
    assert len(re.findall(r"\(\d+%, η² [01]\.\d\d\)", section)) == 6  # 3 heads x 2 picks
    # a run of some heads beside it, and another dictionary for two heads: the report keeps
    # one dictionary (the one explaining every head) and one line per head
    other = tmp_path / "other.txt"
    other.write_text("\n".join(["zz one", "zz two", "zz three"]))
    run_explain(urls[0], ExplainParams(dictionary=str(other), texts_per_head=2, rank=4,
                                       units=("L0H0", "L1H1")), tables_root=str(root / "st"))
    run_explain(urls[0], ExplainParams(dictionary=str(words), texts_per_head=2, rank=4,
                                       units=("L0H0",)), tables_root=str(root / "st"))
    again = write_report(root / "st", EMBEDDED_MODEL, {dataset: tuple(urls)},
                         tmp_path / "rep2").path.read_text()
    assert again.split("## Heads in text")[1].split("\n## ")[0] == section
    # --format svg / --dpi: every figure in that format, linked by the report
    from PIL import Image

    from pipelines.cli import main

    for fmt, dpi in (("svg", 110), ("png", 220)):
        out = tmp_path / f"rep-{fmt}"
        assert main(["report", "--model", EMBEDDED_MODEL, "--store-root", str(root / "st"),
                     "--out", str(out), "--format", fmt, "--dpi", str(dpi)]) == 0
        figures = sorted(p.name for p in out.iterdir() if p.suffix != ".md")
        assert figures and all(f.endswith(f".{fmt}") for f in figures)
        text = (out / "report.md").read_text()
        assert all(f"]({f})" in text for f in figures)
    small = Image.open(tmp_path / "rep" / "head_zero_shot.png").size
    large = Image.open(tmp_path / "rep-png" / "head_zero_shot.png").size
    assert large[0] == pytest.approx(2 * small[0], rel=0.05)  # dpi 220 against 110
    assert main(["report", "--model", EMBEDDED_MODEL, "--store-root", str(root / "st"),
                 "--dpi", "5"]) == 2


def test_report_across_models_from_the_tables(task, tmp_path):
    """The "across models" section reads cross_model, unit_stats and basis_similarity rows."""
    from residual_core.report.markdown import write_report
    from residual_core.tables import write_rows

    root, urls = task
    store_root = tmp_path / "st"
    shutil.copytree(root / "st" / "tables", store_root / "tables")
    dataset = read_table(store_root, "evaluations").column("dataset")[0].as_py()
    compared = "cifar10"  # the models were compared on another dataset than the task's
    other = str(tmp_path / "other.pt")
    heads = [f"L{l}H{h}" for l in range(4) for h in range(4)]
    for weights, shift in (("random", 0), (other, 1)):
        write_rows(store_root, "unit_stats", [
            {"model": EMBEDDED_MODEL, "dataset": compared, "split": "train", "unit": u,
             "kind": "head", "k90": 3 + i % 4 + shift, "twonn": 5.0 + i / 4}
            for i, u in enumerate(heads)], key=f"stats-{shift}", provenance={"pretrained": weights})
    write_rows(store_root, "cross_model", [
        {"model": EMBEDDED_MODEL, "dataset": compared, "split": "train",
         "other_model": EMBEDDED_MODEL, "other_pretrained": other, "statistic": s,
         "pearson": 0.9, "spearman": 0.8, "n_heads": 16} for s in ("k90", "twonn")],
        key="cross", provenance={"pretrained": "random"})
    write_rows(store_root, "basis_similarity", [
        {"model": EMBEDDED_MODEL, "dataset": compared, "other_dataset": compared, "split": "train",
         "other_split": "train", "other_model": EMBEDDED_MODEL, "other_pretrained": other,
         "unit": u, "authors": 0.25 + i / 100} for i, u in enumerate(heads)],
        key="sim", provenance={"pretrained": "random"})
    text = write_report(store_root, EMBEDDED_MODEL, {dataset: tuple(urls)},
                        tmp_path / "rep").path.read_text()
    section = text.split("## Across models")[1].split("\n## ")[0]
    assert "on `cifar10` (train)" in section and "| k90 | 0.900 | 0.800 | 16 |" in section and "mean 0.325" in section
    assert (tmp_path / "rep" / "cross_model_0.png").stat().st_size > 1000


def test_finetune_reads_the_images_from_the_given_data_root(tmp_path, monkeypatch):
    from builders import write_cifar
    from residual_core.errors import DatasetNotFoundError

    data_root = tmp_path / "datasets"
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    write_cifar(data_root, "cifar-10-batches-py", files, "labels", "batches.meta",
                "label_names", n_classes=10, per_file=[20] * 5 + [20])
    monkeypatch.setenv("RESIDUAL_DATA_ROOT", str(tmp_path / "elsewhere"))  # default: no CIFAR
    urls = [extract(EMBEDDED_MODEL, None, "cifar10", s,
                    ExtractParams(batch_size=32, num_workers=0, device="cpu"),
                    data_root=data_root, store_root=tmp_path / "st", progress=False).url for s in ("train", "val", "test")]
    params = AlignParams(methods=("zero-shot", "finetune"), finetune_epochs=1, patience=1,
                         head_selection=False)
    with pytest.raises(DatasetNotFoundError, match="elsewhere"):
        run_align(*urls, params, progress=False)
    result = run_align(*urls, params, data_root=str(data_root), progress=False)
    finetune = [r for r in result.rows if r["method"] == "finetune"]
    assert len(finetune) == 1 and finetune[0]["trainable_parameters"] > 100_000


def test_align_command(task, tmp_path, capsys, monkeypatch):
    from pipelines.cli import main

    root, urls = task
    store_root = tmp_path / "st"
    shutil.copytree(root / "st", store_root)  # this test's rows stay out of the shared root
    dataset = FeatureStore.open(urls[0]).attrs["dataset"]
    args = ["align", "--model", EMBEDDED_MODEL, "--dataset", dataset, "--store-root",
            str(store_root), "--methods", "zero-shot", "linear", "--seeds", "3", "--epochs", "2",
            "--no-head-selection", "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = {(r["method"], r["seed"]): r for r in read_table(store_root, "evaluations").to_pylist()}
    for method in ("zero-shot", "linear"):
        line = next(li for li in out.splitlines() if li.startswith(method + " "))
        assert line.split()[1] == "3"
        assert line.split()[-1] == f"{rows[method, 3]['test_acc']:.4g}"
    created = rows["linear", 3]["created_at"]
    assert main(args) == 0  # a rerun reuses both fits
    again = {(r["method"], r["seed"]): r for r in read_table(store_root, "evaluations").to_pylist()}
    assert again["linear", 3]["created_at"] == created and len(again) == len(rows)
    capsys.readouterr()
    fitted, n_rows = [], read_table(store_root, "evaluations").num_rows
    real_fit = align_engine.fit
    monkeypatch.setattr(align_engine, "fit", lambda m, *a, **k: fitted.append(m) or
                        real_fit(m, *a, **k))
    assert main(args + ["--force"]) == 0  # --force refits both and replaces their rows
    assert sorted(fitted) == ["linear", "zero-shot"] and "(all refitted)" in capsys.readouterr().out
    assert read_table(store_root, "evaluations").num_rows == n_rows
    monkeypatch.undo()

    # --lr / --batch-size per method: a fit of its own beside the preset's, reused on rerun
    tuned = args[:-1] + ["--lr", "linear=0.01", "--batch-size", "16"]
    assert main(tuned) == 0
    linear = [r for r in read_table(store_root, "evaluations").to_pylist()
              if (r["method"], r["seed"]) == ("linear", 3)]
    settings = sorted((json.loads(r["preset_params"])["lr"],
                       json.loads(r["preset_params"])["batch_size"]) for r in linear)
    assert settings == [(0.001, 64), (0.01, 16)]  # the preset's fit kept beside the tuned one
    n_rows = read_table(store_root, "evaluations").num_rows
    assert main(tuned) == 0 and read_table(store_root, "evaluations").num_rows == n_rows
    capsys.readouterr()

    for bad, says in ((["--methods", "nope"], "unknown methods"),
                      (["--basis", "cifar10"], "no spectral store"),
                      (["--epochs", "-1"], "--epochs"),
                      (["--lr", "nope=0.1"], "--lr: unknown method 'nope'"),
                      (["--batch-size", "linear=0"], "--batch-size: linear: must be positive")):
        assert main(args[:5] + ["--store-root", str(store_root), *bad, "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
    assert main(["align", "--model", EMBEDDED_MODEL, "--dataset", "mnist", "--store-root",
                 str(store_root), "--quiet"]) == 2
    assert "no feature store" in capsys.readouterr().err


def test_a_changed_preset_recomputes_only_its_fits(task, monkeypatch):
    import dataclasses

    from residual_core.engines.align import plan_align
    from residual_core.method import adapters as residual

    root, urls = task
    basis = run_align(*urls, AlignParams(methods=("zero-shot",), head_selection=False),
                      progress=False).basis_url
    params = AlignParams(methods=("zero-shot", "linear"), head_selection=False)
    before = plan_align(*urls, basis, params).fits
    presets = dict(residual.PRESETS)
    presets["linear"] = dataclasses.replace(presets["linear"], batch_size=32)
    monkeypatch.setattr(residual, "PRESETS", presets)
    after = plan_align(*urls, basis, params).fits
    assert after["zero-shot", 0] == before["zero-shot", 0]
    key, content = after["linear", 0]
    assert key == before["linear", 0][0] and content != before["linear", 0][1]  # row replaced


def test_stores_open_with_xarray(task):
    """Feature, spectral and align stores carry Zarr dimension_names: xarray opens them as they
    are, with the axes named and sized as the store's own reader says."""
    import xarray as xr

    from residual_core.engines.align import load_bases
    from residual_core.engines.spectral import run_spectral
    from residual_core.formats.feature_store import FeatureStore
    from residual_core.layout import Layout

    root, urls = task
    store = FeatureStore.open(urls[0])
    features = xr.open_zarr(urls[0], consolidated=False)
    assert features["heads"].dims == ("n", "layer", "head", "head_dim")
    assert features.sizes["n"] == store.dims.n and features.sizes["layer"] == store.dims.layer
    np.testing.assert_array_equal(features["labels"].values, store.labels)
    spectral_url = run_spectral(urls[0], tables_root=str(root / "st"), progress=False).url
    spectral = xr.open_zarr(spectral_url, consolidated=False)
    assert spectral["components"].dims == ("unit", "component", "embed")
    bases = load_bases(spectral_url)
    np.testing.assert_allclose(spectral["eigenvalues"].values[1], bases.eigenvalues[1])
    run_align(*urls, AlignParams(methods=("residual-star",), epochs=1, head_selection=False),
              progress=False)
    lam = xr.open_zarr(Layout.align_weights(urls[0]), group="residual-star/seed0/lambda",
                       consolidated=False)
    assert lam.data_vars and all(v.ndim == 1 for v in lam.data_vars.values())
