"""The explain stage's engine: each head of a feature store described in text, table
``head_texts``; and the concept query (which heads carry a text's direction).

A dictionary (:func:`load_dictionary`) is embedded once per (weights, dictionary content) with
the model's own text tower and cached in a Zarr store under ``<root>/text/`` (written in row
chunks, each marked done after it is written, so a killed run resumes). Heads are explained one
at a time: each head's contributions ``y_u [N, E]`` are read from the feature store alone
(bounded memory: one head, never all units), then :func:`~residual_core.method.explain.textspan`
or :func:`~residual_core.method.explain.somp` picks its descriptions.
"""

from __future__ import annotations

import difflib
import hashlib
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import zarr
from tqdm.auto import tqdm

from residual_core.errors import ResidualError, StoreError
from residual_core.formats.feature_store import FeatureStore
from residual_core.identity import WeightsId, config_hash
from residual_core.layout import Layout, zarr_target
from residual_core.method.explain import (
    class_separation,
    concept_scores,
    principal_directions,
    somp,
    textspan,
)
from residual_core.method.zeroshot import encode_texts
from residual_core.stages.explain import Params, Result
from residual_core.tables import has_rows, write_rows

EXPLAIN_VERSION = 2  # 2: the class_separation column
DICTIONARIES = {"textspan": "textspan_descriptions.txt", "world": "world_descriptions.txt"}
"""The dictionaries shipped with the package (``residual_core/resources``, origin in its
SOURCES.md), by the name ``--dictionary`` takes."""
TEXT_CHUNK = 256  # texts per chunk of the embedding cache: the unit of writing and resuming


@dataclass(frozen=True)
class Dictionary:
    """A text dictionary: its name as given, its descriptions, and the SHA-1 of its content."""

    name: str
    texts: tuple[str, ...]

    @property
    def sha1(self) -> str:
        return hashlib.sha1("\n".join(self.texts).encode()).hexdigest()


def load_dictionary(spec: str) -> Dictionary:
    """A shipped dictionary by name (:data:`DICTIONARIES`), a text file (one description a
    line; blank lines ignored) or ``FILE.parquet:COLUMN`` (a string column)."""
    if spec in DICTIONARIES:
        text = resources.files("residual_core.resources").joinpath(DICTIONARIES[spec]).read_text()
        texts = text.splitlines()
    else:
        path, _, column = spec.partition(".parquet:")
        if column:
            texts = _parquet_column(Path(path + ".parquet").expanduser(), column, spec)
        else:
            file = Path(spec).expanduser()
            if not file.is_file():
                raise ResidualError(f"unknown dictionary {spec!r}: use "
                                    f"{', '.join(DICTIONARIES)}, a text file (one description a "
                                    "line) or FILE.parquet:COLUMN")
            try:
                texts = file.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError:
                raise ResidualError(f"dictionary {spec!r} is not UTF-8 text") from None
    texts = tuple(t.strip() for t in texts if t and t.strip())
    if not texts:
        raise ResidualError(f"dictionary {spec!r} is empty: it needs at least one description")
    return Dictionary(spec, texts)


