"""ImageNet and ImageNet-100 on disk: class list, boxes (VOC XML or the Kaggle CSV) and a cached index.

Walking ImageNet's 1.28 M files takes minutes, so the parsed index is kept as
Parquet under the cache folder (``registry.cache_dir() / "index"``), keyed on
the folder, split, and the times (and sizes) of what it was built from: a
second start reads one file, and a changed folder replaces its old index.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Iterable

from . import registry
from .formats import (
    IMAGE_SUFFIXES,
    Box,
    ImageRecord,
    _check_split,
    _fail,
    _find_dir,
    _one_based_inclusive,
)

INDEX_FORMAT_VERSION = 1

# ImageNet-100 of Tian et al. (CMC), as published in HobbitLong/CMC issue #21.
IMAGENET100_WNIDS = tuple(
    "n02869837 n01749939 n02488291 n02107142 n13037406 n02091831 n04517823 n04589890 n03062245 "
    "n01773797 n01735189 n07831146 n07753275 n03085013 n04485082 n02105505 n01983481 n02788148 "
    "n03530642 n04435653 n02086910 n02859443 n13040303 n03594734 n02085620 n02099849 n01558993 "
    "n04493381 n02109047 n04111531 n02877765 n04429376 n02009229 n01978455 n02106550 n01820546 "
    "n01692333 n07714571 n02974003 n02114855 n03785016 n03764736 n03775546 n02087046 n07836838 "
    "n04099969 n04592741 n03891251 n02701002 n03379051 n02259212 n07715103 n03947888 n04026417 "
    "n02326432 n03637318 n01980166 n02113799 n02086240 n03903868 n02483362 n04127249 n02089973 "
    "n03017168 n02093428 n02804414 n02396427 n04418357 n02172182 n01729322 n02113978 n03787032 "
    "n02089867 n02119022 n03777754 n04238763 n02231487 n03032252 n02138441 n02104029 n03837869 "
    "n03494278 n04136333 n03794056 n03492542 n02018207 n04067472 n03930630 n03584829 n02123045 "
    "n04229816 n02100583 n03642806 n04336792 n03259280 n02116738 n02108089 n03424325 n01855672 "
    "n02090622".split()
)


# --------------------------------------------------------------------------- ImageNet


def _imagenet_dir(root, name: str = "imagenet") -> Path:
    return _find_dir(name, root)


def _find_upwards(d: Path, filename: str, levels: int = 3) -> Path | None:
    """`filename` in d or one of its first `levels` parents (the Kaggle tree keeps CSVs at its top)."""
    for p in [d, *list(d.parents)[:levels]]:
        if (p / filename).is_file():
            return p / filename
    return None


def _xml_dirs(d: Path, split: str) -> list[Path]:
    """Folders of per-image VOC XML for `split` that exist (own tree, or the Kaggle ILSVRC tree)."""
    cands = [d / "bbox" / split, d / "Annotations" / split, d / "Annotations" / "CLS-LOC" / split]
    if d.parent.name == "Data":  # <kaggle>/ILSVRC/Data/CLS-LOC -> <kaggle>/ILSVRC/Annotations/CLS-LOC
        cands.append(d.parent.parent / "Annotations" / d.name / split)
    return [c for c in cands if c.is_dir()]


def _parse_voc(path: Path) -> tuple[list[tuple[str, Box]], tuple[int, int] | None]:
    """(wnid, box) pairs and (w, h) of one Pascal-VOC XML; boxes 1-based inclusive -> 0-based."""
    try:
        root = ET.parse(path).getroot()
        size = root.find("size")
        wh = (int(size.findtext("width")), int(size.findtext("height"))) if size is not None else None
        objs = []
        for obj in root.iter("object"):
            b = obj.find("bndbox")
            objs.append(
                (
                    obj.findtext("name").strip(),
                    _one_based_inclusive(*(float(b.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))),
                )
            )
    except (ET.ParseError, AttributeError, TypeError, ValueError) as e:
        raise _fail("imagenet", f"malformed VOC XML {path} ({e}); expected <size> and <object><name>/<bndbox>") from e
    return objs, wh


def _parse_loc_csv(path: Path) -> dict[str, list[tuple[str, Box]]]:
    """Kaggle LOC_<split>_solution.csv: ImageId,PredictionString "wnid xmin ymin xmax ymax ..."."""
    out: dict[str, list[tuple[str, Box]]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise _fail("imagenet", f"{path} must have the header ImageId,PredictionString")
        for row in reader:
            toks = row["PredictionString"].split()
            if len(toks) % 5:
                raise _fail("imagenet", f"{path}: PredictionString of {row['ImageId']} is not groups of 5 fields")
            out[row["ImageId"]] = [
                (toks[k], _one_based_inclusive(*map(float, toks[k + 1 : k + 5]))) for k in range(0, len(toks), 5)
            ]
    return out


def _list_images(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))


def _imagenet_classes(d: Path, name: str) -> tuple[list[str], dict[str, str]]:
    """(sorted wnids, wnid -> description). The class list comes from LOC_synset_mapping.txt,
    else train/ subfolders, else val/ subfolders."""
    mapping_file = _find_upwards(d, "LOC_synset_mapping.txt")
    desc: dict[str, str] = {}
    if mapping_file is not None:
        for line in open(mapping_file, encoding="utf-8"):
            if line.strip():
                wnid, _, text = line.strip().partition(" ")
                desc[wnid] = text
        wnids = sorted(desc)
    else:
        wnids = []
        for split in ("train", "val"):
            if (d / split).is_dir():
                wnids = sorted(e.name for e in os.scandir(d / split) if e.is_dir())
                if wnids:
                    break
    if name == "imagenet100":
        absent = [w for w in IMAGENET100_WNIDS if wnids and w not in wnids]
        if absent:
            raise _fail(name, f"{len(absent)} ImageNet-100 classes are absent under {d}: {absent[:5]}")
        wnids = sorted(IMAGENET100_WNIDS)
    return wnids, desc


def _fingerprint(paths: Iterable[Path]) -> list:
    """What the index depends on: [path, modification time, size] of its files, and [path, modification time]
    of its folders and their immediate sub-folders (a folder's time changes when an entry is added or removed)."""
    out = []
    for p in paths:
        if p is None or not p.exists():
            continue
        st = p.stat()
        if p.is_dir():
            out.append([str(p), st.st_mtime_ns])
            out.extend([e.path, e.stat().st_mtime_ns] for e in os.scandir(p) if e.is_dir())
        else:
            out.append([str(p), st.st_mtime_ns, st.st_size])
    return sorted(out)


def _cached(key: dict, cache_dir: Path | None, build: Callable[[], list[ImageRecord]]) -> list[ImageRecord]:
    """Records from a Parquet index keyed on ``key`` (name, split, root, fingerprint); built and written on a miss.

    The file is ``<name>-<split>-<hash of the root>-<hash of the key>.parquet``: when the folder changes,
    the new index replaces the indexes of the same name, split and root, so the cache keeps one per
    dataset folder and split.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(cache_dir or registry.cache_dir() / "index")
    stem = f"{key['name']}-{key['split']}-{hashlib.sha1(key['root'].encode()).hexdigest()[:10]}"
    path = folder / f"{stem}-{hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]}.parquet"
    try:
        t = pq.read_table(path).to_pydict()
    except FileNotFoundError:  # not built yet, or dropped by a process that saw the folder change first
        t = None
    if t is not None:
        return [
            ImageRecord(
                p,
                lab,
                tuple(tuple(b[k : k + 4]) for k in range(0, len(b), 4)),
                (w, h) if w is not None else None,
            )
            for p, lab, b, w, h in zip(t["path"], t["label"], t["boxes"], t["width"], t["height"])
        ]
    recs = build()
    table = pa.table(
        {
            "path": pa.array([r.path for r in recs], pa.string()),
            "label": pa.array([r.label for r in recs], pa.int32()),
            "boxes": pa.array([[c for b in r.boxes for c in b] for r in recs], pa.list_(pa.float64())),
            "width": pa.array([r.size[0] if r.size else None for r in recs], pa.int32()),
            "height": pa.array([r.size[1] if r.size else None for r in recs], pa.int32()),
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)  # atomic, so concurrent workers never read a half-written index
    finally:
        tmp.unlink(missing_ok=True)
    for stale in folder.glob(f"{glob.escape(stem)}-*.parquet"):
        if stale != path:
            stale.unlink(missing_ok=True)
    return recs


def imagenet_class_names(root, *, name: str = "imagenet") -> list[str]:
    """Descriptions from LOC_synset_mapping.txt when present, else the wnids, in class-index order."""
    wnids, desc = _imagenet_classes(_imagenet_dir(root, name), name)
    return [desc.get(w, w) for w in wnids]


ONE_PERCENT_SOURCE = (
    "the standard 12,811-image ImageNet 1% list of SimCLR and SwAV "
    "(https://github.com/google-research/simclr/blob/master/imagenet_subsets/1percent.txt)"
)


def one_percent_file(root) -> Path:
    """The ``1percent.txt`` of an ImageNet folder: in it, in its ``splits/`` or beside it."""
    d = _imagenet_dir(root)
    for c in (d / "1percent.txt", d / "splits" / "1percent.txt", d.parent / "1percent.txt"):
        if c.is_file():
            return c
    raise _fail("imagenet", f"the 1% split needs 1percent.txt in {d}, {d / 'splits'} or {d.parent}: "
                            f"{ONE_PERCENT_SOURCE}; or give its path as data.split_file")


def imagenet_records(root, split: str, *, name: str = "imagenet", cache_dir=None) -> list[ImageRecord]:
    """ImageNet "train", "val" or (name "imagenet") "train_1pct".

    Labels: index of the wnid in the sorted class list. val/ may be per-class
    folders or flat; a flat val/ takes its labels from the boxes' XML or CSV.
    Boxes (those of the image's own class) come from per-image VOC XML or
    LOC_<split>_solution.csv, 1-based inclusive -> 0-based continuous.
    The parsed index is cached as Parquet in `cache_dir`
    (default $CGC_RAY_CACHE_DIR/index or ~/.cache/cgc-ray/index), keyed on the
    folder, split and what :func:`_fingerprint` reads, so a second start does
    not re-walk and a changed folder is walked again (its old index deleted).
    """
    _check_split(name, split)
    d = _imagenet_dir(root, name)
    if split == "train_1pct":
        from .splits import select_listed

        list_file = one_percent_file(d)
        return select_listed(imagenet_records(d, "train", name=name, cache_dir=cache_dir), list_file)
    image_dir = d / split
    if not image_dir.is_dir():
        raise _fail(name, f"missing image folder {image_dir}")
    xml_dirs = _xml_dirs(d, split)
    csv_file = _find_upwards(d, f"LOC_{split}_solution.csv")
    key = {
        "version": INDEX_FORMAT_VERSION,
        "name": name,
        "split": split,
        "root": str(d),
        "mtimes": _fingerprint([image_dir, csv_file, _find_upwards(d, "LOC_synset_mapping.txt"), *xml_dirs]),
    }
    return _cached(key, cache_dir, lambda: _walk_imagenet(d, split, name, xml_dirs, csv_file))


def _walk_imagenet(
    d: Path, split: str, name: str, xml_dirs: list[Path], csv_file: Path | None
) -> list[ImageRecord]:
    """Walk <d>/<split> once and join labels and boxes (the slow path `_cached` saves)."""
    wnids, _ = _imagenet_classes(d, name)
    image_dir = d / split
    xml_of: dict[str, Path] = {}
    for xd in xml_dirs:
        for dirpath, _, files in os.walk(xd):
            for f in files:
                if f.endswith(".xml"):
                    xml_of.setdefault(f[:-4], Path(dirpath) / f)
    csv_boxes = _parse_loc_csv(csv_file) if csv_file is not None else {}

    def annotation(stem: str) -> tuple[list[tuple[str, Box]], tuple[int, int] | None]:
        if stem in xml_of:
            return _parse_voc(xml_of[stem])
        return csv_boxes.get(stem, []), None

    entries: list[tuple[Path, str | None]] = []  # (image path, wnid from its folder or None)
    subdirs = sorted(e.name for e in os.scandir(image_dir) if e.is_dir())
    for w in subdirs:
        entries.extend((image_dir / w / f, w) for f in _list_images(image_dir / w))
    entries.extend((image_dir / f, None) for f in _list_images(image_dir))
    if not wnids:
        raise _fail(
            name,
            f"cannot fix the class list under {d}: add LOC_synset_mapping.txt (one 'wnid description' a line) "
            "or the train/<wnid>/ folders, so labels agree with the training split",
        )
    index = {w: i for i, w in enumerate(wnids)}
    out = []
    for path, wnid in entries:
        stem = path.stem
        objs, wh = annotation(stem)
        if wnid is None:
            if not objs:
                raise _fail(
                    name,
                    f"{path} lies in a flat {split}/ folder but has no label: expected {stem}.xml in one of "
                    f"{[str(x) for x in xml_dirs] or '<root>/bbox/' + split} or a row in LOC_{split}_solution.csv",
                )
            wnid = objs[0][0]
        if wnid not in index:
            if name == "imagenet100":
                continue
            raise _fail(name, f"{path}: class {wnid!r} is not in the class list ({len(wnids)} classes)")
        out.append(ImageRecord(str(path), index[wnid], tuple(b for w, b in objs if w == wnid), wh))
    return out


