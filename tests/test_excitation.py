"""Excitation backprop (MWP / cMWP): against TorchRay, against a NumPy transcription of the MWP formulas, invariants."""

import copy
import math
import types

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from cgc_ray.method.cam import gradcam
from cgc_ray.method.excitation import excitation_backprop, mwp_rules
from cgc_ray.method.metrics import content_heatmap, content_heatmap_saliency
from cgc_ray.models.resnet import build_model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _resnet(arch: str = "resnet_small", seed: int = 0) -> nn.Module:
    """A random ResNet whose BatchNorms are not the identity (eval mode would otherwise hide the BN rule).

    "bottleneck" is a ResNet50 cut to one block per stage (ResNet50's own blocks, a fraction of its time).
    """
    torch.manual_seed(seed)
    model = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=5) if arch == "bottleneck" else build_model(arch, 5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    return model


# --------------------------------------------------------------------------- TorchRay as the oracle


def _torchray_fc_head(model: nn.Module, k: int) -> nn.Module:
    """The authors' Table 4 model: fc as a 1x1 conv over a k x k stride-1 average pool (their ``resnet_to_fc``)."""
    m = copy.deepcopy(model)
    conv = nn.Conv2d(m.fc.in_features, m.fc.out_features, 1)
    conv.weight.data.copy_(m.fc.weight[:, :, None, None])
    conv.bias.data.copy_(m.fc.bias)
    m.fc, m.avgpool = conv, nn.AvgPool2d(k, stride=1)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x))

    m.forward = types.MethodType(forward, m)
    return m


@pytest.mark.parametrize("arch, size, layer", [("resnet_small", 64, "layer3"), ("resnet_small", 64, "layer2"),
                                               ("bottleneck", 64, "layer2")])
def test_matches_torchray(arch, size, layer):
    eb = pytest.importorskip("torchray.attribution.excitation_backprop")
    model = _resnet(arch)
    ref = eb.update_resnet(copy.deepcopy(model)).eval()  # TorchRay rewires the skip sums and freezes parameters
    x, t = torch.randn(2, 3, size, size), torch.tensor([1, 3])
    want_c = torch.cat([eb.contrastive_excitation_backprop(ref, x[i : i + 1], int(t[i]), saliency_layer=layer,
                                                           contrast_layer="avgpool")[:, 0] for i in range(2)])
    want = torch.cat([eb.excitation_backprop(ref, x[i : i + 1], int(t[i]), saliency_layer=layer)[:, 0]
                      for i in range(2)])
    got_c = excitation_backprop(model, x, t, layer=layer)
    got = excitation_backprop(model, x, t, layer=layer, contrastive=False)
    assert got_c.shape == want_c.shape and (want_c > 0).any() and (want_c == 0).any()
    assert _rel(got_c, want_c) <= 1e-4
    assert _rel(got, want) <= 1e-4


def test_matches_torchray_with_the_authors_head():
    """window=7: the authors' Table 4 setting (7 x 7 stride-1 pool, fc per position, softmax-over-positions seed)."""
    eb = pytest.importorskip("torchray.attribution.excitation_backprop")
    common = pytest.importorskip("torchray.attribution.common")
    model = _resnet()
    ref = eb.update_resnet(_torchray_fc_head(model, 7)).eval()
    x, t = torch.randn(2, 3, 96, 128), torch.tensor([0, 4])  # layer4 12 x 16: 6 x 10 positions
    want = torch.cat([eb.contrastive_excitation_backprop(
        ref, x[i : i + 1], int(t[i]), saliency_layer="layer3", contrast_layer="avgpool",
        get_backward_gradient=common.get_pointing_gradient)[:, 0] for i in range(2)])
    got = excitation_backprop(model, x, t, window=7)
    assert _rel(got, want) <= 1e-4
    assert _rel(got, excitation_backprop(model, x, t)) > 1e-2  # the head matters at this size


def test_window_equals_own_head_when_it_covers_the_map():
    model = _resnet()
    x, t = torch.randn(2, 3, 56, 56), torch.tensor([2, 0])  # layer4 7 x 7, as a ResNet at 224 px
    assert _rel(excitation_backprop(model, x, t, window=7), excitation_backprop(model, x, t)) <= 1e-5


# --------------------------------------------------------------------------- NumPy transcription of the formulas


