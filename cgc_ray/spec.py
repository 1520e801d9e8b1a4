"""Experiment specifications: what one trial or one sweep of trials runs.

An :class:`ExperimentSpec` is validated once at the edge (pydantic,
``extra="forbid"`` everywhere), crosses into Ray as a plain dict
(``spec.model_dump(mode="json")``) and is re-validated on the worker with
:func:`validate_spec`. Defaults live here and nowhere else.

This module imports neither torch nor Ray, so specs can be checked before
either starts.

Typical use::

    spec = load_spec(PRESETS["lambda_ablation_demo"])
    spec = apply_overrides(spec, ["optim.epochs=2", "sweep.grid.seed=[0, 1]"])
    check_data_root(spec)
    for trial in expand_trials(spec):
        print(trial_id(trial), trial.method.lam)

Symbols follow the paper (Pillai et al., CVPR 2022): ``lam`` is the weight
lambda of the CGC term in ``L = L_CE + lam * L_CGC``, ``tau`` the temperature of
the contrastive softmax.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, NamedTuple, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "ARCHS",
    "DATASETS",
    "DATA_LAYOUTS",
    "DataLayout",
    "NON_IDENTITY_FIELDS",
    "PRESETS",
    "DataSpec",
    "ExperimentSpec",
    "MethodSpec",
    "ModelSpec",
    "OptimSpec",
    "ScalingSpec",
    "SpecError",
    "SweepSpec",
    "apply_overrides",
    "check_data_root",
    "expand_trials",
    "load_spec",
    "method_config_kwargs",
    "spec_hash",
    "trial_id",
    "validate_against_data",
    "validate_spec",
]

DatasetName = Literal[
    "synthetic", "cub200", "cars196", "aircraft", "flowers102", "imagenet", "imagenet100", "unrel"
]
DATASETS: tuple[str, ...] = DatasetName.__args__
ArchName = Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet_small"]
ARCHS: tuple[str, ...] = ArchName.__args__
MetricName = Literal["top1", "top5", "ch", "iauc", "cgc_loss"]

# Fields that say where or how fast a trial runs, not what it computes; they
# are left out of trial_id so moving results to a cluster (other data root,
# other storage, more CPUs) still recognises completed trials.
NON_IDENTITY_FIELDS: frozenset[str] = frozenset(
    {
        "name",
        "storage",
        "data.root",
        "data.num_workers",
        "scaling.cpus_per_worker",
        "scaling.gpus_per_worker",
        "scaling.use_gpu",
        "scaling.amp",
        "scaling.channels_last",
        "failure.max_retries",
        "failure.checkpoint_every",
        "eval_every",
    }
)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TV_WEIGHTS_RE = re.compile(r"^ResNet(\d+)_Weights\.\w+$")


class SpecError(ValueError):
    """A user-facing problem with a spec: says which field, what was wrong, what to do."""


class PathKind(NamedTuple):
    """Marks a spec field that may hold a local path (see :func:`resolve_paths`).

    ``kind``: ``"path"`` a plain path; ``"storage"`` a path or a URI; ``"weights"``
    a path, ``swav:PATH``, or a name that is not a path (a torchvision enum).
    """

    kind: str


LocalPath = Annotated[str, PathKind("path")]
StoragePath = Annotated[str, PathKind("storage")]
WeightsRef = Annotated[str, PathKind("weights")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticSpec(_Strict):
    """Options of the embedded synthetic dataset (``data.dataset == "synthetic"``).

    ``clutter``: the object sits among distractor shapes; ``spurious``: a
    background cue correlates with the label, so a classifier can be right for
    the wrong reason (a good case for heatmap metrics). The fields are the
    keyword arguments of ``cgc_ray.data.synthetic.ensure``; ``seed`` fixes the
    images (it is not the training seed), ``p_cue`` is the share of
    ``spurious`` training images whose cue names their own class.
    """

    variant: Literal["clutter", "spurious"] = "clutter"
    seed: int = Field(0, ge=0)
    n_train_per_class: int = Field(300, ge=2)
    n_test_per_class: int = Field(150, ge=1)
    p_cue: float = Field(0.8, ge=0, le=1)


class DataSpec(_Strict):
    """Which images a trial trains and evaluates on.

    ``root`` is the directory of the dataset in the layout of
    :data:`DATA_LAYOUTS`; for ``synthetic`` it is an optional cache directory
    (None: the data module's default cache). ``shots`` selects few-shot
    episodes (n training images per class, the rest of the class for
    validation), ``episode`` the seeded split, ``percent`` the labelled share
    (in %) for semi-supervised runs, ``split_file`` an optional fixed list of
    labelled images (e.g. the standard ImageNet ``1percent.txt``), ``train_crop_scale``
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
        if self.split_file is not None and self.percent is None:
            raise ValueError("data.split_file is only used with data.percent (semi-supervised); set both or neither")
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
        m = _TV_WEIGHTS_RE.match(self.weights or "")
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
    """

    name: Literal["baseline", "cgc", "cgc_no_neg"] = "cgc"
    lam: float = Field(1.0, ge=0)
    tau: float = Field(0.5, gt=0)
    resolution: Literal["image", "feature"] = "image"
    anchor: Literal["paper", "authors"] = "paper"
    negatives: Literal["local", "global"] = "local"
    crop_scale: tuple[float, float] = (0.08, 1.0)

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"method.crop_scale must satisfy 0 < low <= high <= 1, got ({lo}, {hi})")
        return v


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
    """Fault tolerance: retries of a failed trial (from its last checkpoint)."""

    max_retries: int = Field(2, ge=0)
    checkpoint_every: int = Field(1, ge=1)


class SweepSpec(_Strict):
    """Grid axes: dotted field path -> values; trials are the Cartesian product.

    Example: ``{"method.lam": [0, 0.1], "seed": [0, 1, 2]}`` gives 6 trials.
    Every path must exist in :class:`ExperimentSpec` and every value must
    validate there (checked when the spec is built).
    """

    grid: dict[str, list[Any]] = Field(default_factory=dict)

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
        if not self.sweep.grid:
            return self
        base = self.model_dump(mode="json")
        base["sweep"] = {"grid": {}}
        for path, values in self.sweep.grid.items():
            for i, value in enumerate(values):
                try:
                    ExperimentSpec.model_validate(_set_path(copy.deepcopy(base), path, value))
                except (ValidationError, SpecError) as e:
                    raise ValueError(f"sweep.grid[{path!r}][{i}] = {value!r}: {_describe(e)}") from None
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


# Dict-valued fields whose keys are free-form (the rest of a dotted path is the key).
_FREE_KEY_DICTS = {("sweep", "grid")}


def _set_path(tree: dict, path: str, value: Any) -> dict:
    """Set ``tree[a][b]... = value`` for ``path == "a.b..."``; unknown keys raise SpecError."""
    parts = path.split(".")
    node, walked = tree, []
    for i, key in enumerate(parts):
        if tuple(walked) in _FREE_KEY_DICTS:
            node[".".join(parts[i:])] = value
            return tree
        if not isinstance(node, dict) or key not in node:
            where = ".".join(walked) or "<top level>"
            valid = ", ".join(sorted(node)) if isinstance(node, dict) else "(none: not a section)"
            raise SpecError(f"unknown field {path!r}: {key!r} is not a key of {where}; valid keys there: {valid}")
        if i == len(parts) - 1:
            node[key] = value
        else:
            node = node[key]
            walked.append(key)
    return tree


def apply_overrides(spec: ExperimentSpec | Mapping[str, Any], overrides: list[str]) -> ExperimentSpec:
    """Apply ``--set`` style overrides ``"a.b=value"``; values are parsed as YAML.

    ``"method.lam=0.5"``, ``"data.shots=null"``, ``"sweep.grid.seed=[0,1,2]"``,
    ``"optim.schedule={name: cosine}"``. Raises SpecError naming the path and
    the valid keys at the level where it went wrong.
    """
    tree = validate_spec(spec).model_dump(mode="json")
    for item in overrides:
        path, sep, raw = item.partition("=")
        path = path.strip()
        if not sep or not path:
            raise SpecError(f"override {item!r} must look like 'section.field=value'")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise SpecError(f"override {item!r}: value is not valid YAML: {e}") from None
        _set_path(tree, path, value)
    return validate_spec(tree)


def _path_kind(annotation: Any) -> str | None:
    """The :class:`PathKind` of a field annotation (through ``X | None`` and ``Annotated``)."""
    for meta in getattr(annotation, "__metadata__", ()):
        if isinstance(meta, PathKind):
            return meta.kind
    for arg in typing.get_args(annotation):
        kind = _path_kind(arg)
        if kind is not None:
            return kind
    return None


def path_fields(model: type[BaseModel] = None, prefix: str = "") -> dict[str, str]:
    """Dotted field path -> :class:`PathKind` kind of every path-like field of the spec."""
    model = model or ExperimentSpec
    out: dict[str, str] = {}
    for name, info in model.model_fields.items():
        # pydantic moves the metadata of a bare Annotated[...] onto the FieldInfo
        kind = next((m.kind for m in info.metadata if isinstance(m, PathKind)), None) or _path_kind(info.annotation)
        if kind is not None:
            out[prefix + name] = kind
        elif isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            out.update(path_fields(info.annotation, f"{prefix}{name}."))
    return out


def is_uri(value: str) -> bool:
    """``scheme://...`` (s3, gs, file, hdfs, ...): left as given, never resolved against a folder."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value) is not None


def resolve_path_value(value: str | None, kind: str, cwd: str | os.PathLike | None = None) -> str | None:
    """``value`` made absolute against ``cwd`` (default: the current directory), ``~`` expanded.

    URIs pass unchanged. For ``kind="weights"``: ``swav:PATH`` resolves its
    PATH; a torchvision enum name (``ResNet50_Weights.IMAGENET1K_V1``) or a
    ``scheme:reference`` that is not a path stays as it is.
    """
    if value is None or is_uri(value):
        return value
    if kind == "weights":
        if value.startswith("swav:"):
            return "swav:" + resolve_path_value(value[len("swav:"):], "path", cwd)
        if re.match(r"^[A-Za-z]\w*:(?!\\|/)", value) or (
            _TV_WEIGHTS_RE.match(value) and not Path(cwd or ".", value).exists()
        ):
            return value
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = Path(cwd if cwd is not None else os.getcwd()) / path
    return os.path.normpath(path)


def resolve_paths(spec: ExperimentSpec | Mapping[str, Any], cwd: str | os.PathLike | None = None) -> ExperimentSpec:
    """The spec with every local path made absolute against ``cwd`` (default: the current directory).

    Resolve at the edge, on the driver, before the spec reaches Ray: Tune runs
    each trial in its own working directory, where ``./results`` would mean
    something else. Covers every field marked path-like (:func:`path_fields`:
    storage, data root, split file, weights) and the values of sweep axes over
    them. URIs (``s3://``, ``gs://``, ``file://``) pass unchanged. Idempotent.
    """
    tree = validate_spec(spec).model_dump(mode="json")
    fields = path_fields()
    for path, kind in fields.items():
        node, *_ = _walk(tree, path)
        node[path.rsplit(".", 1)[-1]] = resolve_path_value(_get_path(tree, path), kind, cwd)
    grid = tree["sweep"]["grid"]
    for axis, values in grid.items():
        if axis in fields:
            grid[axis] = [resolve_path_value(v, fields[axis], cwd) for v in values]
    return validate_spec(tree)


def unresolved_paths(spec: ExperimentSpec) -> list[str]:
    """``field=value`` of every local path of ``spec`` that is not absolute (should be empty on a worker)."""
    out = []
    for path, kind in path_fields().items():
        value = _get_path(spec.model_dump(mode="json"), path)
        if value is not None and resolve_path_value(value, kind, "/") != value:
            out.append(f"{path}={value!r}")
    return out


def _walk(tree: dict, path: str) -> tuple[dict, str]:
    *parents, leaf = path.split(".")
    node = tree
    for key in parents:
        node = node[key]
    return node, leaf


def _get_path(tree: dict, path: str) -> Any:
    node, leaf = _walk(tree, path)
    return node.get(leaf)


def expand_trials(spec: ExperimentSpec) -> list[ExperimentSpec]:
    """The grid product of ``spec.sweep`` as trial specs (each with an empty sweep).

    Order is deterministic (axes in insertion order, values in given order);
    trials with the same :func:`trial_id` appear once.
    """
    grid = spec.sweep.grid
    base = spec.model_dump(mode="json")
    base["sweep"] = {"grid": {}}
    trials, seen = [], set()
    for combo in itertools.product(*grid.values()):
        tree = copy.deepcopy(base)
        for path, value in zip(grid, combo):
            _set_path(tree, path, value)
        trial = validate_spec(tree)
        tid = trial_id(trial)
        if tid not in seen:
            seen.add(tid)
            trials.append(trial)
    return trials


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v and (tuple(key.split(".")) not in _FREE_KEY_DICTS):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def trial_id(spec: ExperimentSpec | Mapping[str, Any]) -> str:
    """Deterministic id of what a trial computes: 12 hex of sha256 of its canonical config.

    Fields in :data:`NON_IDENTITY_FIELDS` (where/how fast it runs) are left out,
    so the same trial on a laptop and on a cluster has the same id.
    """
    flat = _flatten(validate_spec(spec).model_dump(mode="json"))
    return _digest({k: v for k, v in flat.items() if k not in NON_IDENTITY_FIELDS})


def spec_hash(spec: ExperimentSpec | Mapping[str, Any]) -> str:
    """12 hex of sha256 of the full resolved config (every field, unlike trial_id)."""
    return _digest(validate_spec(spec).model_dump(mode="json"))


def loader_workers(spec: ExperimentSpec) -> int:
    """DataLoader worker processes of one trial worker (``data.num_workers``, "auto" resolved)."""
    w = spec.data.num_workers
    return max(0, int(spec.scaling.cpus_per_worker) - 1) if w == "auto" else w


def method_config_kwargs(spec: ExperimentSpec) -> dict[str, Any]:
    """Keyword arguments for ``cgc_ray.engine.MethodConfig`` from a spec."""
    m = spec.method
    return {
        "name": m.name,
        "lam": m.lam,
        "tau": m.tau,
        "resolution": m.resolution,
        "anchor": m.anchor,
        "global_negatives": m.negatives == "global",
        "layer": spec.model.layer,
        "crop_scale": m.crop_scale,
    }


# --------------------------------------------------------------------------- data checks

class DataLayout(NamedTuple):
    """Where a dataset may sit under ``data.root`` and what must be there.

    ``subdirs``: the dataset folder is ``root`` itself or ``root/<subdir>``
    (torchvision's convention, the same rule as ``cgc_ray.data.formats``);
    ``required``: entries that folder must hold; ``text``: the layout shown
    in errors.
    """

    subdirs: tuple[str, ...]
    required: tuple[str, ...]
    text: str


DATA_LAYOUTS: dict[str, DataLayout] = {
    "synthetic": DataLayout((), (), "generated on first use under data.root (or the default cache); nothing to download"),
    "cub200": DataLayout(
        ("CUB_200_2011",),
        ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt", "images"),
        "CUB_200_2011/\n"
        "  images.txt              <id> <relative path>\n"
        "  image_class_labels.txt  <id> <class, 1-based>\n"
        "  train_test_split.txt    <id> <1 = train, 0 = test>\n"
        "  bounding_boxes.txt      <id> <x> <y> <w> <h>  (0-based top-left)\n"
        "  classes.txt\n"
        "  images/<class dir>/*.jpg",
    ),
    "cars196": DataLayout(
        ("stanford_cars",),
        ("devkit", "cars_train", "cars_test"),
        "stanford_cars/                     (torchvision StanfordCars layout)\n"
        "  devkit/cars_train_annos.mat      bbox_x1 bbox_y1 bbox_x2 bbox_y2 class fname\n"
        "  devkit/cars_meta.mat\n"
        "  cars_test_annos_withlabels.mat\n"
        "  cars_train/*.jpg\n"
        "  cars_test/*.jpg",
    ),
    "aircraft": DataLayout(
        ("fgvc-aircraft-2013b",),
        ("data/variants.txt", "data/images", "data/images_box.txt"),
        "fgvc-aircraft-2013b/               (torchvision FGVCAircraft layout)\n"
        "  data/images/*.jpg\n"
        "  data/images_variant_{train,val,test,trainval}.txt\n"
        "  data/images_box.txt              <name> <xmin> <ymin> <xmax> <ymax>\n"
        "  data/variants.txt                100 variants",
    ),
    "flowers102": DataLayout(
        ("flowers-102",),
        ("setid.mat", "jpg", "imagelabels.mat"),
        "flowers-102/                       (torchvision Flowers102 layout; no boxes)\n"
        "  jpg/image_XXXXX.jpg\n"
        "  imagelabels.mat\n"
        "  setid.mat                        trnid, valid, tstid",
    ),
    "imagenet": DataLayout(
        ("imagenet", "ILSVRC/Data/CLS-LOC"),
        ("train", "val"),
        "imagenet/                          (or the Kaggle ILSVRC/Data/CLS-LOC tree)\n"
        "  train/<wnid>/*.JPEG\n"
        "  val/*.JPEG or val/<wnid>/*.JPEG\n"
        "  boxes: Pascal-VOC XML per image (1-indexed inclusive) or LOC_val_solution.csv\n"
        "  1percent.txt                     (semi-supervised split, optional: data.split_file)",
    ),
    "imagenet100": DataLayout(
        ("imagenet100", "imagenet", "ILSVRC/Data/CLS-LOC"),
        ("train", "val"),
        "the imagenet layout (train/<wnid>/, val/); only the 100 CMC classes are used",
    ),
    "unrel": DataLayout(
        ("unrel", "UnRel"),
        ("annotations.csv", "images"),
        "unrel/\n"
        "  images/<file>\n"
        "  annotations.csv   image,category,imagenet_index,xmin,ymin,xmax,ymax (1-based inclusive)",
    ),
}


def check_data_root(spec: ExperimentSpec) -> None:
    """Fail before any trial starts if ``data.root`` cannot hold the dataset.

    Raises SpecError with the expected layout when a real dataset has no root,
    when the root is missing, or when required entries are absent. Checks every
    dataset a sweep reaches.
    """
    for dataset in _swept_values(spec, "data.dataset", spec.data.dataset):
        for root in _swept_values(spec, "data.root", spec.data.root):
            layout = DATA_LAYOUTS[dataset]
            if dataset == "synthetic":
                continue
            if root is None:
                raise SpecError(
                    f"data.root is required for data.dataset={dataset!r} (only 'synthetic' is embedded); "
                    f"pass --data-root or --set data.root=PATH. Expected layout:\n{layout.text}"
                )
            path = Path(root).expanduser()
            if not path.is_dir():
                raise SpecError(f"data.root={root!r} does not exist; expected layout for {dataset}:\n{layout.text}")
            candidates = [path] + [path / sub for sub in layout.subdirs]
            folder = next((c for c in candidates if (c / layout.required[0]).exists()), path)
            missing = [r for r in layout.required if not (folder / r).exists()]
            if missing:
                where = " or ".join(str(c) for c in candidates)
                raise SpecError(
                    f"data.root={root!r} lacks {', '.join(missing)} for data.dataset={dataset!r} "
                    f"(looked in {where}); expected layout:\n{layout.text}"
                )


def data_root_missing_here(spec: ExperimentSpec) -> list[str]:
    """The dataset folders the sweep names that do not exist on this machine (embedded data needs none)."""
    missing = []
    for dataset in _swept_values(spec, "data.dataset", spec.data.dataset):
        for root in _swept_values(spec, "data.root", spec.data.root):
            if dataset != "synthetic" and root is not None and not Path(root).expanduser().is_dir():
                missing.append(root)
    return missing


def _swept_values(spec: ExperimentSpec, path: str, current: Any) -> list[Any]:
    return list(spec.sweep.grid.get(path, [current]))


def validate_against_data(spec: ExperimentSpec, class_counts: Mapping[int, int]) -> None:
    """Check the spec against the real dataset: few-shot needs shots < images per class.

    ``class_counts``: label -> number of training images of that class. Every
    swept value of ``data.shots`` is checked.
    """
    if not class_counts:
        raise SpecError(f"data.dataset={spec.data.dataset!r} has no images: check data.root")
    smallest = min(class_counts.values())
    for shots in _swept_values(spec, "data.shots", spec.data.shots):
        if shots is None or shots < smallest:
            continue
        short = sorted(c for c, n in class_counts.items() if n <= shots)
        shown = ", ".join(f"class {c}: {class_counts[c]}" for c in short[:5])
        more = f" and {len(short) - 5} more" if len(short) > 5 else ""
        raise SpecError(
            f"data.shots={shots} leaves no validation image for {len(short)} class(es) ({shown}{more}); "
            f"few-shot takes shots images per class for training and the rest for validation, "
            f"so data.shots must be at most {smallest - 1} here"
        )


# --------------------------------------------------------------------------- presets


def _paper_base(**over: Any) -> dict[str, Any]:
    """REFERENCE.md section 2: SGD lr 0.1, momentum 0.9, wd 1e-4, batch 256, tau 0.5,
    90 epochs with lr x0.1 every 30 epochs."""
    base: dict[str, Any] = {
        "data": {"dataset": "imagenet", "image_size": 224, "batch_size": 256},
        "model": {"arch": "resnet18", "weights": None, "layer": "layer4"},
        "method": {"name": "cgc", "lam": 1.0, "tau": 0.5},
        "optim": {
            "lr": 0.1,
            "momentum": 0.9,
            "weight_decay": 1e-4,
            "epochs": 90,
            "schedule": {"name": "step", "milestones": [30, 60], "gamma": 0.1},
        },
        "metrics": ["top1", "top5", "ch", "iauc", "cgc_loss"],
        # one GPU per trial worker with 8 CPUs: 7 DataLoader processes feed it (cluster/gpu.yaml's 4-GPU
        # type has 12 CPUs per GPU); ImageNet DDP adds --set scaling.num_workers=4
        "scaling": {"cpus_per_worker": 8, "gpus_per_worker": 1},
    }
    return _merge(base, over)


def _mergeable(old: Any, new: Any) -> bool:
    """Dicts merge, except members of a discriminated union (e.g. optim.schedule) of another kind."""
    if not (isinstance(old, dict) and isinstance(new, Mapping)):
        return False
    return "name" not in new or old.get("name") == new["name"]


def _merge(a: dict[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if _mergeable(out.get(k), v) else copy.deepcopy(v)
    return out


_R50_IMAGENET = "ResNet50_Weights.IMAGENET1K_V1"
_FINEGRAINED_LAM = {"cub200": 0.25, "cars196": 0.25, "aircraft": 0.5, "flowers102": 0.5}
_FEWSHOT_LAM = {"cub200": 0.8, "cars196": 0.8, "aircraft": 0.6, "flowers102": 0.8}
_METHODS3 = ["baseline", "cgc", "cgc_no_neg"]

# The demo scale: embedded synthetic data (1,500 training images of 5 shape classes among
# distractors), the small CPU net at 64 px. Tuned on the 2-core CPU: cross-entropy reaches
# ~71 % test top-1 in 20 epochs (~3.5 s/epoch per core); mild training crops (0.85-1 of the
# area) and CGC crops of 0.3-1 so T keeps the object, as in the pilots.
_DEMO = {
    "data": {"dataset": "synthetic", "image_size": 64, "batch_size": 64, "num_workers": 0,
             "train_crop_scale": [0.85, 1.0]},
    "model": {"arch": "resnet_small", "weights": None},
    "method": {"crop_scale": [0.3, 1.0]},
    "optim": {"lr": 0.05, "nesterov": True, "weight_decay": 1e-4, "epochs": 20, "schedule": {"name": "onecycle"}},
    "scaling": {"cpus_per_worker": 1, "gpus_per_worker": 0.25},
    "metrics": ["top1", "ch", "cgc_loss"],
    "eval_every": 5,
}

PRESETS: dict[str, dict[str, Any]] = {
    # Tables 1, 2, 5: ImageNet from scratch; lambda 1.0 (ResNet18) / 0.5 (ResNet50).
    "imagenet_r18": _paper_base(name="imagenet", sweep={"grid": {"method.name": _METHODS3}}),
    "imagenet_r50": _paper_base(
        name="imagenet", model={"arch": "resnet50"}, method={"lam": 0.5}, sweep={"grid": {"method.name": _METHODS3}}
    ),
    # Table 11: ImageNet-100, ResNet50 (lambda as for ResNet50 on ImageNet).
    "imagenet100_r50": _paper_base(
        name="imagenet100",
        data={"dataset": "imagenet100"},
        model={"arch": "resnet50"},
        method={"lam": 0.5},
        sweep={"grid": {"method.name": _METHODS3}},
    ),
    # Table 10: lambda ablation, ResNet18 on ImageNet.
    "lambda_ablation": _paper_base(
        name="lambda_ablation", sweep={"grid": {"method.lam": [0.0, 0.01, 0.1, 0.5, 1.0, 2.0]}}
    ),
    # Table 9: 1% labels, SwAV ResNet50 init; authors' command: batch 128, 50 epochs,
    # lr 0.02 (trunk) / 5 (head), wd 0, lr x0.2 at epochs 12 and 16, lambda 0.25.
    "semisup": _paper_base(
        name="semisup",
        data={"percent": 1.0, "batch_size": 128},
        model={"arch": "resnet50", "weights": "swav:swav_800ep_pretrain.pth.tar"},
        method={"lam": 0.25},
        optim={
            "lr": 0.02,
            "head_lr": 5.0,
            "weight_decay": 0.0,
            "epochs": 50,
            "schedule": {"name": "step", "milestones": [12, 16], "gamma": 0.2},
        },
        sweep={"grid": {"method.name": ["baseline", "cgc"]}},
    ),
}
for _ds, _lam in _FINEGRAINED_LAM.items():
    # Table 6: ImageNet-pretrained ResNet50, all layers fine-tuned, 3 trials.
    PRESETS[f"finegrained_{_ds}"] = _paper_base(
        name="finegrained",
        data={"dataset": _ds},
        model={"arch": "resnet50", "weights": _R50_IMAGENET},
        method={"lam": _lam},
        scaling={"cpus_per_worker": 4, "gpus_per_worker": 1},  # one trial per single-GPU node (4 CPUs)
        sweep={"grid": {"method.name": ["baseline", "cgc"], "seed": [0, 1, 2]}},
    )
for _ds, _lam in _FEWSHOT_LAM.items():
    # Tables 7/8: 1/5/10 shots x 20 episodes, same episode for baseline and CGC.
    PRESETS[f"fewshot_{_ds}"] = _paper_base(
        name="fewshot",
        data={"dataset": _ds, "shots": 1},
        model={"arch": "resnet50", "weights": _R50_IMAGENET},
        method={"lam": _lam},
        scaling={"cpus_per_worker": 1, "gpus_per_worker": 0.25},  # four small trials share a GPU
        sweep={
            "grid": {"method.name": ["baseline", "cgc"], "data.shots": [1, 5, 10], "data.episode": list(range(20))}
        },
    )

PRESETS.update(
    {
        "imagenet_demo": _merge(PRESETS["imagenet_r18"], _DEMO),
        "lambda_ablation_demo": _merge(
            _merge(PRESETS["lambda_ablation"], _DEMO),
            {"method": {"lam": 0.5}, "sweep": {"grid": {"method.lam": [0.0, 0.5, 1.0], "seed": [0, 1]}}},
        ),
        "finegrained_demo": _merge(
            _merge(PRESETS["finegrained_cub200"], _DEMO), {"sweep": {"grid": {"seed": [0, 1]}}}
        ),
        "fewshot_demo": _merge(
            _merge(PRESETS["fewshot_cub200"], _DEMO),
            {"data": {"shots": 5}, "sweep": {"grid": {"data.shots": [5], "data.episode": [0, 1, 2]}}},
        ),
        "semisup_demo": _merge(
            _merge(PRESETS["semisup"], _DEMO),
            {"data": {"percent": 10.0, "batch_size": 32}, "optim": {"lr": 0.05, "head_lr": None, "weight_decay": 1e-4}},
        ),
    }
)
