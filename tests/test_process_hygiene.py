"""`residual run` and `residual demo` leave no process behind: the temporary Prefect server
dies with them.

Each command runs as a real subprocess (no PREFECT_API_URL, a temporary PREFECT_HOME); once
its Prefect server child answers /api/health, the `residual` process is killed (SIGKILL,
SIGTERM) or interrupted (SIGINT), and every process that was its descendant must be gone
within seconds. Descendants are read from /proc (Linux). Every process seen is killed by its
PID in a ``finally`` block, so a failing test leaves nothing running.
"""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESIDUAL = str(Path(sys.executable).parent / "residual")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")]

SERVER_UP_TIMEOUT = 150  # s: the server starts in 5-15 s, slower on a busy 2-core machine
GONE_TIMEOUT = 10  # s: how long the descendants may outlive the killed `residual`


def _children(pid: int) -> set[int]:
    kids: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids.update(int(k) for k in (task / "children").read_text().split())
        except OSError:  # the task or process ended meanwhile
            pass
    return kids


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        for kid in _children(todo.pop()) - found:
            found.add(kid)
            todo.append(kid)
    return found


def _start_time(pid: int) -> str | None:
    """The process's start time (in clock ticks since boot), or None if it is not running (a
    zombie, dead but not yet reaped, is not). A (pid, start time) pair names one process even if
    its PID is reused later."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def _alive(proc: tuple[int, str]) -> bool:
    return _start_time(proc[0]) == proc[1]


def _snapshot(pid: int) -> set[tuple[int, str]]:
    """(pid, start time) of every running descendant of ``pid``."""
    return {(p, t) for p in _descendants(pid) if (t := _start_time(p)) is not None}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
    except OSError:
        return "?"


def _server_port(pid: int) -> int | None:
    """The port of a Prefect server process (uvicorn or `prefect server start`), else None."""
    args = _cmdline(pid).split()
    if "uvicorn" not in args and not ("prefect" in " ".join(args) and "server" in args):
        return None
    return int(args[args.index("--port") + 1]) if "--port" in args[:-1] else None


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _kill_all(procs: set[tuple[int, str]]) -> None:
    """SIGKILL each of these processes still running (and not a new one with a reused PID)."""
    for proc in procs:
        if _alive(proc):
            try:
                os.kill(proc[0], signal.SIGKILL)
            except ProcessLookupError:
                pass


def _listeners(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of the sockets listening on ``port``."""
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


# A shell's background jobs ignore SIGINT, and so would `residual` then: restore its default.
_SIGINT_DEFAULT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                   "os.execv(sys.argv[1], sys.argv[1:])")


@pytest.mark.parametrize("command, sig", [("run", signal.SIGKILL), ("run", signal.SIGTERM),
                                          ("run", signal.SIGINT), ("demo", signal.SIGKILL)],
                         ids=["run-sigkill", "run-sigterm", "run-sigint", "demo-sigkill"])
def test_stopped_command_leaves_no_prefect_server(tmp_path, command, sig):
    """Killed (SIGKILL, SIGTERM), its server dies with it; interrupted (SIGINT, Ctrl-C), it
    stops the server itself and exits with 130."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update({"PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep), "PREFECT_HOME": str(home), "HF_HUB_OFFLINE": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    args = [RESIDUAL, command, "--store-root", str(tmp_path / "store")]
    if command == "run":
        args += ["--grid", "smoke"]
    log_path = tmp_path / "residual.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-c", _SIGINT_DEFAULT, *args], cwd=tmp_path,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    seen: set[tuple[int, str]] = set()
    try:
        deadline = time.monotonic() + SERVER_UP_TIMEOUT
        while True:
            seen |= _snapshot(proc.pid)
            ports = [port for p in seen if _alive(p) and (port := _server_port(p[0]))]
            if ports := [port for port in ports if _healthy(port)]:
                break
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no Prefect server up in {SERVER_UP_TIMEOUT} s"
            time.sleep(0.2)
        assert _listeners(ports[0]) == {"0100007F"}, "the server must listen on 127.0.0.1 only"
        time.sleep(1)  # and whatever `residual` starts next
        seen |= _snapshot(proc.pid)
        assert proc.poll() is None, log_path.read_text()[-3000:]

        proc.send_signal(sig)
        rc = proc.wait(timeout=60 if sig == signal.SIGINT else GONE_TIMEOUT)
        if sig == signal.SIGINT:
            assert rc == 130, log_path.read_text()[-3000:]
            assert "Stopping temporary" in log_path.read_text()  # it stopped the server itself
        deadline = time.monotonic() + GONE_TIMEOUT
        while (alive := {p for p in seen if _alive(p)}) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive, f"still running after `residual` got signal {sig!r}: " + "; ".join(
            f"{p}: {_cmdline(p)}" for p, _ in sorted(alive))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for pid, _ in list(seen):  # and what survivors started meanwhile
            seen |= _snapshot(pid)
        _kill_all(seen)
        log.close()


def test_server_lives_as_long_as_the_context():
    """In this process: the server is up (and this process's Prefect settings point at it)
    inside the context, stopped after it; a configured API URL starts nothing."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipelines.server import temporary_prefect_server

    before = _snapshot(os.getpid())
    with temporary_prefect_server() as api_url:
        assert api_url.startswith("http://127.0.0.1:") and api_url.endswith("/api")
        assert os.environ["PREFECT_API_URL"] == api_url == PREFECT_API_URL.value()
        port = int(api_url.rsplit(":", 1)[1].split("/")[0])
        assert _healthy(port)
        servers = {p for p in _snapshot(os.getpid()) - before if _server_port(p[0]) == port}
        assert servers, "the server is a child of this process"
    assert not _healthy(port) and not any(_alive(p) for p in servers)
    assert "PREFECT_API_URL" not in os.environ and not PREFECT_API_URL.value()

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        with temporary_prefect_server() as api_url:
            assert api_url is None and _snapshot(os.getpid()) == before
