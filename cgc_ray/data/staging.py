"""A data root given as a URI, staged once per node into its local cache; every reader uses the local copy.

``data.root`` (or ``$CGC_RAY_DATA_ROOT``) may be a pyarrow filesystem URI (``s3://bucket/datasets``,
``file:///mnt/share/datasets``, ``s3://bucket/d?endpoint_override=host:port&scheme=http``) naming a folder in
the dataset's own on-disk layout, or one archive of it (``.tar``, ``.tar.zst``, ``.tar.gz``: pyarrow
decompresses, nothing else to install). :func:`staged_root` copies it into ``<cache>/data/<name>-<key>/``
(``$CGC_RAY_CACHE_DIR/data``, else ``~/.cache/cgc-ray/data``) on first use and returns that folder:

* One process copies; the others on the node block on the key's lock (``fcntl.flock``), then find it staged.
* The copy goes into ``<name>-<key>.tmp-<pid>``, is verified (the files and bytes the listing or the
  archive's members promised, counted on disk; an archive read to its last byte), gets :data:`MARKER` and
  is renamed into place. A folder under its final name is whole; a copy killed half-way is never used and
  the next process that takes the lock deletes it.
* Progress and rate go to stderr every :data:`PROGRESS_EVERY_S` seconds and at the end.

A folder of several datasets (``s3://bucket/datasets`` holding ``CUB_200_2011/`` and ``imagenet.tar.zst``)
stages only the one a trial reads (``staged_root``'s ``entries``, the registry's folder names).

The key is the URI for a folder (change the data: use a new prefix, or delete the staged folder), and the
URI, size and modification time for an archive (a new upload is staged anew). ImageNet's Parquet index
(``imagenet``) is keyed on the staged folder, so it is built once per node and kept next to it in the cache.
Torch-free. Whether a root is a URI is ``config.paths.is_uri``'s call, made by the caller.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import io
import json
import os
import shutil
import socket
import stat
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs

from . import registry

__all__ = ["ARCHIVES", "MARKER", "Source", "source", "staged_root"]

ARCHIVES: dict[str, str | None] = {".tar": None, ".tar.zst": "zstd", ".tar.zstd": "zstd", ".tar.gz": "gzip",
                                   ".tgz": "gzip"}  # suffix -> pyarrow codec
MARKER = ".cgc-ray-staged.json"
PROGRESS_EVERY_S = 5.0
# Many small files from an object store: each GET waits ~10-50 ms, so one stream would be latency-bound.
COPY_THREADS = 16
_CHUNK = 1 << 20
_TAR_BUFFER = 1 << 16
# pyarrow's S3 stream sends a ranged GET per read: an archive is read in large ones, not tar's 64 kB.
_STREAM_BUFFER = 16 << 20
# What this process staged: its trials (Tune reuses processes) read one copy and ask the store nothing more.
_STAGED: dict[tuple[str, str, tuple[str, ...]], Path] = {}


@dataclass(frozen=True)
class Source:
    """What a data-root URI names: a folder (``size`` None) or an archive (its codec, size and time)."""

    uri: str
    fs: pafs.FileSystem
    path: str
    archive: str | None  # the archive suffix, None for a folder
    size: int | None = None
    mtime_ns: int | None = None
    into: str = ""  # where in the staged root a folder's files go: its name, when one dataset of a folder of many

    @property
    def key(self) -> str:
        """``<name>-<hash>``: the staged folder's name in the cache."""
        name = Path(self.path).name
        name = name[: -len(self.archive)] if self.archive else name
        digest = hashlib.sha256(json.dumps([self.uri, self.size, self.mtime_ns, self.into]).encode()).hexdigest()[:16]
        return f"{name or 'root'}-{digest}"


