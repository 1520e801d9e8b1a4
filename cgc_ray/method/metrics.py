"""Evaluation metrics: top-k accuracy, Content Heatmap (CH), insertion AUC (RISE)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms.functional import gaussian_blur

from cgc_ray.method.cam import gradcam
from cgc_ray.method.excitation import SALIENCY_LAYER, excitation_backprop


def topk_correct(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, Tensor]:
    """Number of correct predictions at each k (tensors, no host sync): {"top1": n, ...}."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # B x kmax
    hit = top == labels[:, None]
    return {f"top{k}": hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks}


def boxes_mask(boxes: Sequence[Tensor], image_size: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """B x H x W bool: pixels whose centre lies inside the union of each image's boxes.

    boxes: B tensors N_i x 4 in cgc-ray's box convention (docs/PAPER.md §6).
    """
    H, W = image_size
    device = device or (boxes[0].device if len(boxes) else torch.device("cpu"))
    n = max((b.shape[0] for b in boxes), default=0)
    padded = torch.zeros(len(boxes), max(n, 1), 4, device=device)  # empty boxes never contain a centre
    padded[..., :2] = 1.0
    for i, b in enumerate(boxes):  # ragged input; the mask itself is built batched
        if b.numel():
            padded[i, : b.shape[0]] = b.to(device=device, dtype=torch.float32).reshape(-1, 4)
    cx = torch.arange(W, device=device, dtype=torch.float32) + 0.5
    cy = torch.arange(H, device=device, dtype=torch.float32) + 0.5
    x1, y1, x2, y2 = (padded[..., i, None, None] for i in range(4))  # B x N x 1 x 1
    inside_x = (cx >= x1) & (cx <= x2)  # B x N x 1 x W
    inside_y = (cy[:, None] >= y1) & (cy[:, None] <= y2)  # B x N x H x 1
    return (inside_x & inside_y).any(dim=1)  # B x H x W


def normalise_l1(maps: Tensor) -> Tensor:
    """Each B x H x W map to sum 1; an all-zero map becomes uniform."""
    flat = maps.flatten(1).clamp(min=0)
    s = flat.sum(dim=1, keepdim=True)
    uniform = torch.full_like(flat, 1.0 / flat.shape[1])
    return torch.where(s > 0, flat / s.clamp(min=torch.finfo(flat.dtype).tiny), uniform).view_as(maps)


def content_heatmap(cams: Tensor, boxes: Sequence[Tensor], image_size: tuple[int, int]) -> Tensor:
    """CH in [0, 1] per image: share of the l1-normalised heatmap inside the object boxes.

    cams: B x h x w at any resolution, resized bilinearly (align_corners=False)
    to image_size = (H, W), then l1-normalised. An image without boxes gets NaN.
    """
    if cams.dim() != 3:
        raise ValueError(f"cams must be B x h x w, got shape {tuple(cams.shape)}")
    if len(boxes) != cams.shape[0]:
        raise ValueError(f"{cams.shape[0]} heatmaps but {len(boxes)} box lists")
    H, W = image_size
    up = F.interpolate(cams[:, None].float(), size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    m = normalise_l1(up)  # B x H x W
    mask = boxes_mask(boxes, (H, W), device=cams.device)
    ch = (m * mask).flatten(1).sum(dim=1)
    has_box = torch.tensor([b.numel() > 0 for b in boxes], device=cams.device)
    return torch.where(has_box, ch, torch.full_like(ch, math.nan))


SALIENCIES = ("gradcam", "cmwp", "mwp")


def content_heatmap_saliency(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    boxes: Sequence[Tensor],
    image_size: tuple[int, int] | None = None,
    *,
    saliency: str = "gradcam",
    layer: str | None = None,
    window: int | None = None,
    classifier: str = "fc",
) -> Tensor:
    """CH per image (Tensor[B], NaN where left out) with the named saliency, in eval mode (mode restored).

    ``gradcam`` is the paper's CH; ``cmwp`` (contrastive excitation backprop)
    is Table 4's, ``mwp`` its non-contrastive form (``method/excitation.py``).
    images: B x 3 x H x W; targets: LongTensor[B], the ground-truth class;
    image_size: the size the maps are resized to, default the images' H x W.
    layer: default layer4 for Grad-CAM, layer3 for (c)MWP (TorchRay's ResNet
    setting); window and classifier: see ``excitation_backprop`` (the authors'
    Table 4 script: window 7). An all-zero map counts as uniform for Grad-CAM
    (the authors' Grad-CAM script) and is left out for (c)MWP (their cMWP
    script skips it).
    """
    if saliency not in SALIENCIES:
        raise ValueError(f"saliency={saliency!r}; choose one of {list(SALIENCIES)}")
    if saliency == "gradcam" and window is not None:
        raise ValueError(f"window={window} applies to cmwp/mwp only; leave it None for gradcam")
    was_training = model.training
    model.eval()
    try:
        if saliency == "gradcam":
            maps = gradcam(model, images, targets, layer=layer or "layer4")
        else:
            maps = excitation_backprop(model, images, targets, layer=layer or SALIENCY_LAYER,
                                       contrastive=saliency == "cmwp", window=window, classifier=classifier)
    finally:
        model.train(was_training)
    ch = content_heatmap(maps, boxes, image_size or tuple(images.shape[-2:]))
    if saliency == "gradcam":
        return ch
    return torch.where(maps.flatten(1).clamp(min=0).sum(dim=1) > 0, ch, torch.full_like(ch, math.nan))


def authors_blur_kernel(klen: int = 11, sigma: float = 5.0) -> Tensor:
    """The authors' ``gkern``: scipy's Gaussian filter (σ, reflect mode) of a klen x klen delta; klen x klen."""
    from scipy.ndimage import gaussian_filter

    delta = np.zeros((klen, klen))
    delta[klen // 2, klen // 2] = 1
    return torch.from_numpy(gaussian_filter(delta, sigma).astype(np.float32))


def _authors_blur(images: Tensor, klen: int, sigma: float) -> Tensor:
    """Each channel convolved with :func:`authors_blur_kernel`, zero padding (their ``conv2d(..., padding=klen//2)``)."""
    C = images.shape[1]
    k = authors_blur_kernel(klen, sigma).to(images)
    return F.conv2d(images, k.expand(C, 1, klen, klen), padding=klen // 2, groups=C)


@torch.no_grad()
def insertion_auc(
    model: nn.Module,
    images: Tensor,
    saliency: Tensor,
    *,
    protocol: str = "fast",
    pixels_per_step: int | None = None,
    blur_kernel: int = 11,
    blur_sigma: float = 5.0,
    chunk: int = 256,
) -> Tensor:
    """Insertion AUC (RISE) per image, in [0, 1], batched over images and steps.

    Starting from a blurred copy, pixels of the original are inserted in order
    of decreasing saliency, ``pixels_per_step`` at a time (default 8 rows' worth,
    1792 at 224 x 224: 28 steps, 29 scores). Score: softmax probability of the
    class predicted on the clean image. AUC by the trapezoid rule over [0, 1].
    The model runs in eval mode throughout and its mode is restored afterwards.

    protocol: ``fast`` blurs with torchvision's Gaussian (reflect padding) and
    orders pixels by a stable descending sort; ``authors`` reproduces the
    authors' script (docs/PAPER.md §5): their ``gkern`` with zero padding and
    ``np.flip(np.argsort(saliency))`` (NumPy's order of ties).
    images: B x 3 x H x W; saliency: B x h x w (any resolution, upsampled bilinearly).
    """
    if protocol not in ("fast", "authors"):
        raise ValueError(f"protocol={protocol!r}; choose 'fast' or 'authors'")
    was_training = model.training
    model.eval()
    try:
        B, _, H, W = images.shape
        n_pix = H * W
        step = pixels_per_step or 8 * W
        n_steps = math.ceil(n_pix / step)
        sal = F.interpolate(saliency[:, None].float(), size=(H, W), mode="bilinear", align_corners=False)
        if protocol == "fast":
            order = sal.flatten(1).argsort(dim=1, descending=True, stable=True)  # B x HW
            blurred = gaussian_blur(images, [blur_kernel, blur_kernel], [blur_sigma, blur_sigma])
        else:
            flat = sal.flatten(1).cpu().numpy()
            order = torch.from_numpy(np.stack([np.flip(np.argsort(f)).copy() for f in flat])).to(images.device)
            blurred = _authors_blur(images, blur_kernel, blur_sigma)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(n_pix, device=images.device).expand(B, -1))
        target = model(images).argmax(dim=1)  # B
        counts = torch.clamp(torch.arange(n_steps + 1, device=images.device) * step, max=n_pix)  # S
        scores = torch.empty(B, n_steps + 1, device=images.device)
        pairs = torch.arange(B * (n_steps + 1), device=images.device)  # every (image, step)
        for start in range(0, pairs.numel(), chunk):
            bs = pairs[start : start + chunk] // (n_steps + 1)
            ss = pairs[start : start + chunk] % (n_steps + 1)
            keep = (rank[bs] < counts[ss, None]).view(-1, 1, H, W).to(images.dtype)
            canvas = blurred[bs] * (1 - keep) + images[bs] * keep
            p = model(canvas).softmax(dim=1).gather(1, target[bs, None])[:, 0]
            scores[bs, ss] = p.float()
        return (scores.sum(dim=1) - scores[:, 0] / 2 - scores[:, -1] / 2) / n_steps
    finally:
        model.train(was_training)
