"""Experiment specifications: what one trial or one sweep of trials runs.

An :class:`ExperimentSpec` is validated once at the edge (pydantic,
``extra="forbid"`` everywhere), crosses into Ray as a plain dict
(``spec.model_dump(mode="json")``) and is re-validated on the worker with
:func:`validate_spec`. Defaults live here and nowhere else.

This module imports neither torch nor Ray, so specs can be checked before
either starts.

The rest of ``cgc_ray.config``: ``identity`` (overrides, sweeps, trial ids),
``paths`` (local paths made absolute at the edge), ``checks`` (the spec against
the data on disk), ``presets`` (the paper's and the demos' settings).

Symbols follow the paper (Pillai et al., CVPR 2022): ``lam`` is the weight
lambda of the CGC term in ``L = L_CE + lam * L_CGC``, ``tau`` the temperature of
the contrastive softmax.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from cgc_ray.config.base import LocalPath, SpecError, StoragePath, WeightsRef, set_path
from cgc_ray.data.registry import DATASETS
from cgc_ray.models.archs import ARCHS

DatasetName = Literal[DATASETS]
ArchName = Literal[ARCHS]
MetricName = Literal["top1", "top5", "ch", "iauc", "cgc_loss"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
TV_WEIGHTS_RE = re.compile(r"^ResNet(\d+)_Weights\.\w+$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticSpec(_Strict):
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


class DataSpec(_Strict):
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


class ModelSpec(_Strict):
    """The classifier f and the layer whose activation A Grad-CAM explains.

    ``weights``: None (random init), a torchvision enum name such as
    ``"ResNet50_Weights.IMAGENET1K_V1"``, a local state_dict path,
    ``"swav:/path/to/swav_800ep_pretrain.pth.tar"`` or a cgc-ray checkpoint.
    """

    arch: ArchName = "resnet18"
    weights: WeightsRef | None = None
    layer: str = Field("layer4", pattern=r"^[A-Za-z_][\w.]*$")

    @model_validator(mode="after")
    def _weights_match_arch(self) -> "ModelSpec":
        m = TV_WEIGHTS_RE.match(self.weights or "")
        if m and f"resnet{m.group(1)}" != self.arch:
            raise ValueError(
                f"model.weights={self.weights!r} are for resnet{m.group(1)} but model.arch={self.arch!r}; "
                f"use ResNet{self.arch.removeprefix('resnet')}_Weights.* or change model.arch"
            )
        return self


class MethodSpec(_Strict):
    """Training objective ``L = L_CE + lam * L_CGC``.

    ``name``: ``baseline`` (L_CE only), ``cgc`` (contrastive Grad-CAM
    consistency), ``cgc_no_neg`` (Tables 5/11 ablation: l2 between the
    positive pair only). ``resolution``: compare heatmaps at image size
    (authors) or at the h x w feature size. ``anchor``: ``paper`` compares the
    query T_i(g(x_i)) with every g(T_j(x_j)); ``authors`` reproduces the
    released code (augmented vs augmented negatives). ``negatives``: from this
    worker's batch (``local``) or gathered across DDP workers (``global``).
    ``crop_scale``: area range of the random resized crop T.

    How the term is computed, where the paper and the authors' code differ
    (docs/PAPER.md §5; docs/DESIGN.md has the measurements behind the defaults):

    ``forward``: ``joint`` runs the views through the network as one batch
    (BatchNorm normalises them together); ``separate`` runs each view on its
    own, as the authors do (BatchNorm statistics per view).
    ``view``: the image T is applied to: ``train`` the random-crop training
    view (the paper's reading: x is the training image); ``center`` a centre
    view of it (Resize + CenterCrop, the authors' code). Cross-entropy is on
    the training view either way.
    ``no_neg_scale``: the ``cgc_no_neg`` l2 term summed over pixels (``sum``)
    or averaged (``mean``, the authors' ``F.mse_loss``: ``sum`` / pixels).
    ``cam_class``: the class both heatmaps explain: ``pred`` the top-1
    prediction on x (the paper), ``label`` the ground truth (a diagnostic).
    ``lam_normalization``: ``none`` uses ``lam`` as given; ``imagenet``
    rescales it by the ratio of the two terms' starting values here to their
    ratio on ImageNet, ``(ln K / ln B) / (ln 1000 / ln 256)`` (K classes, B
    images a batch), so one λ means the same weight of CGC against CE on
    datasets of any size.
    """

    name: Literal["baseline", "cgc", "cgc_no_neg"] = "cgc"
    lam: float = Field(1.0, ge=0)
    tau: float = Field(0.5, gt=0)
    resolution: Literal["image", "feature"] = "image"
    anchor: Literal["paper", "authors"] = "paper"
    negatives: Literal["local", "global"] = "local"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    forward: Literal["joint", "separate"] = "joint"
    view: Literal["train", "center"] = "train"
    no_neg_scale: Literal["sum", "mean"] = "mean"
    cam_class: Literal["pred", "label"] = "pred"
    lam_normalization: Literal["none", "imagenet"] = "none"

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"method.crop_scale must satisfy 0 < low <= high <= 1, got ({lo}, {hi})")
        return v


class EvaluationSpec(_Strict):
    """How the metrics are computed (docs/PAPER.md §3).

    ``iauc_images``: how many evaluation images IAUC scores (None: all, as the
    paper's Table 2); fewer are a seeded sample spread over every class.
    ``iauc_protocol``: ``authors`` reproduces the authors' script (Grad-CAM of
    the ground-truth class, their Gaussian kernel with zero padding, pixels in
    ``np.flip(argsort)`` order); ``fast`` is batched (Grad-CAM of the predicted
    class, torchvision's blur, a stable order). ``cgc_batch``: images per
    held-out CGC-loss group (the paper's 32), drawn from a seeded permutation
    of the evaluation images, so the value does not depend on file order.
    """

    iauc_images: int | None = Field(None, ge=1)
    iauc_protocol: Literal["authors", "fast"] = "authors"
    cgc_batch: int = Field(32, ge=2)


class StepSchedule(_Strict):
    """Multiply the learning rate by ``gamma`` at each epoch in ``milestones``."""

    name: Literal["step"] = "step"
    milestones: tuple[int, ...] = (30, 60)
    gamma: float = Field(0.1, gt=0, le=1)

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(m < 1 for m in v) or list(v) != sorted(set(v)):
            raise ValueError(f"optim.schedule.milestones must be strictly increasing epochs >= 1, got {list(v)}")
        return v


class CosineSchedule(_Strict):
    """Cosine decay from ``optim.lr`` to ``min_lr`` over the training steps."""

    name: Literal["cosine"] = "cosine"
    min_lr: float = Field(0.0, ge=0)


class OneCycleSchedule(_Strict):
    """One-cycle policy peaking at ``optim.lr`` after ``pct_start`` of the steps."""

    name: Literal["onecycle"] = "onecycle"
    pct_start: float = Field(0.3, gt=0, lt=1)


Schedule = Annotated[Union[StepSchedule, CosineSchedule, OneCycleSchedule], Field(discriminator="name")]


class OptimSpec(_Strict):
    """SGD and its learning-rate schedule.

    ``head_lr``: a separate learning rate for the final linear layer (the
    authors' semi-supervised recipe); None uses ``lr`` everywhere.
    ``warmup_epochs``: linear warm-up before the schedule.
    """

    lr: float = Field(0.1, gt=0)
    head_lr: float | None = Field(None, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    nesterov: bool = False
    epochs: int = Field(90, ge=1)
    warmup_epochs: int = Field(0, ge=0)
    schedule: Schedule = StepSchedule()

    @model_validator(mode="after")
    def _warmup_shorter(self) -> "OptimSpec":
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"optim.warmup_epochs={self.warmup_epochs} must be smaller than optim.epochs={self.epochs}"
            )
        if self.nesterov and self.momentum == 0:
            raise ValueError("optim.nesterov=true needs optim.momentum > 0")
        if self.warmup_epochs and self.schedule.name == "onecycle":
            raise ValueError(
                f"optim.warmup_epochs={self.warmup_epochs} with optim.schedule.name=onecycle: one-cycle warms up "
                "itself (optim.schedule.pct_start); set optim.warmup_epochs=0"
            )
        if self.schedule.name == "step" and any(m <= self.warmup_epochs for m in self.schedule.milestones):
            raise ValueError(
                f"optim.schedule.milestones={list(self.schedule.milestones)} must all come after the warm-up "
                f"(optim.warmup_epochs={self.warmup_epochs})"
            )
        return self


class ScalingSpec(_Strict):
    """Resources of one trial: ``num_workers`` DDP workers, each with these CPUs/GPUs.

    ``gpus_per_worker`` may be fractional below 1 so several small trials
    share a GPU; it is used only when a GPU is used (``use_gpu``: ``auto``
    means "if the cluster has GPUs"). ``amp`` (fp16 autocast with a grad
    scaler) and ``channels_last`` apply on GPUs only.
    """

    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)
    use_gpu: bool | Literal["auto"] = "auto"
    amp: bool = True
    channels_last: bool = True

    @field_validator("gpus_per_worker")
    @classmethod
    def _whole_above_one(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError(f"scaling.gpus_per_worker above 1 must be a whole number (Ray's rule), got {v}")
        return v

    @model_validator(mode="after")
    def _ddp_whole_gpus(self) -> "ScalingSpec":
        if self.num_workers > 1 and 0 < self.gpus_per_worker < 1 and self.use_gpu is not False:
            raise ValueError(
                f"scaling.num_workers={self.num_workers} with scaling.gpus_per_worker={self.gpus_per_worker}: "
                "DDP ranks cannot share a GPU (NCCL needs one per rank); set scaling.gpus_per_worker=1, "
                "or scaling.num_workers=1 to pack single-worker trials, or scaling.use_gpu=false for CPU DDP"
            )
        if self.use_gpu is True and self.gpus_per_worker == 0:
            raise ValueError("scaling.use_gpu=true needs scaling.gpus_per_worker > 0")
        return self


class FailureSpec(_Strict):
    """Fault tolerance.

    ``max_retries``: retries of a failed trial (a lost node, an error), each
    from its last checkpoint; a NaN loss is deterministic and never retried.
    ``checkpoint_every``: epochs between checkpoints (the last epoch is always
    checkpointed); a retry or re-run resumes from the last one.
    """

    max_retries: int = Field(2, ge=0)
    checkpoint_every: int = Field(1, ge=1)


class SweepSpec(_Strict):
    """Grid axes: dotted field path -> values; trials are the Cartesian product.

    Example: ``{"method.lam": [0, 0.1], "seed": [0, 1, 2]}`` gives 6 trials.
    ``variants``: settings changed one set at a time (an ablation, one factor
    at a time), each crossed with the grid; ``{}`` is the unchanged spec.
    ``grid: {seed: [0, 1]}, variants: [{}, {method.forward: separate}]`` gives
    4 trials. Every path must exist in :class:`ExperimentSpec` and every value
    must validate there (checked when the spec is built).
    """

    grid: dict[str, list[Any]] = Field(default_factory=dict)
    variants: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("variants")
    @classmethod
    def _variants_well_formed(cls, variants: list[dict[str, Any]]) -> list[dict[str, Any]]:
        canon = [json.dumps(v, sort_keys=True) for v in variants]
        if len(set(canon)) != len(canon):
            raise ValueError("sweep.variants has repeated entries: each trial would run twice")
        for v in variants:
            bad = [p for p in v if p == "sweep" or p.startswith("sweep.")]
            if bad:
                raise ValueError(f"sweep.variants: {bad} cannot be swept")
        return variants

    @field_validator("grid")
    @classmethod
    def _axes_well_formed(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for path, values in grid.items():
            if path == "sweep" or path.startswith("sweep."):
                raise ValueError(f"sweep.grid[{path!r}]: a sweep cannot sweep over itself")
            if not values:
                raise ValueError(f"sweep.grid[{path!r}] is empty: give at least one value or remove the axis")
            canon = [json.dumps(v, sort_keys=True) for v in values]
            if len(set(canon)) != len(canon):
                raise ValueError(f"sweep.grid[{path!r}] has repeated values {values}: each trial would run twice")
        return grid


class ExperimentSpec(_Strict):
    """Everything that defines an experiment: one trial, or a sweep of trials.

    ``name`` is the experiment (a results partition and the Ray run name),
    ``storage`` a local path or pyarrow filesystem URI (``s3://bucket/prefix``)
    for results and checkpoints, ``metrics`` what evaluation computes and
    ``eval_every`` how often (in epochs; the last epoch is always evaluated).
    """

    name: str = "default"
    seed: int = Field(0, ge=0)
    storage: StoragePath = "./results"
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    method: MethodSpec = MethodSpec()
    optim: OptimSpec = OptimSpec()
    scaling: ScalingSpec = ScalingSpec()
    failure: FailureSpec = FailureSpec()
    sweep: SweepSpec = SweepSpec()
    metrics: tuple[MetricName, ...] = ("top1", "top5", "ch", "cgc_loss")
    eval_every: int = Field(1, ge=1)
    evaluation: EvaluationSpec = EvaluationSpec()

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(
                f"name={v!r} must start with a letter or digit and use only letters, digits, '_', '.', '-' "
                "(it becomes a directory name)"
            )
        return v

    @field_validator("metrics")
    @classmethod
    def _unique_metrics(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"metrics has repeated entries: {list(v)}")
        return v

    @model_validator(mode="after")
    def _label_needs_labels(self) -> "ExperimentSpec":
        if self.method.cam_class == "label" and self.data.percent is not None and self.method.name != "baseline":
            raise ValueError("method.cam_class=label explains the ground-truth class, which unlabelled images "
                             "(data.percent) do not have; use method.cam_class=pred")
        return self

    @model_validator(mode="after")
    def _loader_fits_cpus(self) -> "ExperimentSpec":
        w, cpus = self.data.num_workers, self.scaling.cpus_per_worker
        if isinstance(w, int) and w > max(0, int(cpus) - 1):
            raise ValueError(
                f"data.num_workers={w} loader processes need CPUs the trial does not hold "
                f"(scaling.cpus_per_worker={cpus:g}; one CPU trains): set scaling.cpus_per_worker={w + 1} "
                "or data.num_workers=auto"
            )
        return self

    @model_validator(mode="after")
    def _sweep_values_valid(self) -> "ExperimentSpec":
        if not self.sweep.grid and not self.sweep.variants:
            return self
        base = self.model_dump(mode="json")
        base["sweep"] = {"grid": {}, "variants": []}
        for path, values in self.sweep.grid.items():
            for i, value in enumerate(values):
                try:
                    ExperimentSpec.model_validate(set_path(copy.deepcopy(base), path, value))
                except (ValidationError, SpecError) as e:
                    raise ValueError(f"sweep.grid[{path!r}][{i}] = {value!r}: {_describe(e)}") from None
        for i, variant in enumerate(self.sweep.variants):
            tree = copy.deepcopy(base)
            try:
                for path, value in variant.items():
                    set_path(tree, path, value)
                ExperimentSpec.model_validate(tree)
            except (ValidationError, SpecError) as e:
                raise ValueError(f"sweep.variants[{i}] = {variant!r}: {_describe(e)}") from None
        return self


def _describe(err: Exception) -> str:
    """One line per problem: ``dotted.field: message (got value)``."""
    if not isinstance(err, ValidationError):
        return str(err)
    lines = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "tagged-union")))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (not allowed here)"
        got = "" if e["type"] in ("value_error", "missing") else f" (got {e.get('input')!r})"
        lines.append(f"{loc}: {msg}{got}" if loc else f"{msg}{got}")
    return "; ".join(lines)


def validate_spec(data: Mapping[str, Any] | ExperimentSpec) -> ExperimentSpec:
    """Validate a plain dict (e.g. received on a Ray worker) into a spec; raises SpecError."""
    if isinstance(data, ExperimentSpec):
        return data
    try:
        return ExperimentSpec.model_validate(dict(data))
    except ValidationError as e:
        raise SpecError(f"invalid experiment spec: {_describe(e)}") from None


def load_spec(source: str | Path | Mapping[str, Any] | ExperimentSpec) -> ExperimentSpec:
    """Load a spec from a YAML/JSON file path, a dict, or return a spec unchanged."""
    if isinstance(source, (ExperimentSpec, Mapping)):
        return validate_spec(source)
    path = Path(source)
    if not path.is_file():
        raise SpecError(f"spec file {str(path)!r} does not exist; give a .yaml/.json path or a preset name")
    try:
        data = yaml.safe_load(path.read_text())  # JSON is a subset of YAML
    except yaml.YAMLError as e:
        raise SpecError(f"spec file {str(path)!r} is not valid YAML/JSON: {e}") from None
    if not isinstance(data, dict):
        raise SpecError(f"spec file {str(path)!r} must hold a mapping at the top level, got {type(data).__name__}")
    return validate_spec(data)


def loader_workers(spec: ExperimentSpec) -> int:
    """DataLoader worker processes of one trial worker (``data.num_workers``, "auto" resolved)."""
    w = spec.data.num_workers
    return max(0, int(spec.scaling.cpus_per_worker) - 1) if w == "auto" else w


IMAGENET_LOSS_RATIO = math.log(1000) / math.log(256)  # CE / L_CGC at the start, ImageNet at batch 256


def effective_lam(spec: ExperimentSpec, num_classes: int) -> float:
    """``method.lam``, rescaled per ``method.lam_normalization`` for a dataset of ``num_classes`` classes.

    ``imagenet``: λ · (ln K / ln B) / (ln 1000 / ln 256), B the images a query
    is contrasted with (this worker's batch, or every worker's with global
    negatives): the two loss terms start near ln K and ln B.
    """
    m = spec.method
    if m.lam_normalization == "none":
        return m.lam
    batch = spec.data.batch_size if m.negatives == "global" else spec.data.batch_size // spec.scaling.num_workers
    return m.lam * (math.log(num_classes) / math.log(batch)) / IMAGENET_LOSS_RATIO


def method_config_kwargs(spec: ExperimentSpec, *, heldout_metric: bool = False,
                         num_classes: int | None = None) -> dict[str, Any]:
    """Keyword arguments for ``cgc_ray.method.cgc.MethodConfig`` from a spec.

    ``heldout_metric``: the settings of the held-out CGC-loss metric instead
    of the trained method's: the paper's CGC term (``MethodSpec``'s defaults:
    τ 0.5, its T, image resolution, the paper's anchor) on the spec's Grad-CAM
    layer, the same for every trial so baselines and every λ or τ are scored
    on one yardstick. ``num_classes``: needed when ``method.lam_normalization``
    rescales λ (:func:`effective_lam`).
    """
    m = MethodSpec(name="cgc") if heldout_metric else spec.method
    if m.lam_normalization != "none" and num_classes is None:
        raise ValueError("method.lam_normalization rescales λ by the number of classes: pass num_classes")
    return {
        "name": m.name,
        "lam": m.lam if heldout_metric or m.lam_normalization == "none" else effective_lam(spec, num_classes),
        "forward": m.forward,
        "view": m.view,
        "no_neg_scale": m.no_neg_scale,
        "cam_class": m.cam_class,
        "tau": m.tau,
        "resolution": m.resolution,
        "anchor": m.anchor,
        "global_negatives": m.negatives == "global",
        "layer": spec.model.layer,
        "crop_scale": m.crop_scale,
    }


