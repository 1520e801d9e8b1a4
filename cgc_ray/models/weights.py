"""Initialise a model from pretrained weights, reporting every key that did not fit.

The sources (torchvision enum names, ``swav:PATH``, state_dict files, cgc-ray
checkpoints) are read by :func:`cgc_ray.models.checkpoint.read_state_dict`.
The classification head ("fc.*") is left as the model built it when the
checkpoint lacks it or its shape differs (a new head for num_classes); any
other missing or mis-shaped key raises.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from cgc_ray.models.checkpoint import read_state_dict

log = logging.getLogger(__name__)

HEAD_PREFIX = "fc."


@dataclass(frozen=True)
class WeightsReport:
    """What load_weights did. missing: model keys left at their initial value (head only);
    unexpected: checkpoint keys the model has no place for (ignored); skipped: head keys
    whose shape differs from the model's; dropped: SwAV projection-head/prototype keys."""

    source: str
    loaded: int
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()


def load_weights(model: nn.Module, weights: str, *, arch: str) -> WeightsReport:
    """Load `weights` (see module docstring) into `model` in place and report what did not fit.

    Raises ValueError naming the keys when a non-head parameter or buffer of
    the model is absent from the checkpoint or has another shape.
    """
    state, source, dropped = read_state_dict(weights, arch=arch)
    own = model.state_dict()
    skipped = tuple(
        sorted(k for k in state if k in own and k.startswith(HEAD_PREFIX) and state[k].shape != own[k].shape)
    )
    bad_shape = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and not k.startswith(HEAD_PREFIX) and state[k].shape != own[k].shape
    ]
    # a BatchNorm counter missing from old checkpoints is not a learned weight
    missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
    missing_trunk = [k for k in missing if not k.startswith(HEAD_PREFIX)]
    if missing_trunk or bad_shape:
        raise ValueError(
            f"weights {source} do not fit arch={arch!r}: {len(missing_trunk)} backbone keys missing "
            f"(e.g. {missing_trunk[:5]}), {len(bad_shape)} with another shape (e.g. {bad_shape[:3]}); "
            "check that the checkpoint was trained with this architecture"
        )
    unexpected = tuple(sorted(k for k in state if k not in own))
    to_load = {k: v for k, v in state.items() if k in own and k not in skipped}
    model.load_state_dict(to_load, strict=False)
    missing_head = tuple(sorted(set(k for k in missing if k.startswith(HEAD_PREFIX)) | set(skipped)))
    report = WeightsReport(source, len(to_load), missing_head, unexpected, skipped, dropped)
    if unexpected:
        log.warning("%s: %d unexpected keys ignored, e.g. %s", source, len(unexpected), list(unexpected[:5]))
    if missing_head:
        log.info("%s: classification head %s kept at its new initialisation", source, list(missing_head))
    return report
