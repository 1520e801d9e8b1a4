"""The ``data`` section of a spec: which images a trial trains and evaluates on."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from cgc_ray.config.base import LocalPath
from cgc_ray.config.section import Section
from cgc_ray.data.registry import DATASETS

DatasetName = Literal[DATASETS]


class SyntheticSpec(Section):
    """Options of the embedded synthetic dataset (``data.dataset == "synthetic"``).

    ``classes``: ``novel`` (5 shapes, the demos' classes) or ``base`` (10 other
    shapes, the disjoint set the demos pretrain on).
    ``clutter``: the object sits among distractor shapes; ``spurious``: a
    background cue correlates with the label, so a classifier can be right for
    the wrong reason (a good case for heatmap metrics). The fields are the
    keyword arguments of ``cgc_ray.data.synthetic.ensure``; ``seed`` fixes the
    images (it is not the training seed), ``p_cue`` is the share of
    ``spurious`` training images whose cue names their own class.
    """

    classes: Literal["novel", "base"] = "novel"
    variant: Literal["clutter", "spurious"] = "clutter"
    seed: int = Field(0, ge=0)
    n_train_per_class: int = Field(300, ge=2)
    n_test_per_class: int = Field(150, ge=1)
    n_val_per_class: int = Field(0, ge=0)
    p_cue: float = Field(0.8, ge=0, le=1)


class DataSpec(Section):
    """Which images a trial trains and evaluates on.

    ``root`` is the directory of the dataset in the layout of
    :data:`DATA_LAYOUTS`; for ``synthetic`` it is an optional cache directory
    (None: the data module's default cache). ``shots`` selects few-shot
    episodes (n training images per class, the rest of the class for
    validation), ``episode`` the seeded split, ``percent`` the labelled share
    (in %) for semi-supervised runs, ``eval_split`` the split the metrics are
    computed on (None: the dataset's test split; ``val`` to choose settings
    without looking at the reported split), ``labelled`` how the labelled images are
    chosen: ``random`` (``percent`` of each class, seeded) or ``list`` (a fixed
    list: ``split_file``, for ImageNet by default the standard ``1percent.txt``
    in the dataset folder), ``train_crop_scale``
    the area range of the standard random-resized-crop augmentation of training images.
    """

    dataset: DatasetName = "synthetic"
    root: LocalPath | None = None
    image_size: int = Field(224, ge=32)
    batch_size: int = Field(256, ge=2)
    num_workers: int | Literal["auto"] = "auto"
    shots: int | None = Field(None, ge=1)
    episode: int = Field(0, ge=0)
    percent: float | None = Field(None, gt=0, le=100)
    eval_split: str | None = None
    labelled: Literal["random", "list"] = "random"
    split_file: LocalPath | None = None
    train_crop_scale: tuple[float, float] = (0.08, 1.0)
    synthetic: SyntheticSpec = SyntheticSpec()

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError(f"data.num_workers must be >= 0 or 'auto', got {v}")
        return v

    @field_validator("train_crop_scale")
    @classmethod
    def _crop_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"data.train_crop_scale must satisfy 0 < low <= high <= 1, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _split_exclusive(self) -> "DataSpec":
        if self.shots is not None and self.percent is not None:
            raise ValueError(
                f"data.shots={self.shots} and data.percent={self.percent} are both set; "
                "a trial is either few-shot (shots) or semi-supervised (percent): unset one"
            )
        if (self.split_file is not None or self.labelled == "list") and self.percent is None:
            raise ValueError("data.split_file / data.labelled=list are only used with data.percent "
                             "(semi-supervised); set data.percent too")
        if self.split_file is not None and self.labelled != "list":
            raise ValueError(f"data.split_file={self.split_file!r} is a list of labelled images: set data.labelled=list")
        return self
