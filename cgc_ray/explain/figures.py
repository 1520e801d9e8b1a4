"""Heatmap figures: Grad-CAM overlays per checkpoint, and the paper's Figure 1 (consistency under T).

Two figures, each computed by a ``*_maps`` function that returns the arrays
behind it (tested directly) and drawn by a ``render_*`` function that returns
a :class:`matplotlib.figure.Figure` (no pyplot, so no global state or GUI
backend is involved):

- explain grid: one column per image, one row per checkpoint; each cell is the
  image with its Grad-CAM g(x) overlaid (perceptual colormap, opacity
  ``alpha``), the ground-truth boxes drawn, the class named and the image's
  Content Heatmap (CH) printed.
- consistency (Figure 1 of Pillai et al.): per image x, the image, T(x), and
  per checkpoint T(g(x)) and g(T(x)) with their cosine similarity, the
  quantity the CGC loss pulls towards 1 for the positive pair. The heatmaps
  are the ones the held-out CGC loss compares (``method.cgc.heatmap_pair``
  with ``config.HELDOUT_METRIC``: T crops the h x w map straight to the input
  size, g(T(x)) is upsampled bilinearly, the class of both views is the top-1
  prediction on x), in eval mode.

Checkpoints are cgc-ray checkpoints or plain torchvision-layout state_dicts;
the architecture is read off the state_dict's key names and shapes.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor, nn

from cgc_ray.config import (HELDOUT_METRIC, DataSpec, ExperimentSpec, apply_overrides, effective_method, trial_id,
                            validate_spec)
from cgc_ray.data import ImageRecord, class_names, records
from cgc_ray.data.dataset import IMAGENET_MEAN, IMAGENET_STD, BoxDataset, collate
from cgc_ray.method import transforms as T
from cgc_ray.method.cam import gradcam, linear_head
from cgc_ray.method.cgc import heatmap_pair
from cgc_ray.method.metrics import content_heatmap
from cgc_ray.models.checkpoint import Classifier, load_classifier
from cgc_ray.results.table import read_rows
from cgc_ray.storage import Storage
from cgc_ray.train.trial import data_root, synthetic_options, trial_data

__all__ = [
    "Row",
    "ConsistencyMaps",
    "ExplainMaps",
    "consistency_maps",
    "draw_cell",
    "explain_maps",
    "load_row",
    "load_images",
    "pick_indices",
    "render_consistency",
    "report_heatmaps",
    "render_explain",
    "sample_explain_figure",
    "write_sample_figure",
    "write_explain",
]

BOX_COLOUR = "#00ff00"
CMAP = "inferno"


@dataclass
class Row:
    """One row of a figure: a model in eval mode, the layer its Grad-CAM reads, the title it is shown under."""

    model: nn.Module
    layer: str
    label: str


def load_row(path: str | Path, *, arch: str | None = None, layer: str | None = None) -> tuple[Row, Classifier]:
    """A figure row from a checkpoint or state_dict, and what ``models.checkpoint.load_classifier`` read.

    The title is the file name, plus the method and λ a cgc-ray checkpoint records.
    """
    path = Path(path)
    clf = load_classifier(path, arch=arch, layer=layer)
    label = path.stem if path.stem != "checkpoint" else f"{path.parent.name}/{path.stem}"
    method = clf.method or {}
    if method.get("name"):
        name = effective_method({"method": method}) if "lam" in method else method["name"]  # CGC at λ 0 is CE only
        label += f"\n{name}" + (f" λ={method['lam']:g}" if name != "baseline" else "")
    return Row(clf.model, clf.layer, label), clf


def pick_indices(n_available: int, n: int, seed: int, indices: Sequence[int] | None = None) -> list[int]:
    """``indices`` as given (checked), else the first ``n`` of a permutation seeded with ``seed``."""
    if indices:
        bad = [i for i in indices if not 0 <= i < n_available]
        if bad:
            raise ValueError(f"--indices {bad} out of range: the split has {n_available} images (0..{n_available - 1})")
        return list(indices)
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_available, generator=g)[: min(n, n_available)].tolist()


def load_images(recs: Sequence[ImageRecord], image_size: int) -> tuple[Tensor, Tensor, list[Tensor]]:
    """The evaluation view of ``recs`` (resize + centre crop, as ``trial``'s validation loader).

    Returns (images B x 3 x S x S ImageNet-normalised, labels B, boxes: B tensors N_i x 4 in pixels).
    """
    ds = BoxDataset(recs, train=False, image_size=image_size)
    return collate([ds[i] for i in range(len(ds))])


def unnormalise(images: Tensor) -> Tensor:
    """B x 3 x H x W ImageNet-normalised -> B x H x W x 3 in [0, 1] for display."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1)


def _display(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """B x h x w -> B x H x W, bilinear, each map scaled to max 1 (an all-zero map stays 0)."""
    up = F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    peak = up.flatten(1).amax(dim=1).clamp(min=torch.finfo(up.dtype).tiny)
    return (up / peak[:, None, None]).clamp(0, 1)


# --------------------------------------------------------------------------- explain grid


@dataclass
class ExplainMaps:
    """Everything the explain grid shows, for M checkpoints and N images of S x S pixels.

    images: N x S x S x 3 in [0, 1]; labels: N; boxes: N tensors N_i x 4 (pixels);
    heatmaps: M x N x S x S, each scaled to max 1; targets, preds: M x N (class
    explained, top-1 prediction); ch: M x N CH in [0, 1] (NaN without boxes).
    """

    images: Tensor
    labels: Tensor
    boxes: list[Tensor]
    heatmaps: Tensor
    targets: Tensor
    preds: Tensor
    ch: Tensor
    row_labels: list[str]


@torch.no_grad()
def _predict(model: nn.Module, images: Tensor) -> Tensor:
    return model(images).argmax(dim=1)


def explain_maps(
    classifiers: Sequence[Row],
    images: Tensor,
    labels: Tensor,
    boxes: Sequence[Tensor],
    *,
    classes: str = "gt",
) -> ExplainMaps:
    """Grad-CAM of every image under every classifier, with its CH.

    images: N x 3 x S x S normalised. classes: "gt" explains the ground-truth
    class (the authors' CH protocol), "pred" each model's top-1 prediction.
    """
    if classes not in ("gt", "pred"):
        raise ValueError(f"--classes must be 'gt' or 'pred', got {classes!r}")
    S = tuple(images.shape[-2:])
    heat, targets, preds, ch = [], [], [], []
    for c in classifiers:
        pred = _predict(c.model, images)  # N
        t = labels if classes == "gt" else pred
        cams = gradcam(c.model, images, t, layer=c.layer)  # N x h x w
        heat.append(_display(cams, S))
        ch.append(content_heatmap(cams, list(boxes), S))
        targets.append(t)
        preds.append(pred)
    return ExplainMaps(
        unnormalise(images), labels, list(boxes), torch.stack(heat), torch.stack(targets), torch.stack(preds),
        torch.stack(ch), [c.label for c in classifiers],
    )


def draw_cell(ax, image: np.ndarray, heatmap: np.ndarray | None, boxes: Tensor, *, alpha: float, cmap: str = CMAP):
    """Image (H x W x 3 in [0, 1]), heatmap overlay (H x W in [0, 1], opacity ``alpha``) and box outlines.

    Pixel (row i, column j) covers [j, j + 1] x [i, i + 1], the convention of
    the boxes (continuous 0-based pixel coordinates), so a box edge at x = 10
    is drawn on the boundary between columns 9 and 10.
    """
    H, W = image.shape[:2]
    extent = (0, W, H, 0)
    ax.imshow(image, extent=extent, interpolation="nearest")
    if heatmap is not None and alpha > 0:
        ax.imshow(heatmap, extent=extent, cmap=cmap, vmin=0, vmax=1, alpha=alpha, interpolation="bilinear")
    for x1, y1, x2, y2 in boxes.reshape(-1, 4).tolist():
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=BOX_COLOUR, linewidth=1.2))
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def _name(names: Sequence[str] | None, k: int) -> str:
    """Class k's name without a CUB-style "NNN." prefix, or k itself when there is no name."""
    return re.sub(r"^\d+\.", "", names[k]) if names and 0 <= k < len(names) else str(k)


