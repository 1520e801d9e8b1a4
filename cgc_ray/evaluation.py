"""Evaluate a saved model: top-1/5, Content Heatmap (two protocols), IAUC, held-out CGC loss.

Two CH protocols, recorded with every result as ``ch_protocol``:

``"fast"``     the batched variant at training resolution (``engine.evaluate``):
               centre crop at ``image_size``, Grad-CAM of the ground-truth class,
               boxes moved into crop coordinates.
``"authors"``  exactly the authors' measurement (REFERENCE.md §3): batch 1,
               eval mode, image resized to ``short_side`` (448) on its short side
               without crop, Grad-CAM of the GROUND-TRUTH class, heatmap resized
               bilinearly to the ORIGINAL image size, l1-normalised (an all-zero
               map counts as uniform) and summed over the union of the boxes in
               original-image coordinates.

Every other metric comes from ``engine.evaluate`` with the model in eval mode
throughout (IAUC per RISE included). Fractions are returned in [0, 1];
:func:`result_row` converts to the results table's units (% for top1/top5/ch).
No Ray here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cgc_ray.cam import gradcam, unwrap
from cgc_ray.data import BoxDataset, ImageRecord, class_names, collate, records
from cgc_ray.engine import CHECKPOINT_FORMAT, MethodConfig, evaluate
from cgc_ray.metrics import content_heatmap
from cgc_ray.models import build_model
from cgc_ray.weights import load_weights

Protocol = Literal["fast", "authors"]
PROTOCOLS: tuple[str, ...] = ("fast", "authors")
METRICS: tuple[str, ...] = ("top1", "top5", "ch", "iauc", "cgc_loss")
DEFAULT_ARCH = "resnet18"


# --------------------------------------------------------------------------- authors' CH


class _ShortSideView(Dataset):
    """(image 3 x S' x S'' with short side S, label, boxes N x 4 in ORIGINAL pixels, (H, W) original)."""

    def __init__(self, recs: Sequence[ImageRecord], short_side: int):
        self.inner = BoxDataset(recs, train=False, image_size=short_side, eval_resize="short_side")

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> tuple[Tensor, int, Tensor, tuple[int, int]]:
        x, y, _ = self.inner[i]
        rec = self.inner.records[i]
        with Image.open(rec.path) as im:  # header only: the decoded pixels come from BoxDataset
            W, H = im.size
        return x, y, torch.tensor(rec.boxes, dtype=torch.float32).reshape(-1, 4), (H, W)


def _only(batch: list) -> Any:
    return batch[0]


def content_heatmap_authors(
    model: nn.Module,
    recs: Sequence[ImageRecord],
    *,
    layer: str = "layer4",
    short_side: int = 448,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
) -> Tensor:
    """CH in [0, 1] per record by the authors' protocol (module docstring); NaN where a record has no box.

    recs: N ImageRecords (boxes in 0-based continuous coordinates of the
    original image). Returns Tensor[N] on the CPU. The model is put in eval
    mode for the pass and its mode restored afterwards.
    """
    device = torch.device(device)
    loader = DataLoader(_ShortSideView(recs, short_side), batch_size=1, num_workers=num_workers, collate_fn=_only)
    was_training = model.training
    model.eval()
    out = torch.empty(len(recs))
    try:
        for i, (x, y, boxes, size) in enumerate(loader):
            x = x[None].to(device)  # 1 x 3 x S' x S''
            t = torch.tensor([y], device=device)
            with torch.no_grad():  # gradcam turns autograd back on where the layer needs it
                cam = gradcam(model, x, t, layer=layer)  # 1 x h x w
            out[i] = content_heatmap(cam, [boxes.to(device)], size)[0].cpu()
    finally:
        model.train(was_training)
    return out


# --------------------------------------------------------------------------- loading


def default_synthetic_root() -> Path:
    """Where the embedded synthetic dataset is generated when no root is given."""
    return Path(os.environ.get("CGC_RAY_CACHE_DIR", Path.home() / ".cache" / "cgc-ray")) / "synthetic"


def _peek_checkpoint(weights: str) -> dict[str, Any]:
    """The header of a cgc-ray checkpoint (format, epoch, extra), or {} for any other weights."""
    path = Path(weights).expanduser()
    if not path.is_file():
        return {}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a weights-only file: load_weights reports it with the path
        return {}
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        return {"epoch": state.get("epoch"), "extra": dict(state.get("extra") or {})}
    return {}


def load_model(
    weights: str | os.PathLike, num_classes: int, *, arch: str | None = None, layer: str | None = None
) -> tuple[nn.Module, MethodConfig | None, dict[str, Any]]:
    """Build ``arch`` with ``num_classes`` outputs and load ``weights`` into it, head included.

    weights: a cgc-ray checkpoint, a plain torchvision state_dict path, or any
    other string ``cgc_ray.weights.load_weights`` accepts. arch: None takes
    ``extra["arch"]`` recorded in a cgc-ray checkpoint, else resnet18.
    Returns (model in eval mode, the checkpoint's MethodConfig or None when it
    records none, {"arch", "weights", "epochs"}). Raises ValueError when the
    classification head does not load (a head for another number of classes
    would be evaluated at random).
    """
    header = _peek_checkpoint(str(weights))
    extra = header.get("extra", {})
    arch = arch or extra.get("arch") or DEFAULT_ARCH
    model = build_model(arch, num_classes)
    report = load_weights(model, str(weights), arch=arch)
    if report.missing or report.skipped:
        raise ValueError(
            f"weights {report.source}: classification head {list(report.missing)} did not load "
            f"(it has another shape or is absent); the model was built for {num_classes} classes of the "
            "evaluated dataset. Evaluate on the dataset the checkpoint was trained on, or check --arch"
        )
    method = None
    if isinstance(extra.get("method"), dict):
        fields = dict(extra["method"])
        fields["crop_scale"] = tuple(fields.get("crop_scale", MethodConfig.crop_scale))
        method = MethodConfig(**fields)
    if layer is not None and method is not None:
        method = MethodConfig(**{**asdict(method), "layer": layer})
    epoch = header.get("epoch")
    info = {"arch": arch, "weights": report.source, "epochs": 0 if epoch is None else int(epoch) + 1}
    return model.eval(), method, info


# --------------------------------------------------------------------------- evaluation


def _subsample(recs: list[ImageRecord], limit: int | None) -> list[ImageRecord]:
    """``limit`` records spread evenly over the split (classes are usually stored in order)."""
    if limit is None or limit >= len(recs):
        return recs
    if limit < 1:
        raise ValueError(f"limit={limit} must be a positive number of images")
    return [recs[i * len(recs) // limit] for i in range(limit)]


def evaluate_checkpoint(
    checkpoint: str | os.PathLike | nn.Module,
    dataset: str,
    root: str | os.PathLike | None,
    split: str = "test",
    *,
    arch: str | None = None,
    metrics: Sequence[str] = METRICS,
    protocol: Protocol = "fast",
    image_size: int = 224,
    short_side: int = 448,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    iauc_images: int = 64,
    num_workers: int = 0,
    layer: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    synthetic_variant: str = "clutter",
) -> dict[str, Any]:
    """Evaluate a checkpoint (or an in-memory model) on ``split`` of ``dataset``.

    top1/top5/iauc/cgc_loss and the fast CH come from ``engine.evaluate`` on
    centre crops at ``image_size``; with ``protocol="authors"`` CH is
    :func:`content_heatmap_authors` at ``short_side`` instead. root None is
    allowed for ``synthetic`` (generated under :func:`default_synthetic_root`).
    layer: None takes the checkpoint's recorded Grad-CAM layer, else layer4.
    limit: evaluate only this many images, spread evenly over the split.
    synthetic_variant: for ``synthetic``, the generated variant; its images are
    generated at ``image_size``, as a trial does.

    Returns a dict: the requested metrics as fractions in [0, 1] (cgc_loss in
    nats), n_eval, zero_cam_frac, ch_protocol, wall_time_s, epochs, and
    ``config`` (data/model/method/evaluate settings, JSON-able) for
    :func:`result_row`.
    """
    start = time.perf_counter()
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}; choose one of {PROTOCOLS}")
    wanted = list(dict.fromkeys(metrics))
    unknown = set(wanted) - set(METRICS)
    if unknown or not wanted:
        raise ValueError(f"metrics={list(metrics)}: choose one or more of {list(METRICS)}")
    if root is None:
        if dataset != "synthetic":
            raise ValueError(f"dataset {dataset!r} needs a data root (--data-root); only 'synthetic' is embedded")
        root = default_synthetic_root()
    options = {"variant": synthetic_variant, "image_size": image_size} if dataset == "synthetic" else {}
    recs = _subsample(records(dataset, root, split, **options), limit)
    if not recs:
        raise ValueError(f"split {split!r} of dataset {dataset!r} under {root} has no images")
    device = torch.device(device)

    if isinstance(checkpoint, nn.Module):
        model, method = unwrap(checkpoint), None
        info = {"arch": arch or type(model).__name__, "weights": "<in-memory model>", "epochs": 0}
    else:
        num_classes = len(class_names(dataset, root, **options))
        model, method, info = load_model(checkpoint, num_classes, arch=arch, layer=layer)
    recorded = method is not None
    method = method or MethodConfig(name="baseline", lam=0.0, layer=layer or "layer4")
    model.to(device)

    out: dict[str, Any] = {"ch_protocol": protocol}
    fast = [m for m in wanted if not (m == "ch" and protocol == "authors")]
    if fast:
        data = BoxDataset(recs, train=False, image_size=image_size)
        loader = DataLoader(data, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
        out.update(evaluate(model, loader, device, method=method, metrics=fast, iauc_images=iauc_images, seed=seed))
    else:
        out["n_eval"] = float(len(recs))
    if protocol == "authors" and "ch" in wanted:
        ch = content_heatmap_authors(model, recs, layer=method.layer, short_side=short_side, device=device,
                                     num_workers=num_workers)
        ok = ~torch.isnan(ch)
        out["ch"] = ch[ok].mean().item() if ok.any() else math.nan
        out["n_ch"] = float(ok.sum())
    out["wall_time_s"] = time.perf_counter() - start
    out["epochs"] = info["epochs"]
    out["config"] = {
        "data": {"dataset": dataset, "root": str(root), "split": split, "image_size": image_size,
                 "limit": limit, "shots": None, "episode": 0, "percent": None,
                 **({"synthetic": {"variant": synthetic_variant}} if dataset == "synthetic" else {})},
        "model": {"arch": info["arch"], "weights": _absolute(info["weights"]), "layer": method.layer},
        "method": {"name": method.name if recorded else "unknown", "lam": method.lam, "tau": method.tau},
        "seed": seed,
        "evaluate": {"protocol": protocol, "metrics": sorted(wanted), "short_side": short_side,
                     "iauc_images": iauc_images},
    }
    return out


def _absolute(source: str) -> str:
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


# --------------------------------------------------------------------------- results row


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


def evaluation_trial_id(config: Mapping[str, Any]) -> str:
    """``eval-<12 hex>``: what was evaluated (weights, dataset, split, protocol, settings), not where the data sits."""
    ident = json.loads(json.dumps(config))
    ident["data"].pop("root", None)
    return f"eval-{_digest(ident)}"


def result_row(result: Mapping[str, Any], *, node: str | None = None) -> dict[str, Any]:
    """A row for ``cgc_ray.results.write_row`` from :func:`evaluate_checkpoint`'s result.

    top1/top5/ch are converted to % (the table's unit); NaN metrics (e.g. CH
    on a dataset without boxes) become null.
    """
    from cgc_ray.results import code_version, result_metrics, row_from_config

    config = result["config"]
    return row_from_config(
        config,
        result_metrics(result),
        trial_id=evaluation_trial_id(config),
        spec_hash=_digest(config),
        epochs=int(result["epochs"]),
        wall_time_s=float(result["wall_time_s"]),
        node=node or platform.node(),
        code_version=code_version(),
    )
