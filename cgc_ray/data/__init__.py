"""Datasets of the CGC paper: a registry of their facts, on-disk parsers, few-shot and semi-supervised splits.

Importing this package imports no torch (the spec's data checks use it before
torch starts): the torch Dataset is ``cgc_ray.data.dataset.BoxDataset``, the
ImageNet index ``cgc_ray.data.imagenet``, the generated data
``cgc_ray.data.synthetic``.
"""
from .formats import DatasetFormatError, ImageRecord, class_names, records
from .registry import DATASETS, REGISTRY, DatasetInfo, cache_dir, info, synthetic_root
from .splits import episode, percent_split, select_listed

__all__ = [
    "DATASETS",
    "REGISTRY",
    "DatasetFormatError",
    "DatasetInfo",
    "ImageRecord",
    "cache_dir",
    "class_names",
    "episode",
    "info",
    "percent_split",
    "records",
    "select_listed",
    "synthetic_root",
]
