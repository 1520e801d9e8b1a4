"""Which driver runs which trial: leases in storage, so that a trial is trained by one driver at a time.

Layout, in the experiment's lease folder (:meth:`cgc_ray.storage.Storage.leases_dir`)::

    _drivers/<driver>.json           a driver's heartbeat {driver, host, pid}, rewritten every HEARTBEAT_S
    <trial_id>/<gen>.json            an exclusive claim (a posix root; S3 with boto3); its content names the driver
    <trial_id>/<gen>.<driver>.json   a claim on an object store without exclusive creates; its name names the driver

**The holder** of a trial is its claim of the highest generation ``gen``; without exclusive creates, of that
generation's claims, the one the store wrote first, then the smallest driver id. Every driver that reads
the same listing names the same holder. A holder is live while its heartbeat is younger than
:data:`STALE_S` and, for a driver on this host, its process exists. Ages are read on the storage's clock:
a heartbeat file's modification time against that of this driver's own beat, written just before. So
the drivers' own clocks never enter (a skew of minutes cannot kill a live driver or keep a dead one
alive), and a driver dead for an hour is taken over at once, without waiting a STALE_S to watch it.

**Claiming** creates generation 0 of a trial without claims, or generation g + 1 over a holder at g that
is not live (a takeover). Where the storage is :attr:`~cgc_ray.storage.Storage.exclusive` a claim is
created exclusively and whole (:meth:`~cgc_ray.storage.Storage.create_exclusive`: a hard link on a posix
root, a conditional PUT, ``If-None-Match: *``, on S3): of several drivers one wins, and a driver killed,
or a disk full, at any step leaves either the old claim (taken over by the next driver) or a whole new
one (whose dead driver is taken over in turn): a trial is never left unclaimable. Elsewhere (GCS; S3
without boto3, or a store that ignores the condition) each claimant writes a claim of its own, for all
its pending trials in one batch, waits :data:`_CONFIRM_S` once, and lists: the holder rule picks one
winner. Two drivers both win only when one's claim takes longer than that pause to appear after the
other's was written; both then train the trial until the loser's next heartbeat check, at most
:data:`HEARTBEAT_S` later, and its trial stops at its next epoch (tests/test_s3_protocol.py shows it).

**A holder keeps checking.** After every heartbeat the driver lists its claims and records in ``lost``
the trials another driver now holds (the driver stops them), and a trial checks its lease
(:func:`check_lease`) before it trains and before it writes its row. So a driver that was silent for
STALE_S and was taken over writes no row for that trial; and since rows are replaced whole under their
trial id, a double run costs compute, never a row.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import AbstractSet, Any, Iterable, NamedTuple

import pyarrow.fs as pafs

from cgc_ray.storage import Storage

HEARTBEAT_S = 20.0
STALE_S = 90.0
_CONFIRM_S = 1.0  # object stores: the pause between writing a batch of claims and listing them
_WRITERS = 16  # claims written (and deleted) at once: an object store's requests are round trips
_CLAIM_RE = re.compile(r"(?P<gen>\d+)(?:\.(?P<driver>[0-9a-f]+))?\.json")
_DRIVERS = "_drivers"


class LeaseLost(RuntimeError):
    """This driver no longer holds a trial's lease: another driver took it over."""


@dataclass(frozen=True)
class Claim:
    """One claim file: its generation, the driver it names (None: its content does not parse), its storage mtime."""

    gen: int
    driver: str | None
    mtime: _dt.datetime
    path: str


