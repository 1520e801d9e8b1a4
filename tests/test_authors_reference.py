"""Self-tests of tests/authors_reference.py, the independent re-implementation of the authors' step.

Hand-computed values on tiny inputs, invariants (a flip-equivariant model gives
identical positive maps), the closed form of the CAM, and the group split.
Only the box conversion test touches the product (its T parameters as input).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests import authors_reference as ref


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class TinyResNet(nn.Module):
    """The module names of a torchvision ResNet (what the reference steps through), 3 stride-2 free layers."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.maxpool = nn.Identity()
        self.layer1, self.layer2 = _block(8, 8, 1), _block(8, 16, 2)
        self.layer3, self.layer4 = _block(16, 16, 1), _block(16, 16, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return ref.forward_with_features(self, x)[0]


def _model(seed: int = 0, symmetric: bool = False) -> TinyResNet:
    torch.manual_seed(seed)
    m = TinyResNet().double().train()
    if symmetric:  # left-right mirrored kernels: the net commutes with a flip on odd sizes
        with torch.no_grad():
            for c in m.modules():
                if isinstance(c, nn.Conv2d):
                    c.weight.copy_((c.weight + c.weight.flip(-1)) / 2)
    return m


def _batch(B: int, size: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, size, size, generator=g, dtype=torch.float64)
    x_rrc = torch.randn(B, 3, size, size, generator=g, dtype=torch.float64)
    boxes = torch.tensor([[1, 2, 9, 7], [0, 0, size, size], [3, 4, 6, 10], [5, 1, 11, 11], [2, 2, 8, 8]])[:B]
    flips = torch.tensor([True, False, True, False, True])[:B]
    labels = torch.arange(B) % 5
    return x_rrc, x, boxes, flips, labels


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def test_cam_equals_the_closed_form_of_a_gap_linear_head_with_its_gradients():
    model = _model()
    x = _batch(4, 16)[1]
    logits, A = ref.forward_with_features(model, x)
    t = logits.detach().argmax(1)
    cam = ref.authors_cam(logits, A, t)  # B x h x w
    closed = F.relu(torch.einsum("bk,bkij->bij", model.fc.weight[t], A)) / (A.shape[-2] * A.shape[-1])
    torch.testing.assert_close(cam, closed, rtol=1e-12, atol=1e-14)
    w = torch.rand_like(cam)  # a generic downstream loss of the maps
    params = [p for n, p in model.named_parameters() if n != "fc.bias"]  # the bias never reaches a CAM
    g_ref = torch.autograd.grad((cam * w).sum(), params, retain_graph=True)
    g_closed = torch.autograd.grad((closed * w).sum(), params)
    for a, b in zip(g_ref, g_closed):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    assert g_ref[-1].abs().sum() > 0  # fc.weight gets a gradient through dy/dA (create_graph)


def test_upsample_normalise_by_hand_and_zero_maps_become_uniform():
    zero = ref.upsample_normalise(torch.zeros(2, 3, 3, dtype=torch.float64), (6, 6))
    assert torch.equal(zero, torch.full((2, 6, 6), 1e-8, dtype=torch.float64))
    cam = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]], dtype=torch.float64)  # 1 x 2 x 2
    up = torch.tensor([0.0, 0.25, 0.75, 1.0], dtype=torch.float64).expand(4, 4)  # bilinear, align_corners False
    torch.testing.assert_close(ref.upsample_normalise(cam, (4, 4))[0], up / (8 + 1e-8) + 1e-8, rtol=1e-14, atol=0)


def test_crop_resize_flip_by_hand_repeats_the_crop_border_and_mirrors():
    m = (10 * torch.arange(4.0)[:, None] + torch.arange(4.0)[None]).double()[None]  # 1 x 4 x 4, m[r, c] = 10r + c
    box = torch.tensor([[1, 0, 2, 2]])  # rows 1-2, cols 0-1
    rows = torch.tensor([10.0, 12.5, 17.5, 20.0], dtype=torch.float64)  # 2 -> 4: [v0, .75v0+.25v1, .25v0+.75v1, v1]
    cols = torch.tensor([0.0, 0.25, 0.75, 1.0], dtype=torch.float64)
    out = ref.crop_resize_flip(m, box, torch.tensor([False]), (4, 4))
    torch.testing.assert_close(out[0], rows[:, None] + cols[None], rtol=0, atol=1e-12)
    out = ref.crop_resize_flip(m, box, torch.tensor([True]), (4, 4))
    torch.testing.assert_close(out[0], rows[:, None] + cols.flip(0)[None], rtol=0, atol=1e-12)
    full = torch.tensor([[0, 0, 4, 4]])
    img = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    assert torch.equal(ref.crop_resize_flip(img, full, torch.tensor([True]), (4, 4)), img.flip(-1))
    assert torch.equal(ref.crop_resize_flip(m, full, torch.tensor([False]), (4, 4)), m)
    with pytest.raises(ValueError, match="leaves the"):
        ref.crop_resize_flip(m, torch.tensor([[2, 0, 3, 2]]), torch.tensor([False]), (4, 4))


