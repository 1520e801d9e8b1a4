"""Datasets of the CGC paper: on-disk parsers, a box-aware Dataset, few-shot and semi-supervised splits.

Only torch/torchvision/PIL/scipy/pyarrow here (no ray, pydantic or rich).
`cgc_ray.data.synthetic` (procedural data in CUB layout) is imported lazily.
"""
from .dataset import IMAGENET_MEAN, IMAGENET_STD, BoxDataset, collate, read_image, transform_boxes
from .formats import (
    DATASETS,
    IMAGENET100_WNIDS,
    DatasetFormatError,
    ImageRecord,
    class_names,
    cub200_class_names,
    cub200_records,
    records,
)
from .splits import episode, percent_split, select_listed

__all__ = [
    "DATASETS",
    "IMAGENET100_WNIDS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BoxDataset",
    "DatasetFormatError",
    "ImageRecord",
    "class_names",
    "collate",
    "cub200_class_names",
    "cub200_records",
    "episode",
    "percent_split",
    "read_image",
    "records",
    "select_listed",
    "transform_boxes",
]
