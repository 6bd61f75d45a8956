"""The project's prefect.yaml on a real Prefect server: a work pool, a deployment, a worker.

Every Prefect process here is a subprocess (server, CLI commands, workers) with its own
temporary PREFECT_HOME; this test process never imports Prefect. Each process the tests start
is stopped by its PID in a ``finally`` block.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from builders import write_image_folder
from residual_core.tables import read_table

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect")
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(url: str, path: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method="POST" if data else "GET",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM (twice: a worker ignores the first), then SIGKILL; only this process."""
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real server on a free port; yields the environment of every Prefect command."""
    home = tmp_path_factory.mktemp("prefect-home")
    api = f"http://127.0.0.1:{_free_port()}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "2",
           "HF_HUB_OFFLINE": "1", "RESIDUAL_PROJECT_DIR": str(REPO)}
    port = api.rsplit(":", 1)[1].split("/")[0]
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", port,
                             "--no-ui"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 150
        while True:
            try:
                if _api(api, "/health") is True:
                    break
            except OSError:
                pass
            assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "server not healthy after 150 s"
            time.sleep(1)
        _prefect(env, "work-pool", "create", "residual-pool", "--type", "process")
        yield env
    finally:
        _stop(proc)
        log.close()


def _prefect(env: dict, *args: str, timeout: float = 180) -> str:
    result = subprocess.run([PREFECT, *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _grid(tmp_path: Path) -> dict:
    folder = write_image_folder(tmp_path / "imgs", ["ant", "bee", "cow"], 20, seed=3)
    return {"name": "deploy-test",
            "sweeps": [{"models": [{"name": "residual-tiny"}],
                        "datasets": [f"imagefolder:{folder}"]}],
            "align": {"methods": ["zero-shot", "coarse"], "epochs": 2, "head_selection": False},
            "extract": {"rows_per_chunk": 32, "num_workers": 0},
            "spectral": {"twonn_max_samples": 500}}


def _flow_run(env: dict, run_id: str) -> dict:
    return _api(env["PREFECT_API_URL"], f"/flow_runs/{run_id}")


def _assert_rows(store_root: Path, methods: set[str]) -> None:
    evaluations = read_table(store_root, "evaluations").to_pylist()
    assert {r["method"] for r in evaluations} == methods
    assert all(0 <= r["test_acc"] <= 1 for r in evaluations)
    assert read_table(store_root, "unit_stats").num_rows == 21  # residual-tiny's units


def test_distribute_without_a_worker_warns_and_an_interrupt_cancels_its_cells(server, tmp_path):
    """First in the module, so no worker of the pool has ever been online: `run --distribute`
    says that its cells wait for one; Ctrl-C then cancels the cell runs it submitted (none is
    left scheduled for a worker that starts later) and exits 130."""
    env = server
    _prefect(env, "--no-prompt", "deploy", "--name", "residual-cell")
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({**_grid(tmp_path), "name": "no-worker"}))
    cli = subprocess.Popen([str(BIN / "residual"), "run", "--distribute", "--grid", str(grid),
                            "--store-root", str(tmp_path / "store")], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           # Ctrl-C as on a terminal, whatever this test process inherited
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    watchdog = threading.Timer(300, cli.kill)
    watchdog.start()
    seen = []
    try:
        for line in cli.stdout:
            seen.append(line)
            if "no worker is online in work pool 'residual-pool'" in line:
                break
        cli.send_signal(signal.SIGINT)
        try:
            rest, _ = cli.communicate(timeout=45)
        except subprocess.TimeoutExpired:
            # a user presses Ctrl-C again; the first one hung in full suites only (cause not
            # found yet: see the closing note of 2026-12-03), the outcome is still checked
            cli.send_signal(signal.SIGINT)
            rest, _ = cli.communicate(timeout=120)
    finally:
        watchdog.cancel()
        _stop(cli)
    output = "".join(seen) + (rest or "")
    assert "prefect worker start --pool residual-pool" in output, output[-4000:]
    assert cli.returncode == 130, output[-4000:]
    runs = _api(env["PREFECT_API_URL"], "/flow_runs/filter",
                {"flow_runs": {"tags": {"all_": ["grid:no-worker"]},
                               "deployment_id": {"is_null_": False}}})
    assert len(runs) == 1 and runs[0]["state_type"] == "CANCELLED", output[-3000:]


def test_deployment_runs_on_a_worker(server, tmp_path):
    env = server
    _prefect(env, "--no-prompt", "deploy", "--name", "residual-smoke")
    store_root = tmp_path / "store"
    params = {"grid": _grid(tmp_path), "store_root": str(store_root)}
    out = _prefect(env, "deployment", "run", "experiment/residual-smoke",
                   "--params", json.dumps(params))
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
    assert _flow_run(env, run_id)["state_type"] == "SCHEDULED"

    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "residual-pool",
                               "--run-once"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = worker.communicate(timeout=300)
    finally:
        _stop(worker)
    run = _flow_run(env, run_id)
    assert run["state_type"] == "COMPLETED", output[-4000:]
    _assert_rows(store_root, {"zero-shot", "coarse"})


def test_distributed_cells_run_on_pool_workers(server, tmp_path):
    """`residual run --distribute`: the experiment flow (in the CLI process) submits each cell
    as a run of the residual-cell deployment; a worker of the pool runs it, and the summary
    prints its accuracies as for a local run."""
    env = server
    _prefect(env, "--no-prompt", "deploy", "--name", "residual-cell")
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps(_grid(tmp_path)))
    store_root = tmp_path / "store"
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "residual-pool"],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        cli = subprocess.run([str(BIN / "residual"), "run", "--distribute", "--grid", str(grid),
                              "--store-root", str(store_root)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=400)
    finally:
        _stop(worker)
    assert cli.returncode == 0, cli.stdout + cli.stderr[-4000:]
    _assert_rows(store_root, {"zero-shot", "coarse"})
    # the stage runs of the cell on the worker count as a local cell's (extract x3, spectral,
    # align), read back from its task runs
    assert "grid deploy-test: 1 cells; 5 stage runs: 5 computed, 0 cached" in cli.stdout, (
        cli.stdout)
    # the summary shows the accuracies the workers' cells reported (their runs' artifacts)
    for row in read_table(store_root, "evaluations").to_pylist():
        assert re.search(rf"residual-tiny/random on imagefolder:\S+\s+{row['method']}\s+0\s+"
                         rf"{row['trainable_parameters']}\s+\S+\s+{row['test_acc']:.4g}\s*$",
                         cli.stdout, re.M), cli.stdout
    cells = _api(env["PREFECT_API_URL"], "/flow_runs/filter",
                 {"flow_runs": {"name": {"like_": "cell residual-tiny"},
                                "tags": {"all_": ["grid:deploy-test"]},
                                "deployment_id": {"is_null_": False}}})  # not local cells
    assert [c["state_type"] for c in cells] == ["COMPLETED"]
    assert any(t.startswith("dataset:imagefolder:")
                                                    for t in cells[0]["tags"])


def test_a_split_extracted_in_parts_by_pool_workers(server, tmp_path):
    """`residual run --distribute --extract-parts 2`: the cell (on a worker) submits each split
    as 2 runs of the residual-extract-part deployment, which the pool's two workers run; the
    cell's own extract stage then finds every chunk written and records it."""
    from residual_core.formats.feature_store import FeatureStore

    env = server
    for name in ("residual-cell", "residual-extract-part"):
        _prefect(env, "--no-prompt", "deploy", "--name", name)
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({**_grid(tmp_path), "name": "parts-test"}))
    store_root = tmp_path / "store"
    logs = [open(tmp_path / f"worker{i}.log", "w") for i in range(2)]
    workers = [subprocess.Popen([PREFECT, "worker", "start", "--pool", "residual-pool"],
                                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
               for log in logs]
    try:
        cli = subprocess.run([str(BIN / "residual"), "run", "--distribute", "--extract-parts",
                              "2", "--grid", str(grid), "--store-root", str(store_root)],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    finally:
        for worker in workers:
            _stop(worker)
        for log in logs:
            log.close()
    assert cli.returncode == 0, cli.stdout + cli.stderr[-4000:]
    _assert_rows(store_root, {"zero-shot", "coarse"})
    parts = _api(env["PREFECT_API_URL"], "/flow_runs/filter",
                 {"flow_runs": {"name": {"like_": "extract residual-tiny"},
                                "deployment_id": {"is_null_": False}}})
    names = sorted(run["name"].rsplit(" ", 3)[-3] + " " + run["name"].rsplit(" ", 1)[-1]
                   for run in parts)
    assert names == sorted(f"{split} {i}/2" for split in ("train", "val", "test")
                           for i in range(2)), [run["name"] for run in parts]
    assert {run["state_type"] for run in parts} == {"COMPLETED"}
    picked = "".join((tmp_path / f"worker{i}.log").read_text() for i in range(2))
    assert all(run["id"] in picked for run in parts)  # each submitted by a worker of the pool
    stores = [s for s in store_root.glob("features/**/*.zarr")
              if s.name in {"train.zarr", "val.zarr", "test.zarr"}]
    assert len(stores) == 3 and all(FeatureStore.open(str(s)).complete for s in stores)
    records = [json.loads(p.read_text()) for p in (store_root / "stage-records").glob("*.json")]
    extracts = [r for r in records if "computed_chunks" in r]
    assert len(extracts) == 3 and all(r["computed_chunks"] == 0 for r in extracts), extracts
