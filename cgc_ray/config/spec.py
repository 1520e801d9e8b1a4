"""Experiment specifications: what one trial or one sweep of trials runs.

An :class:`ExperimentSpec` is validated once at the edge (pydantic,
``extra="forbid"`` everywhere), crosses into Ray as a plain dict
(``spec.model_dump(mode="json")``) and is re-validated on the worker with
:func:`validate_spec`. Defaults live here and nowhere else.

This module imports neither torch nor Ray, so specs can be checked before
either starts.

Its sections, one module each: ``data``, ``model``, ``method`` (the objective's
settings), ``training`` (``optim``, ``scaling``, ``failure``) and ``sweep``;
``EvaluationSpec`` and the experiment itself live here.

The rest of ``cgc_ray.config``: ``identity`` (overrides, sweeps, trial ids),
``paths`` (local paths made absolute at the edge), ``checks`` (the spec against
the data on disk), ``presets`` (the paper's and the demos' settings).

Symbols follow the paper (Pillai et al., CVPR 2022): ``lam`` is the weight
lambda of the CGC term in ``L = L_CE + lam * L_CGC``, ``tau`` the temperature of
the contrastive softmax.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from cgc_ray.config.base import SpecError, StoragePath, check_name, set_path
from cgc_ray.config.data import DataSpec
from cgc_ray.config.method import MethodSpec
from cgc_ray.config.model import ModelSpec
from cgc_ray.config.section import Section
from cgc_ray.config.sweep import SweepSpec
from cgc_ray.config.training import FailureSpec, OptimSpec, ScalingSpec

# the sections are imported from here too (``from cgc_ray.config.spec import MethodSpec``)
__all__ = ["DataSpec", "EvaluationSpec", "ExperimentSpec", "FailureSpec", "MethodSpec", "ModelSpec", "OptimSpec",
           "ScalingSpec", "SweepSpec", "load_spec", "loader_workers", "validate_spec"]

MetricName = Literal["top1", "top5", "ch", "iauc", "cgc_loss"]


class EvaluationSpec(Section):
    """How the metrics are computed (docs/PAPER.md §3).

    ``iauc_images``: how many evaluation images IAUC scores (None: all, as the
    paper's Table 2); fewer are a seeded sample spread over every class.
    ``iauc_protocol``: ``authors`` reproduces the authors' script (Grad-CAM of
    the ground-truth class, their Gaussian kernel with zero padding, pixels in
    ``np.flip(argsort)`` order); ``fast`` is batched (Grad-CAM of the predicted
    class, torchvision's blur, a stable order). ``iauc_input``: the images IAUC
    scores, ``center_crop`` (short side to 256/224 of ``data.image_size``, centre
    crop) or ``squash`` (the whole image resized to ``data.image_size`` square,
    the authors' RISE script). ``cgc_batch``: images per
    held-out CGC-loss group (the paper's 32), drawn from a seeded permutation
    of the evaluation images, so the value does not depend on file order.

    ``ch_protocol``: how CH is measured. ``fast``: batched centre crops at
    ``data.image_size``, boxes clipped to the crop. ``authors``: the paper's
    (TorchRay's script with ``--input_resize 448``): batch 1, the whole image
    resized to ``ch_short_side`` on its short side, the map resized to the
    original image and summed over the union of the ground-truth class's boxes.
    ``saliency``: the map CH scores, ``gradcam`` of ``model.layer`` (the paper's
    CH), or excitation backprop at layer3, ``cmwp`` (contrastive, Table 4) or
    ``mwp`` (``method.metrics.content_heatmap_saliency``: an all-zero (c)MWP map
    is left out, as in the authors' Table 4 script). ``saliency_window``: for
    (c)MWP, TorchRay's k x k stride-1 pooled head (the authors' Table 4: 7);
    None, the model's own head.

    The fields added after trials existed declare as ``legacy`` the value
    that reproduces those trials (``config.identity``): at it they stay out of
    the trial id.
    """

    iauc_images: int | None = Field(None, ge=1)
    iauc_protocol: Literal["authors", "fast"] = "authors"
    iauc_input: Literal["center_crop", "squash"] = Field("center_crop", json_schema_extra={"legacy": "center_crop"})
    cgc_batch: int = Field(32, ge=2)
    ch_protocol: Literal["fast", "authors"] = Field("fast", json_schema_extra={"legacy": "fast"})
    ch_short_side: int = Field(448, ge=32, json_schema_extra={"legacy": 448})
    # the names of method.metrics.SALIENCIES (config imports no torch; tests/test_table3_table4.py holds them equal)
    saliency: Literal["gradcam", "cmwp", "mwp"] = Field("gradcam", json_schema_extra={"legacy": "gradcam"})
    saliency_window: int | None = Field(None, ge=1, json_schema_extra={"legacy": None})

    @model_validator(mode="after")
    def _settings_apply(self) -> "EvaluationSpec":
        if self.ch_protocol == "fast" and self.ch_short_side != type(self).model_fields["ch_short_side"].default:
            raise ValueError(f"evaluation.ch_short_side={self.ch_short_side} is the authors' protocol's resize; "
                             "set evaluation.ch_protocol=authors, or leave ch_short_side at its default")
        if self.saliency == "gradcam" and self.saliency_window is not None:
            raise ValueError(f"evaluation.saliency_window={self.saliency_window} applies to excitation backprop; "
                             "set evaluation.saliency=cmwp (or mwp), or saliency_window=null")
        return self


class ExperimentSpec(Section):
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
        return check_name("name", v)  # it becomes a folder name

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
        search = self.sweep.search
        if not self.sweep.grid and not self.sweep.variants and search is None:
            return self
        base = self.model_dump(mode="json")
        base["sweep"] = {"grid": {}, "variants": []}
        axes = {f"sweep.grid[{p!r}]": (p, v) for p, v in self.sweep.grid.items()}
        if search is not None:  # a searched field's bounds (or choices) are values of that field
            axes.update({f"sweep.search.space[{p!r}]": (p, v) for p, v in search.values_to_check().items()})
        for where, (path, values) in axes.items():
            for i, value in enumerate(values):
                try:
                    ExperimentSpec.model_validate(set_path(copy.deepcopy(base), path, value))
                except (ValidationError, SpecError) as e:
                    raise ValueError(f"{where}[{i}] = {value!r}: {_describe(e)}") from None
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