def test_contrastive_term_by_hand_uses_the_other_augmented_maps_as_negatives():
    same = torch.rand(1, 3, 3, dtype=torch.float64).expand(4, 3, 3)
    torch.testing.assert_close(ref.cgc_authors(same, 2 * same, tau=0.5), torch.tensor(math.log(4), dtype=torch.float64))
    e1 = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    e2 = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    a, o = torch.stack([e1, e2]), torch.stack([e1, e1])
    # row 0: pos a0.o0 = 1, neg a0.a1 = 0; row 1: pos a1.o1 = 0, neg a1.a0 = 0 (the paper's eq. would use o1.a0 = 1)
    want = (math.log(1 + math.exp(-1 / 0.5)) + math.log(2)) / 2
    torch.testing.assert_close(ref.cgc_authors(a, o, tau=0.5), torch.tensor(want, dtype=torch.float64))
    # no negatives: F.mse_loss of unit vectors, a mean over B x D = 2 x 4 entries: (1 + 1 + 0) / 8
    mse = ref.cgc_authors(torch.stack([e1, e1]), torch.stack([3 * e2, e1]), tau=0.5, negatives=False)
    torch.testing.assert_close(mse, torch.tensor(0.25, dtype=torch.float64))


def test_identity_transform_gives_positive_one_and_zero_mse():
    model = _model()
    x_rrc, x, _, _, labels = _batch(4, 16)
    full, no_flip = torch.tensor([[0, 0, 16, 16]] * 4), torch.zeros(4, dtype=torch.bool)
    mse = ref.authors_step(model, x_rrc, x, full, no_flip, labels, lam=1.0, tau=0.5, negatives=False).cgc
    assert abs(mse.item()) < 1e-20
    # with a_b = o_b the loss is log(1 + sum_{j != b} exp((cos(a_b, a_j) - 1) / tau)), from the maps themselves
    logits, A = ref.forward_with_features(model, x)
    a = ref.upsample_normalise(ref.authors_cam(logits, A, logits.argmax(1)), (16, 16)).flatten(1)
    cos = F.normalize(a, dim=1) @ F.normalize(a, dim=1).T
    want = torch.log(1 + ((cos - 1) / 0.5).exp().sum(1) - 1).mean()
    got = ref.authors_step(model, x_rrc, x, full, no_flip, labels, lam=1.0, tau=0.5).cgc
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)


def test_flip_equivariant_model_with_full_crop_and_flip_gives_identical_positive_maps():
    # 17 px: every stride-2 input (17, 9) is odd, so a mirrored-kernel net commutes with the flip
    model = _model(symmetric=True)
    x_rrc, x, _, _, labels = _batch(4, 17)
    full, flip = torch.tensor([[0, 0, 17, 17]] * 4), torch.ones(4, dtype=torch.bool)
    mse = ref.authors_step(model, x_rrc, x, full, flip, labels, lam=1.0, tau=0.5, negatives=False).cgc
    assert mse.item() < 1e-20
    # control: the image mirrored but not its heatmap, so the positive pair differs
    unflipped = ref.authors_step(model, x_rrc, x, full, ~flip, labels, lam=1.0, tau=0.5, negatives=False,
                                 x_aug=x.flip(-1)).cgc
    assert unflipped.item() > 1e-6


def test_cam_class_is_the_centre_views_top1_for_both_maps():
    model = _model(seed=1)
    with torch.no_grad():
        model.fc.bias.zero_()  # the random bias alone picks one class for every image
    x_rrc, x, boxes, flips, labels = _batch(4, 16)
    x_aug = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype)
    got = ref.authors_step(model, x_rrc, x, boxes, flips, labels, lam=1.0, tau=0.5, x_aug=x_aug).cgc
    lc, Ac = ref.forward_with_features(model, x)
    la, Aa = ref.forward_with_features(model, x_aug)
    assert not torch.equal(lc.argmax(1), la.argmax(1))  # the aug view's own top-1 differs from the centre's

    def cgc(t_aug):
        o = ref.crop_resize_flip(ref.upsample_normalise(ref.authors_cam(lc, Ac, lc.argmax(1)), (16, 16)),
                                 boxes, flips, (16, 16))
        return ref.cgc_authors(ref.upsample_normalise(ref.authors_cam(la, Aa, t_aug), (16, 16)), o, 0.5)

    torch.testing.assert_close(got, cgc(lc.argmax(1)), rtol=1e-12, atol=0)
    assert abs(got.item() - cgc(la.argmax(1)).item()) > 1e-3


