"""Writer claims on a feature store: which process may write which row chunks, across processes
and machines, surviving ``kill -9``.

Local stores (plain paths and ``file://``) use Linux open-file-description locks (``fcntl``
``F_OFD_SETLK``) on byte ranges of one file beside the store, ``<store>.lock``:

- byte 0, the *store*: extraction parts hold it shared; deleting or verifying a store (and
  writing a store of the old layout, whose ``done`` flags share one chunk) hold it exclusive;
- byte 1, the store's *metadata*: creation, attribute updates and finalisation, one at a time;
- byte ``2 + c``, *row chunk* ``c``: the process writing it.

The kernel drops a lock when its holder dies, so what a killed part had claimed is free for the
next claimer at once; on NFS the locks are forwarded to the server. Where OFD locks do not exist
(macOS), POSIX ``lockf`` locks are used: processes still exclude each other, threads of one
process do not.

fsspec stores (``s3://``, ``gs://``, ``memory://``) use *leases*: a claim is a small object
``<store>.claims/<name>`` holding its owner and an expiry, renewed by a heartbeat thread while it
is held; a lease past its expiry (a crashed owner) is taken over. fsspec offers no atomic
create-if-absent, so a claim is confirmed by reading it back after a settle delay; two claimers
whose writes land more than that delay apart can never both win, two landing within it can.
The guarantee: parts own disjoint row chunks, so they never compete for a chunk; two processes
running the same part can (rarely) both write one chunk, with the same values (extraction is
deterministic for the same software and hardware) in whole shard objects. There is no store lock
on fsspec stores: deleting one while a part writes it is not refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import struct
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

from residual_core.errors import StoreError
from residual_core.layout import is_local, local_path

_STORE, _META, _FIRST_CHUNK = 0, 1, 2
_OFD = hasattr(fcntl, "F_OFD_SETLK")


class StoreClaims:
    """The claims of one process on one store (use :func:`store_claims`)."""

    def hold_store(self, exclusive: bool) -> None:
        """Hold the store lock, shared (a writing part) or exclusive (no other writer); raise
        :class:`StoreError` at once when another process holds it the other way."""

    @contextlib.contextmanager
    def metadata(self) -> Iterator[None]:
        """Creation, attribute updates and finalisation happen inside this, one at a time
        (waits for the current holder)."""
        yield

    def claim(self, chunk: int) -> bool:
        """Claim row chunk ``chunk`` for writing; False when another process holds it."""
        raise NotImplementedError

    def claim_many(self, chunks) -> list[int]:
        """Claim each of ``chunks``; the ones this process got."""
        return [int(c) for c in chunks if self.claim(int(c))]

    def release(self, chunk: int) -> None:
        """Give a claimed row chunk back (after its ``done`` flag is written)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release every claim and lock."""


class LocalClaims(StoreClaims):
    """Byte-range locks on ``<store>.lock`` (see the module docstring)."""

    def __init__(self, url: str):
        self.url = url
        self.path = Path(str(local_path(url)) + ".lock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self._store_mode: bool | None = None

    def _lock(self, kind: int, byte: int, wait: bool = False) -> bool:
        try:
            if _OFD:
                cmd = fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK
                fcntl.fcntl(self.fd, cmd, struct.pack("hhqqi4x", kind, os.SEEK_SET, byte, 1, 0))
            else:
                flag = {fcntl.F_WRLCK: fcntl.LOCK_EX, fcntl.F_RDLCK: fcntl.LOCK_SH,
                        fcntl.F_UNLCK: fcntl.LOCK_UN}[kind]
                fcntl.lockf(self.fd, flag | (0 if wait else fcntl.LOCK_NB), 1, byte, os.SEEK_SET)
            return True
        except (BlockingIOError, PermissionError):
            return False

    def hold_store(self, exclusive: bool) -> None:
        if self._store_mode is not None and (self._store_mode or not exclusive):
            return  # held already, at least as strongly
        if not self._lock(fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK, _STORE):
            raise StoreError(
                f"{self.url} is being written by another extraction (lock {self.path}): "
                + ("this needs it alone; wait for it to finish" if exclusive else
                   "it is being verified or deleted; wait for it to finish"))
        self._store_mode = exclusive

    @contextlib.contextmanager
    def metadata(self) -> Iterator[None]:
        self._lock(fcntl.F_WRLCK, _META, wait=True)
        try:
            yield
        finally:
            self._lock(fcntl.F_UNLCK, _META)

    def claim(self, chunk: int) -> bool:
        return self._lock(fcntl.F_WRLCK, _FIRST_CHUNK + int(chunk))

    def release(self, chunk: int) -> None:
        self._lock(fcntl.F_UNLCK, _FIRST_CHUNK + int(chunk))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # drops every lock of this open file description
            self.fd = -1


class LeaseClaims(StoreClaims):
    """Leases under ``<store>.claims/`` on an fsspec store (see the module docstring)."""

    def __init__(self, url: str, ttl: float = 60.0, settle: float = 0.5):
        import fsspec

        self.url, self.ttl, self.settle = url, ttl, settle
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = root.rstrip("/") + ".claims"
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.held: set[str] = set()
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _key(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _read(self, name: str) -> dict | None:
        try:
            with self.fs.open(self._key(name), "rb") as f:
                return json.loads(f.read())
        except (FileNotFoundError, ValueError, OSError):
            return None

    def _write(self, name: str) -> None:
        self.fs.makedirs(self.root, exist_ok=True)
        with self.fs.open(self._key(name), "wb") as f:
            f.write(json.dumps({"owner": self.owner, "expires": time.time() + self.ttl}).encode())

    def _free(self, name: str) -> bool:
        lease = self._read(name)
        return lease is None or lease.get("owner") == self.owner \
            or lease.get("expires", 0) <= time.time()

    def _take_all(self, names: list[str]) -> list[str]:
        """Write a lease on each free name, wait ``settle`` once, keep those still ours."""
        written = [name for name in names if self._free(name)]
        for name in written:
            self._write(name)
        if not written:
            return []
        time.sleep(self.settle)
        won = [name for name in written if (self._read(name) or {}).get("owner") == self.owner]
        with self._guard:
            self.held.update(won)
        if won:
            self._start_heartbeat()
        return won

    def _take(self, name: str) -> bool:
        return bool(self._take_all([name]))

    def _give(self, name: str) -> None:
        with self._guard:
            self.held.discard(name)
        lease = self._read(name)
        if lease is not None and lease.get("owner") == self.owner:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self._key(name))

    def _start_heartbeat(self) -> None:
        if self._heartbeat is None:
            self._heartbeat = threading.Thread(target=self._renew, daemon=True,
                                               name="residual-lease-heartbeat")
            self._heartbeat.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            with self._guard:  # not a lease released meanwhile
                for name in list(self.held):
                    self._write(name)

    @contextlib.contextmanager
    def metadata(self) -> Iterator[None]:
        while not self._take("metadata"):
            time.sleep(self.settle)
        try:
            yield
        finally:
            self._give("metadata")

    def claim(self, chunk: int) -> bool:
        return self._take(f"chunk-{int(chunk)}")

    def claim_many(self, chunks) -> list[int]:
        won = set(self._take_all([f"chunk-{int(c)}" for c in chunks]))
        return [int(c) for c in chunks if f"chunk-{int(c)}" in won]

    def release(self, chunk: int) -> None:
        self._give(f"chunk-{int(chunk)}")

    def close(self) -> None:
        self._stop.set()
        for name in list(self.held):
            self._give(name)


@contextlib.contextmanager
def store_claims(url: str) -> Iterator[StoreClaims]:
    """The claims of this process on the store at ``url``, released on exit (and by the kernel
    or the lease expiry if the process dies)."""
    claims: StoreClaims = LocalClaims(url) if is_local(url) else LeaseClaims(url)
    try:
        yield claims
    finally:
        claims.close()