def render_explain(
    maps: ExplainMaps,
    *,
    alpha: float = 0.5,
    cmap: str = CMAP,
    class_names: Sequence[str] | None = None,
    cell_inches: float = 1.8,
    dpi: int = 100,
) -> Figure:
    """The grid: a column per image (ground-truth class on top), a row per checkpoint.

    Each cell's caption gives the CH and the prediction (marked ✗ when wrong).
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"--alpha must lie in [0, 1], got {alpha}")
    M, N = maps.heatmaps.shape[:2]
    fig = Figure(figsize=(cell_inches * N + 0.6, cell_inches * M + 0.4), dpi=dpi, layout="constrained")
    axes = fig.subplots(M, N, squeeze=False)
    for m in range(M):
        for n in range(N):
            ax = axes[m, n]
            draw_cell(ax, maps.images[n].numpy(), maps.heatmaps[m, n].numpy(), maps.boxes[n], alpha=alpha, cmap=cmap)
            pred, label = int(maps.preds[m, n]), int(maps.labels[n])
            ch = float(maps.ch[m, n])
            ch_text = "CH n/a" if math.isnan(ch) else f"CH {100 * ch:.0f}%"
            mark = "✓" if pred == label else "✗"
            ax.set_xlabel(f"{ch_text}  pred {_name(class_names, pred)} {mark}", fontsize=7)
            if m == 0:
                ax.set_title(_name(class_names, label), fontsize=8)
            if n == 0:
                ax.set_ylabel(maps.row_labels[m], fontsize=7)
    return fig


# --------------------------------------------------------------------------- consistency (Figure 1)


@dataclass
class ConsistencyMaps:
    """Figure 1 for M checkpoints and N images of S x S pixels.

    images, t_images: N x S x S x 3 in [0, 1] (x and T(x)); params: the T used;
    t_of_g: M x N x S x S, T(g(x)); g_of_t: M x N x S x S, g(T(x)) upsampled;
    cos: M x N cosine similarity of the two (before display scaling);
    targets: M x N, the class explained (top-1 on x).
    """

    images: Tensor
    t_images: Tensor
    params: T.CropFlip
    t_of_g: Tensor
    g_of_t: Tensor
    cos: Tensor
    targets: Tensor
    row_labels: list[str]


def consistency_maps(
    classifiers: Sequence[Row],
    images: Tensor,
    *,
    params: T.CropFlip | None = None,
    seed: int = 0,
    crop_scale: tuple[float, float] = (0.08, 1.0),
) -> ConsistencyMaps:
    """T(g(x)) and g(T(x)) for each image and classifier, as the CGC loss compares them.

    images: N x 3 x S x S normalised. params: the transform T (one per image);
    None samples it from ``seed`` (crop area in ``crop_scale``, flip p = 0.5).
    """
    N, _, H, W = images.shape
    if params is None:
        params = T.sample_params(N, (H, W), scale=crop_scale, generator=torch.Generator().manual_seed(seed))
    xt = T.apply(images, params)  # N x 3 x H x W
    t_of_g, g_of_t, cos, targets = [], [], [], []
    for c in classifiers:
        # the models are in eval mode, so forwarding x and T(x) together changes no number
        with torch.set_grad_enabled(linear_head(c.model, c.layer) is None):
            pair = heatmap_pair(c.model, images, HELDOUT_METRIC, params, layer=c.layer, create_graph=False)
        q, k = pair.q.detach(), pair.k.detach()  # T(g(x)), g(T(x)): N x H x W
        cos.append(F.cosine_similarity(q.flatten(1), k.flatten(1), dim=1))
        t_of_g.append(_display(q, (H, W)))
        g_of_t.append(_display(k, (H, W)))
        targets.append(pair.target)
    return ConsistencyMaps(
        unnormalise(images), unnormalise(xt), params, torch.stack(t_of_g), torch.stack(g_of_t), torch.stack(cos),
        torch.stack(targets), [c.label for c in classifiers],
    )


def render_consistency(
    maps: ConsistencyMaps,
    *,
    alpha: float = 0.5,
    cmap: str = CMAP,
    class_names: Sequence[str] | None = None,
    cell_inches: float = 1.6,
    dpi: int = 100,
) -> Figure:
    """One row per image: x, T(x), then per checkpoint T(g(x)) and g(T(x)) over T(x), with their cosine."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"--alpha must lie in [0, 1], got {alpha}")
    M, N = maps.t_of_g.shape[:2]
    cols = 2 + 2 * M
    fig = Figure(figsize=(cell_inches * cols, cell_inches * N + 0.5), dpi=dpi, layout="constrained")
    axes = fig.subplots(N, cols, squeeze=False)
    no_boxes = torch.zeros(0, 4)
    for n in range(N):
        ti = maps.t_images[n].numpy()
        draw_cell(axes[n, 0], maps.images[n].numpy(), None, no_boxes, alpha=0)
        draw_cell(axes[n, 1], ti, None, no_boxes, alpha=0)
        flip = " + flip" if bool(maps.params.flip[n]) else ""
        axes[n, 1].set_xlabel(f"crop{flip}", fontsize=7)
        for m in range(M):
            a, b = axes[n, 2 + 2 * m], axes[n, 3 + 2 * m]
            draw_cell(a, ti, maps.t_of_g[m, n].numpy(), no_boxes, alpha=alpha, cmap=cmap)
            draw_cell(b, ti, maps.g_of_t[m, n].numpy(), no_boxes, alpha=alpha, cmap=cmap)
            a.set_xlabel(_name(class_names, int(maps.targets[m, n])), fontsize=7)
            b.set_xlabel(f"cos {float(maps.cos[m, n]):.3f}", fontsize=7)
            if n == 0:
                a.set_title(f"{maps.row_labels[m]}\nT(g(x))", fontsize=7)
                b.set_title(f"{maps.row_labels[m]}\ng(T(x))", fontsize=7)
        if n == 0:
            axes[n, 0].set_title("x", fontsize=8)
            axes[n, 1].set_title("T(x)", fontsize=8)
    return fig


