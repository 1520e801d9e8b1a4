"""A data root given as a URI: staged once per node, verified before use, read as the local root.

The source is the synthetic dataset's real on-disk layout (``<root>/<cache name>/CUB_200_2011/...``), as a
``file://`` folder, as ``.tar`` / ``.tar.gz`` / ``.tar.zst`` archives, and (one test) from a loopback S3
server speaking the S3 HTTP API.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from conftest import TINY
from cgc_ray import data as D
from cgc_ray.config import PRESETS, SpecError, apply_overrides, load_spec
from cgc_ray.data import staging
from cgc_ray.data.synthetic import ensure
from cgc_ray.train.trial import run_trial, synthetic_options

# the tiniest demo trial, on 5 classes x (4 train + 2 val + 2 test) images of 32 px
TRIAL = [*TINY, "sweep.grid={}", "method.lam=0.5", "data.synthetic.n_train_per_class=4",
         "data.synthetic.n_test_per_class=2", "data.synthetic.n_val_per_class=2"]


def _spec(*overrides):
    return apply_overrides(load_spec(PRESETS["lambda_ablation_demo"]), [*TRIAL, *overrides])


OPTIONS = synthetic_options(_spec())


def _digest(folder: Path) -> dict[str, str]:
    """relative path -> sha1 of every regular file under ``folder`` (the marker left out)."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != staging.MARKER}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A data root holding the synthetic dataset as the generator writes it."""
    root = tmp_path_factory.mktemp("source")
    ensure(root, **OPTIONS)
    return root


def _tar(source: Path, path: Path) -> Path:
    """``source``'s contents as an archive at ``path`` (.tar, .tar.gz or .tar.zst), members relative to it."""
    codec = staging.ARCHIVES[next(s for s in staging.ARCHIVES if path.name.endswith(s))]
    out = pa.CompressedOutputStream(str(path), codec) if codec else open(path, "wb")
    with out, tarfile.open(fileobj=out, mode="w|") as tar:
        for entry in sorted(source.iterdir()):
            tar.add(entry, arcname=entry.name)
    return path


@pytest.fixture(scope="module")
def archive(source, tmp_path_factory) -> Path:
    return _tar(source, tmp_path_factory.mktemp("archives") / "synthetic.tar")


def _records(root) -> list[tuple]:
    """Every split's records with paths relative to the dataset folder: equal for equal datasets."""
    cub = ensure(root, **OPTIONS)
    return [(split, os.path.relpath(r.path, cub), r.label, r.boxes, r.size)
            for split in ("train", "test") for r in D.records("synthetic", root, split, **OPTIONS)]


@pytest.mark.parametrize("kind", ["folder", ".tar", ".tar.gz", ".tar.zst"])
def test_a_staged_uri_root_is_the_same_dataset_as_the_local_root(kind, source, tmp_path, capfd, monkeypatch):
    uri = source.as_uri() if kind == "folder" else _tar(source, tmp_path / f"synthetic{kind}").as_uri()
    monkeypatch.setattr(staging, "PROGRESS_EVERY_S", 0.0)  # a progress line at every read
    staged = staging.staged_root(uri, tmp_path / "cache")
    name = source.name if kind == "folder" else "synthetic"
    assert staged.parent == tmp_path / "cache" and re.fullmatch(rf"{name}-[0-9a-f]{{16}}", staged.name)
    assert _digest(staged) == _digest(source)  # every file, byte for byte
    marker = json.loads((staged / staging.MARKER).read_text())
    assert (marker["files"], marker["bytes"]) == (len(_digest(source)),
                                                  sum(p.stat().st_size for p in source.rglob("*") if p.is_file()))
    assert _records(staged) == _records(source)
    assert _digest(staged) == _digest(source)  # reading it generated nothing: the staged dataset was used
    err = capfd.readouterr().err
    assert f"cgc-ray: staged {uri} into {staged}: {marker['files']} files" in err and "MB/s" in err
    size = marker["bytes"] if kind == "folder" else Path(uri.removeprefix("file://")).stat().st_size
    assert re.search(rf"^cgc-ray: staging {re.escape(uri)}: \d+ MB of {round(size / 1e6)} MB \(\d+ %\), \d+ MB/s$", err,
                     flags=re.M), err
    # another trial process of the node finds it staged and copies nothing
    staging._STAGED.clear()
    assert staging.staged_root(uri, tmp_path / "cache") == staged
    assert "staged" not in capfd.readouterr().err


