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
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cgc_ray.config import HELDOUT_METRIC, ExperimentSpec, MethodSpec, loader_workers, validate_spec
from cgc_ray.config.base import digest, set_path
from cgc_ray.data import ImageRecord, class_names, records
from cgc_ray.data import info as info_of
from cgc_ray.data.dataset import BoxDataset
from cgc_ray.method.cam import gradcam
from cgc_ray.method.metrics import content_heatmap
from cgc_ray.models.checkpoint import Classifier, load_classifier, method_record, read_header, weights_arch
from cgc_ray.train.trial import data_root, evaluator, synthetic_options

Protocol = Literal["fast", "authors"]
PROTOCOLS: tuple[str, ...] = ("fast", "authors")


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


# --------------------------------------------------------------------------- evaluation


def checkpoint_spec(weights: str | os.PathLike, settings: Mapping[str, Any] | None = None) -> ExperimentSpec:
    """The spec ``weights`` are evaluated under (``model.weights``): the spec's defaults, then what the
    checkpoint records (its architecture, else the one its tensors fit; its Grad-CAM layer; its image size),
    then ``settings`` (dotted field path -> value, e.g. ``{"data.dataset": "cub200"}``), which win."""
    weights, settings = str(weights), dict(settings or {})
    extra = read_header(weights).get("extra", {})
    recorded = {"model.arch": extra.get("arch") or (None if "model.arch" in settings else weights_arch(weights)),
                "model.layer": method_record(extra)[1], "data.image_size": extra.get("image_size")}
    tree = ExperimentSpec().model_dump(mode="json")
    for path, value in {"model.weights": weights, **recorded, **settings}.items():
        if value is not None or path in settings:
            set_path(tree, path, value)
    return validate_spec(tree)


def _subsample(recs: list[ImageRecord], limit: int | None) -> list[ImageRecord]:
    """``limit`` records spread evenly over the split (classes are usually stored in order)."""
    if limit is None or limit >= len(recs):
        return recs
    if limit < 1:
        raise ValueError(f"limit={limit} must be a positive number of images")
    return [recs[i * len(recs) // limit] for i in range(limit)]


def _classifier(spec: ExperimentSpec, num_classes: int) -> Classifier:
    """``model.weights`` as ``model.arch`` with the Grad-CAM layer ``model.layer``, checked against the dataset:
    a head for another number of classes would give meaningless predictions (ValueError)."""
    clf = load_classifier(spec.model.weights, arch=spec.model.arch, layer=spec.model.layer)
    if clf.num_classes != num_classes:
        raise ValueError(
            f"weights {clf.source} classify {clf.num_classes} classes but the evaluated dataset has {num_classes}; "
            "evaluate on the dataset the checkpoint was trained on"
        )
    return clf


def evaluate_checkpoint(spec: ExperimentSpec, *, protocol: Protocol = "fast", short_side: int = 448,
                        limit: int | None = None, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Evaluate the classifier in ``spec.model.weights`` on ``data.eval_split`` of ``data.dataset``.

    ``spec`` (:func:`checkpoint_spec` builds one for a checkpoint) says what
    and how: ``metrics``, ``evaluation``, ``seed``, ``model.layer``, and the
    data (``root``, ``image_size``, ``batch_size``, ``num_workers``, and for
    ``synthetic`` the generated set, at ``image_size`` as a trial generates it).
    top1/top5/iauc/cgc_loss and the fast CH come from ``engine.evaluate`` on
    centre crops at ``data.image_size``; with ``protocol="authors"`` CH is
    :func:`content_heatmap_authors` at ``short_side`` instead. ``limit``:
    evaluate only this many images, spread evenly over the split.

    Returns a dict: the requested metrics as fractions in [0, 1] (cgc_loss in
    nats), n_eval, zero_cam_frac, ch_protocol, wall_time_s, epochs, and
    ``config`` (data/model/method/evaluate settings, JSON-able) for
    :func:`result_row`.
    """
    start = time.perf_counter()
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}; choose one of {PROTOCOLS}")
    dataset, root, options = spec.data.dataset, data_root(spec), synthetic_options(spec)
    split = spec.data.eval_split or info_of(dataset).eval_split
    recs = _subsample(records(dataset, root, split, **options), limit)
    if not recs:
        raise ValueError(f"split {split!r} of dataset {dataset!r} under {root} has no images")
    clf = _classifier(spec, info_of(dataset).label_space or len(class_names(dataset, root, **options)))
    model = clf.model.to(torch.device(device))
    out: dict[str, Any] = {"ch_protocol": protocol}
    fast = [m for m in spec.metrics if not (m == "ch" and protocol == "authors")]
    if fast:
        out.update(evaluator(spec, recs, batch=spec.data.batch_size, metrics=fast)(model, device))
    else:
        out["n_eval"] = float(len(recs))
    if protocol == "authors" and "ch" in spec.metrics:
        ch = content_heatmap_authors(model, recs, layer=clf.layer, short_side=short_side, device=device,
                                     num_workers=loader_workers(spec))
        ok = ~torch.isnan(ch)
        out.update(ch=ch[ok].mean().item() if ok.any() else math.nan, n_ch=float(ok.sum()))
    if "iauc" in out:
        out.update(iauc_protocol=spec.evaluation.iauc_protocol, iauc_images=int(out["n_iauc"]))
    out.update(wall_time_s=time.perf_counter() - start, epochs=clf.epochs, eval_split=split,
               config=_row_config(spec, clf, split=split, root=root, protocol=protocol, short_side=short_side,
                                  limit=limit))
    return out


def _row_config(spec: ExperimentSpec, clf: Classifier, *, split: str, root: str, protocol: str, short_side: int,
                limit: int | None) -> dict[str, Any]:
    """What an evaluation row records of what was evaluated, and how (:func:`evaluation_trial_id` hashes it)."""
    d, ev = spec.data, spec.evaluation
    method = None if clf.method is None else MethodSpec.model_validate(clf.method)
    return {
        "data": {"dataset": d.dataset, "root": str(root), "split": split, "image_size": d.image_size,
                 "limit": limit, "shots": None, "episode": 0, "percent": None,
                 **({"synthetic": {"variant": d.synthetic.variant}} if d.dataset == "synthetic" else {})},
        "model": {"arch": clf.arch, "weights": _absolute(clf.source), "layer": clf.layer},
        "method": {"name": method.name, "lam": method.lam, "tau": method.tau} if method else
                  {"name": "unknown", "lam": 0.0, "tau": HELDOUT_METRIC.tau},
        "seed": spec.seed,
        "evaluate": {"protocol": protocol, "metrics": sorted(spec.metrics), "short_side": short_side,
                     "iauc_images": ev.iauc_images, "iauc_protocol": ev.iauc_protocol, "cgc_batch": ev.cgc_batch},
    }


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
