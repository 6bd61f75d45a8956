"""The Prefect flows end to end (ephemeral mode): a grid cell on the tiny model runs every stage,
and reruns recompute exactly the stages whose inputs, parameters or outputs changed.

Prefect runs in ephemeral mode with a temporary PREFECT_HOME (set for the session in conftest.py).
"""

import csv
import dataclasses
import json
import os
import shutil
from collections import Counter

import numpy as np
import pytest
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import (  # noqa: E402
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.sorting import FlowRunSort  # noqa: E402
from prefect.exceptions import ParameterTypeError  # noqa: E402

from builders import write_image_folder  # noqa: E402
from pipelines.flows import experiment_flow, extract_flow, spectral_flow  # noqa: E402
from pipelines.grid import GridError, load_grid  # noqa: E402
from residual_core.engines import align as align_engine  # noqa: E402
from residual_core.engines import extract as extract_engine
from residual_core.engines import spectral as spectral_engine  # noqa: E402
from residual_core.formats.align_weights import stored_classifier  # noqa: E402
from residual_core.formats.feature_store import FeatureStore  # noqa: E402
from residual_core.formats.spectral_store import SpectralStore  # noqa: E402
from residual_core.identity import EMBEDDED_MODEL, WeightsId, parse_weights  # noqa: E402
from residual_core.layout import Layout  # noqa: E402
from residual_core.stages import STAGES, downstream, extract, spectral  # noqa: E402
from residual_core.tables import read_table  # noqa: E402

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module", autouse=True)
def _temporary_server():
    """Stop the temporary Prefect server this module started, after sending it the queued logs
    and events, while pytest still captures output (Prefect's exit hook would log to a closed
    stream, and workers with no server retry for a minute)."""
    yield
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer

    APILogWorker.drain_all(timeout=30)
    EventsWorker.drain_all(timeout=30)
    SubprocessASGIServer().stop()


STAGE_FUNCTIONS = {"extract": (extract_engine, "extract"),
                   "spectral": (spectral_engine, "run_spectral"),
                   "align": (align_engine, "run_align")}
"""Stage -> the residual_core engine function its stage runs (module, name)."""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An image folder, a store root, and the grid of one cell on them."""
    root = tmp_path_factory.mktemp("flows")
    folder = write_image_folder(root / "imgs", ["ant", "bee", "cow"], 24, seed=1)
    grid = {"name": "test",
            "sweeps": [{"models": [{"name": EMBEDDED_MODEL}],
                        "datasets": [f"imagefolder:{folder}"]}],
            "align": {"methods": ["residual-star"], "epochs": 2, "head_selection": False},
            "extract": {"rows_per_chunk": 32, "num_workers": 0},
            "spectral": {"twonn_max_samples": 500}}
    return {"root": root, "store": root / "store", "grid": grid}


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of the residual_core engines the stages run (the real functions still
    run: counting, not mocking)."""
    counter: Counter = Counter()
    kwargs: dict = {}

    def counting(stage, original):
        def wrapper(*args, **kw):
            counter[stage] += 1
            kwargs[stage] = kw
            return original(*args, **kw)
        return wrapper

    for stage, (module, name) in STAGE_FUNCTIONS.items():
        monkeypatch.setattr(module, name, counting(stage, getattr(module, name)))
    counter.kwargs = kwargs
    return counter


def _run(world, **kw) -> dict[str, list[str]]:
    """Run the grid; returns each stage's task-run states, in order."""
    report = experiment_flow(grid=world["grid"], store_root=str(world["store"]), **kw)
    states: dict[str, list[str]] = {}
    for run in report["runs"] + [r for c in report["cells"] for r in c["runs"]]:
        states.setdefault(run["stage"], []).append(run["state"])
    return states


def _latest_cell_task_states() -> dict[str, str]:
    """Task-run states of the latest ``cell`` flow run, as the Prefect API has them."""
    cells = FlowFilter(name=FlowFilterName(any_=["cell"]))
    with get_client(sync_client=True) as client:
        (cell,) = client.read_flow_runs(flow_filter=cells, sort=FlowRunSort.START_TIME_DESC,
                                        limit=1)
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[cell.id])))
    return {r.name: r.state.name for r in runs}


@pytest.fixture(scope="module")
def first_run(world):
    return _run(world)