def _numpy_mwp(x, Wc, bc, Wl, t, pool, contrastive):
    """MWP on conv3x3(pad 1) -> ReLU -> 2x2 pool -> flatten -> linear, written from Zhang et al.'s equations.

    x: C x H x W. Returns (map at the image, map at the ReLU output), each H x W.
    """
    C, H, W = x.shape
    O = Wc.shape[0]
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    conv = np.zeros((O, H, W))
    for o in range(O):
        for y in range(H):
            for xx in range(W):
                conv[o, y, xx] = (Wc[o] * xp[:, y : y + 3, xx : xx + 3]).sum() + bc[o]
    a = np.maximum(conv, 0)
    win = a.reshape(O, H // 2, 2, W // 2, 2)
    pooled = win.mean(axis=(2, 4)) if pool == "avg" else win.max(axis=(2, 4))
    f = pooled.reshape(-1)

    def top(w):  # p_j = f_j w+_j / sum_k w+_k f_k for the target output, seeded with mass 1
        wp = np.maximum(w, 0)
        return f * wp / (wp @ f)

    p_f = top(Wl[t]) - top(-Wl[t]) if contrastive else top(Wl[t])
    p_pool = p_f.reshape(O, H // 2, W // 2)
    p_a = np.zeros_like(a)
    for c in range(O):
        for Y in range(H // 2):
            for X in range(W // 2):
                w = a[c, 2 * Y : 2 * Y + 2, 2 * X : 2 * X + 2]
                if pool == "avg":  # the pool's weights are 1/4 > 0: mass in proportion to each input
                    share = w / w.sum() if w.sum() > 0 else np.zeros_like(w)
                else:  # the winner takes all
                    share = np.zeros_like(w)
                    share[np.unravel_index(np.argmax(w), w.shape)] = 1
                p_a[c, 2 * Y : 2 * Y + 2, 2 * X : 2 * X + 2] = share * p_pool[c, Y, X]
    p_conv = p_a * (conv > 0)  # ReLU
    Wp = np.maximum(Wc, 0)
    p_xp = np.zeros_like(xp)
    for o in range(O):
        for y in range(H):
            for xx in range(W):
                z = (Wp[o] * xp[:, y : y + 3, xx : xx + 3]).sum()  # no bias
                p_xp[:, y : y + 3, xx : xx + 3] += Wp[o] * p_conv[o, y, xx] / z
    p_x = x * p_xp[:, 1:-1, 1:-1]
    maps = p_x.sum(0), p_a.sum(0)
    return tuple(np.maximum(m, 0) for m in maps) if contrastive else maps


def _tiny_net(pool: str) -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Identity(),  # "0": its output is the image, so the map can be read at the input
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2) if pool == "avg" else nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    ).double()


@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("contrastive", [False, True])
def test_matches_numpy_formulas(pool, contrastive):
    net = _tiny_net(pool)
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64) + 0.05  # MWP assumes non-negative inputs
    t = torch.tensor([0, 2])
    conv, fc = net[1], net[5]
    for layer, which in (("0", 0), ("2", 1)):
        got = excitation_backprop(net, x, t, layer=layer, classifier="5", contrastive=contrastive)
        for i in range(2):
            want = _numpy_mwp(x[i].numpy(), conv.weight.detach().numpy(), conv.bias.detach().numpy(),
                              fc.weight.detach().numpy(), int(t[i]), pool, contrastive)[which]
            assert np.abs(want).max() > 0
            np.testing.assert_allclose(got[i].numpy(), want, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- invariants


def test_mwp_conserves_probability_mass():
    model = _resnet()
    x, t = torch.randn(3, 3, 64, 64), torch.tensor([0, 1, 4])
    top = excitation_backprop(model, x, t, layer="avgpool", contrastive=False)  # the classifier's input
    torch.testing.assert_close(top.sum(dim=(1, 2)), torch.ones(3), rtol=0, atol=1e-6)
    for layer in ("layer4", "layer3", "layer1"):  # every layer passes the mass on
        m = excitation_backprop(model, x, t, layer=layer, contrastive=False)
        torch.testing.assert_close(m.sum(dim=(1, 2)), torch.ones(3), rtol=0, atol=1e-5)


def test_maps_are_non_negative_and_cmwp_is_below_mwp():
    """Without a residual split every mass is >= 0; cMWP = ReLU(MWP - MWP_dual) <= MWP; cMWP keeps a share."""
    net = _tiny_net("avg")
    x, t = torch.rand(4, 3, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    mwp = excitation_backprop(net, x, t, layer="2", classifier="5", contrastive=False)
    cmwp = excitation_backprop(net, x, t, layer="2", classifier="5")
    assert (mwp >= 0).all() and (cmwp >= 0).all()
    assert (cmwp <= mwp + 1e-12).all()
    assert (cmwp.flatten(1).sum(1) < mwp.flatten(1).sum(1) - 1e-3).all() and (cmwp > 0).any()


def _flip_equivariant_net() -> nn.Sequential:
    """Stride-1, symmetric padding, left-right symmetric kernels: f(flip x) = flip f(x) at every layer."""
    torch.manual_seed(2)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(3, stride=1, padding=1),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(3, stride=1, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).double()
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Conv2d):
                m.weight.copy_((m.weight + m.weight.flip(-1)) / 2)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
    return net


@pytest.mark.parametrize("contrastive", [False, True])
@pytest.mark.parametrize("layer", ["2", "5"])
def test_flipped_image_gives_flipped_map(contrastive, layer):
    net = _flip_equivariant_net()
    x, t = torch.rand(2, 3, 9, 11, dtype=torch.float64), torch.tensor([1, 3])
    m = excitation_backprop(net, x, t, layer=layer, classifier="9", contrastive=contrastive)
    m_flip = excitation_backprop(net, x.flip(-1), t, layer=layer, classifier="9", contrastive=contrastive)
    assert not torch.allclose(m, m.flip(-1))  # otherwise the test could not fail
    torch.testing.assert_close(m_flip, m.flip(-1), rtol=1e-9, atol=1e-12)


def test_model_is_left_as_it_was():
    model = _resnet()
    model.train()
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    model.eval()
    logits = model(x)
    (before,) = torch.autograd.grad(logits[:, 1].sum(), x)
    model.train()
    excitation_backprop(model, x.detach(), torch.tensor([1, 2]))
    assert model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # BN statistics included
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    model.eval()
    logits2 = model(x)
    (after,) = torch.autograd.grad(logits2[:, 1].sum(), x)
    torch.testing.assert_close(logits2, logits, rtol=0, atol=0)
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # ordinary gradients again outside the scope


def test_rules_leave_the_forward_unchanged_and_are_scoped():
    model = _resnet().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
        with mwp_rules(model):
            assert "forward" in model.layer1[0].__dict__
            ruled = model(x)
    torch.testing.assert_close(ruled, plain, rtol=1e-6, atol=1e-6)
    assert "forward" not in model.layer1[0].__dict__


def test_errors_name_what_to_change():
    model = _resnet()
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match="layer1.0.relu.*runs once"):
        excitation_backprop(model, x, layer="layer1.0.relu")  # a block's ReLU runs twice
    with pytest.raises(ValueError, match="does not feed"):
        excitation_backprop(model, x, layer="fc")
    with pytest.raises(ValueError, match="nn.Linear"):
        excitation_backprop(model, x, classifier="layer4")
    gelu = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="module '1'.*no rule for GELU"):
        excitation_backprop(gelu, x, layer="0", classifier="4")
    with pytest.raises(ValueError, match="window=7 needs a torchvision ResNet"):
        excitation_backprop(gelu, x, layer="0", classifier="4", window=7)


