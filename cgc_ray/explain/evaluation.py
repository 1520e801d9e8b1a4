"""Evaluate a saved model: top-1/5, Content Heatmap (two protocols), IAUC, held-out CGC loss.

Two CH protocols, recorded with every result as ``ch_protocol``:

``"fast"``     the batched variant at training resolution (``engine.evaluate``):
               centre crop at ``image_size``, Grad-CAM of the ground-truth class,
               boxes moved into crop coordinates.
``"authors"``  exactly the authors' measurement (docs/PAPER.md §3): batch 1,
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

import json
import math
import os
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cgc_ray.config import DataSpec, ExperimentSpec, method_config_kwargs
from cgc_ray.config.base import digest
from cgc_ray.data import ImageRecord, class_names, records, synthetic_root
from cgc_ray.data import info as info_of
from cgc_ray.data.dataset import BoxDataset
from cgc_ray.method.cam import gradcam, unwrap
from cgc_ray.method.cgc import MethodConfig, method_config_from_record
from cgc_ray.method.metrics import content_heatmap
from cgc_ray.models.checkpoint import load_classifier, read_header
from cgc_ray.train.engine import evaluate
from cgc_ray.train.trial import evaluation_loaders

Protocol = Literal["fast", "authors"]
PROTOCOLS: tuple[str, ...] = ("fast", "authors")
METRICS: tuple[str, ...] = ("top1", "top5", "ch", "iauc", "cgc_loss")


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


def load_model(
    weights: str | os.PathLike, num_classes: int, *, arch: str | None = None, layer: str | None = None
) -> tuple[nn.Module, MethodConfig | None, dict[str, Any]]:
    """The classifier in ``weights`` (``models.checkpoint.load_classifier``), checked against the dataset.

    Returns (model in eval mode, the checkpoint's MethodConfig or None when it
    records none, {"arch", "weights", "epochs"}). Raises ValueError when the
    head has another number of classes than the evaluated dataset (its
    predictions would be meaningless).
    """
    clf = load_classifier(weights, arch=arch, layer=layer)
    if clf.num_classes != num_classes:
        raise ValueError(
            f"weights {clf.source} classify {clf.num_classes} classes but the evaluated dataset has {num_classes}; "
            "evaluate on the dataset the checkpoint was trained on"
        )
    method = None if clf.method is None else replace(method_config_from_record(clf.method), layer=clf.layer)
    return clf.model, method, {"arch": clf.arch, "weights": clf.source, "epochs": clf.epochs}


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
    image_size: int | None = None,
    short_side: int = 448,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    iauc_images: int | None = None,
    iauc_protocol: str = "authors",
    num_workers: int = 0,
    layer: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    cgc_batch: int = 32,
    synthetic_variant: str = "clutter",
) -> dict[str, Any]:
    """Evaluate a checkpoint (or an in-memory model) on ``split`` of ``dataset``.

    top1/top5/iauc/cgc_loss and the fast CH come from ``engine.evaluate`` on
    centre crops at ``image_size`` (None: the size the checkpoint was trained
    at, else the spec's default); with ``protocol="authors"`` CH is
    :func:`content_heatmap_authors` at ``short_side`` instead. root None is
    allowed for ``synthetic`` (generated under :func:`cgc_ray.data.synthetic_root`).
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
        root = synthetic_root()
    if image_size is None:
        recorded_size = None if isinstance(checkpoint, nn.Module) else read_header(checkpoint).get("extra", {}).get(
            "image_size")
        image_size = recorded_size or DataSpec.model_fields["image_size"].default
    options = {"variant": synthetic_variant, "image_size": image_size} if dataset == "synthetic" else {}
    recs = _subsample(records(dataset, root, split, **options), limit)
    if not recs:
        raise ValueError(f"split {split!r} of dataset {dataset!r} under {root} has no images")
    device = torch.device(device)

    if isinstance(checkpoint, nn.Module):
        model, method = unwrap(checkpoint), None
        info = {"arch": arch or type(model).__name__, "weights": "<in-memory model>", "epochs": 0}
    else:
        num_classes = info_of(dataset).label_space or len(class_names(dataset, root, **options))
        model, method, info = load_model(checkpoint, num_classes, arch=arch, layer=layer)
    recorded = method is not None
    grad_cam_layer = method.layer if recorded else layer or "layer4"
    # the held-out CGC loss is scored with the spec's metric settings, the same yardstick as in training runs
    heldout = MethodConfig(**{**method_config_kwargs(ExperimentSpec(), heldout_metric=True), "layer": grad_cam_layer})
    model.to(device)

    out: dict[str, Any] = {"ch_protocol": protocol}
    fast = [m for m in wanted if not (m == "ch" and protocol == "authors")]
    if fast:
        loader, options = evaluation_loaders(recs, image_size=image_size, batch=batch_size, workers=num_workers,
                                             seed=seed, metrics=fast, cgc_batch=cgc_batch, iauc_images=iauc_images,
                                             iauc_protocol=iauc_protocol)
        out.update(evaluate(model, loader, device, method=heldout, metrics=fast, seed=seed, **options))
    else:
        out["n_eval"] = float(len(recs))
    if protocol == "authors" and "ch" in wanted:
        ch = content_heatmap_authors(model, recs, layer=grad_cam_layer, short_side=short_side, device=device,
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
        "model": {"arch": info["arch"], "weights": _absolute(info["weights"]), "layer": grad_cam_layer},
        "method": {"name": method.name if recorded else "unknown", "lam": method.lam if recorded else 0.0,
                   "tau": method.tau if recorded else heldout.tau},
        "seed": seed,
        "evaluate": {"protocol": protocol, "metrics": sorted(wanted), "short_side": short_side,
                     "iauc_images": iauc_images, "iauc_protocol": iauc_protocol, "cgc_batch": cgc_batch},
    }
    if "iauc" in out:
        out.update(iauc_protocol=iauc_protocol, iauc_images=int(out["n_iauc"]))
    out["eval_split"] = split
    return out


def _absolute(source: str) -> str:
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


# --------------------------------------------------------------------------- results row


def evaluation_trial_id(config: Mapping[str, Any]) -> str:
    """``eval-<12 hex>``: what was evaluated (weights, dataset, split, protocol, settings), not where the data sits."""
    ident = json.loads(json.dumps(config))
    ident["data"].pop("root", None)
    return f"eval-{digest(ident)}"


def result_row(result: Mapping[str, Any], *, node: str | None = None) -> dict[str, Any]:
    """A row for ``cgc_ray.results.table.write_row`` from :func:`evaluate_checkpoint`'s result.

    top1/top5/ch are converted to % (the table's unit); NaN metrics (e.g. CH
    on a dataset without boxes) become null.
    """
    from cgc_ray.results.table import DETAIL_COLUMNS, code_version, result_metrics, row_from_config

    config = result["config"]
    return row_from_config(
        config,
        result_metrics(result),
        trial_id=evaluation_trial_id(config),
        spec_hash=digest(config),
        epochs=int(result["epochs"]),
        wall_time_s=float(result["wall_time_s"]),
        node=node or platform.node(),
        code_version=code_version(),
        details={k: result[k] for k in DETAIL_COLUMNS if result.get(k) is not None},
    )