def test_a_folder_of_datasets_stages_only_the_one_a_trial_reads(tmp_path):
    """``CGC_RAY_DATA_ROOT=s3://bucket/datasets`` holding CUB_200_2011/ and flowers-102.tar.zst: a CUB trial's
    node stages CUB alone, a Flowers trial's node the Flowers archive alone."""
    from fixtures_data import write_cub, write_flowers
    from cgc_ray.train.trial import data_root

    root = tmp_path / "datasets"
    write_cub(root)
    write_flowers(tmp_path / "flowers")
    _tar(tmp_path / "flowers", root / "flowers-102.tar.zst")
    (root / "notes.txt").write_text("read by no dataset")
    cub = Path(data_root(_spec("data.dataset=cub200", f"data.root={root.as_uri()}")))
    assert sorted(p.name for p in cub.iterdir()) == [staging.MARKER, "CUB_200_2011"]
    assert _digest(cub / "CUB_200_2011") == _digest(root / "CUB_200_2011")
    flowers = Path(data_root(_spec("data.dataset=flowers102", f"data.root={root.as_uri()}")))
    assert sorted(p.name for p in flowers.iterdir()) == [staging.MARKER, "flowers-102"] and flowers != cub
    assert [r.label for r in D.records("flowers102", flowers, "train")] == \
           [r.label for r in D.records("flowers102", tmp_path / "flowers", "train")]
    whole = staging.staged_root(root.as_uri())  # no dataset named: the folder as it is
    assert sorted(p.name for p in whole.iterdir()) == sorted([staging.MARKER, "CUB_200_2011", "flowers-102.tar.zst",
                                                              "notes.txt"])


def test_an_archive_is_staged_anew_when_replaced(source, archive, tmp_path):
    copy = tmp_path / "data.tar"
    copy.write_bytes(archive.read_bytes())
    first = staging.staged_root(copy.as_uri(), tmp_path / "cache")
    with tarfile.open(copy, "a") as tar:  # a new upload under the same name
        tar.add(source / next(p.name for p in source.iterdir()) / "CUB_200_2011" / "classes.txt", arcname="extra.txt")
    staging._STAGED.clear()  # a new process: this one keeps reading the copy it staged
    second = staging.staged_root(copy.as_uri(), tmp_path / "cache")
    assert second != first and (second / "extra.txt").is_file() and not (first / "extra.txt").exists()


_STAGE_IN_TURN = """
import sys, time
from pathlib import Path
from cgc_ray.data import staging
uri, cache, me, other = sys.argv[1:]
real = staging._extract
def slow(*args):  # hold the lock long enough that the other process must wait on it
    time.sleep(1.0)
    return real(*args)
staging._extract = slow
Path(me).touch()
while not Path(other).exists():  # start together
    time.sleep(0.01)
print(staging.staged_root(uri, cache))
"""


