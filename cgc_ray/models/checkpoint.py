"""cgc-ray checkpoints, and the one reader of every weights file the product accepts.

Writing: :func:`save_checkpoint` stores model, optimiser, scheduler, scaler,
epoch (the last finished one), every RNG state, the metrics and an ``extra``
dict (arch, number of classes, method, dataset), atomically: a temporary file in
the same folder, synced, renamed over the old one, so a killed or failed save
leaves the previous checkpoint whole. :func:`keep_model_only` drops the training
state of a finished run (``failure.keep_checkpoint``). The model is saved
unwrapped, so it loads into a plain torchvision model:
``model.load_state_dict(torch.load(p, weights_only=True)["model"])``.

Reading, for every consumer:

- :func:`resume_checkpoint` restores a training run; a file that does not parse
  (a copy cut short) is set aside and the run starts from scratch;
- :func:`read_state_dict` returns the weights of any accepted source: a
  cgc-ray checkpoint, a plain state_dict (``module.`` / ``_orig_mod.``
  prefixes stripped), ``swav:PATH`` (SwAV's projection head and prototypes
  dropped) or a torchvision enum name (``ResNet50_Weights.IMAGENET1K_V1``,
  downloaded into torch.hub's cache when the machine is online, and read
  only if its SHA-256 matches the hash published in its file name);
- :func:`read_header` the format, epoch and ``extra`` of a cgc-ray checkpoint
  (a trial writes :func:`trial_record` there; :func:`method_record` reads
  its method back, from checkpoints of every version);
- :func:`load_classifier` builds the classifier a file describes, head
  included, for evaluation and figures (the architecture is the one recorded,
  else read off the state_dict's keys and shapes).
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import io
import os
import pickle
import random
import re
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cgc_ray.method.cam import unwrap
from cgc_ray.models.resnet import ARCHS, build_model

CHECKPOINT_FORMAT = "cgc-ray-checkpoint/1"
SWAV_DROPPED_PREFIXES = ("projection_head.", "prototypes.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_ENUM_NAME = re.compile(r"^(?P<cls>[A-Za-z0-9_]+_Weights)\.(?P<member>[A-Za-z0-9_]+)\Z")


# ---------------------------------------------------------------- training state


def _rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "generators": {k: g.get_state() for k, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    for k, g in generators.items():
        if k in state["generators"]:
            g.set_state(state["generators"][k])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def _temp_name(path: Path) -> Path:
    """``.<name>.<pid>.<unique>.tmp`` beside ``path``: the pid says whether its writer still lives."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def remove_dead_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of writes of ``path`` whose writer died (killed mid-save); returns them."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[0-9a-f]+\.tmp")
    dead = [p for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp")
            if (m := pattern.fullmatch(p.name)) and not pid_alive(int(m[1]))]
    for p in dead:
        p.unlink(missing_ok=True)
    return dead


