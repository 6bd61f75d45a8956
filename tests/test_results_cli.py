"""`residual results` against tables of known rows (and of a real `residual run`): filters,
group-by, formats that parse back, one-line errors with exit status 2."""

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from builders import write_image_folder
from pipelines.cli import main
from residual_core.tables import write_rows

BIN = Path(sys.executable).parent

ROWS = [  # model, dataset, method, seed, test_acc, trainable_parameters
    ("ViT-B-16", "cifar10", "zero-shot", 0, 0.90, 0),
    ("ViT-B-16", "cifar10", "coarse", 0, 0.92, 144),
    ("ViT-B-16", "cifar10", "coarse", 1, 0.94, 144),
    ("ViT-B-16", "mnist", "coarse", 0, 0.80, 144),
    ("ViT-L-14", "cifar10", "coarse", 0, 0.96, 384),
    ("ViT-L-14", "cifar10", "linear", 0, 0.97, 590_592),
]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tables")
    rows = [dict(zip(("model", "dataset", "method", "seed", "test_acc", "trainable_parameters"),
                     r)) for r in ROWS]
    for (model, dataset) in {(r["model"], r["dataset"]) for r in rows}:
        write_rows(root, "evaluations", [r for r in rows if (r["model"], r["dataset"]) ==
                                         (model, dataset)], key="known")
    return root


