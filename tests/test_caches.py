"""Caches on a node: keyed on what they were built from, refreshed when it changes, and bounded.

Real files throughout: a ``file://`` URI goes the object-store way (a copy into the weights cache), and the
ImageNet index is built from a fixture folder that the tests then change.
"""

import os
from pathlib import Path

import fixtures_data as fx
import pytest
from conftest import TINY

from cgc_ray.config import PRESETS, apply_overrides, load_spec
from cgc_ray.data import imagenet, records
from cgc_ray.train import trial as T


def _weights_spec(uri: str):
    return apply_overrides(load_spec(PRESETS["lambda_ablation_demo"]), [*TINY, f"model.weights={uri}"])


def _fetched(path: Path) -> bytes:
    """What a trial naming ``path`` as a URI reads (through ``local_weights``, as ``run_trial`` does)."""
    return Path(T.local_weights(_weights_spec(f"file://{path}"))).read_bytes()


def _copies(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "weights").rglob("*") if p.is_file())


def _set_mtime(path: Path, seconds_later: float) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + int(seconds_later * 1e9)))


# ---------------------------------------------------------------- weights


def test_a_changed_weights_file_is_fetched_again_and_its_old_copy_dropped(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CGC_RAY_CACHE_DIR", str(cache))
    ckpt = tmp_path / "pretrain" / "checkpoint.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"epoch 3 of 90")  # fetched while the pretraining was still running
    assert _fetched(ckpt) == b"epoch 3 of 90"

    ckpt.write_bytes(b"epoch 90 of 90")  # it finished: the same URI, other bytes
    assert _fetched(ckpt) == b"epoch 90 of 90"
    ckpt.write_bytes(b"epoch 91 of 90")  # same size: the modification time tells
    _set_mtime(ckpt, 2)
    assert _fetched(ckpt) == b"epoch 91 of 90"
    (copy,) = _copies(cache)
    assert copy.read_bytes() == b"epoch 91 of 90"  # one copy per file: the old ones are gone

    assert _fetched(ckpt) == b"epoch 91 of 90"  # unchanged: read from the cache, not copied again
    assert [p.stat().st_ino for p in _copies(cache)] == [copy.stat().st_ino]


def test_the_weights_cache_stays_within_its_bound_dropping_the_least_recently_used(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CGC_RAY_CACHE_DIR", str(cache))
    monkeypatch.setattr(T, "WEIGHTS_CACHE_BYTES", 250)
    files = []
    for i in range(5):
        f = tmp_path / f"w{i}.pt"
        f.write_bytes(bytes([i]) * 100)
        files.append(f)
    _fetched(files[0])
    _fetched(files[1])
    _fetched(files[0])  # used again: now the most recent
    for f in files[2:]:
        _fetched(f)
        assert sum(p.stat().st_size for p in _copies(cache)) <= 250
    held = {p.read_bytes()[0] for p in _copies(cache)}
    assert held == {3, 4}  # the two used last
    assert _fetched(files[0]) == bytes([0]) * 100  # a dropped copy is simply fetched again
    assert {p.read_bytes()[0] for p in _copies(cache)} == {4, 0}


def test_a_single_file_larger_than_the_bound_is_still_served(tmp_path, monkeypatch):
    monkeypatch.setenv("CGC_RAY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(T, "WEIGHTS_CACHE_BYTES", 10)
    big = tmp_path / "big.pt"
    big.write_bytes(b"x" * 100)
    assert _fetched(big) == b"x" * 100


# ---------------------------------------------------------------- the ImageNet index


def _indexes(cache: Path, split: str) -> list[Path]:
    return sorted(cache.glob(f"imagenet-{split}-*.parquet"))


def test_the_imagenet_index_is_replaced_when_its_folder_changes(tmp_path):
    d = fx.write_imagenet(tmp_path)
    cache = tmp_path / "cache"
    assert len(records("imagenet", tmp_path, "train", cache_dir=cache)) == 6
    (first,) = _indexes(cache, "train")
    for n in (3, 4, 5):  # images added over time: each change is a new index, and the old one goes
        fx.write_image(d / "train" / "n01443537" / f"n01443537_{n}.JPEG")
        _set_mtime(d / "train" / "n01443537", n)
        assert len(records("imagenet", tmp_path, "train", cache_dir=cache)) == 4 + n  # 6 images, plus _3 ... _n
        (index,) = _indexes(cache, "train")
        assert index != first
    records("imagenet", tmp_path, "val", cache_dir=cache)
    assert len(_indexes(cache, "val")) == 1 and len(_indexes(cache, "train")) == 1  # one per split


def test_the_imagenet_index_sees_a_rewritten_box_file_of_the_same_time(tmp_path):
    """The box CSV rewritten with its old modification time (a copy that kept times): its size tells."""
    d = fx.write_imagenet(tmp_path, boxes="csv")
    cache = tmp_path / "cache"
    by_stem = lambda recs: {Path(r.path).stem: r.boxes for r in recs}  # noqa: E731
    before = by_stem(records("imagenet", tmp_path, "val", cache_dir=cache))
    assert before["ILSVRC2012_val_00000003"] == ((2.0, 0.0, 3.0, 1.0),)
    csv = d / "LOC_val_solution.csv"
    st = csv.stat()
    csv.write_text(csv.read_text().replace("n01484850 3 1 3 1", "n01484850 3 1 30 10"))
    os.utime(csv, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = by_stem(records("imagenet", tmp_path, "val", cache_dir=cache))
    assert after["ILSVRC2012_val_00000003"] == ((2.0, 0.0, 30.0, 10.0),)
    assert len(_indexes(cache, "val")) == 1


def test_two_imagenet_folders_keep_an_index_each(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    fx.write_imagenet(a)
    fx.write_imagenet(b, wnids=fx.IMAGENET_WNIDS[:2])
    cache = tmp_path / "cache"
    assert len(records("imagenet", a, "train", cache_dir=cache)) == 6
    assert len(records("imagenet", b, "train", cache_dir=cache)) == 4
    assert len(_indexes(cache, "train")) == 2

    def no_walk(*args, **kwargs):
        raise AssertionError("walked a folder whose index is cached")

    monkeypatch.setattr(imagenet, "_walk_imagenet", no_walk)
    assert len(records("imagenet", a, "train", cache_dir=cache)) == 6
    assert len(records("imagenet", b, "train", cache_dir=cache)) == 4
