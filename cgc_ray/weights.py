"""Load pretrained or saved weights into a torchvision-layout model, reporting every key that did not fit.

Accepted `weights` strings:
- a torchvision enum name, e.g. "ResNet50_Weights.IMAGENET1K_V1" (torchvision
  downloads it into its own cache when the machine has internet);
- "swav:/path/to/swav_800ep_pretrain.pth.tar": a SwAV checkpoint (keys prefixed
  "module.", plus projection_head.* and prototypes.* which are dropped; the
  trunk keys are torchvision's resnet50 keys);
- a local file: a state_dict, or a dict holding one under "model" (a cgc-ray
  checkpoint) or "state_dict"; "module." (DataParallel/DDP) and "_orig_mod."
  (torch.compile) prefixes are stripped.

The classification head ("fc.*") is left as the model built it when the
checkpoint lacks it or its shape differs (a new head for num_classes); any
other missing or mis-shaped key raises.
"""
from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

HEAD_PREFIX = "fc."
SWAV_DROPPED_PREFIXES = ("projection_head.", "prototypes.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_ENUM_NAME = re.compile(r"^(?P<cls>[A-Za-z0-9_]+_Weights)\.(?P<member>[A-Za-z0-9_]+)$")


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


def _strip_prefixes(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in _WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        out[k] = v
    return out


def _torch_load(path: Path) -> object:
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {path} does not exist; pass a torchvision enum name "
            "(e.g. ResNet50_Weights.IMAGENET1K_V1), 'swav:/path/to/ckpt' or an existing state_dict path"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} holds objects other than tensors and plain containers, so it cannot be loaded with "
            f"weights_only=True; re-save just the state_dict (torch.save(model.state_dict(), path)). ({e})"
        ) from e


def _unwrap(obj: object, path: Path) -> dict:
    """The state_dict inside a raw state_dict, a {"model": ...} (cgc-ray) or {"state_dict": ...} wrapper."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{path} is not a state_dict (name -> tensor), nor a dict holding one under 'model' or 'state_dict'"
        )
    return _strip_prefixes(obj)


def read_state_dict(weights: str, *, arch: str) -> tuple[dict[str, torch.Tensor], str, tuple[str, ...]]:
    """(state_dict with wrapper prefixes stripped, description of the source, dropped keys)."""
    m = _ENUM_NAME.match(weights)
    if m and not Path(weights).exists():
        from torchvision.models import get_weight

        expected = arch.replace("_", "").lower()
        if m["cls"][: -len("_Weights")].replace("_", "").lower() != expected:
            raise ValueError(f"weights {weights!r} are for a different architecture than arch={arch!r}")
        try:
            enum = get_weight(weights)
        except (ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"unknown torchvision weights {weights!r}: {e}") from e
        return dict(enum.get_state_dict(progress=False)), f"torchvision:{weights}", ()
    if weights.startswith("swav:"):
        path = Path(weights[len("swav:") :]).expanduser()
        state = _unwrap(_torch_load(path), path)
        dropped = tuple(sorted(k for k in state if k.startswith(SWAV_DROPPED_PREFIXES)))
        return {k: v for k, v in state.items() if k not in dropped}, f"swav:{path}", dropped
    path = Path(weights).expanduser()
    return _unwrap(_torch_load(path), path), str(path), ()


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
