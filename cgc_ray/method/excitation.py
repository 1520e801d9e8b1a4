"""Excitation backprop (Zhang et al., ECCV 2016): MWP and contrastive MWP (cMWP) maps, as TorchRay computes them.

Marginal Winning Probability. A top-down pass sends the probability mass p of
each output neuron i of a linear layer (conv, linear, average pooling) to its
inputs x_j in proportion to their positive excitation:

    p'_j = x_j * sum_i W+_ij p_i / z_i,     z_i = sum_k W+_ik x_k,   W+ = max(W, 0), no bias

Every other layer follows TorchRay (``torchray.attribution.excitation_backprop``,
the code behind the paper's Table 4):

- ReLU and max-pooling keep their ordinary gradient: ReLU passes p where it
  fired, a max-pool sends each window's p to its winner (MWP with one winner).
- BatchNorm passes p through unchanged (TorchRay's choice: its scale and shift
  are ignored rather than folded into the preceding conv's W+).
- A residual sum r + i splits p in proportion to the summands:
  p_r = p r / (r + i), p_i = p i / (r + i) (TorchRay's ``update_resnet``).

Contrastive MWP: the same pass from the classifier's dual (the target row of W
negated) gives a second map; cMWP = ReLU(sum over channels of
MWP_t - MWP_dual) at the saliency layer. Every rule is linear in p, so this is
exactly TorchRay's subtraction at ``contrast_layer`` followed by the pass down.
Nothing here changes the model: the rules hold only inside :func:`mwp_rules`.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from functools import partial
from types import MethodType
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from cgc_ray.method.cam import resolve_layer, unwrap

# TorchRay's (and the Caffe original's) guard in p / (z + eps): z = 0 only where every input x is 0,
# and there the rule hands back x * (...) = 0 anyway
_EPS = 1e-20

# layers whose ordinary gradient is already the MWP rule, and containers whose forward we know
_GRADIENT_RULE = (nn.ReLU, nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.Identity, nn.Flatten, nn.Dropout)
_CONTAINERS = (nn.Sequential, ResNet, BasicBlock, Bottleneck)

# TorchRay's benchmark layer for ResNet50 (examples/attribution_benchmark.py: saliency at layer3, contrast at
# avgpool), which the authors' Table 4 script keeps (UCDvision/CGC, TorchRay/torchray/benchmark/
# evaluate_imagenet_excitation_backprop_energy_inside_bbox.py)
SALIENCY_LAYER = "layer3"


class _Excite(torch.autograd.Function):
    """y = f(x) forward; MWP backward: p -> x * J^T (p / (f+(x) + eps)), f+ = f with W+ and no bias."""

    @staticmethod
    def forward(ctx, x: Tensor, f: Callable[[Tensor], Tensor], f_pos: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.f_pos = f_pos
        ctx.save_for_backward(x)
        return f(x)

    @staticmethod
    def backward(ctx, p: Tensor) -> tuple[Tensor, None, None]:
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            z = ctx.f_pos(x)
            (g,) = torch.autograd.grad(z, x, p / (z + _EPS))  # W+^T (p / z): f+ is linear in x
        return x.detach() * g, None, None


class _PassThrough(torch.autograd.Function):
    """y = f(x) forward; p passes back unchanged (TorchRay's BatchNorm rule)."""

    @staticmethod
    def forward(ctx, x: Tensor, f: Callable[[Tensor], Tensor]) -> Tensor:
        return f(x)

    @staticmethod
    def backward(ctx, p: Tensor) -> tuple[Tensor, None]:
        return p, None


class _ResidualSum(torch.autograd.Function):
    """y = r + i forward; p splits in proportion to the summands (0 where r + i = 0, which ReLU zeroes anyway)."""

    @staticmethod
    def forward(ctx, r: Tensor, i: Tensor) -> Tensor:
        ctx.save_for_backward(r, i)
        return r + i

    @staticmethod
    def backward(ctx, p: Tensor) -> tuple[Tensor, Tensor]:
        r, i = ctx.saved_tensors
        s = r + i
        q = torch.where(s != 0, p / torch.where(s != 0, s, 1), 0)
        return q * r, q * i


# torchvision's block forwards with `out += identity` made a _ResidualSum; kept in step with torchvision 0.2x
def _basic_block_forward(self: BasicBlock, x: Tensor) -> Tensor:
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(_ResidualSum.apply(out, identity))


def _bottleneck_forward(self: Bottleneck, x: Tensor) -> Tensor:
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(_ResidualSum.apply(out, identity))


def _rule(m: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """The MWP forward for module m, or None where its own forward already has the MWP gradient."""
    f = m.forward
    if isinstance(m, nn.Conv2d):
        return lambda x: _Excite.apply(x, f, lambda x: m._conv_forward(x, m.weight.detach().clamp(min=0), None))
    if isinstance(m, nn.Linear):
        return lambda x: _Excite.apply(x, f, lambda x: F.linear(x, m.weight.detach().clamp(min=0)))
    if isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        return lambda x: _Excite.apply(x, f, f)  # pooling weights are positive already
    if isinstance(m, nn.BatchNorm2d):
        return lambda x: _PassThrough.apply(x, f)
    if isinstance(m, BasicBlock):
        return MethodType(_basic_block_forward, m)
    if isinstance(m, Bottleneck):
        return MethodType(_bottleneck_forward, m)
    if isinstance(m, _GRADIENT_RULE + _CONTAINERS):
        return None
    raise ValueError(
        f"excitation backprop has no rule for {type(m).__name__}; it supports Conv2d, Linear, BatchNorm2d, "
        f"(Adaptive)AvgPool2d, {', '.join(t.__name__ for t in _GRADIENT_RULE)} inside "
        f"{', '.join(t.__name__ for t in _CONTAINERS)}: use a torchvision ResNet or add a rule here"
    )


@contextmanager
def mwp_rules(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, backward passes through ``model`` follow the MWP rules (module docstring).

    The forwards are patched per module instance and restored on exit; weights,
    buffers and the train/eval mode are not touched. Forward outputs are unchanged.
    """
    net = unwrap(model)
    patched: dict[nn.Module, object] = {}
    try:
        for name, m in net.named_modules():
            try:
                rule = _rule(m)
            except ValueError as e:
                raise ValueError(f"module {name or '<root>'!r}: {e}") from None
            if rule is not None:
                patched[m] = m.__dict__.get("forward")  # None: the class's forward
                m.forward = rule
        yield net
    finally:
        for m, own in patched.items():
            if own is None:
                del m.forward
            else:
                m.forward = own


class _Probe:
    value: Tensor | None = None
    calls: int = 0


@contextmanager
def _probe(model: nn.Module, layer: str, *, output: bool) -> Iterator[_Probe]:
    """The output (or input) of ``layer`` in the forward inside the block, as a tensor autograd can reach."""
    box = _Probe()
    module = resolve_layer(model, layer)

    def keep(t: Tensor) -> Tensor:
        box.calls += 1
        box.value = t if t.requires_grad else t.detach().requires_grad_()  # never the caller's tensor itself
        return box.value.clone()  # an in-place op downstream (ReLU(inplace=True)) must not overwrite the probe

    if output:
        handle = module.register_forward_hook(lambda _m, _inp, out: keep(out))
    else:
        handle = module.register_forward_pre_hook(lambda _m, inp: (keep(inp[0]), *inp[1:]))
    try:
        yield box
    finally:
        handle.remove()


def _excite_head(f: Tensor, W: Tensor, targets: Tensor, seed: Tensor) -> Tensor:
    """MWP of the classifier rows W[t] at their input: f B x C x L, W K x C, seed B x L -> p B x C x L."""
    w = W[targets].clamp(min=0)[:, :, None]  # B x C x 1
    z = (w * f).sum(dim=1, keepdim=True)  # B x 1 x L
    return f * w * seed[:, None] / (z + _EPS)


def excitation_backprop(
    model: nn.Module,
    images: Tensor,
    targets: Tensor | None = None,
    *,
    layer: str = SALIENCY_LAYER,
    contrastive: bool = True,
    classifier: str = "fc",
    window: int | None = None,
) -> Tensor:
    """cMWP (or MWP with ``contrastive=False``) maps B x h x w at the output of ``layer``, detached.

    images: B x 3 x H x W; targets: LongTensor[B], or None for the top-1
    prediction. ``classifier`` names the last Linear layer, whose target row
    seeds the pass with mass 1. MWP maps are the summed channel mass (on a
    ResNet a residual split can leave a little of it negative); cMWP maps are
    clamped at 0.

    window: None uses the model's own head. An int k reproduces TorchRay's
    benchmark head on a ResNet, as the authors' Table 4 script does: the
    global pool becomes a k x k stride-1 average pool, ``fc`` is applied at
    every position, and the seed is the softmax over positions of the target's
    scores (``get_pointing_gradient``). At 224 px (7 x 7 at layer4) k = 7 is
    the model's own head. The model runs in eval mode; its mode is restored.
    """
    net = unwrap(model)
    if targets is not None and targets.shape != images.shape[:1]:
        raise ValueError(f"targets must be a LongTensor of shape [{images.shape[0]}], got {tuple(targets.shape)}")
    head = resolve_layer(net, classifier)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"classifier={classifier!r} is a {type(head).__name__}; name the model's last nn.Linear")
    if window is not None and not isinstance(net, ResNet):
        raise ValueError(f"window={window} needs a torchvision ResNet (avgpool + fc); got {type(net).__name__}")
    was_training = net.training
    net.eval()
    try:
        with ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            stack.enter_context(mwp_rules(net))
            sal = stack.enter_context(_probe(net, layer, output=True))
            top = stack.enter_context(_probe(net, classifier if window is None else "avgpool", output=False))
            logits = net(images)
            if sal.calls != 1:
                raise ValueError(f"layer={layer!r} ran {sal.calls} times in one forward; pick a module that runs once")
            if targets is None:
                targets = logits.detach().argmax(dim=1)
            f, seed = _head_input(top.value, head, targets, window)
            p = _excite_head(f, head.weight.detach(), targets, seed)
            if contrastive:
                p = p - _excite_head(f, -head.weight.detach(), targets, seed)
            (mass,) = torch.autograd.grad(f, sal.value, p, allow_unused=True)
    finally:
        net.train(was_training)
    if mass is None:
        raise ValueError(f"layer={layer!r} does not feed classifier={classifier!r}; pick a layer below it")
    maps = mass.detach().sum(dim=1, dtype=torch.promote_types(mass.dtype, torch.float32))  # B x h x w
    return maps.clamp(min=0) if contrastive else maps


def _head_input(x: Tensor, head: nn.Linear, targets: Tensor, window: int | None) -> tuple[Tensor, Tensor]:
    """(f B x C x L, seed B x L): what the classifier reads at each of L positions, and the mass each seeds."""
    if window is None:
        if x.dim() != 2:
            raise ValueError(f"the classifier's input is {tuple(x.shape)}; excitation backprop expects B x C")
        return x[:, :, None], torch.ones(x.shape[0], 1, device=x.device, dtype=x.dtype)
    pool = partial(F.avg_pool2d, kernel_size=window, stride=1)  # its weights are positive: f+ = f
    f = _Excite.apply(x, pool, pool).flatten(2)  # B x C x L
    scores = torch.einsum("bc,bcl->bl", head.weight[targets], f)  # B x L
    if head.bias is not None:
        scores = scores + head.bias[targets, None]
    return f, scores.detach().softmax(dim=1)