def test_first_run_computes_every_stage_and_writes_the_tables(world, first_run):
    assert first_run == {"extract": ["Completed"] * 3, "spectral": ["Completed"],
                         "align": ["Completed"]}
    evaluations = read_table(world["store"], "evaluations").to_pylist()
    assert [r["method"] for r in evaluations] == ["residual-star"]
    assert read_table(world["store"], "unit_stats").num_rows == 21  # 1 + 4 + 4 * 4 units
    assert len(list((world["store"] / "stage-records").glob("*.json"))) == 5


def test_cell_runs_are_named_and_tagged_and_results_are_an_artifact(world, first_run):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from pipelines.flows import results_artifact_key

    cells = FlowFilter(name=FlowFilterName(any_=["cell"]))
    with get_client(sync_client=True) as client:
        (cell,) = client.read_flow_runs(flow_filter=cells, sort=FlowRunSort.START_TIME_DESC,
                                        limit=1)
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[
                results_artifact_key("test")])), limit=1)
    dataset = world["grid"]["sweeps"][0]["datasets"][0]
    assert cell.name == f"cell {EMBEDDED_MODEL}/random on {dataset}"
    assert {"grid:test", f"model:{EMBEDDED_MODEL}/random", f"dataset:{dataset}"} <= set(cell.tags)
    table = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    (row,) = read_table(world["store"], "evaluations").to_pylist()
    assert [(r["method"], r["test_acc"]) for r in table] == [("residual-star", row["test_acc"])]


def test_second_run_executes_no_stage_body(world, first_run, calls):
    from pipelines.tasks import on_stage_runs

    seen: list[dict] = []
    with on_stage_runs(seen.append):  # what the run's progress bar counts
        states = _run(world)
    assert [r["stage"] for r in seen] == ["extract"] * 3 + ["spectral", "align"]
    assert {r["state"] for r in seen} == {"Cached"}
    assert states == {"extract": ["Cached"] * 3, "spectral": ["Cached"], "align": ["Cached"]}
    assert sum(calls.values()) == 0
    api = _latest_cell_task_states()
    assert len(api) == 5 and set(api.values()) == {"Cached"}, api


def test_changing_an_align_parameter_reruns_only_align(world, first_run, calls):
    world["grid"]["align"]["epochs"] = 3
    try:
        states = _run(world)
        assert states == {"extract": ["Cached"] * 3, "spectral": ["Cached"],
                          "align": ["Completed"]}
        assert calls == {"align": 1}
        rows = read_table(world["store"], "evaluations").to_pylist()
        assert sorted(json.loads(r["preset_params"])["epochs"] for r in rows) == [2, 3]
    finally:
        world["grid"]["align"]["epochs"] = 2
    # back to the old parameters: that fit is still in the tables, side by side
    assert _run(world)["align"] == ["Cached"]
    assert calls == {"align": 1}


def test_deleted_spectral_output_reruns_spectral_only(world, first_run, calls):
    shutil.rmtree(Layout.spectral_store(_train_store(world)))
    states = _run(world)
    assert states == {"extract": ["Cached"] * 3, "spectral": ["Completed"], "align": ["Cached"]}
    assert calls == {"spectral": 1}


@pytest.mark.parametrize("table", spectral.TABLES)
def test_deleted_spectral_table_is_rewritten_from_the_store(world, first_run, calls, table):
    from residual_core.tables import tables_root

    rows = read_table(world["store"], table).num_rows
    shutil.rmtree(tables_root(world["store"]) / table)
    states = _run(world)
    assert states == {"extract": ["Cached"] * 3, "spectral": ["Completed"], "align": ["Cached"]}
    assert read_table(world["store"], table).num_rows == rows


def test_force_spectral_reruns_spectral_and_align(world, first_run, calls):
    before = SpectralStore.open(Layout.spectral_store(_train_store(world))).attrs["created_at"]
    states = _run(world, force=["spectral"])
    assert states == {"extract": ["Cached"] * 3, "spectral": ["Completed"],
                      "align": ["Completed"]}
    assert calls == {"spectral": 1, "align": 1}
    # recomputed (the store was discarded first), not found up to date
    assert SpectralStore.open(Layout.spectral_store(_train_store(world))).attrs[
        "created_at"] != before


