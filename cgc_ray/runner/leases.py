"""Which driver runs which trial: claims in storage, so two drivers on one storage never run a trial twice.

Layout, in the experiment's lease folder (:meth:`cgc_ray.storage.Storage.leases_dir`):
``<trial_id>.json`` holds the claiming driver's id; ``_drivers/<driver_id>.json``
is that driver's heartbeat (host, pid, last beat), rewritten every
:data:`HEARTBEAT_S` seconds while it runs.

A claim is live while its driver's heartbeat is younger than :data:`STALE_S`
and, for a driver on this host, while its process exists (so re-running a
killed command takes its trials over at once). A driver skips trials whose
claim is live and takes over stale ones.

Claims are created exclusively where the filesystem can (``O_EXCL`` on a
:attr:`~cgc_ray.storage.Storage.posix` root: a folder or a ``file://`` mount).
Object stores (S3, GCS via pyarrow) have no exclusive create: there a claim
is written, then read back after a short pause, and the driver keeps it only
if its own id is still there (the last writer wins, and both drivers see the
same winner), which leaves a window of that pause for a tie; each trial's row
is still written atomically, so a tie costs compute, never a duplicated row.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from cgc_ray.storage import Storage

HEARTBEAT_S = 20.0
STALE_S = 90.0
_CONFIRM_S = 1.0  # object stores: the pause before reading a claim back


def _read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except (FileNotFoundError, OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@dataclass
class Leases:
    """This driver's claims on the trials of one experiment (see the module docstring)."""

    storage: Storage | str
    experiment: str
    driver: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def __post_init__(self) -> None:
        self.storage = Storage.of(self.storage)
        self.fs = self.storage.fs
        self.dir = self.storage.leases_dir(self.experiment)
        self.mine: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- heartbeat

    def _beat(self) -> None:
        beat = {"driver": self.driver, "host": socket.gethostname(), "pid": os.getpid(), "beat": time.time()}
        self.storage.write_bytes(f"{self.dir}/_drivers/{self.driver}.json", json.dumps(beat).encode())

    def start(self) -> "Leases":
        self.fs.create_dir(f"{self.dir}/_drivers", recursive=True)
        self._beat()
        self._thread = threading.Thread(target=self._loop, name="cgc-ray-leases", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._beat()
            except OSError:  # a storage hiccup: the next beat retries; STALE_S spans several beats
                pass

    def owner(self, driver: str) -> dict[str, Any] | None:
        """The heartbeat of ``driver`` if it is alive, else None."""
        beat = _read_json(self.fs, f"{self.dir}/_drivers/{driver}.json")
        if beat is None or time.time() - float(beat.get("beat", 0)) > STALE_S:
            return None
        if beat.get("host") == socket.gethostname() and not _pid_alive(int(beat.get("pid", -1))):
            return None
        return beat

    # ---------------------------------------------------------------- claims

    def _create(self, path: str) -> bool:
        """Exclusively create the claim file; False if it exists."""
        record = json.dumps({"driver": self.driver}).encode()
        if self.storage.posix:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(record)
            return True
        if self.storage.exists(path):
            return False
        self.storage.write_bytes(path, record)
        time.sleep(_CONFIRM_S)
        return (_read_json(self.fs, path) or {}).get("driver") == self.driver

    def _take_over(self, path: str, stale: str) -> bool:
        """Replace the stale claim of driver ``stale``; exactly one of several drivers trying succeeds locally."""
        record = json.dumps({"driver": self.driver}).encode()
        if self.storage.posix:
            try:  # whoever creates the marker for this stale owner wins the takeover
                os.close(os.open(f"{path}.from-{stale}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                return False
            self.storage.write_bytes(path, record)
            return True
        self.storage.write_bytes(path, record)
        time.sleep(_CONFIRM_S)
        return (_read_json(self.fs, path) or {}).get("driver") == self.driver

    def claim(self, trial_ids: list[str]) -> tuple[list[str], dict[str, dict[str, Any]]]:
        """(trials this driver now holds, trial id -> heartbeat of the live driver holding it)."""
        held: dict[str, dict[str, Any]] = {}
        got = []
        for tid in trial_ids:
            path = f"{self.dir}/{tid}.json"
            if self._create(path):
                got.append(tid)
                continue
            other = (_read_json(self.fs, path) or {}).get("driver")
            beat = self.owner(other) if other and other != self.driver else None
            if beat is not None:
                held[tid] = beat
                continue
            # a stale claim (its driver died or stopped beating): take it over, one driver only
            if self._take_over(path, other or "unknown"):
                got.append(tid)
            else:  # another driver took it over first
                beat = self.owner((_read_json(self.fs, path) or {}).get("driver", ""))
                if beat is not None:
                    held[tid] = beat
        self.mine.update(got)
        return got, held

    def release(self) -> None:
        """Drop this driver's claims and heartbeat (its trials are done or may be run by others)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for tid in sorted(self.mine):
            path = f"{self.dir}/{tid}.json"
            if (_read_json(self.fs, path) or {}).get("driver") == self.driver:
                self.storage.delete_quietly(path)
        self.storage.delete_quietly(f"{self.dir}/_drivers/{self.driver}.json")
        self.mine.clear()
