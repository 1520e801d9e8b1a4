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

Every write of a whole file goes through :meth:`Storage.write_atomic`, so a reader never sees a
partial file under its final name.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import uuid
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs

from cgc_ray.config.paths import is_uri

__all__ = ["CHECKPOINT_NAME", "HIDDEN", "Storage", "resolve"]

CHECKPOINT_NAME = "checkpoint.pt"
HIDDEN = (".", "_")  # name prefixes that Parquet readers (and cgc-ray's own) skip
STALE_TEMP_S = 3600.0  # a temporary file this old belongs to a writer that died
_PARTITION = "experiment="
# a folder or file name under the root: no separators, no hidden prefix, no whitespace or control characters
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a local path or a pyarrow filesystem URI; a local path made absolute."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    try:
        fs, path = pafs.FileSystem.from_uri(location)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise ValueError(f"storage URI {location!r} is not usable by pyarrow: {e}") from None
    return fs, path.rstrip("/")


def _name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ValueError(f"{kind} {value!r} cannot be a folder or file name under the storage root; "
                         "use letters, digits, _ . - (starting with a letter or digit)")
    return value


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
        return f"{self.root}/{_PARTITION}{_name('experiment name', experiment)}"

    def row_path(self, experiment: str, trial_id: str) -> str:
        return f"{self.experiment_dir(experiment)}/{_name('trial_id', trial_id)}.parquet"

    def corrupt_dir(self, experiment: str) -> str:
        """Where unreadable row files of the experiment are set aside."""
        return f"{self.experiment_dir(experiment)}/_corrupt"

    def checkpoint_path(self, experiment: str, trial_id: str) -> str:
        return f"{self.root}/_checkpoints/{_name('experiment name', experiment)}/{_name('trial_id', trial_id)}/" \
               f"{CHECKPOINT_NAME}"

    def summary_path(self, experiment: str) -> str:
        return f"{self.root}/_summary/{_name('experiment name', experiment)}.parquet"

    def leases_dir(self, experiment: str) -> str:
        return f"{self.root}/_leases/{_name('experiment name', experiment)}"

    def figures_dir(self, experiment: str) -> str:
        return f"{self.root}/_figures/{_name('experiment name', experiment)}"

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
        self.fs.create_dir(parent, recursive=True)
        if not self.posix:
            write(path)
            return path
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

    def delete_quietly(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except OSError:  # FileNotFoundError included: someone else removed it
            pass

    # ---------------------------------------------------------------- reading and tidying

    def files(self, directory: str) -> list[pafs.FileInfo]:
        """The files directly in ``directory`` (none if it does not exist)."""
        infos = self.fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
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

    def set_aside(self, path: str, experiment: str, now: _dt.datetime) -> str:
        """Move the row file ``path`` of ``experiment`` into its ``_corrupt`` folder; returns where it went."""
        aside = f"{self.corrupt_dir(experiment)}/{path.rpartition('/')[2]}.{now:%Y%m%dT%H%M%S}"
        self.fs.create_dir(self.corrupt_dir(experiment), recursive=True)
        self.fs.move(path, aside)
        return aside

    def check_writable(self) -> None:
        """Create the root and write and delete a probe file there; raises what the filesystem raises."""
        self.fs.create_dir(self.root, recursive=True)
        probe = f"{self.root}/.cgc-ray-probe-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(probe) as f:
            f.write(b"ok")
        self.fs.delete_file(probe)