def test_two_processes_on_a_node_copy_once(source, archive, tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _STAGE_IN_TURN, archive.as_uri(), str(tmp_path / "cache"),
                               str(tmp_path / f"ready{i}"), str(tmp_path / f"ready{1 - i}")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    (staged,) = {Path(out.strip()) for out, _ in outs}
    errs = "".join(err for _, err in outs)
    assert errs.count("cgc-ray: staged ") == 1 and errs.count("cgc-ray: waiting for another process") == 1, errs
    assert _digest(staged) == _digest(source)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([staged.name, f"{staged.name}.lock"])


_KILLED_MID_COPY = """
import os, signal, sys, tarfile
from cgc_ray.data import staging
real, calls = tarfile.TarFile.extract, [0]
def extract(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == 10:  # ten entries written: the node dies
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, *args, **kwargs)
tarfile.TarFile.extract = extract
staging.staged_root(sys.argv[1], sys.argv[2])
"""


def test_a_copy_killed_half_way_is_never_used_and_the_next_stages_anew(source, archive, tmp_path):
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", _KILLED_MID_COPY, archive.as_uri(), str(cache)], timeout=60)
    assert proc.returncode == -9
    (dead,) = cache.glob("*.tmp-*")  # what the dead copier left: never under the final name
    assert not (cache / dead.name.rpartition(".tmp-")[0]).exists() and 0 < len(list(dead.rglob("*"))) < 40
    staged = staging.staged_root(archive.as_uri(), cache)
    assert _digest(staged) == _digest(source) and not dead.exists()


def test_a_copy_that_fails_half_way_leaves_nothing(source, tmp_path, monkeypatch):
    real, calls = staging._Progress.add, [0]

    def add(self, n):  # the tenth file's bytes: the connection drops
        calls[0] += 1
        if calls[0] == 10:
            raise OSError("simulated: connection reset")
        real(self, n)

    cache = tmp_path / "cache"
    monkeypatch.setattr(staging, "COPY_THREADS", 1)
    monkeypatch.setattr(staging._Progress, "add", add)
    with pytest.raises(OSError, match="connection reset"):
        staging.staged_root(source.as_uri(), cache)
    assert calls[0] == 10 and [p.suffix for p in cache.iterdir()] == [".lock"]
    monkeypatch.undo()
    assert _digest(staging.staged_root(source.as_uri(), cache)) == _digest(source)


@pytest.mark.parametrize("cut", ["mid-member", "at a member boundary"])
def test_an_archive_cut_short_is_refused(archive, tmp_path, cut):
    data = archive.read_bytes()
    with tarfile.open(archive) as tar:
        boundary = tar.getmembers()[len(tar.getmembers()) // 2].offset  # where a header starts
    short = tmp_path / "short.tar"
    short.write_bytes(data[: boundary + 700] if cut == "mid-member" else data[:boundary])
    with pytest.raises(OSError, match="cut short"):
        staging.staged_root(short.as_uri(), tmp_path / "cache")
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".lock"]


def test_an_archive_of_read_only_folders_and_unsafe_paths(tmp_path):
    """A stream sets a folder's mode before its files arrive: a read-only folder must still take them. A member
    that would land outside the staged folder is refused (tar's "data" filter)."""
    (tmp_path / "src" / "images").mkdir(parents=True)
    (tmp_path / "src" / "images" / "a.jpg").write_bytes(b"jpeg")
    (tmp_path / "src" / "images").chmod(0o555)
    ok = _tar(tmp_path / "src", tmp_path / "ro.tar")
    (tmp_path / "src" / "images").chmod(0o755)
    staged = staging.staged_root(ok.as_uri(), tmp_path / "cache")
    assert (staged / "images" / "a.jpg").read_bytes() == b"jpeg"
    assert (staged / "images").stat().st_mode & 0o777 == 0o755  # writable by its owner (root writes regardless)
    with tarfile.open(tmp_path / "evil.tar", "w") as tar:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    with pytest.raises(ValueError, match=r"'\.\./outside\.txt' would be extracted to .*outside the destination"):
        staging.staged_root((tmp_path / "evil.tar").as_uri(), tmp_path / "cache")
    assert not (tmp_path / "cache" / "outside.txt").exists() and not (tmp_path / "outside.txt").exists()


def test_a_node_without_room_fails_before_copying(source, archive, tmp_path, monkeypatch):
    monkeypatch.setattr(staging.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 99, 1))
    for uri in (source.as_uri(), archive.as_uri()):
        with pytest.raises(OSError, match=r"needs at least \d+ MB but .* has 0 MB free: point CGC_RAY_CACHE_DIR"):
            staging.staged_root(uri, tmp_path / "cache")
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".lock", ".lock"]