def test_force_align_refits_the_fits_already_in_the_tables(world, first_run, monkeypatch):
    """align keeps its results as table rows: forced, it fits again and replaces them (before,
    the run found every fit's row and reused it, so --force align did nothing)."""
    fits = Counter()
    original = align_engine.fit

    def counting_fit(method, *args, **kw):
        fits[method] += 1
        return original(method, *args, **kw)

    monkeypatch.setattr(align_engine, "fit", counting_fit)
    assert _run(world)["align"] == ["Cached"] and not fits
    rows = read_table(world["store"], "evaluations").num_rows
    states = _run(world, force=["align"])
    assert states == {"extract": ["Cached"] * 3, "spectral": ["Cached"], "align": ["Completed"]}
    assert fits == {"residual-star": 1}
    assert read_table(world["store"], "evaluations").num_rows == rows  # replaced, not added


def test_spectral_flow_runs_on_a_dask_cluster(world, first_run, calls):
    model = {"name": EMBEDDED_MODEL}
    dataset = world["grid"]["sweeps"][0]["datasets"][0]
    url = spectral_flow(model=model, dataset=dataset, store_root=str(world["store"]),
                        settings=world["grid"]["spectral"], extract=world["grid"]["extract"],
                        force=["spectral"], n_workers=1)
    assert url == Layout.spectral_store(_train_store(world))
    assert calls == {"spectral": 1}
    assert calls.kwargs["spectral"]["n_workers"] == 1


def test_world_weights_and_a_basis_dataset(world, calls):
    """Pretrained weights and the basis dataset's bases are made once, in the parent flow; the
    cell aligns with them and compares its own bases with them (basis similarity)."""
    basis = write_image_folder(world["root"] / "basis", ["dog", "elk", "fox"], 20, seed=7)
    grid = json.loads(json.dumps(world["grid"]))
    grid["sweeps"][0].update(models=[{"name": EMBEDDED_MODEL, "pretrained": "world"}],
                             basis=f"imagefolder:{basis}")
    grid.update(pretrain={"steps": 2, "batch_size": 8}, similarity_evr=0.9)
    grid["align"].update(methods=["zero-shot"], head_selection=True, random_seeds=2)
    store = world["root"] / "store-basis"
    report = experiment_flow(grid=grid, store_root=str(store))
    assert [(r["stage"], r["state"]) for r in report["runs"]] == [
        ("pretrain", "Completed"), ("extract", "Completed"), ("spectral", "Completed")]
    (cell,) = report["cells"]
    assert [(r["stage"], r["state"]) for r in cell["runs"]] == (
        [("extract", "Completed")] * 3 + [("align", "Completed"), ("spectral", "Completed"),
                                          ("similarity", "Completed")])
    (row,) = read_table(store, "evaluations").to_pylist()
    assert row["basis_dataset"] == f"imagefolder:{basis}:train"
    assert row["pretrained"].endswith(".pt") and os.path.isfile(row["pretrained"])
    assert read_table(store, "head_selection").num_rows > 0
    similarity = read_table(store, "basis_similarity").to_pylist()
    assert len(similarity) == 21 and {r["other_dataset"] for r in similarity} == {
        f"imagefolder:{basis}"}
    again = experiment_flow(grid=grid, store_root=str(store))
    states = [r["state"] for r in again["runs"] + again["cells"][0]["runs"]]
    assert set(states) == {"Cached"} and len(states) == 9
    assert calls == {"extract": 4, "spectral": 2, "align": 1}  # all in the first run
    # report --grid finds the cell's world checkpoint from the grid's pretrain settings
    from pipelines.cli import main

    path = world["root"] / "basis-grid.json"
    path.write_text(json.dumps(grid))
    assert main(["report", "--grid", str(path), "--store-root", str(store)]) == 0
    written = store / "reports" / "grid-test"
    assert (written / "grid_report.md").is_file() and (written / "specialisation.png").is_file()
    (summary,) = list(csv.DictReader(open(written / "specialisation.csv")))
    assert float(summary["zero_shot"]) == pytest.approx(row["test_acc"])  # 'all' = zero-shot
    assert summary["gain"] == ""  # residual-star was not fitted


