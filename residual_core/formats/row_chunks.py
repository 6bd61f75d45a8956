"""Writing a feature store's row chunks, in this process or in a writer process of its own.

The write itself (:func:`write_row_chunk`) is the one :meth:`FeatureStore.write_chunk` makes.
:class:`WriterProcess` runs it in a child process that imports only numpy and zarr (about half a
second to start, begun before the model or the dataset is touched). Zarr's encoding is mostly
Python (its codec pipeline, the sharding index, its event loop), so in a writer *thread* it
holds the GIL that compute needs; a process gives it a core of its own. The child gets
``SIGKILL`` when its parent dies (``PR_SET_PDEATHSIG`` on Linux, a watchdog elsewhere), so a
killed extraction never leaves it writing, exactly as a writer thread dies with its process.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from multiprocessing.connection import Connection
from typing import Callable, Iterable

import numpy as np
import zarr
from zarr.core.sync import sync

__all__ = ["WriterProcess", "delete_row_chunks", "write_row_chunk"]

ArrayOf = Callable[[str], zarr.Array]
"""A store's array by name (opened once by the caller)."""


async def gather(coroutines: Iterable) -> list:
    """Await ``coroutines`` together (one call into zarr's event loop instead of one each)."""
    return await asyncio.gather(*coroutines)


def delete_row_chunks(array: ArrayOf, names: Iterable[str], chunks: Iterable[int]) -> None:
    """Delete the shards of row chunks ``chunks`` of the arrays ``names``: zarr reads an
    existing shard before rewriting it, which fails on a corrupt one."""
    arrays = [array(name) for name in names]
    keys = [f"{a.path}/" + a.metadata.encode_chunk_key((int(c),) + (0,) * (a.ndim - 1))
            for a in arrays for c in chunks]
    if keys:
        store = arrays[0].store_path.store
        sync(gather(store.delete(key) for key in keys))


def write_row_chunk(array: ArrayOf, chunk: int, rows: slice,
                    values: dict[str, np.ndarray]) -> None:
    """Write row chunk ``chunk`` (``rows``) of every array in ``values``, then mark it done in
    ``done`` (the commit point: a chunk is done only once all its data are written)."""
    delete_row_chunks(array, values, [chunk])
    sync(gather(array(name)._async_array.setitem(rows, value) for name, value in values.items()))
    array("done")[chunk] = 1


class WriterError(RuntimeError):
    """A write failed in the writer process (its message is the child's one-line reason)."""


class WriterProcess:
    """A child process that writes row chunks of feature stores, one at a time.

    :meth:`write` sends one chunk and waits until the child has written it (call it from a
    writer thread: the wait and the transfer release the GIL). Use as a context manager;
    leaving it stops the child.
    """

    def __init__(self) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", __name__, str(os.getpid()), str(to_child_r),
             str(from_child_w)], pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self._send = Connection(to_child_w, readable=False)
        self._recv = Connection(from_child_r, writable=False)
        self._used = False

    def write(self, url: str, chunk: int, rows: slice, values: dict[str, np.ndarray]) -> None:
        """Write ``values`` as row chunk ``chunk`` of the store at ``url`` (as
        :func:`write_row_chunk`); raises :class:`WriterError` if the child failed or died."""
        self._used = True
        try:
            self._send.send((url, int(chunk), rows, values))
            reason = self._recv.recv()
        except (EOFError, OSError):
            raise WriterError(f"the writer process died (exit status {self._proc.poll()}) "
                              f"while writing row chunk {chunk}") from None
        if reason is not None:
            raise WriterError(f"row chunk {chunk}: {reason}")

    def close(self) -> None:
        """Stop the child: at once if it never wrote (a store already complete), else once it
        has read the end of its input."""
        if not self._used:
            self._proc.kill()
        try:
            self._send.send(None)
        except OSError:
            pass
        self._send.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._recv.close()

    def __enter__(self) -> "WriterProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _die_with(parent: int) -> None:
    """SIGKILL this process when ``parent`` dies."""
    import signal

    try:
        import ctypes
        bound = ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL) == 0  # PDEATHSIG
    except (OSError, AttributeError):
        bound = False
    if os.getppid() != parent:  # it died before that
        os._exit(1)
    if not bound:
        import threading
        import time

        def watchdog() -> None:
            while os.getppid() == parent:
                time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGKILL)
        threading.Thread(target=watchdog, daemon=True).start()


def _serve(receive: Connection, reply: Connection) -> None:
    """The child's loop: write each chunk it is sent, answer ``None`` or the reason it failed."""
    from residual_core.layout import zarr_target

    url, arrays, group = None, {}, None
    while (message := receive.recv()) is not None:
        target, chunk, rows, values = message
        try:
            if target != url:
                group, arrays, url = zarr.open_group(zarr_target(target), mode="r+"), {}, target
            write_row_chunk(lambda name: arrays.get(name) or arrays.setdefault(
                name, group[name]), chunk, rows, values)
            reply.send(None)
        except Exception as exc:  # the parent raises it, with this one line
            text = str(exc).strip().splitlines()
            reply.send(f"{type(exc).__name__}: {text[0] if text else ''}")


if __name__ == "__main__":
    _die_with(int(sys.argv[1]))
    _serve(Connection(int(sys.argv[2]), writable=False),
           Connection(int(sys.argv[3]), readable=False))