def _parquet_column(path: Path, column: str, spec: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise ResidualError(f"dictionary {spec!r}: no Parquet file {path}")
    try:
        tbl = pq.read_table(path, columns=[column])
    except (pa.ArrowInvalid, KeyError, OSError) as exc:
        raise ResidualError(f"dictionary {spec!r}: cannot read column {column!r} of {path} "
                            f"({str(exc).splitlines()[0]})") from None
    if not pa.types.is_string(tbl.schema.field(column).type) and \
            not pa.types.is_large_string(tbl.schema.field(column).type):
        raise ResidualError(f"dictionary {spec!r}: column {column!r} holds "
                            f"{tbl.schema.field(column).type}, not text")
    return [t for t in tbl.column(column).to_pylist() if t]


# ------------------------------------------------------------------------------ text embeddings


def text_embeddings(loaded, weights: WeightsId, dictionary: Dictionary, layout: Layout,
                    progress: bool = False) -> np.ndarray:
    """``[M, E]`` float32 unit-norm embeddings of the dictionary by the model's text tower,
    from the cache when there (resuming the chunks a killed run left undone)."""
    if not hasattr(loaded.model, "encode_text"):
        raise ResidualError(f"{weights.label} has no text tower: vision-only models need an "
                            "aligner to a text space and are not explained in text")
    url = layout.text_embeddings(weights, dictionary.sha1)
    n = len(dictionary.texts)
    group = _open_cache(url, n, dictionary, weights)
    done, emb = group["done"], group["embeddings"] if "embeddings" in group else None
    pending = np.flatnonzero(~done[...]).tolist()
    for c in tqdm(pending, desc="text embeddings", unit="chunk", disable=not progress):
        rows = slice(c * TEXT_CHUNK, min(n, (c + 1) * TEXT_CHUNK))
        vectors = encode_texts(loaded.model, loaded.tokenizer, dictionary.texts[rows]).numpy()
        if emb is None:
            emb = group.create_array("embeddings", shape=(n, vectors.shape[1]),
                                     chunks=(TEXT_CHUNK, vectors.shape[1]), dtype="float32")
        emb[rows] = vectors
        done[c] = True  # after the rows: a chunk marked done is whole
    return np.asarray(emb[...])


def _open_cache(url: str, n: int, dictionary: Dictionary, weights: WeightsId) -> zarr.Group:
    attrs = {"format": "residual-text-embeddings", "dictionary_sha1": dictionary.sha1,
             "n_texts": n, **weights.as_dict()}
    try:
        group = zarr.open_group(zarr_target(url), mode="r+")
        if all(group.attrs.get(k) == v for k, v in attrs.items()) and "done" in group:
            return group
    except (FileNotFoundError, ValueError, KeyError):
        pass
    group = zarr.open_group(zarr_target(url), mode="w")  # absent or foreign: start over
    group.attrs.update(attrs)
    group.create_array("done", shape=(-(-n // TEXT_CHUNK),), chunks=(1,), dtype=bool,
                       fill_value=False)
    return group


# ------------------------------------------------------------------------------ explain


def explain_key(feature_url: str, params: Params) -> str:
    """The content identity of the rows :func:`run_explain` writes for these inputs."""
    return _key(FeatureStore.open(feature_url), load_dictionary(params.dictionary), params)


def _key(store: FeatureStore, dictionary: Dictionary, params: Params) -> str:
    return "explain-" + config_hash({"features": store.attrs["config_hash"],
                                     "dictionary": dictionary.sha1,
                                     "params": params.identity(), "version": EXPLAIN_VERSION})


def _rows_key(feature_url: str, params: Params) -> str:
    """Which rows a run replaces: this store's rows of this method and dictionary name (an
    edited dictionary or other settings replace them; other methods or dictionaries stay), of
    the heads it names (a run of some heads never replaces a run of every head)."""
    chosen = {"units": sorted(params.units)} if params.units else {}
    return "explain-" + config_hash({"store": Layout.location(feature_url),
                                     "method": params.method, "dictionary": params.dictionary,
                                     **chosen})


def is_explained(feature_url: str, params: Params, tables_root: str) -> bool:
    """Whether ``head_texts`` holds the rows of exactly these inputs and parameters."""
    store = FeatureStore.open(feature_url)
    return _explained(store, _key(store, load_dictionary(params.dictionary), params), tables_root)


def _explained(store: FeatureStore, key: str, tables_root: str) -> bool:
    return has_rows(tables_root, "head_texts", store.attrs["model"], store.attrs["dataset"],
                    config_hash=key)


def _heads(store: FeatureStore, names: tuple[str, ...] = ()) -> list:
    """The store's heads (those named, in store order, when ``names`` is given)."""
    heads = [u for u in store.units if u.kind == "head"]
    if not heads:
        raise StoreError(f"{store.url} has no attention heads to explain")
    if not names:
        return heads
    by_name = {u.name: u for u in store.units}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(by_name), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ResidualError(f"unknown unit {unknown[0]!r} for --units{hint}: the heads of "
                            f"{store.attrs['model']} are L0H0..{heads[-1].name}")
    others = [n for n in names if by_name[n].kind != "head"]
    if others:
        raise ResidualError(f"--units {others[0]} is a {by_name[others[0]].kind} unit: only "
                            "attention heads are explained in text")
    return [u for u in heads if u.name in names]


def _loaded(store: FeatureStore):
    from residual_core.engines.extract import loaded_model

    return loaded_model(store.attrs["model"], store.attrs.get("pretrained"))


def _head_contributions(store: FeatureStore, unit) -> np.ndarray:
    """One head's ``y_u [N, E]`` float32 (only its raw chunks are read)."""
    return np.asarray(store.contributions([unit.index]).compute())[:, 0]


def run_explain(feature_url: str, params: Params | None = None, *, tables_root: str | None = None,
                progress: bool = False, force: bool = False) -> Result:
    """Explain every head of the feature store at ``feature_url`` in text; the rows (one per
    head and pick) go to the ``head_texts`` table. Returns without computing when the table
    already holds this result, unless ``force`` (then the rows are recomputed and replaced)."""
    params = params or Params()
    start = time.perf_counter()
    store = FeatureStore.open(feature_url)
    root = tables_root or Layout.of_store(feature_url).root
    dictionary = load_dictionary(params.dictionary)
    if params.texts_per_head > len(dictionary.texts):  # before any text is embedded
        raise ResidualError(f"--texts-per-head {params.texts_per_head} exceeds the "
                            f"{len(dictionary.texts)} descriptions of {dictionary.name!r}")
    key = _key(store, dictionary, params)
    heads = _heads(store, params.units)
    if not force and _explained(store, key, root):
        return Result(rows=len(heads) * params.texts_per_head, heads=len(heads), computed=False,
                      seconds=time.perf_counter() - start)
    weights = WeightsId.from_attrs(store.attrs)
    texts = text_embeddings(_loaded(store), weights, dictionary, Layout.of(root), progress)
    labels = store.labels
    rows = []
    for unit in tqdm(heads, desc=f"explain ({params.method})", unit="head",
                     disable=not progress):
        y = _head_contributions(store, unit)
        picks, directions = _explain_head(y, texts, params)
        separation = class_separation(y, directions, labels)
        rows += [{"unit": unit.name, "layer": unit.layer, "head": unit.head, "rank": i,
                  "text_index": int(t), "text": dictionary.texts[int(t)], "score": float(s),
                  "explained_variance": float(v), "class_separation": float(c)}
                 for i, ((t, s, v), c) in enumerate(zip(picks, separation))]
    who = {"model": store.attrs["model"], "dataset": store.attrs["dataset"],
           "split": store.attrs["split"], "feature_config_hash": store.attrs["config_hash"],
           "method": params.method, "dictionary": dictionary.name,
           "dictionary_sha1": dictionary.sha1}
    write_rows(root, "head_texts", [{**who, **r} for r in rows], key=_rows_key(feature_url, params),
               provenance={"pretrained": store.attrs.get("pretrained"), "config_hash": key})
    return Result(rows=len(rows), heads=len(heads), computed=True,
                  seconds=time.perf_counter() - start)


def _explain_head(y: np.ndarray, texts: np.ndarray, params: Params):
    """``(text index, score, explained variance)`` per pick, in pick order, and the picks'
    directions ``[k, E]`` (TextSpan: the deflated projected texts the data was deflated along;
    SOMP: the atoms)."""
    if params.method == "textspan":
        r = textspan(y, texts, params.texts_per_head, rank=min(params.rank, y.shape[1]))
        return list(zip(r.indices, r.scores, r.explained_variance)), r.directions
    r = somp(y, texts, params.texts_per_head)
    gained = np.diff(r.explained_variance, prepend=0.0)  # the authors' evr is cumulative
    return list(zip(r.atoms, r.weights, gained)), texts[r.atoms]


def concept_heads(feature_url: str, concepts: list[str], progress: bool = False,
                  rank: int | None = None) -> list[dict]:
    """Every head ranked by the variance of its contributions along each concept's text
    direction (the text side of the U|T ranking, as a query): rows ``concept, unit, variance,
    fraction`` (variance / the head's total variance), best first per concept.

    With ``rank``, also within each head's principal span: ``span_variance`` is the variance
    along the concept's projection on the head's top-``rank`` principal directions
    (renormalised; 0 when the span holds none of it) and ``span_fraction`` its share of the
    head's variance; heads are then ranked by ``span_variance``."""
    if not concepts or not all(c.strip() for c in concepts):
        raise ResidualError("give at least one non-empty concept text")
    if rank is not None and rank < 1:
        raise ResidualError(f"--rank must be at least 1, got {rank}")
    store = FeatureStore.open(feature_url)
    loaded = _loaded(store)
    if not hasattr(loaded.model, "encode_text"):
        raise ResidualError(f"{store.attrs['model']} has no text tower: a concept query needs one")
    directions = encode_texts(loaded.model, loaded.tokenizer, concepts).numpy()
    rows = []
    for unit in tqdm(_heads(store), desc="concept", unit="head", disable=not progress):
        y = _head_contributions(store, unit)
        total = float(np.var(y, axis=0).sum())
        scores = [concept_scores(y, directions)]
        if rank is not None:
            scores.append(concept_scores(y, directions, basis=principal_directions(y, rank)))
        for i, concept in enumerate(concepts):
            row = {"concept": concept, "unit": unit.name}
            for prefix, score in zip(("", "span_"), scores):
                row[prefix + "variance"] = float(score[i])
                row[prefix + "fraction"] = float(score[i]) / total if total > 0 else 0.0
            rows.append(row)
    key = "variance" if rank is None else "span_variance"
    rows.sort(key=lambda r: (concepts.index(r["concept"]), -r[key]))
    return rows