# --------------------------------------------------------------------------- end to end


def write_explain(
    checkpoints: Sequence[str | Path],
    out: str | Path,
    *,
    dataset: str,
    root: str | Path,
    split: str = "test",
    n: int = 8,
    indices: Sequence[int] | None = None,
    seed: int = 0,
    classes: str = "gt",
    alpha: float = 0.5,
    cmap: str = CMAP,
    arch: str | None = None,
    layer: str | None = None,
    image_size: int | None = None,
    consistency: bool = False,
    dataset_options: dict | None = None,
    dpi: int = 100,
    recs: Sequence[ImageRecord] | None = None,
) -> Path:
    """Load checkpoints and images, render the explain grid (or Figure 1 with ``consistency``), write a PNG.

    image_size: None takes the size the first checkpoint was trained at, else the spec's default.
    dataset_options: passed to ``data.records``: the synthetic generator's options (``data.synthetic`` of a
        spec), generated at ``image_size`` where they do not name one.
    recs: the images to draw from instead of ``split``'s (a trial's own evaluation set, e.g. a few-shot
        episode's held-out images, which no named split holds).
    Returns the written path.
    """
    if not checkpoints:
        raise ValueError("explain needs at least one checkpoint")
    classifiers, loaded = zip(*(load_row(p, arch=arch, layer=layer) for p in checkpoints))
    size = image_size or loaded[0].image_size or DataSpec.model_fields["image_size"].default
    # synthetic images are generated at the size they are drawn at, as a trial generates them at its own
    opts = {"image_size": size, **dataset_options} if dataset_options else {}
    recs = list(recs) if recs is not None else records(dataset, root, split, **opts)
    if not recs:
        raise ValueError(f"dataset {dataset!r} split {split!r} under {root} has no images")
    chosen = [recs[i] for i in pick_indices(len(recs), n, seed, indices)]
    images, labels, boxes = load_images(chosen, size)
    names = class_names(dataset, root, **opts)
    if consistency:
        fig = render_consistency(consistency_maps(classifiers, images, seed=seed), alpha=alpha, cmap=cmap,
                                 class_names=names, dpi=dpi)
    else:
        fig = render_explain(explain_maps(classifiers, images, labels, boxes, classes=classes), alpha=alpha,
                             cmap=cmap, class_names=names, dpi=dpi)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def sample_explain_figure(
    checkpoint: str | Path,
    out: str | Path,
    *,
    dataset: str,
    root: str | Path,
    baseline: str | Path | None = None,
    split: str = "test",
    n: int = 6,
    seed: int = 0,
    image_size: int | None = None,
    dataset_options: dict | None = None,
    recs: Sequence[ImageRecord] | None = None,
) -> Path:
    """The small figure stored next to an experiment's results: its best CGC trial (below its baseline, if given).

    checkpoint: the best CGC trial's checkpoint; baseline: optionally a
    baseline trial's checkpoint, drawn in the row above; recs: as :func:`write_explain`. Returns ``out``.
    """
    ckpts = [baseline, checkpoint] if baseline is not None else [checkpoint]
    return write_explain(ckpts, out, dataset=dataset, root=root, split=split, n=n, seed=seed,
                         image_size=image_size, dataset_options=dataset_options, dpi=80, recs=recs)


