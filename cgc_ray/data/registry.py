"""The datasets of the paper, one entry each: where they sit, what must be there, which splits do what.

Torch-free (the spec's data checks import it before torch starts). One home for
every dataset fact the code needs: the folder names a root may hold the dataset
under (torchvision's convention), the entries each split needs, the layout shown
in errors, the training and evaluation splits, the few-shot pool and whether
the dataset has boxes (CH needs them). Parsers live in ``formats`` /
``imagenet``; the cache folder of generated data and indexes is :func:`cache_dir`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV_CACHE_DIR = "CGC_RAY_CACHE_DIR"


def cache_dir() -> Path:
    """Where generated data, dataset indexes and staged data roots (``data/``, :mod:`.staging`) are kept:
    ``$CGC_RAY_CACHE_DIR``, else ``~/.cache/cgc-ray``."""
    return Path(os.environ.get(ENV_CACHE_DIR) or Path.home() / ".cache" / "cgc-ray").expanduser()


def synthetic_root() -> Path:
    """The folder the embedded synthetic dataset is generated into when no data root is given."""
    return cache_dir() / "synthetic"


@dataclass(frozen=True)
class DatasetInfo:
    """Facts of one dataset.

    ``subdirs``: the dataset folder is the given root or ``root/<subdir>``.
    ``marker``: the entry that identifies the dataset folder. ``needs``: split
    -> entries (relative to the dataset folder) that split reads.
    ``train_split`` / ``eval_split``: what a full-data trial trains and is
    evaluated on; ``fewshot_pool``: the splits few-shot episodes draw their
    n shots and validation images from (the paper: n per class for training,
    "the rest of the samples" for validation). ``layout``: shown in errors.
    ``label_space``: when labels index another dataset's classes (UnRel's are
    ImageNet class indices), the number of classes of that space, i.e. the
    head a model needs to be scored on it; None: its own class list.
    """

    name: str
    subdirs: tuple[str, ...]
    marker: str
    needs: dict[str, tuple[str, ...]]
    train_split: str | None
    eval_split: str
    fewshot_pool: tuple[str, ...]
    has_boxes: bool
    layout: str
    label_space: int | None = None

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.needs)


_CUB_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt", "images")
_CUB_LAYOUT = (
    "CUB_200_2011/\n"
    "  images.txt              <id> <relative path>\n"
    "  image_class_labels.txt  <id> <class, 1-based>\n"
    "  train_test_split.txt    <id> <1 = train, 0 = test>\n"
    "  bounding_boxes.txt      <id> <x> <y> <w> <h>  (0-based top-left)\n"
    "  classes.txt\n"
    "  images/<class dir>/*.jpg"
)
_IMAGENET_LAYOUT = (
    "imagenet/                          (or the Kaggle ILSVRC/Data/CLS-LOC tree)\n"
    "  train/<wnid>/*.JPEG\n"
    "  val/*.JPEG or val/<wnid>/*.JPEG\n"
    "  boxes: Pascal-VOC XML per image (bbox/, Annotations[/CLS-LOC]/; 1-indexed inclusive)\n"
    "         or LOC_<split>_solution.csv\n"
    "  1percent.txt                     (semi-supervised split list, optional: data.split_file)"
)

REGISTRY: dict[str, DatasetInfo] = {
    "synthetic": DatasetInfo(
        "synthetic", ("CUB_200_2011",), "images.txt",
        {"train": _CUB_FILES, "val": _CUB_FILES, "test": _CUB_FILES, "conflict": _CUB_FILES},
        "train", "test", ("train",), True,
        "generated on first use under data.root (default: the cache, $CGC_RAY_CACHE_DIR/synthetic) in the "
        "CUB_200_2011 layout; nothing to download",
    ),
    "cub200": DatasetInfo(
        "cub200", ("CUB_200_2011",), "images.txt", {"train": _CUB_FILES, "test": _CUB_FILES},
        "train", "test", ("train",), True, _CUB_LAYOUT,
    ),
    "cars196": DatasetInfo(
        "cars196", ("stanford_cars",), "devkit",
        {"train": ("devkit/cars_train_annos.mat", "devkit/cars_meta.mat", "cars_train"),
         "test": ("cars_test_annos_withlabels.mat", "devkit/cars_meta.mat", "cars_test")},
        "train", "test", ("train",), True,
        "stanford_cars/                     (torchvision StanfordCars layout)\n"
        "  devkit/cars_train_annos.mat      bbox_x1 bbox_y1 bbox_x2 bbox_y2 class fname\n"
        "  devkit/cars_meta.mat\n"
        "  cars_test_annos_withlabels.mat\n"
        "  cars_train/*.jpg\n"
        "  cars_test/*.jpg",
    ),
    "aircraft": DatasetInfo(
        "aircraft", ("fgvc-aircraft-2013b",), "data/variants.txt",
        {s: ("data/variants.txt", "data/images", "data/images_box.txt", f"data/images_variant_{s}.txt")
         for s in ("train", "val", "test", "trainval")},
        "trainval", "test", ("trainval",), True,
        "fgvc-aircraft-2013b/               (torchvision FGVCAircraft layout)\n"
        "  data/images/*.jpg\n"
        "  data/images_variant_{train,val,test,trainval}.txt\n"
        "  data/images_box.txt              <name> <xmin> <ymin> <xmax> <ymax>\n"
        "  data/variants.txt                100 variants",
    ),
    "flowers102": DatasetInfo(
        "flowers102", ("flowers-102",), "setid.mat",
        {s: ("setid.mat", "jpg", "imagelabels.mat") for s in ("train", "val", "test", "trainval")},
        # train has exactly 10 images per class: 10-shot episodes pool train + val (10 + 10 per class)
        "trainval", "test", ("train", "val"), False,
        "flowers-102/                       (torchvision Flowers102 layout; no boxes: CH is null)\n"
        "  jpg/image_XXXXX.jpg\n"
        "  imagelabels.mat\n"
        "  setid.mat                        trnid, valid, tstid",
    ),
    "imagenet": DatasetInfo(
        "imagenet", ("imagenet", "ILSVRC/Data/CLS-LOC"), "",
        {"train": ("train",), "val": ("val",), "train_1pct": ("train",)},
        "train", "val", ("train",), True, _IMAGENET_LAYOUT,
    ),
    "imagenet100": DatasetInfo(
        "imagenet100", ("imagenet100", "imagenet", "ILSVRC/Data/CLS-LOC"), "",
        {"train": ("train",), "val": ("val",)},
        "train", "val", ("train",), True,
        "the imagenet layout (train/<wnid>/, val/); only the 100 CMC classes are used",
    ),
    "unrel": DatasetInfo(
        "unrel", ("unrel", "UnRel"), "annotations.csv", {"test": ("annotations.csv", "images")},
        None, "test", (), True,
        "unrel/\n"
        "  images/<file>\n"
        "  annotations.csv   image,category,imagenet_index,xmin,ymin,xmax,ymax (1-based inclusive)",
        label_space=1000,  # labels are ImageNet-1k class indices: an ImageNet classifier is scored with its own head
    ),
}
DATASETS: tuple[str, ...] = tuple(REGISTRY)


def info(name: str) -> DatasetInfo:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}") from None


def dataset_folder(name: str, root: str | os.PathLike) -> Path | None:
    """The dataset's own folder under ``root`` (root itself or ``root/<subdir>``), or None if none holds it.

    A folder holds the dataset when it has the marker entry (for ImageNet,
    which has none, any of the split folders).
    """
    d = info(name)
    root = Path(root).expanduser()
    markers = (d.marker,) if d.marker else tuple(sorted({e for entries in d.needs.values() for e in entries}))
    for folder in [root] + [root / s for s in d.subdirs]:
        if any((folder / m).exists() for m in markers):
            return folder
    return None


def missing_entries(name: str, root: str | os.PathLike, splits: tuple[str, ...]) -> tuple[Path, list[str]]:
    """(the folder looked at, the entries ``splits`` need that it lacks)."""
    d = info(name)
    folder = dataset_folder(name, root) or Path(root).expanduser()
    needed = dict.fromkeys(e for s in splits for e in d.needs[s])
    return folder, [e for e in needed if not (folder / e).exists()]
