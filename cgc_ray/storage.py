"""The storage root: resolved once into ``(filesystem, root path)``; the one answer to "where does X live".

A storage location is a local folder or a pyarrow filesystem URI: ``file:///shared/mount``,
``s3://bucket/prefix``, ``s3://bucket/prefix?endpoint_override=host:port&scheme=http``,
``gs://bucket/prefix``. :class:`Storage` resolves it once (as Ray's ``StorageContext`` does) and
builds every path under it; no other module spells a folder of this layout::

    <root>/experiment=<name>/<trial_id>.parquet          one row per trial        (results.table)
    <root>/experiment=<name>/_corrupt/                    row files set aside      (results.table)
    <root>/_summary/<name>.parquet                        the aggregated table     (results.summary)
    <root>/_checkpoints/<name>/<trial_id>/checkpoint.pt   a trial's checkpoint     (runner.worker)
    <root>/_leases/<name>/                                which driver runs what   (runner.leases)
    <root>/_figures/<name>/                               figures                  (explain.figures)
    <root>/_ray/<run name>/                               Ray's own run state      (runner.driver)

Parquet readers skip names starting with ``_`` or ``.`` (:data:`HIDDEN`), so the root reads as one
Hive-partitioned dataset of trial rows (``pandas.read_parquet("results")``).

Two facts about a root, each decided here and nowhere else:

* :attr:`Storage.is_local`: a plain folder (no scheme), seen by this machine only. A cluster needs a
  URI; checkpoints of a local root are trained in place.
* :attr:`Storage.posix`: files are this machine's files (a folder or ``file://``): renames replace
  atomically, ``O_EXCL`` creates exclusively and ``open()`` reads them. Elsewhere (S3, GCS) an object
  appears only when its upload completes.

Every write of a whole file goes through :meth:`Storage.write_atomic` (or, for a file that must not
be replaced, :meth:`Storage.create_exclusive`), so a reader never sees a partial file under its final
name. Reads and listings are retried (:meth:`Storage.read_bytes`, :meth:`Storage.files`): a timeout
is not an answer about a file.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
import uuid
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs

from cgc_ray.config.base import check_name
from cgc_ray.config.paths import is_uri

__all__ = ["CHECKPOINT_NAME", "HIDDEN", "Storage", "resolve"]

CHECKPOINT_NAME = "checkpoint.pt"
HIDDEN = (".", "_")  # name prefixes that Parquet readers (and cgc-ray's own) skip
STALE_TEMP_S = 3600.0  # a temporary file this old belongs to a writer that died
# A read or listing that fails this often in a row is an error, not a hiccup (an S3 timeout, a stale NFS
# handle): the pauses between attempts, 0.2 + 0.4 + 0.8 s, outlast a brief network or server blip.
READ_ATTEMPTS = 4
_RETRY_S = 0.2
_PARTITION = "experiment="
_T = TypeVar("_T")


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a local path or a pyarrow filesystem URI; a local path made absolute."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    try:
        fs, path = pafs.FileSystem.from_uri(location)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise ValueError(f"storage URI {location!r} is not usable by pyarrow: {e}") from None
    return fs, path.rstrip("/")


def _retrying(attempt: Callable[[], _T]) -> _T:
    """``attempt()``, tried up to :data:`READ_ATTEMPTS` times while it raises OSError.

    FileNotFoundError is an answer, not a hiccup: it is raised at once.
    """
    for i in range(READ_ATTEMPTS - 1):
        try:
            return attempt()
        except FileNotFoundError:
            raise
        except OSError:
            time.sleep(_RETRY_S * 2**i)
    return attempt()


class Storage:
    """A storage root resolved once: ``fs`` (a pyarrow filesystem) and ``root`` (its path there).

    Cheap to build from its location string, so it crosses into Ray as that string (``uri``)
    and each worker builds its own.
    """

    def __init__(self, location: str | os.PathLike):
        location = os.fspath(location)
        self.fs, self.root = resolve(location)
        self.is_local = not is_uri(location)
        self.posix = isinstance(self.fs, pafs.LocalFileSystem)
        self.uri = self.root if self.is_local else location

    @classmethod
    def of(cls, storage: "Storage | str") -> "Storage":
        """``storage`` itself, or the storage its location string names."""
        return storage if isinstance(storage, Storage) else cls(storage)

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    # ---------------------------------------------------------------- where things live

    def experiment_dir(self, experiment: str) -> str:
        """``experiment=<name>``: the Hive partition holding the experiment's trial rows."""
        return f"{self.root}/{_PARTITION}{check_name('experiment name', experiment)}"

    def row_path(self, experiment: str, trial_id: str) -> str:
        return f"{self.experiment_dir(experiment)}/{check_name('trial_id', trial_id)}.parquet"

    def corrupt_dir(self, experiment: str) -> str:
        """Where unreadable row files of the experiment are set aside."""
        return f"{self.experiment_dir(experiment)}/_corrupt"

    def checkpoint_path(self, experiment: str, trial_id: str) -> str:
        experiment, trial_id = check_name("experiment name", experiment), check_name("trial_id", trial_id)
        return f"{self.root}/_checkpoints/{experiment}/{trial_id}/{CHECKPOINT_NAME}"

    def summary_path(self, experiment: str) -> str:
        return f"{self.root}/_summary/{check_name('experiment name', experiment)}.parquet"

    def leases_dir(self, experiment: str) -> str:
        return f"{self.root}/_leases/{check_name('experiment name', experiment)}"

    def figures_dir(self, experiment: str) -> str:
        return f"{self.root}/_figures/{check_name('experiment name', experiment)}"

    @property
    def ray_path(self) -> str:
        """Ray's ``storage_path`` (Tune and Train add the run name): ``<root>/_ray``, as a URI for a URI root.

        Joined on the parsed URI, so query parameters (``?endpoint_override=...``) stay at the end.
        """
        if self.is_local:
            return f"{self.root}/_ray"
        parts = urlsplit(self.uri)
        return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/_ray"))

    # ---------------------------------------------------------------- writing

    def write_atomic(self, path: str, write: Callable[[str], object]) -> str:
        """Run ``write(target)`` (a path in :attr:`fs`) so that ``path`` appears whole or not at all.

        On a :attr:`posix` root, ``write`` fills a hidden temporary file with a unique name in
        the same folder, which is renamed over ``path``; on any failure (a full disk, a copy
        that raises, Ctrl-C) the temporary file is removed. A writer killed outright leaves it;
        :meth:`remove_stale_temps` deletes it later. An object store publishes an object only
        when its upload completes, so there ``write`` writes ``path`` itself. Returns ``path``.
        """
        parent, _, name = path.rpartition("/")
        if not self.posix:  # no folders to make: a key's prefix is its folder (creating one is a request)
            write(path)
            return path
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
        try:
            write(tmp)
            self.fs.move(tmp, path)
        except BaseException:
            self.delete_quietly(tmp)
            raise
        return path

    def write_bytes(self, path: str, data: bytes) -> str:
        def put(target: str) -> None:
            with self.fs.open_output_stream(target) as f:
                f.write(data)

        return self.write_atomic(path, put)

    def upload(self, local: str | Path, path: str) -> str:
        """Copy the local file ``local`` to ``path`` atomically."""
        return self.write_atomic(path, lambda target: pafs.copy_files(
            str(local), target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs))

    def download(self, path: str, local: str | Path) -> None:
        pafs.copy_files(path, str(local), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create ``path`` holding ``data`` unless it exists; True if this call created it. A :attr:`posix` root only.

        ``data`` is written to a temporary file first, which is then hard-linked to ``path``: the link
        fails if ``path`` exists (so of several creators exactly one wins, on NFS too), and ``path``
        never exists empty or half written. A failure at any step (a full disk, a kill) leaves ``path``
        absent, never half made; a killed writer's temporary file is removed by :meth:`remove_stale_temps`.
        """
        if not self.posix:
            raise NotImplementedError(f"{self.uri}: an object store has no exclusive create through pyarrow")
        parent, _, name = path.rpartition("/")
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "xb") as f:
                f.write(data)
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            self.delete_quietly(tmp)
        return True

    def delete_quietly(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except OSError:  # FileNotFoundError included: someone else removed it
            pass

    # ---------------------------------------------------------------- reading and tidying

    def read_bytes(self, path: str) -> bytes:
        """The whole file at ``path``, read in full; FileNotFoundError at once if it does not exist.

        A read error, or a read that returns fewer bytes than the file holds, is tried again
        (:data:`READ_ATTEMPTS` in all); the last attempt's OSError is raised.
        """
        def attempt() -> bytes:
            with self.fs.open_input_file(path) as f:
                size, data = f.size(), f.read()
            if len(data) != size:
                raise OSError(f"short read of {path}: {len(data)} of its {size} bytes")
            return data

        return _retrying(attempt)

    def files(self, directory: str, *, recursive: bool = False) -> list[pafs.FileInfo]:
        """The files in ``directory`` (with ``recursive``, in its subfolders too; none if it does not exist).

        A listing that fails is tried again (:data:`READ_ATTEMPTS` in all).
        """
        selector = pafs.FileSelector(directory, allow_not_found=True, recursive=recursive)
        infos = _retrying(lambda: self.fs.get_file_info(selector))
        return [i for i in infos if i.type == pafs.FileType.File]

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    @staticmethod
    def is_temp(name: str) -> bool:
        """A temporary file of :meth:`write_atomic` (``.<name>.<unique>.tmp``)."""
        return name.startswith(".") and name.endswith(".tmp")

    def remove_stale_temps(self, infos: list[pafs.FileInfo], now: _dt.datetime | None = None) -> None:
        """Delete the temporary files among ``infos`` older than :data:`STALE_TEMP_S` (their writers died)."""
        now = now or _dt.datetime.now(_dt.timezone.utc)
        for info in infos:
            if self.is_temp(info.base_name):
                mtime = info.mtime.astimezone(_dt.timezone.utc) if info.mtime is not None else now
                if (now - mtime).total_seconds() > STALE_TEMP_S:
                    self.delete_quietly(info.path)

    def set_aside(self, path: str, experiment: str, now: _dt.datetime) -> str | None:
        """Move the row file ``path`` of ``experiment`` into its ``_corrupt`` folder; where it went.

        Under a name of its own, so two drivers setting files aside never collide; None when ``path``
        is already gone (another driver moved it first).
        """
        aside = f"{self.corrupt_dir(experiment)}/{path.rpartition('/')[2]}.{now:%Y%m%dT%H%M%S}.{uuid.uuid4().hex[:8]}"
        self.fs.create_dir(self.corrupt_dir(experiment), recursive=True)
        try:
            self.fs.move(path, aside)
        except OSError:  # FileNotFoundError locally; an object store's copy of a missing key may say less
            if self.exists(path):
                raise
            return None
        return aside

    def check_writable(self) -> None:
        """Create the root and write and delete a probe file there; raises what the filesystem raises."""
        self.fs.create_dir(self.root, recursive=True)
        probe = f"{self.root}/.cgc-ray-probe-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(probe) as f:
            f.write(b"ok")
        self.fs.delete_file(probe)
