"""The CGC term of ``L = L_CE + lam * L_CGC``: one module, readable next to the paper (eq. 2).

:class:`MethodConfig` says what is optimised; :func:`cgc_term` computes, for a
batch x, the logits of x, the loss L_CGC between T(g(x)) and g(T(x)) and the
number of all-zero heatmaps. Grad-CAM ``g`` is :mod:`cgc_ray.method.cam`, the
transform ``T`` :mod:`cgc_ray.method.transforms`, the contrastive loss
:mod:`cgc_ray.method.loss`. Every field of MethodConfig is required: its
defaults live in the spec (``cgc_ray.config.MethodSpec``), nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cgc_ray.method import transforms as T
from cgc_ray.method.cam import cams_from_activation, capture
from cgc_ray.method.loss import cgc_loss

MethodName = Literal["baseline", "cgc", "cgc_no_neg"]


@dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """What is optimised: ``CE`` (baseline) or ``CE + lam * L_CGC``.

    name:        baseline | cgc | cgc_no_neg (the paper's ablation without negatives).
    lam, tau:    the paper's lambda and temperature.
    resolution:  where heatmaps are compared: "image" (upsampled to the input
                 size, as the authors) or "feature" (the layer's own h x w, faster).
    anchor:      "paper" (eq. 2) or "authors" (UCDvision/CGC's negatives).
    global_negatives: negatives from every torch.distributed rank.
    layer:       the Grad-CAM layer.
    crop_scale:  area range of T's random resized crop.
    forward:     "joint" (the views in one batch) or "separate" (one forward a view, as the authors).
    view:        the image T is applied to: "train" (the training view) or "center" (a centre view).
    no_neg_scale: the l2 term of cgc_no_neg summed ("sum") or averaged ("mean") over pixels.
    cam_class:   "pred" (top-1 on the un-transformed image, the paper) or "label".
    The meaning of each, and why the defaults, is in ``cgc_ray.config.MethodSpec``.
    """

    name: MethodName
    lam: float
    tau: float
    resolution: Literal["image", "feature"]
    anchor: Literal["paper", "authors"]
    global_negatives: bool
    layer: str
    crop_scale: tuple[float, float]
    forward: Literal["joint", "separate"]
    view: Literal["train", "center"]
    no_neg_scale: Literal["sum", "mean"]
    cam_class: Literal["pred", "label"]

    def __post_init__(self) -> None:
        if self.name not in ("baseline", "cgc", "cgc_no_neg"):
            raise ValueError(f"method.name={self.name!r}; choose baseline, cgc or cgc_no_neg")
        if not self.lam >= 0:
            raise ValueError(f"method.lam={self.lam} must be >= 0")
        if not self.tau > 0:
            raise ValueError(f"method.tau={self.tau} must be > 0")
        if self.resolution not in ("image", "feature"):
            raise ValueError(f"method.resolution={self.resolution!r}; choose 'image' or 'feature'")
        for field, allowed in (("forward", ("joint", "separate")), ("view", ("train", "center")),
                               ("no_neg_scale", ("sum", "mean")), ("cam_class", ("pred", "label"))):
            if getattr(self, field) not in allowed:
                raise ValueError(f"method.{field}={getattr(self, field)!r}; choose one of {allowed}")

    @property
    def uses_cgc(self) -> bool:
        return self.name != "baseline" and self.lam > 0


# What checkpoints written before a field existed computed (the then only behaviour).
_RECORD_DEFAULTS = {"forward": "joint", "view": "train", "no_neg_scale": "sum", "cam_class": "pred"}


def method_config_from_record(fields: dict) -> MethodConfig:
    """The MethodConfig a checkpoint recorded (``dataclasses.asdict`` of it; lists back to tuples)."""
    return MethodConfig(**{**_RECORD_DEFAULTS, **fields, "crop_scale": tuple(fields["crop_scale"])})


def _views_forward(model: nn.Module, views: list[Tensor], method: MethodConfig, amp_dtype: torch.dtype | None):
    """Activations and logits of each view: one forward of the stacked views, or one forward each."""
    dev = views[0].device.type
    with torch.autocast(dev, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        if method.forward == "joint":
            with capture(model, method.layer) as feat:
                logits = model(torch.cat(views))  # nB x K
            return [feat.value], [logits]
        feats, logits = [], []
        for v in views:
            with capture(model, method.layer) as feat:
                logits.append(model(v))
            feats.append(feat.value)
        return feats, logits


def cgc_term(
    model: nn.Module,
    x: Tensor,
    method: MethodConfig,
    *,
    y: Tensor | None = None,
    x_center: Tensor | None = None,
    generator: torch.Generator | None = None,
    create_graph: bool = True,
    amp_dtype: torch.dtype | None = None,
    closed_form: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(logits of x B x K for the cross-entropy, L_CGC, number of all-zero heatmaps g(·) of the CGC image).

    x: the training view, B x 3 x H x W. The CGC image is x (``method.view``
    "train") or ``x_center`` ("center"); T is sampled per image and applied to
    it. The class t of both heatmaps is the top-1 prediction on the CGC image
    (or ``y`` with ``method.cam_class`` "label"). Both heatmaps carry
    gradients. ``closed_form=False`` forces the autograd Grad-CAM path (for
    benchmarks).
    """
    if method.view == "center" and x_center is None:
        raise ValueError("method.view='center' needs the centre view of each training image (x_center)")
    src = x_center if method.view == "center" else x
    B, _, H, W = src.shape
    params = T.sample_params(B, (H, W), scale=method.crop_scale, generator=generator, device=x.device)
    xt = T.apply(src, params)  # T(x), B x 3 x H x W
    views = [x, xt] if method.view == "train" else [x, src, xt]
    i_src = 1 if method.view == "center" else 0  # where the CGC image sits among the views
    feats, logits = _views_forward(model, views, method, amp_dtype)
    logits_all = torch.cat(logits)  # nB x K, in view order
    if method.cam_class == "label":
        if y is None:
            raise ValueError("method.cam_class='label' needs the labels y of the batch")
        t = y
    else:
        t = logits_all[i_src * B:(i_src + 1) * B].detach().argmax(dim=1)  # B
    with torch.autocast(x.device.type, enabled=False):
        if method.forward == "joint":
            cams = cams_from_activation(
                model, feats[0], logits[0], t.repeat(len(views)), layer=method.layer,
                create_graph=create_graph, closed_form=closed_form,
            )  # nB x h x w
            g_x, g_Tx = cams[i_src * B:(i_src + 1) * B], cams[-B:]
        else:
            g_x, g_Tx = (cams_from_activation(model, feats[i], logits[i], t, layer=method.layer,
                                              create_graph=create_graph, closed_form=closed_form)
                         for i in (i_src, len(views) - 1))  # B x h x w each
        size = (H, W) if method.resolution == "image" else tuple(g_x.shape[-2:])
        q = T.apply(g_x, params, size)  # T_i(g(x_i)), B x size
        k = g_Tx if size == tuple(g_Tx.shape[-2:]) else F.interpolate(
            g_Tx[:, None], size=size, mode="bilinear", align_corners=False
        )[:, 0]  # g(T_i(x_i)), B x size
        loss = cgc_loss(
            k,
            q,
            tau=method.tau,
            negatives=method.name != "cgc_no_neg",
            anchor=method.anchor,
            global_negatives=method.global_negatives,
            l2_reduction=method.no_neg_scale,
        )
    zeros = (g_x.flatten(1).sum(dim=1) == 0).sum()
    return logits_all[:B].float(), loss, zeros
