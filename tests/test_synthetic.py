"""The embedded synthetic dataset: determinism, exact boxes, CUB layout, spurious cue, atomic cache."""
from __future__ import annotations

import inspect
import json
import re
import threading
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
from PIL import Image

from cgc_ray.config import DataSpec, SpecError, validate_spec
from cgc_ray.data import synthetic
from cgc_ray.data.formats import cub200_records

K = len(synthetic.CLASS_SHAPES)
SMALL = dict(n_train_per_class=6, n_test_per_class=4)


def _options(**over) -> dict:
    """The generator's options as a spec passes them (data.synthetic's defaults) at 64 px, ``over`` replaced."""
    return {**DataSpec().synthetic.model_dump(), "image_size": 64, **over}


def _ensure(root, **over) -> Path:
    return synthetic.ensure(root, **_options(**over))


def _table(cub: Path, name: str) -> dict[int, list[str]]:
    """An independent parse of a CUB "<id> <fields...>" file."""
    rows = [line.split() for line in (cub / name).read_text().splitlines()]
    return {int(r[0]): r[1:] for r in rows}


def _files(cub: Path) -> dict[str, bytes]:
    return {str(p.relative_to(cub)): p.read_bytes() for p in sorted(cub.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def clutter(tmp_path_factory) -> Path:
    return _ensure(tmp_path_factory.mktemp("clutter"), seed=0, **SMALL)


@pytest.fixture(scope="module")
def spurious(tmp_path_factory) -> Path:
    return _ensure(
        tmp_path_factory.mktemp("spurious"), variant="spurious", n_train_per_class=40, n_test_per_class=4
    )


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path, clutter):
    again = _ensure(tmp_path / "a", seed=0, **SMALL)
    other = _ensure(tmp_path / "b", seed=1, **SMALL)
    assert _files(again) == _files(clutter)
    a, b = _files(clutter), _files(other)
    assert a.keys() == b.keys()
    images = [k for k in a if k.startswith("images/")]
    assert sum(a[k] != b[k] for k in images) == len(images)


def test_counts_balance_and_cub_files_parse(clutter):
    paths = _table(clutter, "images.txt")
    labels = {i: int(v[0]) for i, v in _table(clutter, "image_class_labels.txt").items()}
    is_train = {i: int(v[0]) for i, v in _table(clutter, "train_test_split.txt").items()}
    classes = _table(clutter, "classes.txt")
    n = K * (SMALL["n_train_per_class"] + SMALL["n_test_per_class"])
    assert sorted(paths) == list(range(1, n + 1))
    assert classes == {k + 1: [f"{k + 1:03d}.{s}"] for k, s in enumerate(synthetic.CLASS_SHAPES)}
    for k in range(1, K + 1):
        ids = [i for i in paths if labels[i] == k]
        assert sum(is_train[i] for i in ids) == SMALL["n_train_per_class"]
        assert sum(1 - is_train[i] for i in ids) == SMALL["n_test_per_class"]
        assert all(paths[i][0].startswith(classes[k][0] + "/") for i in ids)
    for i, (rel,) in paths.items():
        with Image.open(clutter / "images" / rel) as im:
            assert (im.mode, im.size) == ("RGB", (64, 64))
    assert not (clutter / "conflict.txt").exists()

    train = cub200_records(clutter, "train")
    test = cub200_records(clutter, "test")
    assert len(train) == K * SMALL["n_train_per_class"] and len(test) == K * SMALL["n_test_per_class"]
    first = cub200_records(clutter, "train")[0]
    x, y, w, h = map(float, _table(clutter, "bounding_boxes.txt")[1])
    assert first.label == labels[1] - 1 and first.boxes == ((x, y, x + w, y + h),)
    assert Path(first.path) == clutter / "images" / paths[1][0]


def test_box_is_exactly_the_bounding_box_of_the_mask(clutter):
    boxes = _table(clutter, "bounding_boxes.txt")
    for i, (rel,) in _table(clutter, "images.txt").items():
        mask = np.array(Image.open(synthetic.mask_path(clutter, rel)))
        assert mask.shape == (64, 64) and set(np.unique(mask)) == {0, 255}
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        expected = [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]
        assert list(map(float, boxes[i])) == [float(v) for v in expected], rel


def test_distractors_stay_out_of_the_class_box_and_uniform_ch_is_moderate(clutter):
    boxes = {i: list(map(float, v)) for i, v in _table(clutter, "bounding_boxes.txt").items()}
    per_image: dict[int, int] = {}
    for line in (clutter / "distractor_boxes.txt").read_text().splitlines():
        i, x, y, w, h = line.split()
        i, (x, y, w, h) = int(i), map(float, (x, y, w, h))
        bx, by, bw, bh = boxes[i]
        overlap_w = min(x + w, bx + bw) - max(x, bx)
        overlap_h = min(y + h, by + bh) - max(y, by)
        assert overlap_w <= 0 or overlap_h <= 0, f"image {i}: distractor box overlaps the class box"
        assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64 and w > 0 and h > 0
        per_image[i] = per_image.get(i, 0) + 1
    counts = np.array([per_image.get(i, 0) for i in boxes])
    lo, hi = synthetic._N_DISTRACTORS
    assert counts.max() <= hi and counts.mean() >= lo - 0.5  # a distractor is dropped only when no place is found

    # Uniform-map CH = box area / image area: room for a heatmap to do better or worse.
    share = np.array([w * h / 64**2 for _, _, w, h in boxes.values()])
    assert 0.03 < share.min() and share.max() < 0.25 and 0.05 < share.mean() < 0.15


def test_spurious_cue_follows_p_cue_in_train_and_is_always_wrong_in_conflict(spurious):
    labels = {i: int(v[0]) for i, v in _table(spurious, "image_class_labels.txt").items()}
    is_train = {i: int(v[0]) for i, v in _table(spurious, "train_test_split.txt").items()}
    cues = {i: int(v[0]) for i, v in _table(spurious, "cues.txt").items()}
    conflict = {int(s) for s in (spurious / "conflict.txt").read_text().split()}
    assert len(conflict) == 4 * K
    assert all(is_train[i] == 0 and cues[i] != labels[i] for i in conflict)
    aligned = [i for i in labels if not is_train[i] and i not in conflict]
    assert len(aligned) == 4 * K and all(cues[i] == labels[i] for i in aligned)
    train = [i for i in labels if is_train[i]]
    agree = np.mean([cues[i] == labels[i] for i in train])
    assert abs(agree - 0.8) < 3 * np.sqrt(0.8 * 0.2 / len(train))  # binomial, 200 draws
    assert {r.path for r in cub200_records(spurious, "conflict")} == {
        str(spurious / "images" / _table(spurious, "images.txt")[i][0]) for i in conflict
    }

    # cues.txt describes the pixels: the background stripes' frequency (4 + 2 * (cue - 1)
    # cycles per image) is the strongest ring of the spectrum for most images.
    hits = 0
    radius = np.hypot(*np.meshgrid(np.fft.fftfreq(64) * 64, np.fft.fftfreq(64) * 64))
    for i, (rel,) in _table(spurious, "images.txt").items():
        g = np.array(Image.open(spurious / "images" / rel), dtype=float).mean(2)
        power = np.abs(np.fft.fft2(g - g.mean()))
        ring = [power[np.abs(radius - (4 + 2 * k)) < 0.75].max() for k in range(K)]
        hits += int(np.argmax(ring)) + 1 == cues[i]
    assert hits / len(labels) > 0.85


def test_second_call_reuses_the_cache_and_racing_calls_agree(tmp_path):
    results: list[Path] = []
    def call():
        results.append(_ensure(tmp_path, **SMALL))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    cub = results[0]
    assert [p.name for p in tmp_path.iterdir()] == [cub.parent.name]  # no temporary folder left behind
    assert cub.name == "CUB_200_2011"
    assert cub.parent.name == f"synthetic-novel-clutter-seed0-train6-test4-64px-v{synthetic.GENERATOR_VERSION}"
    stamp = {p: p.stat().st_mtime_ns for p in cub.rglob("*")}
    assert _ensure(tmp_path, **SMALL) == cub
    assert {p: p.stat().st_mtime_ns for p in cub.rglob("*")} == stamp


@pytest.mark.parametrize(
    "options, field",
    [
        (dict(synthetic=dict(variant="stripes")), "data.synthetic.variant"),
        (dict(synthetic=dict(classes="imagenet")), "data.synthetic.classes"),
        (dict(synthetic=dict(n_train_per_class=0)), "data.synthetic.n_train_per_class"),
        (dict(image_size=8), "data.image_size"),
        (dict(synthetic=dict(variant="spurious", p_cue=1.5)), "data.synthetic.p_cue"),
    ],
)
def test_bad_options_are_refused_by_the_spec_naming_the_field(options, field):
    # the generator's options are checked once, by the spec; ensure() takes them validated
    with pytest.raises(SpecError, match=re.escape(field)):
        validate_spec({"data": options})


def test_ensure_takes_every_option_from_the_spec():
    params = inspect.signature(synthetic.ensure).parameters
    assert set(params) == {"root", *DataSpec().synthetic.model_dump(), "image_size"}
    assert all(p.default is inspect.Parameter.empty for p in params.values())  # no second home for a default
    synthetic_fields = type(DataSpec().synthetic).model_fields
    assert set(get_args(synthetic_fields["classes"].annotation)) == set(synthetic.CLASS_SETS)
    assert set(get_args(synthetic_fields["variant"].annotation)) == set(synthetic.VARIANTS)


def test_base_and_novel_classes_share_no_shape_and_the_clutter_design(tmp_path):
    base = _ensure(tmp_path, classes="base", **SMALL)
    novel = _ensure(tmp_path, classes="novel", **SMALL)
    names = lambda cub: [line.split()[1].split(".", 1)[1] for line in (cub / "classes.txt").read_text().splitlines()]
    assert len(names(base)) >= 10 and names(novel) == list(synthetic.CLASS_SETS["novel"])
    assert not set(names(base)) & set(names(novel))
    assert not (set(names(base)) | set(names(novel))) & set(synthetic.DISTRACTOR_SHAPES)
    params = [json.loads((c / "synthetic.json").read_text()) for c in (base, novel)]
    assert params[0]["distractor_shapes"] == params[1]["distractor_shapes"]
    # every class object, in every image, lies inside its box and inside the image
    for cub in (base, novel):
        boxes = {int(i): list(map(float, r)) for i, *r in (l.split() for l in (cub / "bounding_boxes.txt").read_text().splitlines())}
        assert all(w > 2 and h > 2 and x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64 for x, y, w, h in boxes.values())


@pytest.mark.parametrize("shape", sorted(synthetic._SHAPES))
def test_every_shape_fits_the_unit_circle(shape):
    """Objects are placed by their circumradius: a shape outside the unit circle would leave the image."""
    y, x = np.mgrid[-1.2:1.2:241j, -1.2:1.2:241j]
    inside = synthetic._SHAPES[shape](x, y)
    assert inside.mean() * 2.4**2 > 0.5  # a real area, not a sliver
    assert np.hypot(x[inside], y[inside]).max() <= 1.0 + 1e-9


def test_validation_split_is_its_own_images(tmp_path):
    from cgc_ray.data import records

    opts = _options(**SMALL, n_val_per_class=3)
    root = tmp_path
    train, val, test = (records("synthetic", root, s, **opts) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (5 * SMALL["n_train_per_class"], 15, 5 * SMALL["n_test_per_class"])
    assert not {r.path for r in val} & ({r.path for r in test} | {r.path for r in train})
    without = records("synthetic", root, "test", **_options(**SMALL))  # no val split: the same test images
    assert [r.path.split("/")[-1] for r in without] == [r.path.split("/")[-1] for r in test]
