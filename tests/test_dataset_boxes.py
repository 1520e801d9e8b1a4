"""BoxDataset moves boxes exactly like the image: a white rectangle on black stays inside its box."""
import pytest
import torch
from PIL import Image

from cgc_ray.data import ImageRecord
from cgc_ray.data.dataset import IMAGENET_MEAN, IMAGENET_STD, BoxDataset, collate

W, H = 64, 48
RECT = (10, 8, 30, 20)  # white pixels: columns 10..29, rows 8..19 -> continuous box (10, 8, 30, 20)


@pytest.fixture
def rect_record(tmp_path):
    img = Image.new("RGB", (W, H), (0, 0, 0))
    img.paste((255, 255, 255), RECT)
    path = tmp_path / "rect.png"  # lossless, so the rectangle edges are exact
    img.save(path)
    return ImageRecord(str(path), 3, (tuple(float(v) for v in RECT),))


def _unnormalise(x):
    return x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)


def _white_pixels_inside(x, boxes, tol=1.0):
    """Every clearly white pixel centre lies inside the union of `boxes` grown by `tol`,
    and every pixel centre at least `tol` inside a box is white."""
    img = _unnormalise(x).min(0).values  # H x W
    ys, xs = torch.meshgrid(torch.arange(img.shape[0]) + 0.5, torch.arange(img.shape[1]) + 0.5, indexing="ij")
    inside_grown = torch.zeros_like(img, dtype=torch.bool)
    inside_shrunk = torch.zeros_like(img, dtype=torch.bool)
    for x1, y1, x2, y2 in boxes.tolist():
        inside_grown |= (xs > x1 - tol) & (xs < x2 + tol) & (ys > y1 - tol) & (ys < y2 + tol)
        inside_shrunk |= (xs > x1 + tol) & (xs < x2 - tol) & (ys > y1 + tol) & (ys < y2 - tol)
    white = img > 0.5
    return bool((white & ~inside_grown).sum() == 0), bool((inside_shrunk & ~white).sum() == 0), int(white.sum())


def test_random_crops_and_flips_keep_the_object_in_its_box(rect_record):
    ds = BoxDataset([rect_record], train=True, image_size=32, scale=(0.1, 1.0))
    torch.manual_seed(0)
    n_boxes = 0
    for epoch in range(40):
        x, label, boxes = ds[0]
        assert x.shape == (3, 32, 32) and label == 3
        no_stray, filled, n_white = _white_pixels_inside(x, boxes)
        if len(boxes) == 0:
            assert n_white == 0, f"epoch {epoch}: box dropped but {n_white} white pixels remain"
            continue
        n_boxes += 1
        assert no_stray and filled, f"epoch {epoch}: box {boxes.tolist()} does not match the white pixels"
        assert ((boxes >= 0) & (boxes <= 32)).all()
    assert n_boxes >= 20  # most crops keep part of the rectangle, so the check above ran


def test_full_crop_with_flip_gives_the_mirrored_box_exactly(rect_record):
    ds = BoxDataset([rect_record], train=True, image_size=32, scale=(1.0, 1.0), ratio=(W / H, W / H), flip_p=1.0)
    x, _, boxes = ds[0]  # the whole 64 x 48 image squeezed to 32 x 32 and flipped
    assert torch.allclose(boxes, torch.tensor([[32 - 30 / 2, 8 * 32 / 48, 32 - 10 / 2, 20 * 32 / 48]]))
    assert _white_pixels_inside(x, boxes)[:2] == (True, True)


def test_eval_center_crop_box_by_hand(rect_record):
    x, _, boxes = BoxDataset([rect_record], train=False, image_size=32)[0]
    # short side 48 -> int(32 * 256 / 224) = 36, so 64 x 48 -> 48 x 36 (scale 0.75); centre crop left 8, top 2
    assert x.shape == (3, 32, 32)
    assert torch.allclose(boxes, torch.tensor([[0.0, 8 * 0.75 - 2, 30 * 0.75 - 8, 20 * 0.75 - 2]]))
    assert _white_pixels_inside(x, boxes)[:2] == (True, True)


def test_eval_short_side_without_crop(rect_record):
    x, _, boxes = BoxDataset([rect_record], train=False, image_size=24, eval_resize="short_side")[0]
    assert x.shape == (3, 24, 32)
    assert torch.allclose(boxes, torch.tensor([[5.0, 4.0, 15.0, 10.0]]))


def test_normalisation_of_black_and_white(rect_record):
    x, _, _ = BoxDataset([rect_record], train=False, image_size=24, eval_resize="short_side")[0]
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    assert torch.allclose(x[:, 0, 0], -mean / std, atol=1e-6)
    assert torch.allclose(x[:, 7, 10], (1 - mean) / std, atol=1e-6)


def test_augmentation_follows_the_global_rng_that_checkpoints_save(rect_record):
    ds = BoxDataset([rect_record], train=True, image_size=16)
    torch.manual_seed(7)
    xa, _, ba = ds[0]
    state = torch.get_rng_state()
    xnext = ds[0][0]
    torch.manual_seed(7)
    xb, _, bb = ds[0]
    assert torch.equal(xa, xb) and torch.equal(ba, bb)
    torch.set_rng_state(state)  # what a resumed run restores
    assert torch.equal(ds[0][0], xnext) and not torch.equal(xnext, xa)


def test_cache_in_memory_decodes_once(rect_record, tmp_path):
    ds = BoxDataset([rect_record], train=False, image_size=16, cache_in_memory=True)
    expected = BoxDataset([rect_record], train=False, image_size=16)[0][0]
    (tmp_path / "rect.png").unlink()
    assert torch.equal(ds[0][0], expected)


def test_unreadable_image_is_reported_by_path(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(OSError, match="broken.jpg"):
        BoxDataset([ImageRecord(str(bad), 0)], train=False, image_size=16)[0]


def test_collate(rect_record):
    ds = BoxDataset([rect_record, ImageRecord(rect_record.path, 1)], train=False, image_size=16)
    images, labels, boxes = collate([ds[0], ds[1]])
    assert images.shape == (2, 3, 16, 16)
    assert labels.dtype == torch.long and labels.tolist() == [3, 1]
    assert boxes[0].shape == (1, 4) and boxes[1].shape == (0, 4)
    tall = BoxDataset([rect_record], train=False, image_size=20, eval_resize="short_side")[0]
    with pytest.raises(ValueError, match="batch_size=1"):
        collate([ds[0], tall])
