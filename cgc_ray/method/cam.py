"""Grad-CAM, differentiable, for training and evaluation.

Grad-CAM of image x for class t at layer activation A (B x C x h x w):

    g(x) = ReLU( sum_k alpha_k A_k ),   alpha_k = mean_ij d y_t / d A_k,ij

When A feeds a global-average-pool + linear head (every torchvision ResNet at
``layer4``), ``d y_t / d A_k,ij = W[t, k] / (h w)`` is constant over space, so

    g(x) = ReLU( einsum('bk,bkij->bij', W[t], A) ) / (h w)

exactly, with no ``autograd.grad``; the parameter gradients of a loss built on
it are the same too (the head's gradient does not depend on A). Every other
layer/head goes through ``torch.autograd.grad(..., create_graph=...)``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import ResNet


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel/DataParallel wrapper."""
    return getattr(model, "module", model)


def resolve_layer(model: nn.Module, layer: str) -> nn.Module:
    try:
        return unwrap(model).get_submodule(layer)
    except AttributeError as e:
        names = [n for n, m in unwrap(model).named_modules() if isinstance(m, nn.Conv2d) or n.startswith("layer")]
        raise ValueError(
            f"layer={layer!r} is not a submodule of {type(unwrap(model)).__name__}; "
            f"pick one of its named modules, e.g. {names[-5:]}"
        ) from e


def linear_head(model: nn.Module, layer: str) -> nn.Linear | None:
    """The linear head W when ``layer`` feeds global-average-pool + linear, else None."""
    m = unwrap(model)
    if isinstance(m, ResNet) and layer == "layer4":
        pool = m.avgpool
        if isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size in (1, (1, 1)) and isinstance(m.fc, nn.Linear):
            return m.fc
    return None


class _Capture:
    value: Tensor | None = None


@contextmanager
def capture(model: nn.Module, layer: str) -> Iterator[_Capture]:
    """Capture the activation of ``layer`` during forwards inside the block.

    The hook hands a clone downstream, so an in-place op right after the layer
    (VGG's ``ReLU(inplace=True)``) cannot overwrite the captured activation;
    gradients still flow back through the clone to it.
    """
    box = _Capture()

    def hook(_module: nn.Module, _inp: tuple, out: Tensor) -> Tensor:
        box.value = out
        return out.clone()

    handle = resolve_layer(model, layer).register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def cams_from_activation(
    model: nn.Module,
    A: Tensor,
    logits: Tensor,
    targets: Tensor,
    *,
    layer: str = "layer4",
    create_graph: bool = False,
    closed_form: bool | None = None,
) -> Tensor:
    """Grad-CAM maps B x h x w from a captured activation A (B x C x h x w).

    ``closed_form=None`` picks the exact closed form whenever it applies.
    """
    head = linear_head(model, layer) if closed_form is not False else None
    if closed_form and head is None:
        raise ValueError(f"the closed-form CAM needs a ResNet read at layer4; got layer={layer!r}")
    h, w = A.shape[-2:]
    # maps in float32 whatever autocast produced; the gradient is taken w.r.t. A itself (a cast copy of A
    # is not in the graph of the logits)
    if head is not None:
        W_t = head.weight[targets].float()  # B x C
        cam = torch.einsum("bk,bkij->bij", W_t, A.float()) / (h * w)
        cam = F.relu(cam)
        return cam if create_graph else cam.detach()
    score = logits.float().gather(1, targets[:, None]).sum()
    (dA,) = torch.autograd.grad(score, A, create_graph=create_graph, retain_graph=True)
    alpha = dA.float().mean(dim=(2, 3), keepdim=True)  # B x C x 1 x 1
    cam = F.relu((alpha * A.float()).sum(dim=1))  # B x h x w
    return cam if create_graph else cam.detach()


def gradcam(
    model: nn.Module,
    images: Tensor,
    targets: Tensor | None = None,
    *,
    layer: str = "layer4",
    create_graph: bool = False,
    closed_form: bool | None = None,
) -> Tensor:
    """ReLU'd Grad-CAM B x h x w at the layer's resolution, not normalised.

    images: B x 3 x H x W; targets: LongTensor[B], or None for the model's top-1
    prediction on ``images``. With ``create_graph=True`` the maps are
    differentiable w.r.t. the model's parameters (for a training loss).
    """
    cams, _, _ = cam_and_logits(
        model, images, targets=targets, layer=layer, create_graph=create_graph, closed_form=closed_form
    )
    return cams


def cam_and_logits(
    model: nn.Module,
    images: Tensor,
    *,
    targets: Tensor | None = None,
    layer: str = "layer4",
    create_graph: bool = False,
    closed_form: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One forward: (cams B x h x w, logits B x K, targets B)."""
    if targets is not None and targets.shape != images.shape[:1]:
        raise ValueError(f"targets must be a LongTensor of shape [{images.shape[0]}], got {tuple(targets.shape)}")
    needs_grad = create_graph or linear_head(model, layer) is None or closed_form is False
    with torch.set_grad_enabled(torch.is_grad_enabled() or needs_grad), capture(model, layer) as feat:
        logits = model(images)
        if targets is None:
            targets = logits.detach().argmax(dim=1)
        cams = cams_from_activation(
            model, feat.value, logits, targets, layer=layer, create_graph=create_graph, closed_form=closed_form
        )
    return cams, (logits if create_graph else logits.detach()), targets