# --------------------------------------------------------------------------- CH with either saliency


def test_content_heatmap_saliency_on_a_fixture():
    """Mass sits only where the image is non-zero: an image blank outside its box has all its MWP inside (CH 1)."""
    net = _tiny_net("avg").float()
    x = torch.zeros(2, 3, 6, 6)
    x[0, :, 1:4, 2:5] = torch.rand(3, 3, 3) + 0.1  # inside the box 2 <= x <= 5, 1 <= y <= 4
    x[1] = torch.rand(3, 6, 6) + 0.1  # fills the image: the box holds only its share
    boxes = [torch.tensor([[2.0, 1.0, 5.0, 4.0]])] * 2
    t = torch.tensor([0, 1])
    ch = content_heatmap_saliency(net, x, t, boxes, saliency="mwp", layer="0", classifier="5")
    assert ch[0].item() == pytest.approx(1.0, abs=1e-6)
    maps = excitation_backprop(net, x, t, layer="0", classifier="5", contrastive=False)
    assert ch[1].item() == pytest.approx((maps[1, 1:4, 2:5].sum() / maps[1].sum()).item(), rel=1e-5)
    assert 0.1 < ch[1].item() < 0.6


def test_content_heatmap_saliency_per_method():
    model = _resnet().train()
    x, t = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])
    boxes = [torch.tensor([[8.0, 8.0, 40.0, 48.0]]), torch.tensor([[0.0, 0.0, 20.0, 20.0], [30.0, 30.0, 60.0, 60.0]])]
    size = (120, 90)  # the original image size the maps are resized to
    got = {s: content_heatmap_saliency(model, x, t, boxes, size, saliency=s) for s in ("gradcam", "cmwp", "mwp")}
    assert model.training
    model.eval()
    torch.testing.assert_close(got["gradcam"], content_heatmap(gradcam(model, x, t), boxes, size))
    torch.testing.assert_close(got["cmwp"], content_heatmap(excitation_backprop(model, x, t), boxes, size))
    torch.testing.assert_close(
        got["mwp"], content_heatmap(excitation_backprop(model, x, t, contrastive=False), boxes, size))
    assert not torch.allclose(got["cmwp"], got["gradcam"])
    with pytest.raises(ValueError, match="saliency='ebp'"):
        content_heatmap_saliency(model, x, t, boxes, saliency="ebp")


def test_an_all_zero_cmwp_map_is_left_out():
    """The authors' cMWP script skips an image whose map sums to 0; Grad-CAM's zero map counts as uniform."""
    net = _tiny_net("avg").float()
    with torch.no_grad():
        net[5].weight.fill_(1.0)  # class 0: its dual row has no positive weight, so cMWP = MWP
        net[5].weight[1] = -1.0  # class 1: nothing excites it and its dual takes all the mass, so cMWP = 0
    x, t = torch.rand(2, 3, 6, 6) + 0.1, torch.tensor([0, 1])
    boxes = [torch.tensor([[0.0, 0.0, 3.0, 3.0]])] * 2
    ch = content_heatmap_saliency(net, x, t, boxes, saliency="cmwp", layer="0", classifier="5")
    assert not math.isnan(ch[0].item()) and math.isnan(ch[1].item())
