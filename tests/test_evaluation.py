"""Evaluation driver: CH on a real photo vs a NumPy reference, the authors' protocol, checkpoints, the CLI."""

import json
import math
from pathlib import Path

import matplotlib.cbook
import numpy as np
import pytest
import torch
from fixtures_data import write_cub
from PIL import Image
from torch import nn

from cgc_ray.cli.main import main
from cgc_ray.data import ImageRecord, records
from cgc_ray.data.dataset import IMAGENET_MEAN, IMAGENET_STD, BoxDataset, collate
from cgc_ray.config import MethodSpec
from cgc_ray.explain.evaluation import (
    checkpoint_spec,
    content_heatmap_authors,
    evaluate_checkpoint,
    evaluation_trial_id,
    result_row,
)
from cgc_ray.method.cam import gradcam
from cgc_ray.method.metrics import content_heatmap
from cgc_ray.models.checkpoint import load_classifier, save_checkpoint, trial_record
from cgc_ray.models.resnet import build_model
from cgc_ray.results.table import read_rows

# Grace Hopper's portrait ships with matplotlib (512 x 600 px). Boxes annotated by
# hand on the image, 0-based continuous pixel coordinates (x1, y1, x2, y2): her
# face (forehead to chin, ear to ear) and her cap, which overlap by 2 rows.
PHOTO = Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
PHOTO_W, PHOTO_H = 512, 600
FACE = (168.0, 148.0, 358.0, 328.0)
CAP = (152.5, 20.0, 372.0, 150.25)


# --------------------------------------------------------------------------- NumPy reference


