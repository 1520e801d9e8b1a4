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
    """

    name: MethodName
    lam: float
    tau: float
    resolution: Literal["image", "feature"]
    anchor: Literal["paper", "authors"]
    global_negatives: bool
    layer: str
    crop_scale: tuple[float, float]

    def __post_init__(self) -> None:
        if self.name not in ("baseline", "cgc", "cgc_no_neg"):
            raise ValueError(f"method.name={self.name!r}; choose baseline, cgc or cgc_no_neg")
        if not self.lam >= 0:
            raise ValueError(f"method.lam={self.lam} must be >= 0")
        if not self.tau > 0:
            raise ValueError(f"method.tau={self.tau} must be > 0")
        if self.resolution not in ("image", "feature"):
            raise ValueError(f"method.resolution={self.resolution!r}; choose 'image' or 'feature'")

    @property
    def uses_cgc(self) -> bool:
        return self.name != "baseline" and self.lam > 0


def method_config_from_record(fields: dict) -> MethodConfig:
    """The MethodConfig a checkpoint recorded (``dataclasses.asdict`` of it; lists back to tuples)."""
    return MethodConfig(**{**fields, "crop_scale": tuple(fields["crop_scale"])})


def cgc_term(
    model: nn.Module,
    x: Tensor,
    method: MethodConfig,
    *,
    generator: torch.Generator | None = None,
    create_graph: bool = True,
    amp_dtype: torch.dtype | None = None,
    closed_form: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One forward of [x ; T(x)]: (logits of x B x K, L_CGC, number of all-zero g(x)).

    The class t of both views is the top-1 prediction on x. Both heatmaps carry
    gradients; the views share one forward (BatchNorm sees both).
    ``closed_form=False`` forces the autograd Grad-CAM path (for benchmarks).
    """
    B, _, H, W = x.shape
    params = T.sample_params(B, (H, W), scale=method.crop_scale, generator=generator, device=x.device)
    xt = T.apply(x, params)  # B x 3 x H x W
    with capture(model, method.layer) as feat:
        with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(torch.cat([x, xt]))  # 2B x K
    t = logits[:B].detach().argmax(dim=1)  # B
    with torch.autocast(x.device.type, enabled=False):
        cams = cams_from_activation(
            model, feat.value.float(), logits.float(), torch.cat([t, t]), layer=method.layer,
            create_graph=create_graph, closed_form=closed_form,
        )  # 2B x h x w
        g_x, g_Tx = cams[:B], cams[B:]
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
        )
    zeros = (g_x.flatten(1).sum(dim=1) == 0).sum()
    return logits[:B].float(), loss, zeros