def test_what_a_uri_root_must_be(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"data.root='file://.*/nope' does not exist"):
        staging.source((tmp_path / "nope").as_uri())
    with pytest.raises(ValueError, match=r"is a file but not an archive; give a folder .*\.tar, \.tar\.zst"):
        staging.source((tmp_path / "notes.txt").as_uri())


def test_the_driver_checks_a_uri_root_exists_and_leaves_its_contents_to_the_nodes(tmp_path):
    from cgc_ray.config import check_data_root, data_root_missing_here
    from cgc_ray.runner.driver import _check_data_where_we_can

    base = apply_overrides(load_spec(PRESETS["lambda_ablation_demo"]), ["data.dataset=cub200", "sweep.grid={}"])
    empty = tmp_path / "empty"
    empty.mkdir()
    spec = apply_overrides(base, [f"data.root={empty.as_uri()}"])
    check_data_root(spec)  # the URI's contents are checked where it is staged
    assert data_root_missing_here(spec) == [empty.as_uri()]
    _check_data_where_we_can(spec, on_this_node=False)
    with pytest.raises(SpecError, match=r"data.root=.file:.*/empty. \(staged at .*/empty\) lacks images.txt"):
        check_data_root(spec, staged={empty.as_uri(): str(empty)})
    missing = apply_overrides(base, [f"data.root={(tmp_path / 'nope').as_uri()}"])
    with pytest.raises(SpecError, match=r"data.root='file://.*/nope' does not exist"):
        _check_data_where_we_can(missing, on_this_node=False)


def test_a_trial_trains_from_a_uri_root(source, archive, tmp_path):
    metrics = run_trial(_spec(f"data.root={archive.as_uri()}"), trial_dir=tmp_path / "uri")
    assert (metrics["epoch"], metrics["n_train"], metrics["n_val"]) == (1, 5 * 4, 5 * 2)
    assert _digest(staging.staged_root(archive.as_uri())) == _digest(source)  # read as staged, nothing generated


def test_the_imagenet_index_of_a_staged_root_is_built_once_and_kept_in_the_cache(tmp_path, monkeypatch):
    from fixtures_data import write_imagenet
    from cgc_ray.data import imagenet

    write_imagenet(tmp_path / "src")
    archive = _tar(tmp_path / "src", tmp_path / "imagenet.tar.zst")
    monkeypatch.setenv(D.registry.ENV_CACHE_DIR, str(tmp_path / "cache"))
    staged = staging.staged_root(archive.as_uri())
    assert staged.parent == tmp_path / "cache" / "data"
    first = imagenet.imagenet_records(staged, "train")
    (index,) = (tmp_path / "cache" / "index").glob("imagenet-train-*.parquet")
    built = index.stat().st_mtime_ns
    local = imagenet.imagenet_records(tmp_path / "src", "train")
    monkeypatch.setattr(imagenet, "_walk_imagenet", lambda *a: pytest.fail("the index was built again"))
    assert imagenet.imagenet_records(staging.staged_root(archive.as_uri()), "train") == first
    assert index.stat().st_mtime_ns == built
    assert [os.path.relpath(r.path, staged) for r in first] == \
           [os.path.relpath(r.path, tmp_path / "src") for r in local]


def test_stage_from_s3(source, archive):
    """The archive and the folder uploaded to a loopback S3 server (moto, the S3 HTTP API) stage as from disk."""
    pytest.importorskip("moto")
    from fixtures_storage import loopback_s3

    with loopback_s3() as root:
        fs, prefix = pafs.FileSystem.from_uri(root)
        pafs.copy_files(str(archive), f"{prefix}/synthetic.tar", destination_filesystem=fs)
        pafs.copy_files(str(source), f"{prefix}/folder", destination_filesystem=fs)
        base, _, query = root.partition("?")
        cache = archive.parent / "s3cache"
        for uri in (f"{base}/synthetic.tar?{query}", f"{base}/folder?{query}"):
            assert _digest(staging.staged_root(uri, cache)) == _digest(source), uri
        # one dataset of a folder of several: its URI is joined before the query
        assert _digest(staging.staged_root(root, cache, entries=("folder",)) / "folder") == _digest(source)
