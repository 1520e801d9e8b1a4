"""The CGC transform T: parameters, equivariance of heatmaps with images, flips."""

import pytest
import torch
from torchvision.transforms.functional import resized_crop

from cgc_ray.method import transforms as T


def test_sampled_boxes_respect_scale_ratio_and_bounds():
    g = torch.Generator().manual_seed(0)
    p = T.sample_params(4000, (64, 48), scale=(0.08, 1.0), generator=g)
    b = p.boxes
    assert b.shape == (4000, 4) and p.flip.shape == (4000,)
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= 1).all() and (b[:, 3] <= 1).all()
    w = (b[:, 2] - b[:, 0]) * 48
    h = (b[:, 3] - b[:, 1]) * 64
    assert torch.allclose(w, w.round(), atol=1e-4) and torch.allclose(h, h.round(), atol=1e-4)  # integer pixels
    area = w * h / (64 * 48)
    assert area.min() >= 0.08 * 0.8 and area.max() <= 1.0  # rounding to whole pixels
    ratio = w / h
    assert ratio.min() >= 3 / 4 * 0.85 and ratio.max() <= 4 / 3 * 1.15
    assert abs(p.flip.float().mean().item() - 0.5) < 0.03


def test_sampling_is_deterministic_given_a_generator():
    a = T.sample_params(8, (32, 32), generator=torch.Generator().manual_seed(3))
    b = T.sample_params(8, (32, 32), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.flip, b.flip)


def test_full_box_with_flip_is_an_exact_mirror_for_images_and_maps_at_any_resolution():
    x = torch.randn(3, 3, 20, 24)
    cam = torch.rand(3, 5, 6)
    p = T.CropFlip(torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3), torch.tensor([True, False, True]))
    out = T.apply(x, p)
    torch.testing.assert_close(out[0], x[0].flip(-1))
    torch.testing.assert_close(out[1], x[1])
    m = T.apply(cam, p)
    torch.testing.assert_close(m[2], cam[2].flip(-1))
    torch.testing.assert_close(m[1], cam[1])


def test_matches_torchvision_resized_crop_inside_the_crop():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 40, 40)
    top, left, h, w = 6, 10, 16, 20
    p = T.CropFlip(torch.tensor([[left / 40, top / 40, (left + w) / 40, (top + h) / 40]]), torch.tensor([False]))
    ours = T.apply(x, p, (32, 40))
    ref = resized_crop(x, top, left, h, w, [32, 40], antialias=False)
    # away from the crop border, where torchvision clamps to the crop and we read the real neighbours
    torch.testing.assert_close(ours[..., 2:-2, 2:-2], ref[..., 2:-2, 2:-2], rtol=1e-5, atol=1e-5)


def _disk_images(n, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    cx = torch.rand(n, generator=g) * size * 0.5 + size * 0.25
    cy = torch.rand(n, generator=g) * size * 0.5 + size * 0.25
    r = torch.rand(n, generator=g) * size * 0.15 + size * 0.1
    mask = ((xx - cx[:, None, None]) ** 2 + (yy - cy[:, None, None]) ** 2 <= r[:, None, None] ** 2).float()
    colour = torch.rand(n, 3, 1, 1, generator=g) * 0.5 + 0.5
    return mask[:, None] * colour, mask  # images B x 3 x H x W (object on black), masks B x H x W


def test_transformed_mask_equals_mask_of_transformed_image():
    x, mask = _disk_images(64)
    p = T.sample_params(64, (64, 64), generator=torch.Generator().manual_seed(1))
    t_of_mask = T.apply(mask, p)  # T(mask(x))
    mask_of_t = (T.apply(x, p).amax(1) > 0.5 * x.amax((1, 2, 3))[:, None, None]).float()  # mask(T(x))
    disagree = (t_of_mask.round() != mask_of_t).float().mean().item()
    assert disagree < 0.01, disagree  # interpolation error on the rim only
    # a low-resolution (8 x 8) map selects the same box: transforming it directly equals
    # transforming its bilinear upsampling, up to the blur of one interpolation
    low = torch.nn.functional.avg_pool2d(mask[:, None], 8)[:, 0]
    up = torch.nn.functional.interpolate(low[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    assert (T.apply(low, p, (64, 64)) - T.apply(up, p)).abs().max() < 0.1


def test_flipped_image_yields_flipped_map():
    x, mask = _disk_images(8, seed=2)
    p = T.sample_params(8, (64, 64), generator=torch.Generator().manual_seed(5))
    p_flip = T.CropFlip(p.boxes, ~p.flip)
    torch.testing.assert_close(T.apply(mask, p_flip), T.apply(mask, p).flip(-1))
    torch.testing.assert_close(T.apply(x, p_flip), T.apply(x, p).flip(-1))


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="scale"):
        T.sample_params(2, (8, 8), scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="batch of 3"):
        T.apply(torch.zeros(3, 4, 4), T.sample_params(2, (4, 4)))