def test_compare_flow_compares_two_embedded_models(world, calls):
    """Two pretraining seeds of the embedded model on one split: basis similarity with the
    authors' score and the cross-model correlations, both cached on a rerun; deleting the
    cross_model table makes the similarity stage run again."""
    from pipelines.flows import compare_flow
    from pipelines.grid import ModelSpec
    from residual_core.stages.pretrain import Params as PretrainParams

    dataset = world["grid"]["sweeps"][0]["datasets"][0]
    store = world["root"] / "store-compare"
    model = ModelSpec(name=EMBEDDED_MODEL, pretrained="world")
    kw = dict(pretrain=PretrainParams(steps=2, batch_size=8),
              other_pretrain=PretrainParams(seed=1, steps=2, batch_size=8),
              store_root=str(store))
    result = compare_flow(model, model, dataset, **kw)
    first, second = result["weights"]
    assert first != second and "seed1" in os.path.basename(second)
    assert [(r["stage"], r["state"]) for r in result["runs"]] == (
        [("pretrain", "Completed"), ("pretrain", "Completed")]
        + [("extract", "Completed"), ("spectral", "Completed")] * 2
        + [("similarity", "Completed")])
    similarity = read_table(store, "basis_similarity").to_pylist()
    assert len(similarity) == 21 and {r["other_pretrained"] for r in similarity} == {second}
    assert all(0 <= r["authors"] <= 1 + 1e-9 for r in similarity)
    cross = read_table(store, "cross_model").to_pylist()
    assert {r["statistic"] for r in cross} == {"k90", "twonn", "cumulative_evr"}
    assert {r["n_heads"] for r in cross} == {16}
    again = compare_flow(model, model, dataset, **kw)
    assert {r["state"] for r in again["runs"]} == {"Cached"}
    shutil.rmtree(store / "tables" / "cross_model")
    third = compare_flow(model, model, dataset, **kw)
    assert [r["stage"] for r in third["runs"] if r["state"] != "Cached"] == ["similarity"]
    assert read_table(store, "cross_model").num_rows == 3


def test_hf_towers_run_the_whole_pipeline(world, tmp_path):
    """A small DINOv2 (vision only: class prototypes) and a small HF CLIP (its own text tower),
    saved with save_pretrained and named hf:DIR, through extract -> spectral -> align in the
    flows, with the same stores and tables as open_clip models; a rerun computes nothing."""
    from hf_builders import save_hf

    dino, clip = tmp_path / "dino", tmp_path / "clip"
    save_hf("Dinov2Model", dino, layers=2, heads=2, width=32)
    save_hf("CLIPModel", clip, layers=2, heads=2, width=32)
    grid = json.loads(json.dumps(world["grid"]))
    grid["sweeps"][0]["models"] = [{"name": f"hf:{dino}"}, {"name": f"hf:{clip}"}]
    grid["align"]["methods"] = ["zero-shot", "residual-star"]
    store = tmp_path / "store"
    report = experiment_flow(grid=grid, store_root=str(store))
    states = Counter((r["stage"], r["state"]) for c in report["cells"] for r in c["runs"])
    assert states == {("extract", "Completed"): 6, ("spectral", "Completed"): 2,
                      ("align", "Completed"): 2}
    rows = read_table(store, "evaluations").to_pylist()
    by_model = {(r["model"], r["method"]): r for r in rows}
    names = {f"hf:{dino.resolve()}": "centroid", f"hf:{clip.resolve()}": "text"}
    assert set(by_model) == {(m, k) for m in names for k in ("zero-shot", "residual-star")}
    for (model, _), row in by_model.items():
        assert row["classifier"] == names[model] and 0 <= row["test_acc"] <= 1
    stats = read_table(store, "unit_stats").to_pylist()
    assert Counter(r["model"] for r in stats) == {m: 1 + 2 + 2 * 2 for m in names}
    dataset = grid["sweeps"][0]["datasets"][0]
    for folder, text in ((dino, False), (clip, True)):
        weights = parse_weights(f"hf:{folder}", None)
        train = FeatureStore.open(Layout.of(store).feature_store(weights, dataset, "train"))
        assert train.text_tower is text and train.attrs["checkpoint_sha256"] == \
            weights.checkpoint_sha256
        # the classifier every method used is stored with the λ: prototypes = class means
        name = "text" if text else "centroid"
        stored = stored_classifier(Layout.align_weights(train.url), name)
        if text:
            np.testing.assert_array_equal(stored, train.class_weights)
        else:
            y = train.contributions().sum(1).compute()
            means = np.stack([y[train.labels == c].mean(0) for c in range(3)])
            np.testing.assert_allclose(stored, means, rtol=1e-5, atol=1e-6)
    again = experiment_flow(grid=grid, store_root=str(store))
    assert {r["state"] for c in again["cells"] for r in c["runs"]} == {"Cached"}


def _train_store(world) -> str:
    return Layout.of(world["store"]).feature_store(
        WeightsId(EMBEDDED_MODEL), world["grid"]["sweeps"][0]["datasets"][0], "train")


