"""A temporary Prefect server that lives exactly as long as the command that started it.

Without ``PREFECT_API_URL`` Prefect starts a temporary local server itself (ephemeral mode,
``prefect.server.api.server.SubprocessASGIServer``) and stops it from an ``atexit`` hook: a
command killed by a signal (SIGKILL, SIGTERM, ...) runs no hook, and the server, reparented to
PID 1, runs forever. :func:`temporary_prefect_server` starts the same server (Prefect's
``create_app`` factory under uvicorn, ephemeral services, no UI, on 127.0.0.1 only) as a child
that dies with its parent, whatever kills the parent:

- on Linux, a small launcher sets ``PR_SET_PDEATHSIG`` (the kernel SIGKILLs it when its parent
  dies), checks that the parent did not die before that, then execs the server (the setting
  survives ``exec``);
- elsewhere, the launcher runs the server in its own process with a watchdog thread that
  SIGKILLs it once its parent PID changes.

The server runs in a session of its own, so a Ctrl-C in a terminal reaches only the command,
which then stops the server itself after its flows have recorded their final states; a normal
exit does the same. On Linux the death signal follows the *thread* that started the server:
enter the context on the thread that outlives the work (the CLI's main thread).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Iterator

__all__ = ["temporary_prefect_server"]

_LAUNCHER = """\
import os, signal, sys
parent, argv = int(sys.argv[1]), sys.argv[2:]
try:
    import ctypes
    bound = ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL) == 0  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    bound = False
if os.getppid() != parent:
    sys.exit(1)
if bound:
    os.execv(sys.executable, [sys.executable, *argv])
import runpy, threading, time
def watchdog():
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)
threading.Thread(target=watchdog, daemon=True).start()
sys.argv = [argv[1], *argv[2:]]
runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
"""
"""``python -c _LAUNCHER <parent pid> -m uvicorn ...``: bind the server's life to the parent's."""

STOP_GRACE_SECONDS = 10.0
"""How long a stopped server may take to shut down before it is killed."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (uvicorn shuts down cleanly), then SIGKILL; only this process."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _start(env: dict[str, str], timeout: float, logger) -> tuple[subprocess.Popen, str]:
    """Start the server on a free port and wait until it is healthy; (process, API URL)."""
    import prefect

    for _attempt in range(3):  # another process may take the free port first
        port = _free_port()
        api_url = f"http://127.0.0.1:{port}/api"
        server = ["-m", "uvicorn", "--app-dir",
                  str(prefect.__module_path__.parent), "--factory",
                  "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port",
                  str(port), "--log-level", "error", "--lifespan", "on"]
        logger.info(f"Starting temporary Prefect server on http://127.0.0.1:{port} (it stops "
                    f"with this command)")
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(os.getpid()), *server],
                                env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while not _healthy(api_url):
                if proc.poll() is not None:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the temporary Prefect server did not answer within "
                                       f"{timeout:.0f} s (PREFECT_SERVER_EPHEMERAL_STARTUP_"
                                       f"TIMEOUT_SECONDS)")
                time.sleep(0.1)
            else:
                return proc, api_url
        except BaseException:
            _stop(proc)
            raise
        if proc.returncode != 3:  # uvicorn's startup failure, e.g. the port was taken
            break
    raise RuntimeError(f"the temporary Prefect server exited with status {proc.returncode} "
                       f"before it was ready (its output is above)")


def _drain_prefect_workers(timeout: float = 30.0) -> None:
    """Send the logs and events Prefect still queues while the server is up (its exit hooks
    would otherwise retry against a stopped server for a minute)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=timeout, at_exit=False)
    EventsWorker.drain_all(timeout=timeout, at_exit=False)


@contextlib.contextmanager
def temporary_prefect_server() -> Iterator[str | None]:
    """Run the body against a temporary local Prefect server that dies with this process.

    If a Prefect API URL is configured (``PREFECT_API_URL``, from the environment or the
    active profile) nothing is started and this yields None. Otherwise this starts the server,
    points this process (its Prefect settings and ``os.environ``, for child processes) at it,
    yields its API URL, and on exit sends the queued logs and events and stops the server.
    Startup waits at most ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``.
    """
    from prefect.logging import get_logger
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_UI_URL,
        get_current_settings,
        temporary_settings,
    )

    settings = get_current_settings()
    if settings.api.url:
        yield None
        return
    env = {**os.environ, **settings.to_environment_variables(exclude_unset=True),
           "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1"}
    env.pop("PREFECT_API_URL", None)
    logger = get_logger()  # "prefect", as Prefect's own temporary server messages
    proc, api_url = _start(env, settings.server.ephemeral.startup_timeout_seconds, logger)
    updates = {PREFECT_API_URL: api_url}
    if settings.ui_url is None:  # no "View at <url>" links: this server has no UI
        updates[PREFECT_UI_URL] = ""
    saved = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = api_url
    try:
        with temporary_settings(updates=updates):
            try:
                yield api_url
            finally:
                _drain_prefect_workers()
    finally:
        if saved is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved
        logger.info(f"Stopping temporary Prefect server on {api_url[:-4]}")
        _stop(proc)
