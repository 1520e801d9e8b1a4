"""Experiment specs: what one trial or a sweep of trials runs (pydantic; no torch, no Ray).

A spec is validated once at the edge (``extra="forbid"`` everywhere), its local
paths are made absolute there (``paths``), it crosses into Ray as a plain dict
and is re-validated on the worker. Defaults live in ``spec`` and nowhere else.

    spec = load_spec(PRESETS["lambda_ablation_demo"])
    spec = resolve_paths(apply_overrides(spec, ["optim.epochs=2", "sweep.grid.seed=[0, 1]"]))
    check_data_root(spec)
    for trial in expand_trials(spec):
        print(trial_id(trial), trial.method.lam)
"""

from cgc_ray.config.base import SpecError
from cgc_ray.config.checks import (
    check_data_root,
    data_root_missing_here,
    data_root_uris,
    splits_read,
    validate_against_data,
)
from cgc_ray.config.identity import (
    CGC_ONLY_FIELDS,
    NON_IDENTITY_FIELDS,
    REPLICATE_FIELDS,
    apply_overrides,
    effective_method,
    expand_trials,
    identity,
    spec_hash,
    trial_id,
)
from cgc_ray.config.paths import (
    is_uri,
    path_fields,
    resolve_path_value,
    resolve_paths,
    unresolved_paths,
)
from cgc_ray.config.presets import PRESETS
from cgc_ray.config.method import HELDOUT_METRIC, contrast_group, effective_lam
from cgc_ray.config.spec import (
    DataSpec,
    EvaluationSpec,
    ExperimentSpec,
    FailureSpec,
    MethodSpec,
    ModelSpec,
    OptimSpec,
    ScalingSpec,
    SweepSpec,
    load_spec,
    loader_workers,
    validate_spec,
)

__all__ = [
    "CGC_ONLY_FIELDS",
    "HELDOUT_METRIC",
    "NON_IDENTITY_FIELDS",
    "REPLICATE_FIELDS",
    "PRESETS",
    "DataSpec",
    "EvaluationSpec",
    "ExperimentSpec",
    "FailureSpec",
    "MethodSpec",
    "ModelSpec",
    "OptimSpec",
    "ScalingSpec",
    "SpecError",
    "SweepSpec",
    "apply_overrides",
    "check_data_root",
    "data_root_missing_here",
    "data_root_uris",
    "contrast_group",
    "effective_lam",
    "effective_method",
    "expand_trials",
    "identity",
    "is_uri",
    "load_spec",
    "loader_workers",
    "path_fields",
    "resolve_path_value",
    "resolve_paths",
    "spec_hash",
    "splits_read",
    "trial_id",
    "unresolved_paths",
    "validate_against_data",
    "validate_spec",
]
