"""What a trial is: overrides, the sweep's trials, the content hash that names each trial, and its group.

A trial's identity (:func:`identity`) holds exactly the fields that change what
it computes:

- where it runs and how fast (:data:`NON_IDENTITY_FIELDS`) are left out, so the
  same trial on a laptop and on a cluster has the same id and its row is reused;
- a CGC trial at λ = 0 trains cross-entropy only: it *is* a baseline
  (:func:`effective_method`);
- a baseline ignores the CGC term's settings (:data:`CGC_ONLY_FIELDS`), so a λ
  sweep crossed with the baseline trains one baseline per seed or episode.

The same identity groups results (``cgc_ray.results.stats``): a group is every
identity field but the replicate axes (:data:`REPLICATE_FIELDS`), which pair a
CGC configuration with its baseline.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Mapping

import yaml

from cgc_ray.config.base import SpecError, digest, flatten, set_path
from cgc_ray.config.method import MethodSpec
from cgc_ray.config.spec import ExperimentSpec, validate_spec

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

# Settings only the CGC term reads (every method field but MethodSpec.BASELINE_FIELDS): a baseline computes
# the same whatever they are.
CGC_ONLY_FIELDS: frozenset[str] = frozenset(
    f"method.{name}" for name in MethodSpec.model_fields if name not in MethodSpec.BASELINE_FIELDS
)
# Repeats of one configuration (model init / augmentation seed, few-shot episode): they pair across methods.
REPLICATE_FIELDS: frozenset[str] = frozenset({"seed", "data.episode"})


def effective_method(config: ExperimentSpec | Mapping[str, Any]) -> str:
    """``method.name``, except that a CGC variant at λ = 0 is a baseline (it trains L_CE only)."""
    tree = config.model_dump(mode="json") if isinstance(config, ExperimentSpec) else config
    name, lam = tree["method"]["name"], tree["method"]["lam"]
    return "baseline" if name in ("cgc", "cgc_no_neg") and lam == 0 else name


def identity(spec: ExperimentSpec | Mapping[str, Any]) -> dict[str, Any]:
    """The flattened fields that define what a trial computes (see the module docstring)."""
    tree = validate_spec(spec).model_dump(mode="json")
    flat = {k: v for k, v in flatten(tree).items() if k not in NON_IDENTITY_FIELDS and not k.startswith("sweep.")}
    flat["method.name"] = effective_method(tree)
    if flat["method.name"] == "baseline":
        flat = {k: v for k, v in flat.items() if k not in CGC_ONLY_FIELDS}
    return flat



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
        set_path(tree, path, value)
    return validate_spec(tree)


def expand_trials(spec: ExperimentSpec) -> list[ExperimentSpec]:
    """The trials of ``spec.sweep``: each variant crossed with the grid, as specs with an empty sweep.

    Order is deterministic (variants in order, then axes in insertion order,
    values in given order); trials with the same :func:`trial_id` appear once
    (e.g. the baseline of several λ variants).
    """
    grid = spec.sweep.grid
    base = spec.model_dump(mode="json")
    base["sweep"] = {"grid": {}, "variants": []}
    trials, seen = [], set()
    for variant in spec.sweep.variants or [{}]:
        for combo in itertools.product(*grid.values()):
            tree = copy.deepcopy(base)
            for path, value in [*variant.items(), *zip(grid, combo)]:
                set_path(tree, path, value)
            trial = validate_spec(tree)
            tid = trial_id(trial)
            if tid not in seen:
                seen.add(tid)
                trials.append(trial)
    return trials


def trial_id(spec: ExperimentSpec | Mapping[str, Any]) -> str:
    """Deterministic id of what a trial computes: 12 hex of the sha256 of its :func:`identity`."""
    return digest(identity(spec))


def spec_hash(spec: ExperimentSpec | Mapping[str, Any]) -> str:
    """12 hex of sha256 of the full resolved config (every field, unlike trial_id)."""
    return digest(validate_spec(spec).model_dump(mode="json"))


