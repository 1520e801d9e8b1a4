"""The CGC term of ``L = L_CE + lam * L_CGC``: one module, readable next to the paper (eq. 2).

:func:`cgc_term` computes, for a batch x, L_CGC between T(g(x)) and g(T(x)),
the logits of every view it forwarded and the number of all-zero heatmaps;
:func:`heatmap_pair` is the part that makes the two compared heatmaps (the
consistency figure draws them). Grad-CAM ``g`` is :mod:`cgc_ray.method.cam`,
the transform ``T`` :mod:`cgc_ray.method.transforms`, the contrastive loss
:mod:`cgc_ray.method.loss`.

``method`` is the spec's ``cgc_ray.config.MethodSpec``, read as it is: its
fields are the settings' one home (with their meaning and defaults); this
module imports no pydantic, only reads the fields. What the spec's method
section does not hold is passed beside it: the Grad-CAM ``layer``
(``model.layer``).

With ``method.negatives_group`` the batch is cut into :func:`groups`, each
computed alone (its forwards, BatchNorm statistics and negatives) as one GPU
chunk of the authors' DataParallel; L_CGC is the mean over groups.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cgc_ray.method import transforms as T
from cgc_ray.method.cam import cams_from_activation, capture
from cgc_ray.method.loss import cgc_loss

if TYPE_CHECKING:  # for type checkers only: at run time any object with these fields will do
    from cgc_ray.config import MethodSpec

UNIFORM_EPS = 1e-8  # the authors' m / (sum m + eps) + eps (models/utils.py, compute_gradcam_mask)


class HeatmapPair(NamedTuple):
    """The two heatmaps the CGC loss compares, and what the forward passes gave on the way.

    q: T_i(g(x_i)), B x S (S: the image size, or h x w with ``resolution="feature"``);
    k: g(T_i(x_i)), B x S; logits: one B x K fp32 tensor per view, in forward
    order (x, [the centre view,] T(x)); target: B, the class both maps explain;
    g_x: B x h x w, the heatmaps of the image T was applied to.
    """

    q: Tensor
    k: Tensor
    logits: tuple[Tensor, ...]
    target: Tensor
    g_x: Tensor


class CGCTerm(NamedTuple):
    """L_CGC of a batch (the mean over its groups); ``logits`` of every view (``logits[0]``: the training
    view x, B x K fp32); ``zeros``: the number of all-zero heatmaps g(·) of the image T was applied to;
    ``groups``: the batch's groups (:func:`groups`), over which cross-entropy is averaged alike."""

    loss: Tensor
    logits: tuple[Tensor, ...]
    zeros: Tensor
    groups: tuple[slice, ...]


def groups(batch: int, size: int | None) -> tuple[slice, ...]:
    """Consecutive groups of ``size`` images of a batch (None: one group of all). A last group of one image
    joins the one before it: the contrastive loss needs two (the authors' code crashes on such a chunk)."""
    if size is None or size >= batch:
        return (slice(0, batch),)
    starts = list(range(0, batch, size))
    if batch - starts[-1] == 1:
        starts.pop()
    return tuple(slice(a, b) for a, b in zip(starts, starts[1:] + [batch]))


def _upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """B x h x w -> B x size, bilinear (align_corners False, as ``F.interpolate``'s default the authors use)."""
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _uniform_when_zero(maps: Tensor) -> Tensor:
    """m / (sum m + eps) + eps per map (B x h x w): the authors' normalisation, which makes a zero map uniform."""
    return maps / (maps.sum(dim=(1, 2), keepdim=True) + UNIFORM_EPS) + UNIFORM_EPS