class Claims(NamedTuple):
    """What :meth:`Leases.claim` found: ``got`` (trials this driver holds now), ``held`` (trial -> the
    heartbeat of the live driver holding it), ``unknown`` (trial -> why it could be neither claimed nor
    found held: a claim or heartbeat that could not be read or written)."""

    got: list[str]
    held: dict[str, dict[str, Any]]
    unknown: dict[str, str]


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
    """This driver's leases on the trials of one experiment (see the module docstring)."""

    storage: Storage | str
    experiment: str
    driver: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def __post_init__(self) -> None:
        self.storage = Storage.of(self.storage)
        self.dir = self.storage.leases_dir(self.experiment)
        self.mine: dict[str, int] = {}  # trial -> the generation of this driver's claim
        self.lost: dict[str, str | None] = {}  # trial -> the driver now holding it (None: no one)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- heartbeat

    @property
    def _beat_path(self) -> str:
        return f"{self.dir}/{_DRIVERS}/{self.driver}.json"

    def _beat(self) -> None:
        beat = {"driver": self.driver, "host": socket.gethostname(), "pid": os.getpid(), "beat": time.time()}
        self.storage.write_bytes(self._beat_path, json.dumps(beat).encode())

    def start(self) -> "Leases":
        self._beat()
        self._thread = threading.Thread(target=self._loop, name="cgc-ray-leases", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        failing = False  # said once per streak of failures
        while not self._stop.wait(HEARTBEAT_S):
            errors = []
            for step in (self._beat, self.check):  # check even when the beat fails: then takeovers happen
                try:
                    step()
                except OSError as e:  # the next round retries
                    errors.append(e)
            if errors and not failing:
                print(f"cgc-ray: driver {self.driver} cannot reach its lease folder {self.dir} ({errors[0]}); if "
                      f"this lasts {STALE_S:.0f} s, other drivers may take its trials over (each trial checks its "
                      "lease before it writes its row)", file=sys.stderr)
            failing = bool(errors)

    def check(self) -> dict[str, str | None]:
        """Record in :attr:`lost` (and return) the trials of :attr:`mine` that another driver holds now."""
        with self._lock:
            mine = dict(self.mine)
        if not mine:
            return dict(self.lost)
        claims, _ = self._scan(mine)
        for tid in mine:
            holder = self._holder(claims.get(tid, []))
            if holder is None or holder.driver != self.driver:
                with self._lock:
                    self.lost[tid] = holder.driver if holder else None
                    self.mine.pop(tid, None)
        return dict(self.lost)

    # ---------------------------------------------------------------- reading the lease folder

    def _scan(self, trial_ids: Iterable[str], *, one: bool = False, created: AbstractSet[str] = frozenset()
              ) -> tuple[dict[str, list[Claim]], dict[str, pafs.FileInfo]]:
        """(trial -> its claims, driver -> its heartbeat file) from one listing of the lease folder
        (with ``one``, of the folder of the one trial in ``trial_ids``).

        Exclusive claims (``<gen>.json``) name their driver in their content: read here for the top
        generation of each of ``trial_ids``, except the paths in ``created`` (this driver's, just made).
        """
        trial_ids = set(trial_ids)
        where = f"{self.dir}/{next(iter(trial_ids))}" if one else self.dir
        infos = self.storage.files(where, recursive=not one)
        if self.storage.posix:
            self.storage.remove_stale_temps(infos)  # of claimants killed mid-claim
        claims: dict[str, list[Claim]] = {}
        beats: dict[str, pafs.FileInfo] = {}
        for info in infos:
            folder, _, name = info.path[len(self.dir) + 1:].rpartition("/")
            m = _CLAIM_RE.fullmatch(name)
            if folder == _DRIVERS and name.endswith(".json"):
                beats[name.removesuffix(".json")] = info
            elif m and folder and "/" not in folder:
                claims.setdefault(folder, []).append(Claim(int(m["gen"]), m["driver"], info.mtime, info.path))
        unnamed = [c for tid in trial_ids & set(claims) for c in claims[tid]
                   if c.driver is None and c.gen == max(x.gen for x in claims[tid])]
        if unnamed:
            named = {c.path: self.driver for c in unnamed if c.path in created}
            unread = [c.path for c in unnamed if c.path not in created]
            workers = 1 if self.storage.posix else _WRITERS  # an object store's reads are round trips
            with ThreadPoolExecutor(workers) as pool:
                named.update(zip(unread, pool.map(self._driver_in, unread)))
            claims = {tid: [replace(c, driver=named[c.path]) if c.path in named else c for c in found]
                      for tid, found in claims.items()}
        return claims, beats

    def _driver_in(self, path: str) -> str | None:
        """The driver an exclusive claim names; None if it is gone (released since the listing) or does not parse."""
        try:
            driver = json.loads(self.storage.read_bytes(path)).get("driver")
        except (FileNotFoundError, ValueError, AttributeError):
            return None
        return driver if isinstance(driver, str) else None

    @staticmethod
    def _holder(claims: list[Claim]) -> Claim | None:
        """The claim that holds the trial: of the highest generation, the first written, then the smallest driver id."""
        if not claims:
            return None
        top = max(c.gen for c in claims)
        return min((c for c in claims if c.gen == top), key=lambda c: (c.mtime, c.driver or ""))

    def _live(self, driver: str | None, beats: dict[str, pafs.FileInfo], now: _dt.datetime,
              seen: dict[str, dict[str, Any] | None]) -> dict[str, Any] | None:
        """The heartbeat of ``driver`` if it is live, else None; OSError if it cannot be read (then no one knows)."""
        if driver is None or driver not in beats:
            return None
        if driver not in seen:
            info = beats[driver]
            beat: dict[str, Any] | None = None
            if (now - info.mtime).total_seconds() <= STALE_S:
                try:
                    beat = json.loads(self.storage.read_bytes(info.path))
                except FileNotFoundError:  # it released its leases just now
                    beat = None
                except ValueError:  # written whole by every writer: only a foreign file does not parse
                    beat = {"driver": driver}
                if beat is not None and beat.get("host") == socket.gethostname() \
                        and not _pid_alive(int(beat.get("pid", -1))):
                    beat = None
            seen[driver] = beat
        return seen[driver]

    def _now(self, beats: dict[str, pafs.FileInfo]) -> _dt.datetime:
        """Now on the storage's clock: the mtime of this driver's own heartbeat, written just before."""
        if self.driver in beats:
            return beats[self.driver].mtime
        return self.storage.fs.get_file_info(self._beat_path).mtime

    def holders(self, trial_ids: list[str]) -> dict[str, tuple[str | None, dict[str, Any] | None]]:
        """trial -> (the driver holding it, or None; that driver's heartbeat if it is live, else None).

        Writes a heartbeat first (its mtime is the storage's now); OSError if the lease folder cannot be read.
        """
        self._beat()
        claims, beats = self._scan(trial_ids)
        now, seen = self._now(beats), {}
        out = {}
        for tid in trial_ids:
            holder = self._holder(claims.get(tid, []))
            driver = holder.driver if holder else None
            out[tid] = (driver, self._live(driver, beats, now, seen))
        return out

    # ---------------------------------------------------------------- claims

    def _claim_path(self, trial_id: str, gen: int) -> str:
        suffix = "" if self.storage.exclusive else f".{self.driver}"
        return f"{self.dir}/{trial_id}/{gen}{suffix}.json"

    def _create(self, trial_id: str, gen: int) -> bool | OSError:
        """Write this driver's claim of generation ``gen`` (on an exclusive root: unless that generation exists);
        whether it was created exclusively, or the error that stopped it."""
        record = json.dumps({"driver": self.driver}).encode()
        try:
            if self.storage.exclusive:
                return self.storage.create_exclusive(self._claim_path(trial_id, gen), record)
            self.storage.write_bytes(self._claim_path(trial_id, gen), record)
        except OSError as e:
            return e
        return False

    def claim(self, trial_ids: list[str]) -> Claims:
        """Claim every trial of ``trial_ids`` that no live driver holds: one listing, one batch of writes, one listing.

        The second listing decides every trial by the holder rule (module docstring); without exclusive
        creates it follows a single :data:`_CONFIRM_S` pause, however many trials are claimed.
        """
        self._beat()
        claims, beats = self._scan(trial_ids)
        now, seen = self._now(beats), {}
        held: dict[str, dict[str, Any]] = {}
        unknown: dict[str, str] = {}
        todo: dict[str, int] = {}  # trial -> the generation to create
        for tid in trial_ids:
            holder = self._holder(claims.get(tid, []))
            theirs = holder is not None and holder.driver != self.driver
            try:
                beat = self._live(holder.driver, beats, now, seen) if theirs else None
            except OSError as e:
                unknown[tid] = f"the heartbeat of driver {holder.driver}, which holds it, could not be read: {e}"
                continue
            if beat is not None:
                held[tid] = beat
            elif holder is None or theirs:
                todo[tid] = holder.gen + 1 if holder else 0
        created = set()  # claims this call created exclusively: this driver's, without reading them back
        with ThreadPoolExecutor(_WRITERS) as pool:  # an object store's round trips, overlapped
            for tid, outcome in zip(todo, pool.map(self._create, todo, todo.values())):
                if isinstance(outcome, OSError):
                    unknown[tid] = f"its claim could not be written: {outcome}"
                elif outcome:
                    created.add(self._claim_path(tid, todo[tid]))
        if todo and not self.storage.exclusive:
            time.sleep(_CONFIRM_S)  # let every claim written meanwhile appear, then decide all at once
        claims, beats = self._scan(trial_ids, created=created) if todo else (claims, beats)
        got = self._settle_claims([t for t in trial_ids if t not in held and t not in unknown], claims, beats, now,
                                  seen, held, unknown)
        return Claims(got, held, unknown)

    def _settle_claims(self, trial_ids: list[str], claims: dict[str, list[Claim]], beats: dict[str, pafs.FileInfo],
                       now: _dt.datetime, seen: dict, held: dict[str, dict[str, Any]], unknown: dict[str, str]
                       ) -> list[str]:
        """Who won each of ``trial_ids`` after the claims were written; the winner tidies the trial's folder."""
        got = []
        for tid in trial_ids:
            found = claims.get(tid, [])
            holder = self._holder(found)
            if holder is not None and holder.driver == self.driver:
                got.append(tid)
                with self._lock:
                    self.mine[tid] = holder.gen
                for c in found:  # superseded claims of dead drivers (claimants of this generation tidy their own)
                    if c.gen < holder.gen:
                        self.storage.delete_quietly(c.path)
                continue
            for c in found:  # a claim of ours that lost
                if c.driver == self.driver:
                    self.storage.delete_quietly(c.path)
            try:
                beat = self._live(holder.driver if holder else None, beats, now, seen)
            except OSError as e:
                beat, unknown[tid] = None, f"the heartbeat of the driver that claimed it could not be read: {e}"
            if beat is not None:
                held[tid] = beat
            elif tid not in unknown:
                unknown[tid] = (f"claimed at the same moment by driver {holder.driver}, which is not live"
                                if holder else "its claim vanished while it was being claimed")
        return got

    def holds(self, trial_id: str) -> bool:
        """Whether this driver held ``trial_id`` at the last check (:meth:`check`, after every heartbeat)."""
        with self._lock:
            return trial_id in self.mine

    def release(self) -> None:
        """Stop beating; drop this driver's claims and heartbeat (its trials are done, or free for others)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            mine, self.mine = self.mine, {}
        paths = [self._claim_path(tid, gen) for tid, gen in sorted(mine.items())]
        with ThreadPoolExecutor(_WRITERS) as pool:
            if self.storage.exclusive:  # an exclusive claim's name does not say whose it is: only what it still holds
                paths = [p for p, d in zip(paths, pool.map(self._driver_in, paths)) if d == self.driver]
            list(pool.map(self.storage.delete_quietly, paths))
        self.storage.delete_quietly(self._beat_path)


def check_lease(storage: Storage | str, experiment: str, trial_id: str, driver: str) -> None:
    """Raise :class:`LeaseLost` unless ``driver`` holds ``trial_id``: a trial asks before it trains and writes its row.

    One listing of the trial's claims (and, for an exclusive claim, one read). A trial that lost its lease
    stops without writing its row: the driver that took it over writes it.
    """
    leases = Leases(storage, experiment, driver)
    claims, _ = leases._scan([trial_id], one=True)
    holder = leases._holder(claims.get(trial_id, []))
    if holder is None or holder.driver != driver:
        now_held = f"driver {holder.driver} holds it now" if holder else "no driver holds it now"
        raise LeaseLost(f"trial {trial_id} of {experiment!r}: driver {driver} no longer holds its lease ({now_held}); "
                        "this copy stops without writing its row")