def source(uri: str) -> Source:
    """The folder or archive ``uri`` names. ValueError / FileNotFoundError name the URI and what to give."""
    what = f"a folder in the dataset's layout or one archive of it ({', '.join(ARCHIVES)})"
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise ValueError(f"data.root={uri!r} is not a URI pyarrow reads ({e}); give {what}") from None
    path = path.rstrip("/")
    try:
        info = fs.get_file_info(path)
    except OSError as e:  # no credentials, access denied, no such bucket, endpoint unreachable
        raise OSError(f"data.root={uri!r} could not be read: {e}. Check the credentials and that they may list "
                      "and read it (on AWS: cluster/worker-policy.json, the data prefix)") from None
    if info.type == pafs.FileType.Directory:
        return Source(uri, fs, path, None)
    if info.type == pafs.FileType.File:
        suffix = next((s for s in sorted(ARCHIVES, key=len, reverse=True) if path.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"data.root={uri!r} is a file but not an archive; give {what}")
        return Source(uri, fs, path, suffix, info.size, info.mtime_ns)
    raise FileNotFoundError(f"data.root={uri!r} does not exist (or these credentials may not list it); give {what}")


def staged_root(uri: str, cache: str | os.PathLike | None = None, entries: Sequence[str] = ()) -> Path:
    """The local folder holding ``uri``'s dataset, staged into ``cache`` (default: the cache's ``data/``) once.

    Asked again in the same process, the answer is the same folder, without a request to the store.

    ``entries``: the folders the dataset may sit in under a root (the registry's ``subdirs``). A folder
    URI holding one of them at its top, as a folder or as an archive (``CUB_200_2011/``,
    ``imagenet.tar.zst``), is a folder of several datasets: only that one is staged, so a node stages
    what its trials read. Files beside it are not (give a dataset that reads them its own URI).
    """
    base = Path(cache) if cache is not None else registry.cache_dir() / "data"
    memo = (uri, str(base), tuple(entries))
    if memo in _STAGED and (_STAGED[memo] / MARKER).is_file():
        return _STAGED[memo]
    src = source(uri)
    if src.archive is None and entries:
        src = _one_dataset(src, entries) or src
    dest = base / src.key
    if not (dest / MARKER).is_file():
        base.mkdir(parents=True, exist_ok=True)
        with _locked(base / f"{src.key}.lock", uri):
            if not (dest / MARKER).is_file():  # else another process staged it while this one waited
                _stage(src, dest)
    _STAGED[memo] = dest
    return dest


def _one_dataset(src: Source, entries: Sequence[str]) -> Source | None:
    """The first of ``entries`` (their top folder, or an archive of it) found at the top of the folder ``src``."""
    names = list(dict.fromkeys(e.split("/")[0] for e in entries))
    candidates = [f"{src.path}/{n}{suffix}" for n in names for suffix in ("", *ARCHIVES)]
    for info in src.fs.get_file_info(candidates):
        if info.type not in (pafs.FileType.File, pafs.FileType.Directory):
            continue
        parts = urlsplit(src.uri)  # joined on the parsed URI: a query (?endpoint_override=...) stays last
        found = source(urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{info.base_name}")))
        return found if found.archive else replace(found, into=info.base_name)
    return None


@contextlib.contextmanager
def _locked(path: Path, uri: str) -> Iterator[None]:
    """An exclusive lock on ``path`` between the processes of this node; released when the holder dies."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"cgc-ray: waiting for another process on {socket.gethostname()} staging {uri}", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _stage(src: Source, dest: Path) -> None:
    """Copy (or extract) ``src`` into a temporary folder, verify it, mark it and rename it to ``dest``.

    Called with the key's lock held, so a temporary folder of this key already there is a dead copier's.
    """
    for dead in dest.parent.glob(f"{glob.escape(dest.name)}.tmp-*"):
        shutil.rmtree(dead, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)  # without its marker: not ours, or incomplete
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    start = time.monotonic()
    try:
        progress = _Progress(src.uri, src.size)
        expected = _extract(src, tmp, progress) if src.archive else _copy_folder(src, tmp, progress)
        found = _files_and_bytes(tmp)
        if found != expected:
            raise OSError(f"staging data.root={src.uri!r}: {tmp} holds {found[0]} files, {found[1]} bytes; the "
                          f"source has {expected[0]} files, {expected[1]} bytes. Is the disk full? Run again to retry")
        seconds = time.monotonic() - start
        (tmp / MARKER).write_text(json.dumps({"uri": src.uri, "size": src.size, "mtime_ns": src.mtime_ns,
                                              "files": found[0], "bytes": found[1], "seconds": round(seconds, 3)}))
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"cgc-ray: staged {src.uri} into {dest}: {found[0]} files, {_mb(found[1])} in {seconds:.1f} s "
          f"({progress.rate():.0f} MB/s read)", file=sys.stderr)


def _copy_folder(src: Source, tmp: Path, progress: "_Progress") -> tuple[int, int]:
    """Copy every file under ``src`` into ``tmp``; (files, bytes) of the listing."""
    infos = [i for i in src.fs.get_file_info(pafs.FileSelector(src.path, recursive=True))
             if i.type == pafs.FileType.File]
    expected = (len(infos), sum(i.size for i in infos))
    _check_space(src, tmp, expected[1])
    progress.total = expected[1]

    def copy(info: pafs.FileInfo) -> None:
        rel = Path(src.into, info.path[len(src.path):].lstrip("/"))
        if ".." in rel.parts:
            raise ValueError(f"data.root={src.uri!r} holds {info.path!r}, a path that leaves the folder")
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        with src.fs.open_input_stream(info.path, compression=None) as f, open(tmp / rel, "wb") as out:
            while chunk := f.read(_CHUNK):
                out.write(chunk)
                progress.add(len(chunk))

    todo, taking, failed = iter(infos), threading.Lock(), threading.Event()

    def drain() -> None:  # threads take the next file in turn; the first failure stops them all
        while not failed.is_set():
            with taking:
                info = next(todo, None)
            if info is None:
                return
            try:
                copy(info)
            except BaseException:
                failed.set()
                raise

    with ThreadPoolExecutor(COPY_THREADS) as pool:
        for done in [pool.submit(drain) for _ in range(COPY_THREADS)]:
            done.result()  # re-raises a failed copy
    return expected


def _extract(src: Source, tmp: Path, progress: "_Progress") -> tuple[int, int]:
    """Extract the archive ``src`` into ``tmp``, streaming; (files, bytes) of its members.

    Read to its last byte and to tar's end-of-archive block: an archive cut short raises OSError.
    """
    _check_space(src, tmp, src.size)
    with _Counting(src.fs.open_input_stream(src.path, compression=None, buffer_size=_STREAM_BUFFER), progress) as raw:
        codec = ARCHIVES[src.archive]
        stream = pa.CompressedInputStream(pa.PythonFile(raw, mode="r"), codec) if codec else io.BufferedReader(raw)
        files, total, ended = _untar(stream, tmp, src.uri)
        while raw.read(_CHUNK):  # the padding after the end-of-archive blocks: read all, count all
            pass
    if not ended or raw.n != src.size:
        raise OSError(f"staging data.root={src.uri!r}: read {raw.n} of its {src.size} bytes"
                      f"{'' if ended else ', and no end-of-archive block'}; the archive is cut short or changed "
                      "while it was read. Run again to retry (re-upload it if it is cut short)")
    return files, total


def _untar(stream, tmp: Path, uri: str) -> tuple[int, int, bool]:
    """(regular files, their bytes, whether the end-of-archive block came) of the tar ``stream``, extracted."""
    files = total = 0
    try:
        # tarfile's stream re-slices its buffer at every read: small buffers (not _CHUNK) keep that cheap
        with tarfile.open(fileobj=stream, mode="r|", bufsize=_TAR_BUFFER, copybufsize=_TAR_BUFFER) as tar:
            while (member := tar.next()) is not None:
                tar.extract(member, tmp, filter=_writable_folders)
                tar.members.clear()  # a stream needs no look-back; ImageNet's 1.3 M entries would cost ~1 GB
                if member.isreg():
                    files, total = files + 1, total + member.size
                elif member.islnk():  # a hard link is one more regular file on disk, of its target's size
                    files, total = files + 1, total + (tmp / member.name).stat().st_size
            # tarfile stops quietly at a missing header; a whole archive ends with a zero block, read here
            return files, total, tar.fileobj.tell() >= tar.offset + tarfile.BLOCKSIZE
    except tarfile.FilterError as e:
        raise ValueError(f"staging data.root={uri!r}: {e}; an archive of a dataset holds only paths inside "
                         "its folder, files and folders (and links within it)") from None
    except tarfile.TarError as e:
        raise OSError(f"staging data.root={uri!r}: the archive cannot be read ({e}); is it cut short?") from None


def _writable_folders(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tar's "data" filter (no absolute paths, links out of ``dest`` or device files), with folders left
    writable to us: one extracted from a stream gets its mode before its files, not after as in extractall."""
    member = tarfile.data_filter(member, dest)
    return member.replace(mode=member.mode | 0o700, deep=False) if member.isdir() and member.mode else member


def _files_and_bytes(folder: Path) -> tuple[int, int]:
    """(regular files, their bytes) under ``folder``, as found on disk."""
    files = total = 0
    for dirpath, _, names in os.walk(folder):
        for n in names:
            st = os.lstat(os.path.join(dirpath, n))
            if stat.S_ISREG(st.st_mode):
                files, total = files + 1, total + st.st_size
    return files, total


def _check_space(src: Source, tmp: Path, needed: int) -> None:
    free = shutil.disk_usage(tmp).free
    if free < needed:
        raise OSError(f"staging data.root={src.uri!r} needs at least {_mb(needed)} but {tmp.parent} has {_mb(free)} "
                      f"free: point {registry.ENV_CACHE_DIR} at a larger disk, or give the node type a larger "
                      "volume (cluster/gpu.yaml, BlockDeviceMappings)")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB" if n < 1e10 else f"{n / 1e9:,.1f} GB"


class _Progress:
    """Bytes read so far; a line on stderr every :data:`PROGRESS_EVERY_S` seconds. Thread-safe."""

    def __init__(self, uri: str, total: int | None):
        self.uri, self.total, self.done = uri, total, 0
        self.start = self.last = time.monotonic()
        self._lock = threading.Lock()

    def rate(self) -> float:
        """MB/s since the start."""
        return self.done / 1e6 / max(time.monotonic() - self.start, 1e-9)

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if now - self.last < PROGRESS_EVERY_S:
                return
            self.last = now
        of = f" of {_mb(self.total)} ({100 * self.done / self.total:.0f} %)" if self.total else ""
        print(f"cgc-ray: staging {self.uri}: {_mb(self.done)}{of}, {self.rate():.0f} MB/s", file=sys.stderr)


class _Counting(io.RawIOBase):
    """A pyarrow input stream as a Python raw stream that counts (and reports) the bytes read."""

    def __init__(self, stream, progress: _Progress):
        self.stream, self.progress, self.n = stream, progress, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.stream.read(len(buffer))
        buffer[: len(data)] = data
        self.n += len(data)
        self.progress.add(len(data))
        return len(data)

    def close(self) -> None:
        self.stream.close()
        super().close()
