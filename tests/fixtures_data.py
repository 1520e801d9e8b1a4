"""Writers of tiny datasets in each dataset's exact on-disk layout (docs/PAPER.md §6).

Each writer creates the dataset under `parent` (the torchvision-style root)
and returns the dataset's own folder. Images are a few pixels large; the
expected records are spelled out next to each writer so tests compare with
hand-written values, not with re-parsed files.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat


def write_image(path: Path, size=(8, 6), color=(90, 120, 150)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


# CUB: 3 classes, 6 images; ids 1..6, class of id i = (i + 1) // 2, train ids 1, 3, 5.
CUB_BOXES = {1: (0.0, 1.0, 4.0, 2.0), 2: (1.5, 2.5, 3.0, 3.5), 3: (2.0, 0.0, 6.0, 6.0),
             4: (0.0, 0.0, 8.0, 6.0), 5: (3.0, 1.0, 2.0, 2.0), 6: (4.0, 4.0, 1.0, 1.0)}  # x y w h


def write_cub(parent: Path, conflict_ids: tuple[int, ...] = ()) -> Path:
    d = parent / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    (d / "images").mkdir(parents=True)
    lines = {"images.txt": [], "image_class_labels.txt": [], "train_test_split.txt": [], "bounding_boxes.txt": []}
    for i in range(1, 7):
        c = (i + 1) // 2
        rel = f"{classes[c - 1]}/{classes[c - 1].split('.')[1]}_{i:04d}_{i}.jpg"
        write_image(d / "images" / rel)
        lines["images.txt"].append(f"{i} {rel}")
        lines["image_class_labels.txt"].append(f"{i} {c}")
        lines["train_test_split.txt"].append(f"{i} {i % 2}")
        lines["bounding_boxes.txt"].append(f"{i} " + " ".join(f"{v:.1f}" for v in CUB_BOXES[i]))
    lines["classes.txt"] = [f"{k + 1} {n}" for k, n in enumerate(classes)]
    for name, rows in lines.items():
        (d / name).write_text("\n".join(rows) + "\n")
    if conflict_ids:
        (d / "conflict.txt").write_text("".join(f"{i}\n" for i in conflict_ids))
    return d


def _struct_array(rows: list[dict]) -> np.ndarray:
    """A 1 x N MATLAB struct array, as the Cars devkit stores its annotations."""
    fields = list(rows[0])
    arr = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for j, row in enumerate(rows):
        for f in fields:
            arr[0, j][f] = np.array([[row[f]]], dtype=np.uint16) if f != "fname" else np.array([row[f]])
    return arr


# Cars: train has 3 images (classes 1, 2, 2), test 2 images (classes 3, 1); boxes 1-based inclusive.
CARS_TRAIN = [dict(bbox_x1=1, bbox_y1=2, bbox_x2=8, bbox_y2=6, **{"class": 1}, fname="00001.jpg"),
              dict(bbox_x1=3, bbox_y1=1, bbox_x2=5, bbox_y2=4, **{"class": 2}, fname="00002.jpg"),
              dict(bbox_x1=2, bbox_y1=2, bbox_x2=2, bbox_y2=2, **{"class": 2}, fname="00003.jpg")]
CARS_TEST = [dict(bbox_x1=4, bbox_y1=3, bbox_x2=7, bbox_y2=5, **{"class": 3}, fname="00001.jpg"),
             dict(bbox_x1=1, bbox_y1=1, bbox_x2=8, bbox_y2=6, **{"class": 1}, fname="00002.jpg")]


def write_cars(parent: Path) -> Path:
    d = parent / "stanford_cars"
    (d / "devkit").mkdir(parents=True)
    savemat(d / "devkit" / "cars_train_annos.mat", {"annotations": _struct_array(CARS_TRAIN)})
    savemat(d / "cars_test_annos_withlabels.mat", {"annotations": _struct_array(CARS_TEST)})
    names = np.empty((1, 3), dtype=object)
    names[0, :] = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"]
    savemat(d / "devkit" / "cars_meta.mat", {"class_names": names})
    for split, rows in (("cars_train", CARS_TRAIN), ("cars_test", CARS_TEST)):
        for row in rows:
            write_image(d / split / row["fname"])
    return d


# Aircraft: variants file order is the class order (not alphabetical here on purpose).
AIRCRAFT_VARIANTS = ["Boeing 737-700", "A320", "Cessna 172"]
AIRCRAFT_SPLITS = {"train": [("0000001", "Boeing 737-700"), ("0000002", "Cessna 172")],
                   "val": [("0000003", "A320")],
                   "test": [("0000004", "Cessna 172"), ("0000005", "Boeing 737-700")]}
AIRCRAFT_BOXES = {"0000001": (1, 1, 8, 6), "0000002": (2, 3, 4, 5), "0000003": (5, 2, 7, 3),
                  "0000004": (1, 2, 3, 4), "0000005": (8, 6, 8, 6)}  # 1-based inclusive


def write_aircraft(parent: Path) -> Path:
    d = parent / "fgvc-aircraft-2013b"
    data = d / "data"
    (data / "images").mkdir(parents=True)
    (data / "variants.txt").write_text("\n".join(AIRCRAFT_VARIANTS) + "\n")
    for split in ("train", "val", "test"):
        (data / f"images_variant_{split}.txt").write_text("".join(f"{i} {v}\n" for i, v in AIRCRAFT_SPLITS[split]))
    trainval = AIRCRAFT_SPLITS["train"] + AIRCRAFT_SPLITS["val"]
    (data / "images_variant_trainval.txt").write_text("".join(f"{i} {v}\n" for i, v in trainval))
    (data / "images_box.txt").write_text("".join(f"{i} {' '.join(map(str, b))}\n" for i, b in AIRCRAFT_BOXES.items()))
    for i in AIRCRAFT_BOXES:
        write_image(data / "images" / f"{i}.jpg")
    return d


# Flowers: 7 images, labels (1-based) per image id 1..7; splits by id.
FLOWERS_LABELS = [3, 1, 1, 2, 3, 2, 1]
FLOWERS_SETID = {"trnid": [2, 5, 4], "valid": [1], "tstid": [7, 6, 3]}


def write_flowers(parent: Path) -> Path:
    d = parent / "flowers-102"
    (d / "jpg").mkdir(parents=True)
    savemat(d / "imagelabels.mat", {"labels": np.array([FLOWERS_LABELS], dtype=np.uint8)})
    savemat(d / "setid.mat", {k: np.array([v], dtype=np.uint16) for k, v in FLOWERS_SETID.items()})
    for i in range(1, len(FLOWERS_LABELS) + 1):
        write_image(d / "jpg" / f"image_{i:05d}.jpg")
    return d


def voc_xml(filename: str, size: tuple[int, int], objects: list[tuple[str, tuple[int, int, int, int]]]) -> str:
    objs = "".join(
        f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>"
        f"<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b in objects
    )
    return (
        f"<annotation><folder>val</folder><filename>{filename}</filename><source><database>ILSVRC_2012</database>"
        f"</source><size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
        f"<segmented>0</segmented>{objs}</annotation>"
    )


# ImageNet: 3 classes; train has 2 images per class, one train image of class 0 has an XML box.
IMAGENET_WNIDS = ["n01440764", "n01443537", "n01484850"]
# val image -> (wnid, [(xmin, ymin, xmax, ymax) 1-based inclusive], plus a box of another class)
IMAGENET_VAL = {
    "ILSVRC2012_val_00000001": ("n01443537", [(1, 1, 4, 3), (5, 2, 8, 6)]),
    "ILSVRC2012_val_00000002": ("n01440764", [(2, 2, 7, 5)]),
    "ILSVRC2012_val_00000003": ("n01484850", [(3, 1, 3, 1)]),
}
IMAGENET_TRAIN_BOX = ("n01440764_10026", (2, 3, 6, 5))


def write_imagenet(parent: Path, *, val_layout: str = "flat", boxes: str = "xml",
                   wnids: list[str] | None = None) -> Path:
    """val_layout "flat" | "per_class"; boxes "xml" (bbox/<split>/...) | "csv" (LOC_val_solution.csv)."""
    d = parent / "imagenet"
    wnids = wnids or IMAGENET_WNIDS
    for w in wnids:
        names = [IMAGENET_TRAIN_BOX[0], f"{w}_1"] if w == "n01440764" else [f"{w}_1", f"{w}_2"]
        for n in names:
            write_image(d / "train" / w / f"{n}.JPEG")
    if "n01440764" in wnids:
        stem, box = IMAGENET_TRAIN_BOX
        (d / "bbox" / "train" / "n01440764").mkdir(parents=True)
        (d / "bbox" / "train" / "n01440764" / f"{stem}.xml").write_text(
            voc_xml(f"{stem}", (8, 6), [("n01440764", box)]))
    rows = []
    for stem, (w, bs) in IMAGENET_VAL.items():
        objs = [(w, b) for b in bs] + [("n09999999", (1, 1, 2, 2))]  # a box of another class is ignored
        write_image(d / "val" / (w if val_layout == "per_class" else "") / f"{stem}.JPEG")
        if boxes == "xml":
            (d / "bbox" / "val").mkdir(parents=True, exist_ok=True)
            (d / "bbox" / "val" / f"{stem}.xml").write_text(voc_xml(stem, (8, 6), objs))
        rows.append(f"{stem}," + " ".join(f"{n} {' '.join(map(str, b))}" for n, b in objs))
    if boxes == "csv":
        (d / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    (d / "1percent.txt").write_text("n01440764_10026.JPEG\nn01484850_2.JPEG\n")
    return d


# UnRel: image -> rows (category, imagenet_index, xmin, ymin, xmax, ymax) 1-based inclusive.
UNREL_ROWS = [("img1.jpg", "car", 817, 1, 1, 4, 4), ("img1.jpg", "car", 817, 5, 2, 8, 6),
              ("img1.jpg", "dog", 207, 2, 2, 3, 3), ("img2.jpg", "bus", 779, 3, 3, 6, 5)]


def write_unrel(parent: Path) -> Path:
    d = parent / "unrel"
    for img in {r[0] for r in UNREL_ROWS}:
        write_image(d / "images" / img)
    rows = "".join(",".join(map(str, r)) + "\n" for r in UNREL_ROWS)
    (d / "annotations.csv").write_text("image,category,imagenet_index,xmin,ymin,xmax,ymax\n" + rows)
    return d