def test_total_is_three_cross_entropies_plus_lambda_cgc():
    model = _model()
    x_rrc, x, boxes, flips, labels = _batch(4, 16)
    out = ref.authors_step(model, x_rrc, x, boxes, flips, labels, lam=0.7, tau=0.5)
    x_aug = ref.crop_resize_flip(x, boxes, flips, (16, 16))
    xent = sum(F.cross_entropy(model(v), labels) for v in (x_rrc, x, x_aug))
    torch.testing.assert_close(out.xent, xent, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.total, out.xent + 0.7 * out.cgc, rtol=1e-12, atol=0)


def test_groups_equal_separate_runs_averaged_unweighted_and_keep_group0_running_stats():
    x_rrc, x, boxes, flips, labels = _batch(5, 16)
    model = _model()
    out = ref.authors_step(model, x_rrc, x, boxes, flips, labels, lam=1.0, tau=0.5, group_size=3)
    out.total.backward()
    buffers = [b.clone() for b in model.buffers()]
    sep = _model()
    parts = [ref.authors_step(sep, x_rrc[s], x[s], boxes[s], flips[s], labels[s], lam=1.0, tau=0.5)
             for s in (slice(0, 3), slice(3, 5))]
    sep_buffers = [b.clone() for b in sep.buffers()]  # after both groups; group 0's come next
    ((parts[0].total + parts[1].total) / 2).backward()  # DataParallel: .mean() over chunks, not over images
    torch.testing.assert_close(out.total, (parts[0].total + parts[1].total) / 2, rtol=1e-12, atol=0)
    for a, b in zip(_grads(model), _grads(sep)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    weighted = (3 * parts[0].total + 2 * parts[1].total) / 5
    assert abs(out.total.item() - weighted.item()) > 1e-6
    g0 = _model()
    ref.authors_step(g0, x_rrc[:3], x[:3], boxes[:3], flips[:3], labels[:3], lam=1.0, tau=0.5)
    for a, b in zip(buffers, g0.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(sep_buffers, g0.buffers()))
    one_whole = ref.authors_step(_model(), x_rrc, x, boxes, flips, labels, lam=1.0, tau=0.5)
    assert abs(one_whole.total.item() - out.total.item()) > 1e-6  # per-group BatchNorm and negatives matter


def test_a_group_of_one_image_and_eval_mode_are_refused():
    x_rrc, x, boxes, flips, labels = _batch(5, 16)
    with pytest.raises(ValueError, match="group of 1"):
        ref.authors_step(_model(), x_rrc, x, boxes, flips, labels, lam=1.0, tau=0.5, group_size=2)
    with pytest.raises(ValueError, match="train mode"):
        ref.authors_step(_model().eval(), x_rrc, x, boxes, flips, labels, lam=1.0, tau=0.5)
    assert ref.dataparallel_group_size(256, 4) == 64 and ref.dataparallel_group_size(143, 4) == 36


def test_pixel_boxes_recover_the_products_t_parameters_and_crops_agree_inside_the_box():
    from cgc_ray.method import transforms as T

    H = W = 32
    p = T.sample_params(64, (H, W), generator=torch.Generator().manual_seed(0))
    px = ref.pixel_boxes(p.boxes, (H, W))  # i, j, h, w
    i, j, h, w = px.unbind(1)
    assert (h >= 1).all() and (w >= 1).all() and (i + h <= H).all() and (j + w <= W).all()
    back = torch.stack([j / W, i / H, (j + w) / W, (i + h) / H], dim=1).float()
    assert torch.equal(back, p.boxes)
    maps = torch.rand(64, H, W, dtype=torch.float64)
    mine = ref.crop_resize_flip(maps, px, p.flip, (H, W))
    theirs = T.apply(maps, p)
    # equal wherever the bilinear source point lies inside the crop; at the enlarged crop's edges the
    # authors repeat the crop border while a grid_sample over the whole map reads the pixel beyond it
    o = torch.arange(H, dtype=torch.float64) + 0.5
    src_r = i[:, None] + o[None] * h[:, None] / H - 0.5  # B x H
    src_c = j[:, None] + o[None] * w[:, None] / W - 0.5  # B x W
    in_r = (src_r >= i[:, None]) & (src_r <= (i + h - 1)[:, None])
    in_c = (src_c >= j[:, None]) & (src_c <= (j + w - 1)[:, None])
    in_c = torch.where(p.flip[:, None], in_c.flip(1), in_c)
    inside = in_r[:, :, None] & in_c[:, None, :]
    assert inside.float().mean() > 0.8
    torch.testing.assert_close(mine[inside], theirs[inside], rtol=1e-5, atol=1e-6)