def _save_atomic(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file in ``path``'s folder, flushed to disk, then renamed over ``path``.

    The file under ``path`` is the old one or the new one, whole, even if the process is killed or the
    disk fills; a failed save removes its temporary file (a killed one: :func:`remove_dead_temps`).
    The folder is synced too, so the rename itself survives a power loss.
    """
    remove_dead_temps(path)
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    epoch: int,
    *,
    generators: dict[str, torch.Generator] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    metrics: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
    progress: dict[str, Any] | None = None,
) -> None:
    """Atomically write model, optimiser, scheduler, epoch (last finished) and all RNG states.

    ``model`` is saved unwrapped (no "module." prefix), so it loads into a
    plain torchvision model. Loadable with ``torch.load(weights_only=True)``.
    ``progress``: in a checkpoint written mid-epoch, what of epoch ``epoch + 1``
    is trained (``engine.fit``: steps, images, running sums, the generators'
    states at that epoch's start); None (and absent in older files) at an epoch's end.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "rng": _rng_state(generators or {}),
        "metrics": metrics or {},
        "extra": extra or {},
        "progress": progress,
    }
    _save_atomic(state, path)


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that was read and does not parse: cut short (a killed copy) or garbled."""


def _read(path: Path, map_location: str | torch.device = "cpu", *, mmap: bool = False) -> dict[str, Any]:
    """The dict a checkpoint file holds. A read error (``OSError``: I/O, permissions, a vanished file) is
    raised as it is, since it says nothing about the file; bytes that do not parse raise UnreadableCheckpoint."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {path}") from None
    except (OSError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError (zip), EOFError, UnpicklingError, ...
        raise UnreadableCheckpoint(f"checkpoint {path} cannot be read ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else 'no data'})") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a cgc-ray checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    return state


def check_readable(path: str | os.PathLike) -> None:
    """Raise UnreadableCheckpoint if ``path`` does not parse as a checkpoint (its tensors are mapped, not read)."""
    _read(Path(path), mmap=True)


def set_aside(path: str | os.PathLike) -> Path | None:
    """Rename an unreadable checkpoint to ``<name>.corrupt-<UTC time>`` beside it; None if it is gone already
    (another rank of the same trial moved it)."""
    path = Path(path)
    aside = path.with_name(f"{path.name}.{corrupt_suffix()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return None
    return aside


def corrupt_suffix() -> str:
    """``corrupt-<UTC time>``: what an unreadable checkpoint's name gets when it is set aside."""
    return f"corrupt-{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%S.%fZ}"


def _restore(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer | None, scheduler: Any,
             generators: dict[str, torch.Generator] | None, scaler: torch.amp.GradScaler | None) -> None:
    unwrap(model).load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    if state["rng"] is not None:  # a model-only checkpoint (keep_model_only) has none
        _set_rng_state(state["rng"], generators or {})


def resumable(state: dict[str, Any]) -> bool:
    """Whether a checkpoint dict holds the training state (optimiser, RNG) that resuming needs."""
    return state.get("optimizer") is not None


def resume_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    *,
    epochs: int,
    generators: dict[str, torch.Generator] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any] | None:
    """Restore a run of ``epochs`` epochs from ``path``: the checkpoint dict, or None to train from scratch.

    None when there is no file; when it does not parse (it is set aside as ``<name>.corrupt-<time>``,
    with a warning: a truncated file must not fail every retry); or when it is a model-only checkpoint
    (:func:`keep_model_only`) of an unfinished run (with a warning). A model-only checkpoint of the
    last epoch restores the model alone: the run is over. Nothing is restored unless the dict is returned.
    """
    path = Path(path)
    try:
        state = _read(path, map_location)
    except FileNotFoundError:  # none yet, or another rank of this trial set it aside a moment ago
        return None
    except UnreadableCheckpoint as e:
        aside = set_aside(path)
        warnings.warn(f"{e}; {'moved to ' + str(aside) if aside else 'already moved aside'}, and the trial "
                      "trains from scratch", RuntimeWarning, stacklevel=2)
        return None
    if resumable(state):
        _restore(state, model, optimizer, scheduler, generators, scaler)
        return state
    if state["epoch"] + 1 < epochs:
        warnings.warn(f"checkpoint {path} holds the model of epoch {state['epoch'] + 1} of {epochs} without its "
                      "optimiser state, so it cannot resume; the trial trains from scratch", RuntimeWarning,
                      stacklevel=2)
        return None
    unwrap(model).load_state_dict(state["model"])
    return state


def keep_model_only(path: str | os.PathLike) -> None:
    """Rewrite the checkpoint ``path`` without its training state (optimiser, schedule, scaler, RNG), atomically.

    What stays is what every reader but resume needs (:func:`read_state_dict`, :func:`read_header`,
    :func:`load_classifier`): the model, epoch, metrics and ``extra``. Half the size with SGD momentum.
    """
    path = Path(path)
    state = _read(path)
    _save_atomic({**state, "optimizer": None, "scheduler": None, "scaler": None, "rng": None, "progress": None},
                 path)


def trial_record(*, method: dict[str, Any], layer: str, arch: str, num_classes: int, dataset: str,
                 image_size: int) -> dict[str, Any]:
    """What a trial's checkpoint records in its ``extra``: ``method`` is the spec's method section
    (``MethodSpec.model_dump(mode="json")``), ``layer`` its Grad-CAM layer (``model.layer``)."""
    return {"method": method, "layer": layer, "arch": arch, "num_classes": num_classes, "dataset": dataset,
            "image_size": image_size}


# Checkpoints written before the record was the spec's method section recorded the engine's own settings
# (with "layer" and "global_negatives" among them, λ as applied after any normalisation). The fields they
# lack are settings that did not exist yet, and had then this one behaviour.
_BEFORE_SECTION_RECORDS = {"forward": "joint", "view": "train", "no_neg_scale": "sum", "cam_class": "pred",
                           "lam_normalization": "none"}


def method_record(extra: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(the method section a checkpoint's ``extra`` records, in the spec's fields, or None; its Grad-CAM layer
    or None). Records of every version: older ones are translated to what they computed."""
    method = extra.get("method")
    if not isinstance(method, dict):
        return None, extra.get("layer")
    if "layer" not in method:
        return dict(method), extra.get("layer")
    old = {**_BEFORE_SECTION_RECORDS, **method}
    layer = old.pop("layer")
    if "global_negatives" in old:
        old["negatives"] = "global" if old.pop("global_negatives") else "local"
    return old, layer


# ---------------------------------------------------------------- any weights file


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


def _hub_state_dict(url: str) -> dict:
    """The state_dict a torchvision weights ``url`` names, from torch.hub's cache (downloaded when absent).

    Refused unless the file's SHA-256 starts with the hash prefix published in its name
    (``resnet50-11ad3fa6.pth``), checked on the very bytes that are loaded, and loaded with
    ``weights_only=True`` (no code runs). ``torch.hub.load_state_dict_from_url(check_hash=True)``
    checks the hash only when it downloads, so a file altered in the cache would pass it.
    """
    name = Path(url.split("?", 1)[0]).name
    m = torch.hub.HASH_REGEX.search(name)
    if not m or not m.group(1):
        raise ValueError(f"{url}: the file name carries no published hash (name-<sha256 prefix>.pth); "
                         "download it yourself, check it, and pass its path as model.weights")
    prefix = m.group(1)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(cached), prefix, progress=False)  # checks the hash, then renames
    data = cached.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if not digest.startswith(prefix):
        raise ValueError(f"{cached} does not match the hash published for {url} (SHA-256 {digest[:len(prefix)]}..., "
                         f"expected {prefix}...): it was altered or cut short; delete it and it is downloaded again")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{cached} holds objects other than tensors, refused by weights_only=True ({e})") from e


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
        return dict(_hub_state_dict(enum.url)), f"torchvision:{weights}", ()
    if weights.startswith("swav:"):
        path = Path(weights[len("swav:") :]).expanduser()
        state = _unwrap(_torch_load(path), path)
        dropped = tuple(sorted(k for k in state if k.startswith(SWAV_DROPPED_PREFIXES)))
        return {k: v for k, v in state.items() if k not in dropped}, f"swav:{path}", dropped
    path = Path(weights).expanduser()
    return _unwrap(_torch_load(path), path), str(path), ()


def read_header(weights: str | os.PathLike) -> dict[str, Any]:
    """``{"epoch", "step", "extra"}`` of a cgc-ray checkpoint, or {} for any other weights source; ``step``: the
    optimiser steps of epoch ``epoch + 1`` trained, in a checkpoint written mid-epoch, else 0."""
    path = Path(weights).expanduser()
    if not path.is_file():
        return {}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not a weights-only file: read_state_dict reports it with the path
        return {}
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        return {"epoch": state.get("epoch"), "step": int((state.get("progress") or {}).get("steps", 0)),
                "extra": dict(state.get("extra") or {})}
    return {}


def infer_arch(state: dict[str, torch.Tensor]) -> str:
    """The entry of ``ARCHS`` whose parameters have exactly the keys and shapes of ``state``.

    Models are built on the meta device (no memory, no init cost); BatchNorm's
    ``num_batches_tracked`` counters are ignored (older checkpoints lack them).
    """
    if "fc.weight" not in state:
        raise ValueError("the state_dict has no 'fc.weight'; pass --arch explicitly (a torchvision ResNet layout)")
    num_classes = state["fc.weight"].shape[0]
    shapes = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    for arch in ARCHS:
        with torch.device("meta"):
            own = build_model(arch, max(num_classes, 2)).state_dict()
        if shapes == {k: tuple(v.shape) for k, v in own.items() if not k.endswith("num_batches_tracked")}:
            return arch
    raise ValueError(
        f"the state_dict ({len(shapes)} tensors, fc {tuple(state['fc.weight'].shape)}) matches none of {list(ARCHS)}; "
        "pass the architecture with --arch"
    )


@dataclass
class Classifier:
    """A classifier loaded from a weights file, in eval mode.

    ``layer``: the Grad-CAM layer it was trained with (else layer4);
    ``method``: the method section a cgc-ray checkpoint records, in the spec's
    fields (:func:`method_record`; None for other files); ``epochs``: epochs trained (0 when unknown);
    ``image_size``: the input size it was trained at (None when not recorded).
    """

    model: nn.Module
    arch: str
    num_classes: int
    layer: str
    method: dict[str, Any] | None
    epochs: int
    source: str
    image_size: int | None = None


def _named_arch(weights: str, extra: dict[str, Any]) -> str | None:
    """The architecture a cgc-ray checkpoint records, else a torchvision enum's, else None."""
    enum = _ENUM_NAME.match(weights)
    return extra.get("arch") or (f"resnet{enum['cls'].removeprefix('ResNet').removesuffix('_Weights')}"
                                 if enum else None)


def weights_arch(weights: str | os.PathLike) -> str:
    """The architecture ``weights`` are for: the recorded or named one, else :func:`infer_arch` of its tensors."""
    weights = str(weights)
    return _named_arch(weights, read_header(weights).get("extra", {})) or infer_arch(
        read_state_dict(weights, arch="")[0])


def load_classifier(weights: str | os.PathLike, *, arch: str | None = None, layer: str | None = None) -> Classifier:
    """Build the classifier ``weights`` holds, head included (see :func:`read_state_dict` for the sources).

    arch: None takes the one a cgc-ray checkpoint records, else the torchvision
    enum's, else :func:`infer_arch`. Raises ValueError when the weights do not
    fit the architecture.
    """
    weights = str(weights)
    header = read_header(weights)
    extra = header.get("extra", {})
    arch = arch or _named_arch(weights, extra)
    state, source, _ = read_state_dict(weights, arch=arch or "")
    arch = arch or infer_arch(state)
    if "fc.weight" not in state:
        raise ValueError(f"weights {source} have no classification head (fc.weight): they cannot classify")
    num_classes = state["fc.weight"].shape[0]
    model = build_model(arch, num_classes)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"weights {source} do not fit arch={arch!r}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    method, recorded_layer = method_record(extra)
    epoch = header.get("epoch")
    return Classifier(model.eval(), arch, num_classes, layer or recorded_layer or "layer4", method,
                      0 if epoch is None else int(epoch) + 1, source, extra.get("image_size"))