def _best(rows: list[dict[str, Any]], cgc: bool) -> dict[str, Any] | None:
    """The CGC trial with the highest CH, or the baseline (lambda 0) with the highest top-1."""
    if cgc:
        cands = [r for r in rows if r["method"] != "baseline" and r["lam"] > 0 and r["ch"] is not None]
        return max(cands, key=lambda r: r["ch"], default=None)
    cands = [r for r in rows if (r["method"] == "baseline" or r["lam"] == 0) and r["top1"] is not None]
    return max(cands, key=lambda r: r["top1"], default=None)


def write_sample_figure(spec: ExperimentSpec) -> Path | None:
    """``explain.png`` in the experiment's figures folder (:meth:`Storage.figures_dir`): the best CGC
    trial below the best baseline.

    Storage on this machine's filesystem only (checkpoints are read from disk). A failure is a
    warning, not an error: the results themselves are already written.
    """
    storage = Storage(spec.storage)
    if not storage.posix:
        return None
    rows = read_rows(storage, spec.name).to_pylist()
    best_cgc, best_base = _best(rows, cgc=True), _best(rows, cgc=False)
    if best_cgc is None:
        return None
    ckpt = lambda r: Path(storage.checkpoint_path(spec.name, r["trial_id"]))
    out = Path(storage.figures_dir(spec.name)) / "explain.png"
    try:
        trial = validate_spec(json.loads(best_cgc["config_json"]))
        return sample_explain_figure(
            ckpt(best_cgc), out, dataset=trial.data.dataset, root=data_root(trial),
            baseline=ckpt(best_base) if best_base is not None else None,
            image_size=trial.data.image_size, dataset_options=synthetic_options(trial),
        )
    except Exception as e:  # noqa: BLE001 - a figure must never cost the user their results
        warnings.warn(f"could not write the sample explain figure {out}: {e}")
        return None


