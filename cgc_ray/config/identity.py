"""What a trial is: overrides, the sweep's trials, the content hash that names each trial, and its group.

A trial's identity (:func:`identity`) holds exactly the fields that change what
it computes:

- where it runs and how fast (:data:`NON_IDENTITY_FIELDS`) are left out, so the
  same trial on a laptop and on a cluster has the same id and its row is reused;
- a CGC trial at λ = 0 trains cross-entropy only: it *is* a baseline
  (:func:`effective_method`);
- a baseline ignores the CGC term's settings (:data:`CGC_ONLY_FIELDS`), so a λ
  sweep crossed with the baseline trains one baseline per seed or episode;
- a field at the value it declares as its *legacy* value is left out, so adding
  a field keeps every existing id (see below).

The same identity groups results (``cgc_ray.results.stats``): a group is every
identity field but the replicate axes (:data:`REPLICATE_FIELDS`), which pair a
CGC configuration with its baseline (:func:`group_key`).

Adding a field to a spec after trials exist: declare the value that does what
the code did before the field existed,
``Field(<default>, json_schema_extra={"legacy": <value>})``. At that value
:func:`identity` leaves the field out (in nested sections too), so every id
computed before it existed stays the id of the same computation: its row is
reused and the report counts it once. A config stored before the field existed
(a row's ``config_json``, a checkpoint) lacks it and means the legacy value,
whatever the default is now: read it through :func:`with_legacy_values`. Never
declare ``legacy`` on a field that already exists: trials at that value would
change id.
"""

from __future__ import annotations

import copy
import functools
import itertools
from typing import Annotated, Any, Mapping

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from cgc_ray.config.base import SpecError, digest, flatten, get_path, set_path
from cgc_ray.config.method import MethodSpec
from cgc_ray.config.spec import ExperimentSpec, validate_spec
from cgc_ray.config.sweep import REPLICATE_FIELDS

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
        "failure.checkpoint_every_steps",
        "failure.max_preemptions",
        "failure.keep_checkpoint",
        "eval_every",
    }
)


@functools.cache
def cgc_only_fields(method: type[MethodSpec]) -> frozenset[str]:
    """Settings only the CGC term reads (every method field but ``BASELINE_FIELDS``): a baseline computes the
    same whatever they are."""
    return frozenset(f"method.{name}" for name in method.model_fields if name not in method.BASELINE_FIELDS)


CGC_ONLY_FIELDS: frozenset[str] = cgc_only_fields(MethodSpec)


def unread_fields(method: str) -> frozenset[str]:
    """Method settings that ``method`` never reads: a baseline none of the CGC term's, ``cgc`` none of the
    ablation without negatives'. Results leave them out of a configuration's labels (its id keeps them)."""
    if method == "baseline":
        return CGC_ONLY_FIELDS
    if method == "cgc":
        return frozenset(f"method.{name}" for name in MethodSpec.NO_NEG_FIELDS)
    return frozenset()


def effective_method(config: ExperimentSpec | Mapping[str, Any]) -> str:
    """``method.name``, except that a CGC variant at λ = 0 is a baseline (it trains L_CE only)."""
    tree = config.model_dump(mode="json") if isinstance(config, ExperimentSpec) else config
    name, lam = tree["method"]["name"], tree["method"]["lam"]
    return "baseline" if name in ("cgc", "cgc_no_neg") and lam == 0 else name


def identity(spec: ExperimentSpec | Mapping[str, Any]) -> dict[str, Any]:
    """The flattened fields that define what a trial computes (see the module docstring)."""
    spec = validate_spec(spec)
    tree = spec.model_dump(mode="json")
    flat = {k: v for k, v in flatten(tree).items() if k not in NON_IDENTITY_FIELDS and not k.startswith("sweep.")}
    for path, legacy in legacy_values(type(spec)):
        value = flat[path] if path in flat else get_path(tree, path)  # a section, or a non-identity field
        if type(value) is type(legacy) and value == legacy:  # JSON values of one field: 1 is not True
            if path in flat:
                del flat[path]
            else:  # a whole section at its legacy value
                for k in [k for k in flat if k.startswith(path + ".")]:
                    del flat[k]
    flat["method.name"] = effective_method(tree)
    if flat["method.name"] == "baseline":
        cgc_only = cgc_only_fields(type(spec.method))
        flat = {k: v for k, v in flat.items() if k not in cgc_only}
    return flat