def np_bilinear(src: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize with half-pixel centres (align_corners=False), edges clamped."""
    h, w = src.shape
    H, W = out_hw

    def taps(n_out: int, n_in: int):
        s = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = np.minimum(np.floor(s).astype(int), n_in - 1)
        return i0, np.minimum(i0 + 1, n_in - 1), s - i0

    y0, y1, wy = taps(H, h)
    x0, x1, wx = taps(W, w)
    top = src[y0][:, x0] * (1 - wx) + src[y0][:, x1] * wx
    bottom = src[y1][:, x0] * (1 - wx) + src[y1][:, x1] * wx
    return top * (1 - wy)[:, None] + bottom * wy[:, None]


def np_content_heatmap(cam: np.ndarray, boxes, H: int, W: int) -> float:
    """Resize to H x W, l1-normalise (all-zero -> uniform), sum where the pixel centre is in a box."""
    up = np.maximum(np_bilinear(cam.astype(np.float64), (H, W)), 0.0)
    up = up / up.sum() if up.sum() > 0 else np.full_like(up, 1.0 / up.size)
    cy, cx = np.arange(H) + 0.5, np.arange(W) + 0.5
    mask = np.zeros((H, W), dtype=bool)
    for x1, y1, x2, y2 in boxes:
        mask |= ((cy >= y1) & (cy <= y2))[:, None] & ((cx >= x1) & (cx <= x2))[None, :]
    return float(up[mask].sum())


def np_gradcam_authors(model: nn.Module, path: Path, label: int, short_side: int) -> np.ndarray:
    """The authors' pipeline written out: PIL resize of the short side, hooks + autograd.grad, to NumPy."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    size = (short_side, int(short_side * h / w)) if w <= h else (int(short_side * w / h), short_side)
    arr = np.asarray(img.resize(size, Image.BILINEAR), dtype=np.float32) / 255
    arr = (arr - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
    x = torch.from_numpy(arr).permute(2, 0, 1)[None]
    acts = []
    handle = model.layer4.register_forward_hook(lambda m, i, o: acts.append(o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits[0, label], acts[0])
    alpha = grad.mean(dim=(2, 3), keepdim=True)
    return torch.relu((alpha * acts[0]).sum(dim=1))[0].detach().numpy()


# --------------------------------------------------------------------------- CH on a real photo


def test_photo_and_its_annotation_are_what_the_tests_assume():
    with Image.open(PHOTO) as im:
        assert im.size == (PHOTO_W, PHOTO_H)
        face = np.asarray(im.convert("RGB").crop(tuple(int(v) for v in FACE)), dtype=float)
    # skin: red dominates blue inside the face box (a box on the flag or uniform would fail this)
    assert (face[..., 0] - face[..., 2]).mean() > 30


def test_ch_of_the_photo_with_an_image_derived_heatmap_equals_numpy_reference():
    rgb = np.asarray(Image.open(PHOTO).convert("RGB"), dtype=np.float64)
    redness = np.maximum(rgb[..., 0] - rgb[..., 2], 0)  # 600 x 512: skin and flag stripes, not the sky
    cam = redness[: 19 * 31, : 16 * 32].reshape(19, 31, 16, 32).mean(axis=(1, 3))  # 19 x 16, odd sizes
    boxes = [FACE, CAP]
    expected = np_content_heatmap(cam, boxes, PHOTO_H, PHOTO_W)
    got = content_heatmap(torch.tensor(cam, dtype=torch.float32)[None], [torch.tensor(boxes)], (PHOTO_H, PHOTO_W))
    assert got.item() == pytest.approx(expected, abs=1e-5)
    face_only = np_content_heatmap(cam, [FACE], PHOTO_H, PHOTO_W)
    cap_only = np_content_heatmap(cam, [CAP], PHOTO_H, PHOTO_W)
    assert face_only < expected < face_only + cap_only  # the overlap of the two boxes is counted once
    uniform_share = np_content_heatmap(np.ones((2, 2)), boxes, PHOTO_H, PHOTO_W)
    assert expected > uniform_share + 0.05  # the heatmap favours the face: not a degenerate case


def test_authors_protocol_on_the_photo_equals_numpy_reference():
    torch.manual_seed(0)
    model = build_model("resnet18", 10).eval()
    label = 3
    cam = np_gradcam_authors(model, PHOTO, label, short_side=448)
    assert cam.shape == (525 // 32 + 1, 448 // 32) and cam.max() > 0  # 17 x 14 at 448 x 525
    expected = np_content_heatmap(cam, [FACE, CAP], PHOTO_H, PHOTO_W)

    model.train()
    bn_before = model.bn1.running_mean.clone()
    rec = ImageRecord(str(PHOTO), label, (FACE, CAP))  # no size: read from the file
    got = content_heatmap_authors(model, [rec], short_side=448)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, abs=1e-4)
    assert model.training and torch.equal(model.bn1.running_mean, bn_before)  # eval mode inside, restored


# --------------------------------------------------------------------------- authors' protocol on a fixture


class BrightnessNet(nn.Module):
    """Class 0 = "bright", class 1 = "dark"; its Grad-CAM for class 0 is the bright area.

    ``layer4`` pools 8 x 8 and mixes channels by the identity; the head is
    global-average-pool + linear. A large bias makes "dark" the prediction on
    every image, so a CAM taken for the predicted class would light up the
    background instead.
    """

    def __init__(self):
        super().__init__()
        self.layer4 = nn.Sequential(nn.AvgPool2d(8), nn.Conv2d(3, 3, 1))
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.layer4[1].weight.copy_(torch.eye(3)[:, :, None, None])
            self.layer4[1].bias.zero_()
            self.fc.weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]))
            self.fc.bias.copy_(torch.tensor([0.0, 100.0]))

    def forward(self, x):
        return self.fc(self.layer4(x).mean(dim=(2, 3)))


@pytest.fixture
def bright_square(tmp_path):
    img = np.zeros((48, 64, 3), dtype=np.uint8)  # H x W, black
    img[8:32, 16:40] = 255  # white object: x in [16, 40), y in [8, 32)
    path = tmp_path / "square.png"
    Image.fromarray(img).save(path)
    return str(path)


def test_heatmap_inside_the_box_gives_ch_near_one_for_the_ground_truth_class(bright_square):
    model = BrightnessNet()
    on_object = ImageRecord(bright_square, 0, ((16.0, 8.0, 40.0, 32.0),))
    elsewhere = ImageRecord(bright_square, 0, ((44.0, 20.0, 64.0, 48.0),))
    background_class = ImageRecord(bright_square, 1, ((16.0, 8.0, 40.0, 32.0),))
    no_box = ImageRecord(bright_square, 0, ())
    ch = content_heatmap_authors(model, [on_object, elsewhere, background_class, no_box], short_side=448)
    assert ch[0].item() > 0.95  # the CAM of class 0 lies on the square
    assert ch[1].item() < 0.02
    assert ch[2].item() < 0.05  # GT class 1 (also the prediction) looks at the background
    assert math.isnan(ch[3].item())