def _method_text(row: dict[str, Any]) -> str:
    return row["method"] if row["method"] == "baseline" else f"{row['method']} λ={row['lam']:g}"


def _baseline_of(rows: list[dict[str, Any]], cgc: dict[str, Any]) -> dict[str, Any] | None:
    """The finished baseline trial ``cgc`` is paired with (its setting and seed / episode, CGC off), else the
    best baseline."""
    partner = trial_id(apply_overrides(validate_spec(json.loads(cgc["config_json"])), ["method.name=baseline"]))
    found = [r for r in rows if r["trial_id"] == partner and r["top1"] is not None]
    return found[0] if found else _best(rows, cgc=False)


def report_heatmaps(storage: Storage | str, experiment: str, *, n: int = 6, seed: int = 0) -> tuple[bytes | None, str]:
    """The HTML report's heatmap panel of ``experiment`` (``results.html.HeatmapPanel``): the explain grid as PNG
    bytes, the baseline's row above the CGC trial's on the same images of the split the metrics were computed
    on, with boxes and per-image CH; and its caption. Or None and why there is none.

    The CGC trial is the one with the highest CH; the baseline, its pair (same settings and replicate, CGC off).
    Checkpoints are read from this machine's disk, and exist where the sweep kept them
    (``failure.keep_checkpoint``). A failure to draw is a reason, not an error: the page shows the numbers anyway.
    """
    storage = Storage.of(storage)
    if not storage.posix:
        return None, f"checkpoints are read from this machine's disk, and the storage is {storage.uri}"
    rows = [r for r in read_rows(storage, experiment).to_pylist() if (r["status"] or "finished") == "finished"]
    cgc = _best(rows, cgc=True)
    if cgc is None:
        return None, "no finished CGC trial (λ > 0) with a CH to show"
    try:
        base = _baseline_of(rows, cgc)
        picked = [r for r in (base, cgc) if r is not None]
        missing = [r for r in picked if not Path(storage.checkpoint_path(experiment, r["trial_id"])).is_file()]
        if missing:
            tid = missing[0]["trial_id"]
            keep = validate_spec(json.loads(missing[0]["config_json"])).failure.keep_checkpoint
            why = "its sweep set failure.keep_checkpoint=none; 'model' keeps the trained model for figures" \
                if keep == "none" else f"none at {storage.checkpoint_path(experiment, tid)}"
            return None, f"no checkpoint of trial {tid} ({why})"
        trial = validate_spec(json.loads(cgc["config_json"]))
        held_out = trial_data(trial)  # what the metrics were computed on: a split, or a few-shot episode's rest
        split = held_out.eval_split
        with tempfile.TemporaryDirectory() as tmp:
            out = sample_explain_figure(
                storage.checkpoint_path(experiment, cgc["trial_id"]), Path(tmp) / "heatmaps.png",
                dataset=trial.data.dataset, root=data_root(trial), split=split, n=n, seed=seed,
                baseline=storage.checkpoint_path(experiment, base["trial_id"]) if base is not None else None,
                image_size=trial.data.image_size, dataset_options=synthetic_options(trial), recs=held_out.val)
            png = out.read_bytes()
    except Exception as e:  # noqa: BLE001 - a figure must never cost the reader the numbers
        return None, f"the heatmaps could not be drawn ({type(e).__name__}: {e})"
    replicate = "episode" if trial.data.shots is not None else "seed"  # what pairs the two rows
    rows_text = " above ".join(f"{_method_text(r)} (trial {r['trial_id']}, {replicate} {r[replicate]})" for r in picked)
    return png, (f"Grad-CAM of the ground-truth class on {n} of the images the metrics were computed on ({split}): "
                 f"{rows_text}. Green "
                 "boxes: the object; under each image its CH and the prediction (✗ wrong). The CGC trial is the one "
                 "with the highest CH, the baseline its pair.")