def stored_identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """The :func:`identity` of a config a row or a checkpoint stored, read as :func:`with_legacy_values` says.

    A config this version cannot validate (another version's, an evaluation's) falls back to its raw fields,
    less those of :data:`NON_IDENTITY_FIELDS` and the sweep.
    """
    try:
        return identity(with_legacy_values(config))
    except ValueError:
        return {k: v for k, v in flatten(config).items() if k not in NON_IDENTITY_FIELDS and not k.startswith("sweep.")}


def group_key(ident: Mapping[str, Any]) -> str:
    """The group of an :func:`identity`: 12 hex of the digest of every field but :data:`REPLICATE_FIELDS`."""
    return digest({k: v for k, v in ident.items() if k not in REPLICATE_FIELDS})


@functools.cache
def legacy_values(model: type[BaseModel]) -> tuple[tuple[str, Any], ...]:
    """(dotted path, legacy value as JSON) of each field of ``model`` and of its sections that declares a legacy
    value. A section typed as a union of models is not looked into.

    Raises SpecError when a declared value is not one the field can hold (a typo would silently change ids).
    """
    out: list[tuple[str, Any]] = []
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and "legacy" in extra:
            adapter = TypeAdapter(Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation)
            try:
                out.append((name, adapter.dump_python(adapter.validate_python(extra["legacy"]), mode="json")))
            except ValidationError as e:
                raise SpecError(f"{model.__name__}.{name} declares legacy={extra['legacy']!r}, which the field "
                                f"cannot hold ({e.errors(include_url=False)[0]['msg']}); declare the value that "
                                "reproduces the code before the field existed") from None
        elif isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            out += [(f"{name}.{path}", value) for path, value in legacy_values(info.annotation)]
    return tuple(out)


def with_legacy_values(tree: Mapping[str, Any], model: type[BaseModel] = ExperimentSpec) -> dict[str, Any]:
    """A config stored by an older version, as this version must read it: each field of ``model`` it lacks
    (nested sections too) that declares a legacy value gets that value, which is what the code that wrote it
    did, whatever the default is now. ``tree`` itself is not changed."""
    declared = legacy_values(model)
    out = _copied_along(dict(tree), [path for path, _ in declared])
    for path, value in declared:
        *sections, name = path.split(".")
        node = out
        for key in sections:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):  # not a section here: validation will say so
                break
        else:
            node.setdefault(name, copy.deepcopy(value))
    return out


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
            settings = [*variant.items(), *zip(grid, combo)]
            tree = _copied_along(base, [path for path, _ in settings])
            for path, value in settings:
                set_path(tree, path, value)
            trial = validate_spec(tree)
            tid = trial_id(trial)
            if tid not in seen:
                seen.add(tid)
                trials.append(trial)
    return trials


def _copied_along(tree: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    """``tree`` with the sections on each dotted path copied, so that setting those paths leaves ``tree`` as it
    is (a copy of the whole tree per trial was most of the cost of a 10,000-trial sweep)."""
    out = dict(tree)
    for path in paths:
        node = out
        for key in path.split(".")[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                break
            node[key] = dict(child)
            node = node[key]
    return out


def trial_id(spec: ExperimentSpec | Mapping[str, Any]) -> str:
    """Deterministic id of what a trial computes: 12 hex of the sha256 of its :func:`identity`."""
    return digest(identity(spec))


def spec_hash(spec: ExperimentSpec | Mapping[str, Any]) -> str:
    """12 hex of sha256 of the full resolved config (every field, unlike trial_id)."""
    return digest(validate_spec(spec).model_dump(mode="json"))


