"""Parsers for the on-disk layouts of the datasets used in the CGC paper.

Every parser returns a list of `ImageRecord`s whose boxes follow the one box
convention of cgc-ray (docs/PAPER.md §6): (x1, y1, x2, y2) in 0-based continuous
pixel coordinates of the original image. The conversions:

- CUB-200-2011 `bounding_boxes.txt`: x, y, w, h floats, 0-based top-left
  corner -> (x, y, x + w, y + h).
- ImageNet Pascal-VOC XML and Kaggle `LOC_*_solution.csv`, Stanford Cars devkit
  `.mat` (`bbox_x1..bbox_y2`, MATLAB indices), FGVC-Aircraft `images_box.txt`
  and the UnRel CSV below: 1-based inclusive pixel indices
  -> (xmin - 1, ymin - 1, xmax, ymax).
- Flowers-102 has no boxes.

`root` may be the dataset's own folder or the folder that contains it
(torchvision's convention). Class indices come from one class list per dataset
(the official list file, else sorted class ids), so they agree between splits.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from . import registry

Box = tuple[float, float, float, float]

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")



@dataclass(frozen=True)
class ImageRecord:
    """One annotated image.

    path: absolute image path. label: 0-based class index. boxes: object boxes
    (x1, y1, x2, y2) in 0-based continuous pixel coordinates of the original
    image, empty when the dataset has none. size: (width, height) when the
    annotation states it, else None.
    """

    path: str
    label: int
    boxes: tuple[Box, ...] = ()
    size: tuple[int, int] | None = None


class DatasetFormatError(ValueError):
    """A dataset folder or annotation file is missing or malformed."""


def _fail(name: str, what: str) -> DatasetFormatError:
    return DatasetFormatError(f"{name}: {what}. Official layout:\n{registry.info(name).layout}")


def _find_dir(name: str, root: str | os.PathLike) -> Path:
    """The dataset folder: `root` itself or `root/<subdir>` (``registry``), whichever holds the dataset."""
    folder = registry.dataset_folder(name, root)
    if folder is not None:
        return folder.resolve()
    root = Path(root).expanduser()
    d = registry.info(name)
    tried = ", ".join(str(c) for c in [root] + [root / sub for sub in d.subdirs])
    if not root.exists():
        raise _fail(name, f"root {root} does not exist")
    raise _fail(name, f"no {d.marker or ' or '.join(d.splits)} found under {root} (tried {tried})")


def _read_lines(name: str, path: Path, min_fields: int) -> list[list[str]]:
    """Whitespace-split non-empty lines of an annotation text file, validated."""
    if not path.is_file():
        raise _fail(name, f"missing annotation file {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < min_fields:
                raise _fail(name, f"{path} line {lineno}: expected {min_fields} fields, got {line.strip()!r}")
            rows.append(fields)
    return rows


def _one_based_inclusive(xmin: float, ymin: float, xmax: float, ymax: float) -> Box:
    """1-based inclusive pixel indices (VOC, MATLAB) -> 0-based continuous box."""
    return (float(xmin) - 1.0, float(ymin) - 1.0, float(xmax), float(ymax))


def _check_split(name: str, split: str, allowed: Iterable[str] | None = None) -> None:
    allowed = tuple(allowed if allowed is not None else registry.info(name).splits)
    if split not in allowed:
        raise ValueError(f"{name}: unknown split {split!r}; choose one of {allowed}")


# --------------------------------------------------------------------------- CUB-200-2011


def _cub_dir(root, name: str = "cub200") -> Path:
    return _find_dir(name, root)


def cub200_class_names(root, *, name: str = "cub200") -> list[str]:
    """Class names from `classes.txt` ("1 001.Black_footed_Albatross"), index = id - 1."""
    d = _cub_dir(root, name)
    rows = _read_lines(name, d / "classes.txt", 2)
    return [n for _, n in sorted((int(i), " ".join(rest)) for i, *rest in rows)]


def cub200_records(root, split: str, *, name: str = "cub200") -> list[ImageRecord]:
    """CUB-200-2011 split "train" or "test" (from `train_test_split.txt`).

    When the folder holds `conflict.txt` or `val.txt` (image ids, one a line;
    written by the synthetic generator), split "conflict" / "val" is those ids
    and "test" excludes them.
    """
    d = _cub_dir(root, name)
    conflict_file, val_file = d / "conflict.txt", d / "val.txt"
    _check_split(name, split, ("train", "test") + (("val",) if val_file.exists() else ())
                 + (("conflict",) if conflict_file.exists() else ()))
    paths = {i: " ".join(rest) for i, *rest in _read_lines(name, d / "images.txt", 2)}
    labels = {i: int(c) - 1 for i, c, *_ in _read_lines(name, d / "image_class_labels.txt", 2)}
    is_train = {i: t == "1" for i, t, *_ in _read_lines(name, d / "train_test_split.txt", 2)}
    boxes: dict[str, list[Box]] = {}
    if (d / "bounding_boxes.txt").exists():
        for i, x, y, w, h, *_ in _read_lines(name, d / "bounding_boxes.txt", 5):
            x, y, w, h = float(x), float(y), float(w), float(h)
            boxes.setdefault(i, []).append((x, y, x + w, y + h))
    listed = {
        which: {row[0] for row in _read_lines(name, f, 1)} if f.exists() else set()
        for which, f in (("conflict", conflict_file), ("val", val_file))
    }
    held_out = listed["conflict"] | listed["val"]
    for table, fname in ((labels, "image_class_labels.txt"), (is_train, "train_test_split.txt")):
        missing = [i for i in paths if i not in table]
        if missing:
            raise _fail(name, f"{d / fname} has no entry for image ids {missing[:5]} (of {len(missing)})")

    def wanted(i: str) -> bool:
        if split in listed:
            return i in listed[split]
        return is_train[i] == (split == "train") and i not in held_out

    return [
        ImageRecord(str(d / "images" / p), labels[i], tuple(boxes.get(i, ())))
        for i, p in sorted(paths.items(), key=lambda kv: int(kv[0]))
        if wanted(i)
    ]


# --------------------------------------------------------------------------- Stanford Cars


def _loadmat(name: str, path: Path) -> dict:
    from scipy.io import loadmat

    if not path.is_file():
        raise _fail(name, f"missing annotation file {path}")
    try:
        return loadmat(str(path), squeeze_me=True)
    except Exception as e:  # scipy raises several unrelated types for a corrupt file
        raise _fail(name, f"cannot parse {path} as a MATLAB .mat file ({e})") from e


def _cars_dir(root) -> Path:
    return _find_dir("cars196", root)


def cars196_class_names(root) -> list[str]:
    d = _cars_dir(root)
    mat = _loadmat("cars196", d / "devkit" / "cars_meta.mat")
    if "class_names" not in mat:
        raise _fail("cars196", f"{d / 'devkit' / 'cars_meta.mat'} has no 'class_names' variable")
    return [str(n) for n in mat["class_names"].tolist()]


def cars196_records(root, split: str) -> list[ImageRecord]:
    """Stanford Cars "train" / "test" from the devkit annotation structs.

    Each struct has bbox_x1, bbox_y1, bbox_x2, bbox_y2 (1-based inclusive pixel
    indices, MATLAB convention), class (1-based) and fname.
    """
    import numpy as np

    _check_split("cars196", split)
    d = _cars_dir(root)
    if split == "train":
        mat_path, image_dir = d / "devkit" / "cars_train_annos.mat", d / "cars_train"
    else:
        mat_path, image_dir = d / "cars_test_annos_withlabels.mat", d / "cars_test"
        if not mat_path.exists() and (d / "devkit" / mat_path.name).exists():
            mat_path = d / "devkit" / mat_path.name
    mat = _loadmat("cars196", mat_path)
    if "annotations" not in mat:
        raise _fail("cars196", f"{mat_path} has no 'annotations' struct array")
    anns = np.atleast_1d(mat["annotations"])
    fields = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
    missing = [f for f in fields if anns.dtype.names is None or f not in anns.dtype.names]
    if missing:
        raise _fail("cars196", f"{mat_path} annotations lack fields {missing}")
    return [
        ImageRecord(
            str(image_dir / str(a["fname"])),
            int(a["class"]) - 1,
            (_one_based_inclusive(a["bbox_x1"], a["bbox_y1"], a["bbox_x2"], a["bbox_y2"]),),
        )
        for a in anns
    ]


# --------------------------------------------------------------------------- FGVC-Aircraft


def _aircraft_dir(root) -> Path:
    return _find_dir("aircraft", root) / "data"


def aircraft_class_names(root) -> list[str]:
    """The 100 variants in `variants.txt` order (torchvision's class order)."""
    path = _aircraft_dir(root) / "variants.txt"
    return [line.strip() for line in open(path, encoding="utf-8") if line.strip()]


def aircraft_records(root, split: str) -> list[ImageRecord]:
    """FGVC-Aircraft variant labels, split train / val / test / trainval, boxes from images_box.txt."""
    _check_split("aircraft", split)
    d = _aircraft_dir(root)
    index = {n: i for i, n in enumerate(aircraft_class_names(root))}
    boxes = {}
    for img, *xyxy in _read_lines("aircraft", d / "images_box.txt", 5):
        boxes[img] = _one_based_inclusive(*map(float, xyxy[:4]))
    out = []
    for img, *variant in _read_lines("aircraft", d / f"images_variant_{split}.txt", 2):
        v = " ".join(variant)
        if v not in index:
            raise _fail("aircraft", f"{d / f'images_variant_{split}.txt'}: variant {v!r} not in variants.txt")
        out.append(ImageRecord(str(d / "images" / f"{img}.jpg"), index[v], (boxes[img],) if img in boxes else ()))
    return out


# --------------------------------------------------------------------------- Flowers-102


def _flowers_dir(root) -> Path:
    return _find_dir("flowers102", root)


def flowers102_class_names(root) -> list[str]:
    from torchvision.datasets import Flowers102

    return list(Flowers102.classes)


def flowers102_records(root, split: str) -> list[ImageRecord]:
    """Flowers-102 train (trnid) / val (valid) / test (tstid) / trainval; no boxes."""
    import numpy as np

    _check_split("flowers102", split)
    d = _flowers_dir(root)
    setid = _loadmat("flowers102", d / "setid.mat")
    labels = _loadmat("flowers102", d / "imagelabels.mat")
    keys = {"train": ["trnid"], "val": ["valid"], "test": ["tstid"], "trainval": ["trnid", "valid"]}[split]
    for k in keys:
        if k not in setid:
            raise _fail("flowers102", f"{d / 'setid.mat'} has no {k!r} variable")
    if "labels" not in labels:
        raise _fail("flowers102", f"{d / 'imagelabels.mat'} has no 'labels' variable")
    label_of = np.atleast_1d(labels["labels"]).astype(int) - 1
    ids = [int(i) for k in keys for i in np.atleast_1d(setid[k])]  # setid.mat order, as torchvision
    for i in ids:
        if not 1 <= i <= len(label_of):
            raise _fail("flowers102", f"image id {i} in setid.mat has no label in imagelabels.mat")
    return [ImageRecord(str(d / "jpg" / f"image_{i:05d}.jpg"), int(label_of[i - 1])) for i in ids]


# --------------------------------------------------------------------------- UnRel


def _unrel_dir(root) -> Path:
    return _find_dir("unrel", root)


def unrel_class_names(root) -> list[str]:
    """Category names ordered by their ImageNet class index (the label space is ImageNet's)."""
    names = {}
    for row in _unrel_rows(_unrel_dir(root)):
        names[int(row["imagenet_index"])] = row["category"]
    return [names[k] for k in sorted(names)]


def _unrel_rows(d: Path) -> list[dict]:
    path = d / "annotations.csv"
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        need = ["image", "category", "imagenet_index", "xmin", "ymin", "xmax", "ymax"]
        if reader.fieldnames is None or not set(need) <= set(reader.fieldnames):
            raise _fail("unrel", f"{path} must have the header {','.join(need)} (got {reader.fieldnames})")
        return list(reader)


def unrel_records(root, split: str) -> list[ImageRecord]:
    """UnRel evaluation images; one record per (image, ImageNet class) with all its boxes.

    label is the ImageNet-1k class index (0..999, torchvision order) so an
    ImageNet classifier is scored directly.
    """
    _check_split("unrel", split)
    d = _unrel_dir(root)
    grouped: dict[tuple[str, int], list[Box]] = {}
    for lineno, row in enumerate(_unrel_rows(d), 2):
        try:
            key = (row["image"], int(row["imagenet_index"]))
            box = _one_based_inclusive(*(float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax")))
        except (TypeError, ValueError) as e:
            raise _fail("unrel", f"{d / 'annotations.csv'} line {lineno}: {e}") from e
        grouped.setdefault(key, []).append(box)
    return [ImageRecord(str(d / "images" / img), lab, tuple(bs)) for (img, lab), bs in grouped.items()]


# --------------------------------------------------------------------------- dispatch


def _imagenet():
    from . import imagenet  # it builds on the helpers above

    return imagenet


def _synthetic_dir(root, **options) -> Path:
    from .synthetic import ensure

    return Path(ensure(root, **options))


_RECORDS: dict[str, Callable[..., list[ImageRecord]]] = {
    "synthetic": lambda root, split, options, cache_dir: cub200_records(
        _synthetic_dir(root, **options), split, name="synthetic"
    ),
    "cub200": lambda root, split, options, cache_dir: cub200_records(root, split),
    "cars196": lambda root, split, options, cache_dir: cars196_records(root, split),
    "aircraft": lambda root, split, options, cache_dir: aircraft_records(root, split),
    "flowers102": lambda root, split, options, cache_dir: flowers102_records(root, split),
    "imagenet": lambda root, split, options, cache_dir: _imagenet().imagenet_records(root, split, cache_dir=cache_dir),
    "imagenet100": lambda root, split, options, cache_dir: _imagenet().imagenet_records(
        root, split, name="imagenet100", cache_dir=cache_dir
    ),
    "unrel": lambda root, split, options, cache_dir: unrel_records(root, split),
}

_CLASS_NAMES: dict[str, Callable[..., list[str]]] = {
    "synthetic": lambda root, **options: cub200_class_names(_synthetic_dir(root, **options), name="synthetic"),
    "cub200": cub200_class_names,
    "cars196": cars196_class_names,
    "aircraft": aircraft_class_names,
    "flowers102": flowers102_class_names,
    "imagenet": lambda root: _imagenet().imagenet_class_names(root),
    "imagenet100": lambda root: _imagenet().imagenet_class_names(root, name="imagenet100"),
    "unrel": unrel_class_names,
}

DATASETS = registry.DATASETS
assert set(_RECORDS) == set(_CLASS_NAMES) == set(DATASETS), "every registered dataset needs a parser"


def _check_options(name: str, options: dict) -> None:
    if name not in _RECORDS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if options and name != "synthetic":
        raise ValueError(f"{name}: unexpected options {sorted(options)} (only 'synthetic' takes generator options)")


def records(name: str, root, split: str, *, cache_dir=None, **options) -> list[ImageRecord]:
    """The `split` of dataset `name` under `root` as ImageRecords (see the module docstring).

    cache_dir: where imagenet / imagenet100 keep their Parquet index.
    options: for "synthetic" only, passed to cgc_ray.data.synthetic.ensure (variant, seed, ...).
    """
    _check_options(name, options)
    return _RECORDS[name](root, split, options, cache_dir)


def class_names(name: str, root, **options) -> list[str]:
    """Class names in label-index order (options as in `records`)."""
    _check_options(name, options)
    return _CLASS_NAMES[name](root, **options)