# --------------------------------------------------------------------------- evaluate_checkpoint


@pytest.fixture
def cub(tmp_path):
    write_cub(tmp_path)  # 3 classes, test split: 3 images of 8 x 6 px
    return tmp_path


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(1)
    model = build_model("resnet_small", 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    record = trial_record(method=MethodSpec(lam=0.25).model_dump(mode="json"), layer="layer4", arch="resnet_small",
                          num_classes=3, dataset="cub200", image_size=32)
    path = tmp_path / "ckpt" / "model.pt"
    save_checkpoint(path, model, opt, None, 4, extra=record)
    return path, model.eval()


def _evaluate(weights, cub, **settings):
    """evaluate_checkpoint on the test split of the CUB fixture; ``settings``: dotted path (``__`` for ".") -> value."""
    spec = checkpoint_spec(weights, {"data.dataset": "cub200", "data.root": str(cub), "data.eval_split": "test",
                                     **{k.replace("__", "."): v for k, v in settings.items()}})
    return evaluate_checkpoint(spec)


def test_fast_protocol_matches_a_manual_evaluation(cub, checkpoint):
    path, model = checkpoint
    result = _evaluate(path, cub, metrics=["top1", "ch", "cgc_loss"], data__batch_size=2)
    x, y, boxes = collate([BoxDataset(records("cub200", cub, "test"), train=False, image_size=32)[i] for i in range(3)])
    with torch.no_grad():
        logits = model(x)
    ch = content_heatmap(gradcam(model, x, y), boxes, (32, 32))
    assert result["top1"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert result["ch"] == pytest.approx(ch.mean().item(), abs=1e-6)
    assert math.isfinite(result["cgc_loss"]) and "iauc" not in result and "top5" not in result
    assert result["ch_protocol"] == "fast" and result["n_eval"] == 3 and result["epochs"] == 5
    cfg = result["config"]
    assert cfg["method"] == {"name": "cgc", "lam": 0.25, "tau": 0.5}
    assert cfg["model"]["arch"] == "resnet_small" and cfg["model"]["weights"] == str(path.resolve())
    assert cfg["data"]["image_size"] == 32  # the size the checkpoint records


def test_the_heldout_loss_does_not_depend_on_what_was_trained(cub, checkpoint, tmp_path):
    """The same weights recorded with another τ, anchor and λ score the same held-out CGC loss."""
    path, model = checkpoint
    other = tmp_path / "other.pt"
    method = MethodSpec(lam=3.0, tau=0.05, anchor="authors", resolution="feature", crop_scale=(0.5, 0.6))
    save_checkpoint(other, model, torch.optim.SGD(model.parameters(), lr=0.1), None, 4,
                    extra=trial_record(method=method.model_dump(mode="json"), layer="layer4", arch="resnet_small",
                                       num_classes=3, dataset="cub200", image_size=32))
    a, b = (_evaluate(p, cub, metrics=["cgc_loss"]) for p in (path, other))
    assert a["cgc_loss"] == b["cgc_loss"] and b["config"]["method"] == {"name": "cgc", "lam": 3.0, "tau": 0.05}


def test_checkpoint_records_of_every_version_read_back(tmp_path):
    """A record is the spec's method section and round-trips; an older one (the engine's own settings, fields
    missing that did not exist yet) is read as what it computed."""
    model = build_model("resnet_small", 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method = MethodSpec(name="cgc_no_neg", lam=0.7, negatives="global", view="center", lam_normalization="imagenet")
    new, old = tmp_path / "new.pt", tmp_path / "old.pt"
    save_checkpoint(new, model, opt, None, 0, extra=trial_record(
        method=method.model_dump(mode="json"), layer="layer3", arch="resnet_small", num_classes=3, dataset="cub200",
        image_size=32))
    clf = load_classifier(new)
    assert MethodSpec.model_validate(clf.method) == method and clf.layer == "layer3"
    before = {"name": "cgc", "lam": 0.4, "tau": 0.2, "resolution": "feature", "anchor": "authors",
              "global_negatives": True, "layer": "layer3", "crop_scale": [0.2, 1.0]}
    save_checkpoint(old, model, opt, None, 0, extra={"method": before, "arch": "resnet_small"})
    clf = load_classifier(old)
    assert clf.layer == "layer3" and MethodSpec.model_validate(clf.method) == MethodSpec(
        name="cgc", lam=0.4, tau=0.2, resolution="feature", anchor="authors", negatives="global",
        crop_scale=(0.2, 1.0), forward="joint", view="train", no_neg_scale="sum", cam_class="pred")


def test_authors_protocol_ch_and_plain_state_dict(cub, checkpoint, tmp_path):
    path, model = checkpoint
    plain = tmp_path / "plain.pth"
    torch.save(model.state_dict(), plain)
    result = _evaluate(plain, cub, model__arch="resnet_small", metrics=["top1", "ch"],
                       evaluation__ch_protocol="authors", data__image_size=32, evaluation__ch_short_side=40)
    expected = content_heatmap_authors(model, records("cub200", cub, "test"), short_side=40)
    assert result["ch"] == pytest.approx(expected.mean().item(), abs=1e-6) and result["n_ch"] == 3
    assert result["ch_protocol"] == "authors" and result["config"]["method"]["name"] == "unknown"
    fast = _evaluate(path, cub, metrics=["top1"])
    assert fast["top1"] == result["top1"]  # the same weights through both loaders
    inferred = _evaluate(plain, cub, metrics=["top1"], data__image_size=32)  # the architecture read off the tensors
    assert inferred["config"]["model"]["arch"] == "resnet_small" and inferred["top1"] == result["top1"]


def test_a_head_for_another_dataset_is_refused(cub, tmp_path):
    plain = tmp_path / "ten_classes.pth"
    torch.save(build_model("resnet_small", 10).state_dict(), plain)
    with pytest.raises(ValueError, match="classify 10 classes but the evaluated dataset has 3"):
        _evaluate(plain, cub, model__arch="resnet_small", metrics=["top1"])
    with pytest.raises(ValueError, match="ch_protocol"):
        _evaluate(plain, cub, model__arch="resnet_small", evaluation__ch_protocol="paper")


def test_result_row_units_and_trial_id(cub, checkpoint):
    path, _ = checkpoint
    result = _evaluate(path, cub, metrics=["top1", "ch"])
    row = result_row(result)
    assert row["top1"] == pytest.approx(100 * result["top1"]) and row["ch"] == pytest.approx(100 * result["ch"])
    assert row["iauc"] is None and row["method"] == "cgc" and row["lam"] == 0.25 and row["epochs"] == 5
    moved = json.loads(json.dumps(result["config"]))
    moved["data"]["root"] = "/elsewhere"
    assert evaluation_trial_id(moved) == row["trial_id"]  # where the data sits is not part of the identity
    moved["evaluate"]["protocol"] = "authors"
    assert evaluation_trial_id(moved) != row["trial_id"]


def test_cli_evaluate_prints_and_writes_one_row_per_protocol(cub, checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    store = tmp_path / "results"
    args = ["evaluate", str(path), "--dataset", "cub200", "--data-root", str(cub), "--metrics", "top1,ch",
            "--image-size", "32", "--num-workers", "0", "--device", "cpu",
            "--storage", str(store), "--format", "json"]
    assert main(args) == 0
    shown = json.loads(capsys.readouterr().out)
    assert main(args) == 0  # the same evaluation again replaces its row
    assert main(args + ["--protocol", "authors", "--short-side", "40"]) == 0
    assert main(args + ["--short-side", "40"]) == 2  # the fast protocol has no short side: said, not ignored
    table = read_rows(str(store), "evaluate").to_pylist()
    assert len(table) == 2
    fast = next(r for r in table if r["trial_id"] == shown["trial_id"])
    assert fast["top1"] == pytest.approx(shown["top1"]) and fast["dataset"] == "cub200"
    assert json.loads(fast["config_json"])["evaluate"]["protocol"] == "fast" and shown["ch_protocol"] == "fast"
    assert main(["evaluate", str(path), "--dataset", "cub200", "--storage", str(store)]) == 2  # no --data-root
