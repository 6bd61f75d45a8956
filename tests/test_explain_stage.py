"""The explain stage on real stores: heads explained in text from a feature store, cached text
embeddings, the head_texts table, incremental reruns, the concept query and the CLI.

The numerical core (TextSpan, SOMP, concept scores against references) is tested in
``test_explain.py``; here the engine is checked against that core applied to contributions
computed independently (the model's own decomposition of the same images)."""

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from builders import write_image_folder
from residual_core.datasets import load_dataset
from residual_core.engines import explain as engine
from residual_core.engines.extract import extract
from residual_core.errors import ResidualError
from residual_core.formats.tables import TABLES
from residual_core.identity import EMBEDDED_MODEL, WeightsId
from residual_core.layout import Layout
from residual_core.method.decompose import decompose
from residual_core.method.explain import (
    class_separation,
    concept_scores,
    principal_directions,
    somp,
    textspan,
)
from residual_core.method.models import load_model
from residual_core.method.zeroshot import encode_texts
from residual_core.stages import STAGES
from residual_core.stages.explain import Inputs, Params
from residual_core.stages.extract import Params as ExtractParams
from residual_core.tables import read_table

TEXTS = ["a red square", "a blue circle", "a green field", "a dark night", "a bright sky",
         "a wooden table", "a small cat", "a large dog", "stripes", "dots", "noise", "text"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A random-weight tiny model's train store of a 3-class image folder, and a dictionary."""
    root = tmp_path_factory.mktemp("explain")
    folder = write_image_folder(root / "imgs", ["a", "b", "c"], 30, size=32, seed=2)
    tiny = load_model(EMBEDDED_MODEL, None, device="cpu")
    url = extract(EMBEDDED_MODEL, None, f"imagefolder:{folder}", "train",
                  ExtractParams(batch_size=16, rows_per_chunk=32, num_workers=0, device="cpu"),
                  store_root=root / "st", loaded=tiny, progress=False).url
    dictionary = root / "dictionary.txt"
    dictionary.write_text("\n".join(TEXTS) + "\n\n")
    return {"root": root, "store_root": str(root / "st"), "url": url, "folder": folder,
            "tiny": tiny, "dictionary": str(dictionary)}


def _rows(task, **filters):
    return read_table(task["store_root"], "head_texts", filters=filters or None).to_pylist()


def _params(task, **kw):
    return Params(dictionary=task["dictionary"], texts_per_head=3, rank=8, **kw)


@pytest.fixture(scope="module")
def independent(task):
    """The model's own decomposition of the store's images, in its row order: contributions
    ``[N, units, E]``, unit names, labels and the dictionary's text embeddings."""
    tiny = task["tiny"]
    data = load_dataset(f"imagefolder:{task['folder']}", "train", transform=tiny.preprocess)
    images = torch.stack([data[i][0] for i in range(len(data))])
    decomposed = decompose(tiny.model, images)
    return {"y": decomposed.contributions.numpy(), "names": [u.name for u in decomposed.units],
            "labels": np.array([data[i][1] for i in range(len(data))]),
            "texts": encode_texts(tiny.model, tiny.tokenizer, TEXTS).numpy()}


def test_explain_equals_textspan_on_independently_decomposed_contributions(task, independent):
    result = engine.run_explain(task["url"], _params(task), tables_root=task["store_root"])
    assert result.computed and result.heads == 16 and result.rows == 48  # 4 layers x 4 heads
    rows = _rows(task, method="textspan")
    assert len(rows) == 48
    y, names, texts = independent["y"], independent["names"], independent["texts"]
    for unit in ("L0H0", "L2H3"):
        expected = textspan(y[:, names.index(unit)], texts, 3, rank=8)
        got = sorted((r for r in rows if r["unit"] == unit), key=lambda r: r["rank"])
        assert [r["text"] for r in got] == [TEXTS[i] for i in expected.indices]
        np.testing.assert_allclose([r["explained_variance"] for r in got],
                                   expected.explained_variance, rtol=1e-3, atol=1e-6)
        separation = class_separation(y[:, names.index(unit)], expected.directions,
                                      independent["labels"])
        np.testing.assert_allclose([r["class_separation"] for r in got], separation,
                                   rtol=1e-3, atol=1e-6)


def test_rows_follow_the_table_spec_and_name_their_provenance(task):
    engine.run_explain(task["url"], _params(task), tables_root=task["store_root"])
    tbl = read_table(task["store_root"], "head_texts")
    assert set(tbl.schema.names) == {c.name for c in TABLES["head_texts"].columns}
    row = next(r for r in tbl.to_pylist() if r["method"] == "textspan")
    assert row["pretrained"] == "random" and row["split"] == "train"
    assert row["dictionary_sha1"] == engine.load_dictionary(task["dictionary"]).sha1
    assert row["config_hash"] == engine.explain_key(task["url"], _params(task))


def test_rerun_computes_nothing_and_an_edited_dictionary_replaces_its_rows(task, independent,
                                                                           tmp_path, monkeypatch):
    params = _params(task)
    engine.run_explain(task["url"], params, tables_root=task["store_root"])
    stage, inputs = STAGES["explain"], Inputs(feature_url=task["url"],
                                              tables_root=task["store_root"])
    assert stage.is_current(inputs, params)
    calls = []
    real = engine._explain_head
    monkeypatch.setattr(engine, "_explain_head", lambda *a: calls.append(1) or real(*a))
    assert not engine.run_explain(task["url"], params, tables_root=task["store_root"]).computed
    assert calls == []
    # another method is another result beside this one
    engine.run_explain(task["url"], _params(task, method="somp"), tables_root=task["store_root"])
    assert len(calls) == 16 and len(_rows(task, method="somp")) == 48
    assert len(_rows(task, method="textspan")) == 48
    # SOMP's eta^2 is taken along its atoms (the texts themselves)
    y, texts = independent["y"][:, independent["names"].index("L1H2")], independent["texts"]
    expected = somp(y, texts, 3)
    got = sorted(_rows(task, method="somp", unit="L1H2"), key=lambda r: r["rank"])
    assert [r["text"] for r in got] == [TEXTS[i] for i in expected.atoms]
    np.testing.assert_allclose([r["class_separation"] for r in got],
                               class_separation(y, texts[expected.atoms], independent["labels"]),
                               rtol=1e-3, atol=1e-6)
    # the same file with other content: not current, recomputed, its old rows replaced
    edited = tmp_path / "edited.txt"
    edited.write_text("\n".join(TEXTS[:6]))
    p = Params(dictionary=str(edited), texts_per_head=2, rank=8)
    engine.run_explain(task["url"], p, tables_root=task["store_root"])
    edited.write_text("\n".join(TEXTS[6:]))
    assert not stage.is_current(Inputs(feature_url=task["url"], tables_root=task["store_root"]), p)
    engine.run_explain(task["url"], p, tables_root=task["store_root"])
    rows = _rows(task, dictionary=str(edited))
    assert len(rows) == 32 and {r["text"] for r in rows} <= set(TEXTS[6:])


def test_text_embeddings_are_cached_and_a_killed_run_resumes(task, monkeypatch):
    tiny, layout = task["tiny"], Layout.of(task["store_root"])
    dictionary = engine.Dictionary("many", tuple(f"a photo of thing {i}" for i in range(600)))
    weights = WeightsId(EMBEDDED_MODEL, None)
    monkeypatch.setattr(engine, "TEXT_CHUNK", 256)
    full = engine.text_embeddings(tiny, weights, dictionary, layout)
    reference = encode_texts(tiny.model, tiny.tokenizer, dictionary.texts).numpy()
    np.testing.assert_allclose(full, reference, rtol=1e-5, atol=1e-6)
    # a run killed after its first chunk: the other chunks are not marked done
    import zarr
    group = zarr.open_group(layout.text_embeddings(weights, dictionary.sha1), mode="r+")
    group["done"][1:] = False
    group["embeddings"][256:] = 0
    encoded = []
    real = engine.encode_texts
    monkeypatch.setattr(engine, "encode_texts",
                        lambda m, t, texts: encoded.append(len(texts)) or real(m, t, texts))
    np.testing.assert_allclose(engine.text_embeddings(tiny, weights, dictionary, layout),
                               reference, rtol=1e-5, atol=1e-6)
    assert encoded == [256, 88]  # only the chunks left undone
    engine.text_embeddings(tiny, weights, dictionary, layout)
    assert encoded == [256, 88]


def test_concept_query_ranks_heads_by_variance_along_the_text(task):
    rows = engine.concept_heads(task["url"], ["a red square", "stripes"])
    assert [r["concept"] for r in rows[:16]] == ["a red square"] * 16
    first = rows[:16]
    assert [r["variance"] for r in first] == sorted((r["variance"] for r in first), reverse=True)
    from residual_core.formats.feature_store import FeatureStore

    store = FeatureStore.open(task["url"])
    unit = next(u for u in store.units if u.name == first[0]["unit"])
    y = np.asarray(store.contributions([unit.index]).compute())[:, 0]
    direction = encode_texts(task["tiny"].model, task["tiny"].tokenizer, ["a red square"]).numpy()
    assert first[0]["variance"] == pytest.approx(float(concept_scores(y, direction)[0]), rel=1e-6)
    # within each head's top-4 principal span: ranked by that score instead
    spans = [r for r in engine.concept_heads(task["url"], ["a red square"], rank=4)]
    assert [r["span_variance"] for r in spans] == sorted((r["span_variance"] for r in spans),
                                                         reverse=True)
    same = next(r for r in spans if r["unit"] == unit.name)
    assert same["variance"] == pytest.approx(first[0]["variance"], rel=1e-9)
    expected = concept_scores(y, direction, basis=principal_directions(y, 4))[0]
    assert same["span_variance"] == pytest.approx(float(expected), rel=1e-6)
    assert same["span_fraction"] == pytest.approx(same["span_variance"] / np.var(y, 0).sum(),
                                                  rel=1e-6)


@pytest.mark.parametrize("content, message", [("\n  \n", "is empty"),
                                              (None, "unknown dictionary")])
def test_bad_dictionaries_are_one_line_errors(task, tmp_path, content, message):
    spec = str(tmp_path / "d.txt")
    if content is not None:
        (tmp_path / "d.txt").write_text(content)
    with pytest.raises(ResidualError, match=message):
        engine.run_explain(task["url"], Params(dictionary=spec), tables_root=task["store_root"])


def test_more_texts_per_head_than_descriptions_is_refused(task, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("one\ntwo\n")
    with pytest.raises(ResidualError, match="exceeds the 2 descriptions"):
        engine.run_explain(task["url"], Params(dictionary=str(small), texts_per_head=3),
                           tables_root=task["store_root"])


def test_parquet_dictionaries_read_one_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b", None], "n": [1, 2, 3]}), tmp_path / "d.parquet")
    assert engine.load_dictionary(f"{tmp_path}/d.parquet:text").texts == ("a", "b")
    with pytest.raises(ResidualError, match="not text"):
        engine.load_dictionary(f"{tmp_path}/d.parquet:n")
    with pytest.raises(ResidualError, match="cannot read column"):
        engine.load_dictionary(f"{tmp_path}/d.parquet:missing")


def test_shipped_dictionaries_load():
    assert len(engine.load_dictionary("textspan").texts) == 3498
    world = engine.load_dictionary("world").texts
    assert "a red digit" in world


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True,
                          text=True, timeout=600)


def test_units_explains_only_those_heads_beside_a_run_of_every_head(task):
    """``units``: only the named heads are explained (the same picks as in a run of every
    head); their rows sit beside that run's, which stays current; bad names are refused."""
    full = _params(task)
    engine.run_explain(task["url"], full, tables_root=task["store_root"])
    some = _params(task, units="L2H3, L0H1,L2H3")
    assert some.units == ("L2H3", "L0H1")
    result = engine.run_explain(task["url"], some, tables_root=task["store_root"])
    assert result.computed and result.heads == 2 and result.rows == 6
    key = engine.explain_key(task["url"], some)
    mine = _rows(task, config_hash=key)
    assert sorted({r["unit"] for r in mine}) == ["L0H1", "L2H3"]
    every = {(r["unit"], r["rank"]): r["text"]
             for r in _rows(task, config_hash=engine.explain_key(task["url"], full))}
    assert len(every) == 48  # the run of every head is intact
    assert all(every[(r["unit"], r["rank"])] == r["text"] for r in mine)
    assert engine.is_explained(task["url"], full, task["store_root"])
    assert not engine.run_explain(task["url"], some, tables_root=task["store_root"]).computed
    forced = engine.run_explain(task["url"], some, tables_root=task["store_root"], force=True)
    assert forced.computed and sorted((r["unit"], r["rank"], r["text"]) for r in
                                      _rows(task, config_hash=key)) == sorted(
        (r["unit"], r["rank"], r["text"]) for r in mine)  # recomputed, replaced, not added
    for units, message in ((("L9H9",), "unknown unit 'L9H9'"), (("L1H9",), "did you mean"),
                           (("emb",), "only attention heads"),
                           (("L1.mlp",), "a mlp unit: only attention heads")):
        with pytest.raises(ResidualError, match=re.escape(message)):
            engine.run_explain(task["url"], _params(task, units=units),
                               tables_root=task["store_root"])


def test_cli_explain_and_heads(task):
    common = ["--model", EMBEDDED_MODEL, "--dataset", f"imagefolder:{task['folder']}",
              "--store-root", task["store_root"]]
    out = _cli("explain", *common, "--dictionary", task["dictionary"], "--texts-per-head", "2",
               "--rank", "4", "--quiet")
    assert out.returncode == 0, out.stderr
    assert "L2H3" in out.stdout and "16 heads, 32 rows" in out.stdout
    assert "class_separation" in out.stdout.splitlines()[0]
    out = _cli("explain", *common, "--dictionary", task["dictionary"], "--texts-per-head", "2",
               "--rank", "4", "--units", "L1H2,L3H0", "--quiet")
    assert out.returncode == 0, out.stderr
    shown = {line.split()[0] for line in out.stdout.splitlines()[1:] if line[:1] == "L"}
    assert shown == {"L1H2", "L3H0"} and "2 heads, 4 rows" in out.stdout
    for flags, state in (((), "up to date, nothing computed"), (("--force",), ": computed")):
        out = _cli("explain", *common, "--dictionary", task["dictionary"], "--texts-per-head",
                   "2", "--rank", "4", "--units", "L1H2,L3H0", "--quiet", *flags)
        assert out.returncode == 0 and state in out.stdout, out.stderr
    out = _cli("explain", *common, "--dictionary", task["dictionary"], "--units", "L7H0",
               "--quiet")
    assert out.returncode == 2 and "unknown unit 'L7H0'" in out.stderr
    out = _cli("heads", *common, "--concept", "a red square", "--top", "3", "--quiet")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("a red square") == 3
    out = _cli("heads", *common, "--concept", "a red square", "--top", "3", "--rank", "4",
               "--quiet")
    assert out.returncode == 0 and "span_variance" in out.stdout.splitlines()[0], out.stderr
    out = _cli("heads", *common, "--concept", "a red square", "--rank", "0", "--quiet")
    assert out.returncode == 2 and "--rank must be at least 1" in out.stderr
    out = _cli("explain", *common, "--dictionary", "nothing-here", "--quiet")
    assert out.returncode == 2 and "unknown dictionary" in out.stderr
    assert "Traceback" not in out.stderr
