"""Metrics on hand-computable cases."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from cgc_ray.method.metrics import (
    boxes_mask,
    content_heatmap,
    insertion_auc,
    topk_correct,
)


def test_topk_counts():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.2], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    out = topk_correct(logits, labels, ks=(1, 2))
    assert out["top1"].item() == 1 and out["top2"].item() == 2


def test_heatmap_entirely_inside_the_box_gives_one():
    cam = torch.zeros(1, 32, 32)
    cam[0, 10:20, 5:15] = torch.rand(10, 10) + 0.1
    ch = content_heatmap(cam, [torch.tensor([[5.0, 10.0, 15.0, 20.0]])], (32, 32))
    assert ch.item() == pytest.approx(1.0, abs=1e-6)


def test_uniform_and_all_zero_maps_give_box_area_over_image_area():
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 8.0]])] * 2
    ch = content_heatmap(torch.stack([torch.ones(4, 4), torch.zeros(4, 4)]), boxes, (32, 32))
    torch.testing.assert_close(ch, torch.full((2,), 16 * 8 / 1024.0))


def test_union_of_overlapping_boxes_is_counted_once_and_no_box_gives_nan():
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0]]), torch.zeros(0, 4)]
    ch = content_heatmap(torch.ones(2, 20, 20), boxes, (20, 20))
    assert ch[0].item() == pytest.approx((100 + 100 - 25) / 400)
    assert math.isnan(ch[1].item())


def test_pixel_centre_rule_and_bilinear_resize_match_a_numpy_reference():
    rng = np.random.default_rng(0)
    cam = rng.random((7, 7)).astype(np.float32)
    box = (3.2, 10.7, 40.5, 33.0)
    H, W = 48, 56
    # reference: bilinear (half-pixel centres) by hand, l1 normalise, centre-in-box mask
    ys = (np.arange(H) + 0.5) * 7 / H - 0.5
    xs = (np.arange(W) + 0.5) * 7 / W - 0.5
    ys, xs = np.clip(ys, 0, 6), np.clip(xs, 0, 6)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, 6), np.minimum(x0 + 1, 6)
    wy, wx = (ys - y0)[:, None], (xs - x0)[None, :]
    up = (cam[y0][:, x0] * (1 - wy) * (1 - wx) + cam[y0][:, x1] * (1 - wy) * wx
          + cam[y1][:, x0] * wy * (1 - wx) + cam[y1][:, x1] * wy * wx)
    up = up / up.sum()
    cy, cx = np.arange(H)[:, None] + 0.5, np.arange(W)[None, :] + 0.5
    inside = (cx >= box[0]) & (cx <= box[2]) & (cy >= box[1]) & (cy <= box[3])
    ref = up[inside].sum()
    ours = content_heatmap(torch.from_numpy(cam)[None], [torch.tensor([box])], (H, W))
    assert ours.item() == pytest.approx(float(ref), rel=1e-5)


def test_boxes_mask_counts_pixels_with_centres_inside():
    m = boxes_mask([torch.tensor([[0.5, 0.5, 2.5, 1.5]])], (4, 4))
    # centres 0.5, 1.5, 2.5 lie in [0.5, 2.5] (closed); rows 0.5, 1.5 in [0.5, 1.5]
    assert m[0].sum().item() == 6 and m[0, 1, 2] and not m[0, 2, 0] and not m[0, 0, 3]


class ConstantProb(nn.Module):
    """Softmax of class 0 is p whatever the input; has BatchNorm to catch train-mode leaks."""

    def __init__(self, p):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.register_buffer("logits", torch.tensor([math.log(p), math.log(1 - p)]))

    def forward(self, x):
        return self.logits.expand(x.shape[0], 2) + 0 * self.bn(x).mean()


class OnePixel(nn.Module):
    """P(class 0) = sigmoid(10 (x[4, 4] - 0.5)): only one pixel matters."""

    def forward(self, x):
        z = 10 * (x[:, 0, 4, 4] - 0.5)
        return torch.stack([z, torch.zeros_like(z)], 1)


def test_insertion_auc_of_a_constant_model_is_its_probability_and_stays_in_eval_mode():
    model = ConstantProb(0.3).train()
    before = model.bn.running_mean.clone()
    auc = insertion_auc(model, torch.rand(3, 3, 16, 16), torch.rand(3, 4, 4))
    torch.testing.assert_close(auc, torch.full((3,), 0.7))  # the predicted class is 1, p = 0.7
    assert model.training, "the caller's mode is restored"
    assert torch.equal(model.bn.running_mean, before), "BatchNorm statistics must not be touched"


def test_insertion_auc_follows_the_trapezoid_rule_exactly():
    from torchvision.transforms.functional import gaussian_blur

    img = torch.zeros(1, 3, 16, 16)
    img[..., 4, 4] = 1.0
    model = OnePixel()
    p_clean = model(img).softmax(1)[0, 0].item()
    p_blur = model(gaussian_blur(img, [11, 11], [5.0, 5.0])).softmax(1)[0, 0].item()
    assert p_clean > 0.9 > 0.1 > p_blur
    good = img[:, 0].clone()  # the pixel that matters ranks first
    auc_good = insertion_auc(model, img, good, pixels_per_step=16).item()  # 16 steps, 17 scores
    auc_bad = insertion_auc(model, img, 1 - good, pixels_per_step=16).item()  # ... ranks last
    assert auc_good == pytest.approx((p_blur / 2 + 15.5 * p_clean) / 16, rel=1e-5)
    assert auc_bad == pytest.approx((15.5 * p_blur + p_clean / 2) / 16, rel=1e-5)