# ------------------------------------------------------------------------------ validation


BAD_GRIDS = {
    "unknown dataset 'cifar1O'": lambda g: g["sweeps"][0].update(datasets=["cifar1O"]),
    "unknown model 'ViT-B-61'": lambda g: g["sweeps"][0].update(models=[{"name": "ViT-B-61"}]),
    "unknown methods": lambda g: g["align"].update(methods=["residual-turbo"]),
    "align.epochs": lambda g: g["align"].update(epochs="many"),
}


@pytest.mark.parametrize("message", list(BAD_GRIDS))
def test_bad_grid_is_refused_before_any_task_runs(world, calls, tmp_path, message):
    grid = json.loads(json.dumps(world["grid"]))
    BAD_GRIDS[message](grid)
    # a grid given as data is a flow parameter: Prefect validates it before the flow starts
    with pytest.raises(ParameterTypeError, match=message):
        experiment_flow(grid=grid, store_root=str(world["store"]))
    # a grid file is loaded and validated first thing in the flow
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(grid))
    with pytest.raises(GridError, match=message):
        experiment_flow(grid=str(path), store_root=str(world["store"]))
    assert sum(calls.values()) == 0


def test_flow_parameters_are_validated_by_prefect(world, calls):
    with pytest.raises(ParameterTypeError, match="unknown model"):
        extract_flow(model={"name": "no-such-model"}, dataset="world/digit")
    with pytest.raises(ParameterTypeError):
        experiment_flow(grid=42)
    assert sum(calls.values()) == 0


# ------------------------------------------------------------------------------ keys


def test_force_closure_follows_the_stage_graph():
    assert downstream(["spectral"]) == {"spectral", "align", "similarity"}
    assert downstream(["pretrain"]) == set(STAGES)
    assert downstream(["align"]) == {"align"}
    assert downstream([]) == set()


def test_stage_key_covers_upstream_identity_parameters_and_version(world, first_run,
                                                                   monkeypatch):
    stage = STAGES["spectral"]
    inputs = spectral.Inputs(feature_url=_train_store(world), tables_root=str(world["store"]))
    params = spectral.Params()
    key = stage.key(inputs, params)
    assert stage.key(inputs, params) == key
    assert stage.key(inputs.model_copy(update={"n_workers": 2}), params) == key  # run-only
    assert stage.key(inputs, spectral.Params(seed=1)) != key
    assert dataclasses.replace(stage, version=99).key(inputs, params) != key
    # the upstream store's content identity: its config_hash attribute
    monkeypatch.setattr(spectral, "_feature_hash", lambda url: "another-store")
    assert stage.key(inputs, params) != key


def test_extract_key_is_the_store_config_hash_and_ignores_run_only_settings(world, first_run):
    stage = STAGES["extract"]
    inputs = extract.Inputs(model=EMBEDDED_MODEL, dataset=world["grid"]["sweeps"][0]["datasets"][0],
                            split="train", store_root=str(world["store"]))
    params = extract.Params(**world["grid"]["extract"])
    store = FeatureStore.open(inputs.store_url(params))
    assert stage.identity(inputs, params)["config_hash"] == store.attrs["config_hash"]
    assert stage.is_current(inputs, params)
    slower = params.model_copy(update={"batch_size": 3, "device": "cpu"})
    assert stage.key(inputs, slower) == stage.key(inputs, params) and stage.is_current(inputs, slower)
    other = params.model_copy(update={"rows_per_chunk": 8})
    assert stage.key(inputs, other) != stage.key(inputs, params)
    assert not stage.is_current(inputs, other)


def test_a_tampered_stage_record_is_recomputed_never_executed(world, first_run, calls, tmp_path):
    import pickle

    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    records = sorted((world["store"] / "stage-records").glob("align-*.json"))
    assert records
    for record in records:
        record.write_bytes(pickle.dumps(Payload()))
    states = _run(world)
    assert states["align"] == ["Completed"] and calls == {"align": 1}
    assert not marker.exists()
    assert _run(world)["align"] == ["Cached"]  # the record was rewritten as JSON


def test_grid_settings_are_the_stage_params():
    settings = load_grid("demo").settings()
    for name in ("align", "extract", "spectral", "pretrain"):
        assert type(getattr(settings, name)) is STAGES[name].Params
    for name in ("demo", "paper", "smoke"):
        assert load_grid(name).cells()
