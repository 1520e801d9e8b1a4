"""The storage root: resolved once into ``(filesystem, root path)``; the one answer to "where does X live".

A storage location is a local folder or a pyarrow filesystem URI: ``file:///shared/mount``,
``s3://bucket/prefix``, ``s3://bucket/prefix?endpoint_override=host:port&scheme=http``,
``gs://bucket/prefix``. :class:`Storage` resolves it once (as Ray's ``StorageContext`` does) and
builds every path under it; no other module spells a folder of this layout::

    <root>/experiment=<name>/<trial_id>.parquet          one row per trial        (results.table)
    <root>/experiment=<name>/_corrupt/                    row files set aside      (results.table)
    <root>/_summary/<name>.parquet                        the aggregated table     (results.summary)
    <root>/_summary/<name>.html                           the report page          (results.html)
    <root>/_checkpoints/<name>/<trial_id>/checkpoint.pt   a trial's checkpoint     (runner.worker)
    <root>/_checkpoints/<name>/<trial_id>/errors.json     its code's failures      (runner.worker)
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

A third, :attr:`Storage.exclusive`, says whether :meth:`Storage.create_exclusive` works: on posix roots,
and on S3 through its conditional write (``If-None-Match: *``), which pyarrow does not expose, so it is
sent with boto3 (the ``s3`` extra) configured as pyarrow's filesystem is. :meth:`Storage.check_writable`
tries it once: a store that ignores or refuses it (an older S3-compatible server) is not exclusive.

Every write of a whole file goes through :meth:`Storage.write_atomic` (or, for a file that must not
be replaced, :meth:`Storage.create_exclusive`), so a reader never sees a partial file under its final
name. Reads and listings are retried (:meth:`Storage.read_bytes`, :meth:`Storage.files`): a timeout
is not an answer about a file.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs

from cgc_ray.config.base import check_name
from cgc_ray.config.paths import is_uri

__all__ = ["CHECKPOINT_NAME", "HIDDEN", "Storage", "advice", "resolve"]

CHECKPOINT_NAME = "checkpoint.pt"
HIDDEN = (".", "_")  # name prefixes that Parquet readers (and cgc-ray's own) skip
STALE_TEMP_S = 3600.0  # a temporary file this old belongs to a writer that died
# A read or listing that fails this often in a row is an error, not a hiccup (an S3 timeout, a stale NFS
# handle): the pauses between attempts, 0.2 + 0.4 + 0.8 s, outlast a brief network or server blip.
READ_ATTEMPTS = 4
_RETRY_S = 0.2
_PARTITION = "experiment="
_T = TypeVar("_T")
_S3_CLIENT_LOCK = threading.Lock()


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
        self.exclusive = self.posix or (self.fs.type_name == "s3" and importlib.util.find_spec("boto3") is not None)
        self.uri = self.root if self.is_local else location
        self._s3_client = None  # made on first use (boto3 imports in ~0.3 s)

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

    def errors_path(self, experiment: str, trial_id: str) -> str:
        """Beside the checkpoint: how often the trial's code raised in one driver's run (``runner.worker``)."""
        return f"{self.checkpoint_path(experiment, trial_id).rpartition('/')[0]}/errors.json"

    def summary_path(self, experiment: str) -> str:
        return f"{self.root}/_summary/{check_name('experiment name', experiment)}.parquet"

    def summary_html_path(self, experiment: str) -> str:
        """The experiment's report page (``results.html``), beside its summary."""
        return f"{self.root}/_summary/{check_name('experiment name', experiment)}.html"

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
        """Create ``path`` holding ``data`` unless it exists; True if this call created it. An :attr:`exclusive` root only.

        On a :attr:`posix` root ``data`` is written to a temporary file first, which is then hard-linked
        to ``path``: the link fails if ``path`` exists (so of several creators exactly one wins, on NFS
        too), and ``path`` never exists empty or half written. A failure at any step (a full disk, a kill)
        leaves ``path`` absent, never half made; a killed writer's temporary file is removed by
        :meth:`remove_stale_temps`. On S3 it is one conditional PUT: the store creates the object whole
        or answers 412.
        """
        if not self.exclusive:
            raise NotImplementedError(f"{self.uri}: this object store has no exclusive create here (S3 needs boto3: "
                                      "pip install 'cgc-ray[s3]')")
        if not self.posix:
            return self._put_if_absent(path, data)
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

    def _s3(self):
        """A boto3 S3 client set up as :attr:`fs` is: its endpoint, scheme, region and keys, as pyarrow resolved them
        from the URI and the environment (the pickled settings of an ``S3FileSystem``); no keys: boto3's own chain."""
        with _S3_CLIENT_LOCK:  # claims are written from a thread pool
            if self._s3_client is None:
                import boto3
                from botocore import UNSIGNED
                from botocore.config import Config

                o = self.fs.__reduce__()[1][0]
                endpoint = o["endpoint_override"] or None
                if endpoint and "://" not in endpoint:  # the URI's form, host:port
                    endpoint = f"{o['scheme']}://{endpoint}"
                config = Config(retries={"mode": "standard"}, signature_version=UNSIGNED if o.get("anonymous") else None)
                self._s3_client = boto3.client(
                    "s3", endpoint_url=endpoint, region_name=o["region"] or None, aws_access_key_id=o["access_key"],
                    aws_secret_access_key=o["secret_key"], aws_session_token=o["session_token"],
                    verify=o.get("tls_ca_file_path") or None, config=config)
            return self._s3_client

    def _put_if_absent(self, path: str, data: bytes) -> bool:
        """S3's conditional write of ``path`` (``If-None-Match: *``): True if created, False if it exists (412).

        A 409 (another conditional write of the key is in flight) is tried again, as S3 asks; the
        store's other refusals are an OSError.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, _, key = path.partition("/")
        for i in range(READ_ATTEMPTS):
            try:
                self._s3().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                return True
            except ClientError as e:
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status == 412:
                    return False
                if status == 409 and i < READ_ATTEMPTS - 1:  # the other write settles; then a 412, or this one lands
                    time.sleep(_RETRY_S * 2**i)
                    continue
                error: Exception = e
            except BotoCoreError as e:
                error = e
            raise OSError(f"conditional write of s3://{path}: {error}") from None

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
        """Create the root and write and delete a probe file there; raises what the filesystem raises.

        On S3 the probe also tries a conditional write over itself, which must be refused: a store that
        accepts it (ignoring the condition) or fails it is not :attr:`exclusive` from then on (said on stderr).
        """
        self.fs.create_dir(self.root, recursive=True)
        probe = f"{self.root}/.cgc-ray-probe-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(probe) as f:
            f.write(b"ok")
        try:
            if self.exclusive and not self.posix:
                try:
                    refused = not self._put_if_absent(probe, b"again")
                except OSError as e:
                    refused, why = False, str(e).splitlines()[0]
                else:
                    why = "it overwrote an object that existed"
                if not refused:
                    self.exclusive = False
                    print(f"cgc-ray: storage {self.uri} does not honour S3 conditional writes ({why}); leases there "
                          "fall back to write, wait and read back (see cgc_ray/runner/leases.py)", file=sys.stderr)
        finally:
            self.fs.delete_file(probe)


def advice(error: str) -> str:
    """What to do about a storage error, from the words of pyarrow's or the store's message ("" if nothing fits)."""
    e = error.lower()
    if "bucket" in e and ("not found" in e or "nosuchbucket" in e or "does not exist" in e):
        return "create the bucket (aws s3 mb s3://<bucket>, or the store's console) or correct its name"
    if "region" in e:
        return "add &region=<the bucket's region> to the URI (or set AWS_DEFAULT_REGION)"
    if any(w in e for w in ("access_denied", "accessdenied", "invalidaccesskeyid", "signaturedoesnotmatch",
                            "forbidden", "credentials")):
        return ("check the credentials this machine finds (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                "or the node's role) and that they may write under this prefix")
    if "not usable by pyarrow" in e:
        return "an S3-compatible store is written s3://bucket/prefix?endpoint_override=host:port&scheme=http"
    if any(w in e for w in ("network_connection", "connect to", "resolve host", "timed out", "timeout")):
        return ("check that the endpoint is reachable (an S3-compatible store: "
                "s3://bucket/prefix?endpoint_override=host:port&scheme=http, or AWS_ENDPOINT_URL)")
    return ""
