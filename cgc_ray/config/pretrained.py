"""Weights from another experiment of this product: pretrain once, fine-tune from it anywhere.

``model.weights`` may name a pretraining run instead of a file:

- ``experiment:<preset>`` (e.g. ``experiment:pretrain_demo``) or
  ``experiment:<spec file>`` (``.yaml``/``.json``): the single trial of that
  spec. The driver resolves it before any trial starts (:func:`pin_pretrained`):
  it becomes ``trial:<experiment>/<trial_id>`` and the pretraining is run first
  if its row is not there yet (its trial id, hence its checkpoint, is reused:
  it never trains twice, and ``runner.leases`` keeps two drivers from
  running it at once). It runs in the downstream spec's storage (a
  pretraining spec that names another storage is refused with a clear error).
- ``trial:<experiment>/<trial_id>``: the checkpoint of that trial in the
  trial's own storage (``<storage>/_checkpoints/<experiment>/<trial_id>``),
  read by each trial on its node; with an ``s3://`` storage a cluster
  fine-tunes from the checkpoint its pretraining wrote there. The reference,
  not the storage path, is part of the downstream trial's identity, so moving
  the results keeps the trial ids.
- A URI (``s3://.../checkpoint.pt``) or a local path names a file directly.
"""

from __future__ import annotations

import re
from typing import Any

from cgc_ray.config.base import SpecError, get_path, set_path
from cgc_ray.config.spec import ExperimentSpec, load_spec, validate_spec

EXPERIMENT = "experiment:"
TRIAL = "trial:"
_TRIAL_RE = re.compile(r"^trial:(?P<experiment>[A-Za-z0-9][A-Za-z0-9_.-]*)/(?P<trial_id>[0-9a-f]{12})\Z")
_DEFAULT_STORAGE = ExperimentSpec.model_fields["storage"].default


def parse_trial_ref(weights: str) -> tuple[str, str]:
    """(experiment, trial id) of a ``trial:<experiment>/<trial_id>`` reference."""
    m = _TRIAL_RE.match(weights)
    if m is None:
        raise SpecError(f"model.weights={weights!r}: a trial reference is trial:<experiment>/<12-hex trial id>")
    return m["experiment"], m["trial_id"]


def pretraining_spec(ref: str, storage: str) -> ExperimentSpec:
    """The spec an ``experiment:`` reference names, in ``storage`` unless it sets its own; exactly one trial."""
    from cgc_ray.config.identity import apply_overrides, expand_trials
    from cgc_ray.config.paths import resolve_paths
    from cgc_ray.config.presets import PRESETS

    name = ref[len(EXPERIMENT):]
    if name in PRESETS:
        spec = load_spec(PRESETS[name])
    elif name.endswith((".yaml", ".yml", ".json")):
        spec = load_spec(name)  # resolved to an absolute path at the edge (config.paths)
    else:
        raise SpecError(f"model.weights={ref!r}: {name!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor "
                        "a .yaml/.json spec file")
    if spec.storage == _DEFAULT_STORAGE:
        spec = apply_overrides(spec, [f"storage={storage}"])
    spec = resolve_paths(spec)
    trials = expand_trials(spec)
    if len(trials) != 1:
        raise SpecError(f"model.weights={ref!r}: the pretraining must be one trial, its sweep gives {len(trials)}; "
                        "pick one with --set on its spec")
    if trials[0].failure.keep_checkpoint == "none":
        raise SpecError(f"model.weights={ref!r}: its spec sets failure.keep_checkpoint=none, which leaves no "
                        "checkpoint to fine-tune from; set it to model (the default) or full")
    return trials[0]


def pin_pretrained(spec: ExperimentSpec) -> tuple[ExperimentSpec, list[ExperimentSpec]]:
    """(``spec`` with every ``experiment:`` weights replaced by ``trial:`` references, the pretrainings they name).

    Covers ``model.weights`` and the values of a sweep over it.
    """
    from cgc_ray.config.identity import trial_id

    tree = validate_spec(spec).model_dump(mode="json")
    pretrainings: dict[str, ExperimentSpec] = {}

    def pin(value: Any) -> Any:
        if not isinstance(value, str) or not value.startswith(EXPERIMENT):
            return value
        pre = pretraining_spec(value, tree["storage"])
        if pre.storage != tree["storage"]:
            raise SpecError(f"model.weights={value!r}: its spec stores in {pre.storage!r}, not in this spec's "
                            f"storage {tree['storage']!r}; a trial reference finds checkpoints in its own storage")
        tid = trial_id(pre)
        pretrainings[tid] = pre
        return f"{TRIAL}{pre.name}/{tid}"

    set_path(tree, "model.weights", pin(get_path(tree, "model.weights")))
    grid = tree["sweep"]["grid"]
    if "model.weights" in grid:
        grid["model.weights"] = [pin(v) for v in grid["model.weights"]]
    for variant in tree["sweep"]["variants"]:
        if "model.weights" in variant:
            variant["model.weights"] = pin(variant["model.weights"])
    return validate_spec(tree), list(pretrainings.values())