def _views_forward(model: nn.Module, views: list[Tensor], method: MethodSpec, layer: str,
                   amp_dtype: torch.dtype | None) -> tuple[list[Tensor], list[Tensor]]:
    """Activations and logits of each view: one forward of the stacked views, or one forward each."""
    dev = views[0].device.type
    with torch.autocast(dev, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        if method.forward == "joint":
            with capture(model, layer) as feat:
                logits = model(torch.cat(views))  # nB x K
            return [feat.value], [logits]
        feats, logits = [], []
        for v in views:
            with capture(model, layer) as feat:
                logits.append(model(v))
            feats.append(feat.value)
        return feats, logits


def heatmap_pair(
    model: nn.Module,
    x: Tensor,
    method: MethodSpec,
    params: T.CropFlip,
    *,
    layer: str,
    y: Tensor | None = None,
    x_center: Tensor | None = None,
    create_graph: bool = True,
    amp_dtype: torch.dtype | None = None,
    closed_form: bool | None = None,
) -> HeatmapPair:
    """T(g(x)) and g(T(x)) for the transform ``params`` (one crop and flip per image), as the loss compares them.

    x: the training view, B x 3 x H x W. The image T is applied to is x
    (``method.view`` "train") or ``x_center`` ("center"). The class t of both
    heatmaps is the top-1 prediction on that image (or ``y`` with
    ``method.cam_class`` "label"). Both heatmaps carry gradients; they are
    made per ``method.cam_transform`` and ``method.zero_cam``. The batch is
    one group: :func:`cgc_term` cuts a batch into ``method.negatives_group``.
    ``closed_form=False`` forces the autograd Grad-CAM path (for benchmarks).
    """
    if method.view == "center" and x_center is None:
        raise ValueError("method.view='center' needs the centre view of each training image (x_center)")
    src = x_center if method.view == "center" else x
    B, _, H, W = src.shape
    xt = T.apply(src, params)  # T(x), B x 3 x H x W
    views = [x, xt] if method.view == "train" else [x, src, xt]
    i_src = 1 if method.view == "center" else 0  # where the image T was applied to sits among the views
    feats, logits = _views_forward(model, views, method, layer, amp_dtype)
    logits_all = torch.cat(logits)  # nB x K, in view order
    if method.cam_class == "label":
        if y is None:
            raise ValueError("method.cam_class='label' needs the labels y of the batch")
        t = y
    else:
        t = logits_all[i_src * B:(i_src + 1) * B].detach().argmax(dim=1)  # B
    with torch.autocast(x.device.type, enabled=False):
        cam = lambda f, lg, tt: cams_from_activation(model, f, lg, tt, layer=layer, create_graph=create_graph,
                                                      closed_form=closed_form)
        if method.forward == "joint":
            cams = cam(feats[0], logits[0], t.repeat(len(views)))  # nB x h x w
            g_x, g_Tx = cams[i_src * B:(i_src + 1) * B], cams[-B:]
        else:
            g_x, g_Tx = (cam(feats[i], logits[i], t) for i in (i_src, len(views) - 1))  # B x h x w each
        size = (H, W) if method.resolution == "image" else tuple(g_x.shape[-2:])
        upsampled = method.cam_transform == "upsampled"  # T slices the box of the image-size map (the authors)
        m_x, m_Tx = (_upsample(g, size) for g in (g_x, g_Tx)) if upsampled else (g_x, g_Tx)
        if method.zero_cam == "uniform":
            m_x, m_Tx = _uniform_when_zero(m_x), _uniform_when_zero(m_Tx)
        q = T.apply(m_x, params, size, within_box=upsampled)  # T_i(g(x_i)), B x size
        k = m_Tx if size == tuple(m_Tx.shape[-2:]) else _upsample(m_Tx, size)  # g(T_i(x_i)), B x size
    return HeatmapPair(q, k, tuple(v.float() for v in logits_all.split(B)), t, g_x)


def cgc_term(
    model: nn.Module,
    x: Tensor,
    method: MethodSpec,
    *,
    layer: str,
    y: Tensor | None = None,
    x_center: Tensor | None = None,
    generator: torch.Generator | None = None,
    create_graph: bool = True,
    amp_dtype: torch.dtype | None = None,
    closed_form: bool | None = None,
) -> CGCTerm:
    """L_CGC of the batch x (B x 3 x H x W): T drawn per image from ``generator``, then per group
    (:func:`groups` of ``method.negatives_group``) :func:`heatmap_pair` (whose arguments these are) and the
    contrastive loss of ``method`` (or its l2 ablation); the mean over groups."""
    src = x_center if method.view == "center" and x_center is not None else x
    B, _, H, W = src.shape
    params = T.sample_params(B, (H, W), scale=method.crop_scale, generator=generator, device=x.device)
    parts = groups(B, method.negatives_group)
    losses, logits, zeros = [], [], []
    for s in parts:
        pair = heatmap_pair(model, x[s], method, T.CropFlip(params.boxes[s], params.flip[s]), layer=layer,
                            y=None if y is None else y[s], x_center=None if x_center is None else x_center[s],
                            create_graph=create_graph, amp_dtype=amp_dtype, closed_form=closed_form)
        with torch.autocast(x.device.type, enabled=False):
            losses.append(cgc_loss(
                pair.k,
                pair.q,
                tau=method.tau,
                negatives=method.name != "cgc_no_neg",
                anchor=method.anchor,
                global_negatives=method.negatives == "global",
                l2_reduction=method.no_neg_scale,
            ))
        logits.append(pair.logits)
        zeros.append((pair.g_x.flatten(1).sum(dim=1) == 0).sum())
    view_logits = tuple(torch.cat(v) for v in zip(*logits))  # per view, B x K in batch order
    return CGCTerm(torch.stack(losses).mean(), view_logits, torch.stack(zeros).sum(), parts)