def _results(capsys, root, *args) -> tuple[int, str, str]:
    code = main(["results", "--store-root", str(root), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_filter_answers_with_the_matching_rows(capsys, root):
    code, out, _ = _results(capsys, root, "--model", "ViT-B-16", "--dataset", "cifar10",
                            "--method", "coarse", "--format", "json")
    assert code == 0
    rows = json.loads(out)
    assert sorted((r["seed"], r["test_acc"]) for r in rows) == [(0, 0.92), (1, 0.94)]
    assert {(r["model"], r["dataset"], r["method"]) for r in rows} == {
        ("ViT-B-16", "cifar10", "coarse")}


def test_group_by_prints_counts_and_means(capsys, root):
    code, out, _ = _results(capsys, root, "--group-by", "model,method", "--format", "json")
    assert code == 0
    groups = {(g["model"], g["method"]): g for g in json.loads(out)}
    assert set(groups) == {("ViT-B-16", "zero-shot"), ("ViT-B-16", "coarse"),
                           ("ViT-L-14", "coarse"), ("ViT-L-14", "linear")}
    coarse = groups[("ViT-B-16", "coarse")]
    assert coarse["count"] == 3
    assert coarse["mean_test_acc"] == pytest.approx((0.92 + 0.94 + 0.80) / 3)
    assert coarse["mean_seed"] == pytest.approx(1 / 3)
    assert "mean_dataset" not in coarse  # only numeric columns are averaged
    code, out, _ = _results(capsys, root, "--group-by", "method")
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["method", "count", "mean_trainable_parameters"]  # spec order
    assert [line.split()[:2] for line in lines[1:]] == [["coarse", "4"], ["linear", "1"],
                                                        ["zero-shot", "1"]]


def test_group_by_gives_the_spread_over_seeds_and_columns_select(capsys, root):
    code, out, _ = _results(capsys, root, "--dataset", "cifar10", "--group-by", "model,method",
                            "--columns", "test_acc", "--format", "json")
    assert code == 0
    groups = {(g["model"], g["method"]): g for g in json.loads(out)}
    coarse = groups[("ViT-B-16", "coarse")]
    assert set(coarse) == {"model", "method", "count", "mean_test_acc", "std_test_acc"}
    assert coarse["std_test_acc"] == pytest.approx(float(np.std([0.92, 0.94], ddof=1)))
    assert groups[("ViT-B-16", "zero-shot")]["std_test_acc"] is None  # one seed: no spread
    code, out, _ = _results(capsys, root, "--columns", "method,seed", "--method", "coarse",
                            "--format", "csv")
    assert out.splitlines()[0] == "method,seed" and len(out.splitlines()) == 5
    code, _, err = _results(capsys, root, "--columns", "seed,nope")
    assert code == 2 and "no column 'nope'" in err


def test_pretrained_filter_and_random_weights(capsys, tmp_path):
    for weights in ("openai", None):
        write_rows(tmp_path, "evaluations", [{"model": "ViT-B-16", "dataset": "cifar10",
                                              "method": "zero-shot", "test_acc": 0.5}],
                   key=str(weights), provenance={"pretrained": weights})
    for given, expected in (("openai", ["openai"]), ("random", ["random"])):  # never null
        code, out, _ = _results(capsys, tmp_path, "--pretrained", given, "--format", "json")
        assert code == 0 and [r["pretrained"] for r in json.loads(out)] == expected


def test_a_closed_pipe_is_no_traceback(root):
    with subprocess.Popen([str(BIN / "residual"), "results", "--store-root", str(root),
                           "--format", "csv"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:
        proc.stdout.close()  # the reader is gone before anything is printed (`| head -0`)
        err = proc.stderr.read().decode()
        proc.wait(timeout=120)
    assert "Traceback" not in err and "Error" not in err, err


def test_csv_and_json_parse_back_to_the_same_rows(capsys, root):
    _, as_json, _ = _results(capsys, root, "--dataset", "cifar10", "--format", "json")
    _, as_csv, _ = _results(capsys, root, "--dataset", "cifar10", "--format", "csv")
    from_json = json.loads(as_json)
    from_csv = list(csv.DictReader(io.StringIO(as_csv)))
    assert len(from_json) == len(from_csv) == 5
    for j, c in zip(from_json, from_csv):
        assert set(j) == set(c)
        assert (c["model"], c["method"], int(c["seed"]), float(c["test_acc"])) == \
            (j["model"], j["method"], j["seed"], j["test_acc"])


def test_sql_over_the_tables(capsys, root):
    code, out, _ = _results(capsys, root, "--sql", "SELECT method, max(test_acc) AS best FROM "
                            "evaluations GROUP BY method ORDER BY method", "--format", "csv")
    assert code == 0
    assert list(csv.reader(io.StringIO(out))) == [["method", "best"], ["coarse", "0.96"],
                                                  ["linear", "0.97"], ["zero-shot", "0.9"]]


@pytest.mark.parametrize("args, message", [
    (["--group-by", "nope"], "has no column 'nope'"),
    (["--table", "unit_stats"], "no 'unit_stats' table"),
    (["--sql", "SELECT * FROM nope"], "SQL error"),
    (["--sql", "SELECT 1", "--model", "ViT-B-16"], "cannot be combined with --model"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, root, args, message):
    code, out, err = _results(capsys, root, *args)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("residual: error:") and message in lines[0]


def test_report_needs_the_weights_when_several_were_evaluated(tmp_path):
    from residual_core.errors import ResidualError
    from residual_core.report.markdown import model_report

    for weights, dataset in (("openai", "cifar10"), ("laion2b_s34b_b88k", "mnist")):
        write_rows(tmp_path, "evaluations", [{"model": "ViT-B-16", "dataset": dataset,
                                              "method": "zero-shot", "test_acc": 0.5}],
                   key=weights, provenance={"pretrained": weights})
    with pytest.raises(ResidualError, match="several weights: pass one of "
                                            "laion2b_s34b_b88k, openai"):
        model_report(tmp_path, "ViT-B-16")
    with pytest.raises(ResidualError, match="not evaluated on mnist; evaluated: cifar10"):
        model_report(tmp_path, "ViT-B-16", "openai", datasets=["mnist"])


def test_bad_column_exits_2_through_the_console_script(root):
    proc = subprocess.run([str(BIN / "residual"), "results", "--store-root", str(root),
                           "--method", "coarse", "--group-by", "test_acc,missing"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("residual: error:") and "no column 'missing'" in line


@pytest.mark.slow
def test_results_of_a_real_run(tmp_path, capsys):
    """`residual run` (ephemeral Prefect) writes the tables that `residual results` then
    answers from; with no PREFECT_HOME set, Prefect's history is kept under the data root."""
    folder = write_image_folder(tmp_path / "imgs", ["ant", "bee"], 20, seed=2)
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({
        "name": "cli-test",
        "sweeps": [{"models": [{"name": "residual-tiny"}], "datasets": [f"imagefolder:{folder}"]}],
        "align": {"methods": ["zero-shot", "coarse"], "epochs": 2, "head_selection": False},
        "extract": {"rows_per_chunk": 32, "num_workers": 0},
        "spectral": {"twonn_max_samples": 500}}))
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env.update(HF_HUB_OFFLINE="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    store = tmp_path / "store"
    run = subprocess.run([str(BIN / "residual"), "run", "--grid", str(grid), "--store-root",
                          str(store)], env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "grid cli-test: 1 cells; 5 stage runs: 5 computed, 0 cached" in run.stdout
    assert (store / "prefect" / "prefect.db").is_file()  # the run's history, beside its data
    code, out, _ = _results(capsys, store, "--group-by", "method", "--format", "json")
    assert code == 0
    groups = {g["method"]: g for g in json.loads(out)}
    assert set(groups) == {"zero-shot", "coarse"}
    assert groups["coarse"]["mean_trainable_parameters"] == 16  # one scalar per head (4 x 4)
    code, out, _ = _results(capsys, store, "--table", "unit_stats", "--group-by", "kind",
                            "--format", "csv")
    counts = {r["kind"]: int(r["count"]) for r in csv.DictReader(io.StringIO(out))}
    assert counts == {"emb": 1, "mlp": 4, "head": 16}
    # `residual report` finds the run's stores from its tables (random weights: "random")
    code = main(["report", "--model", "residual-tiny", "--store-root", str(store)])
    out, _ = capsys.readouterr()
    report = store / "reports" / "residual-tiny-random" / "report.md"
    assert code == 0 and f"report: {report}" in out and "coarse" in out
    text = report.read_text()
    for png in ("accuracy_vs_parameters.png", "head_zero_shot.png"):
        assert (report.parent / png).stat().st_size > 1000 and png in text
    for args, message in ((["--pretrained", "openai"], "evaluated: random"),
                          (["--dataset", "cifar10"], "not evaluated on cifar10")):
        code = main(["report", "--model", "residual-tiny", "--store-root", str(store), *args])
        _, err = capsys.readouterr()
        assert code == 2 and message in err


def test_a_dataset_given_as_files_answers_to_its_short_name(tmp_path, capsys):
    """`--dataset pets` finds the rows of `imagefolder:/…/pets` (and `eurosat` those of
    `hf-dataset:tanganke/eurosat`); a short name of two datasets is refused naming both."""
    names = ["imagefolder:/data/a/pets", "hf-dataset:tanganke/eurosat", "imagefolder:/x/cats",
             "imagefolder:/y/cats", "cifar10"]
    for i, dataset in enumerate(names):
        write_rows(tmp_path, "evaluations", [{"model": "ViT-B-16", "dataset": dataset,
                                              "method": "coarse", "test_acc": i / 10}], key="k")
    for short, full in (("pets", names[0]), ("eurosat", names[1]), ("cifar10", "cifar10"),
                        (names[2], names[2])):
        code, out, _ = _results(capsys, tmp_path, "--dataset", short, "--format", "json")
        assert code == 0 and [r["dataset"] for r in json.loads(out)] == [full]
    code, _, err = _results(capsys, tmp_path, "--dataset", "cats")
    assert code == 2 and "short name of 2 datasets" in err and "imagefolder:/y/cats" in err
    code, _, err = _results(capsys, tmp_path, "--dataset", "dogs")
    assert code == 2 and "no 'evaluations' table under" in err and "for dataset dogs (run" in err
