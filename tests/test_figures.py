"""Heatmap figures: explain grid, box placement, Figure 1 consistency, checkpoint loading, CLI."""

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from cgc_ray.cli.main import main as cli_main
from cgc_ray.config import DataSpec
from cgc_ray.config import HELDOUT_METRIC
from cgc_ray.data import class_names, records
from cgc_ray.data.synthetic import ensure
from cgc_ray.explain import figures as fg
from cgc_ray.method.cam import gradcam
from cgc_ray.method.cgc import cgc_term
from cgc_ray.method.metrics import content_heatmap
from cgc_ray.method.transforms import CropFlip
from cgc_ray.models.checkpoint import load_classifier, save_checkpoint
from cgc_ray.models.resnet import build_model


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    """A tiny spurious synthetic dataset (5 classes, 2 train / 2 aligned + 2 conflict test images per class)."""
    options = {**DataSpec().synthetic.model_dump(), "variant": "spurious", "n_train_per_class": 2, "n_test_per_class": 2}
    return ensure(tmp_path_factory.mktemp("synthetic"), **options, image_size=64)


def _small(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("resnet_small", 5).eval()


def _rgb(fig: Figure) -> np.ndarray:
    canvas = FigureCanvasAgg(fig)  # the renderer savefig uses for PNG
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].astype(int)


def _images(cub, n=3):
    recs = records("cub200", cub, "test")
    return fg.load_images([recs[i] for i in fg.pick_indices(len(recs), n, seed=0)], 64)


def test_explain_maps_and_figure_size(cub):
    images, labels, boxes = _images(cub)
    a, b = fg.Row(_small(0), "layer4", "a"), fg.Row(_small(1), "layer4", "b")
    maps = fg.explain_maps([a, b], images, labels, boxes, classes="gt")
    assert maps.heatmaps.shape == (2, 3, 64, 64) and maps.images.shape == (3, 64, 64, 3)
    assert torch.equal(maps.targets, labels.expand(2, -1))
    peak = maps.heatmaps.flatten(2).amax(dim=2)
    assert torch.allclose(peak, torch.ones_like(peak))  # random nets give non-zero maps, scaled to max 1
    assert (maps.heatmaps - maps.heatmaps[[1, 0]]).abs().mean() > 0.05  # two models, two explanations
    cams = gradcam(a.model, images, labels)
    assert torch.allclose(maps.ch[0], content_heatmap(cams, boxes, (64, 64)))
    pred = fg.explain_maps([a], images, labels, boxes, classes="pred")
    assert torch.equal(pred.targets[0], a.model(images).argmax(1))

    fig = fg.render_explain(maps, alpha=0.6, class_names=class_names("cub200", cub), dpi=100)
    assert _rgb(fig).shape == (round(100 * (1.8 * 2 + 0.4)), round(100 * (1.8 * 3 + 0.6)), 3)
    with pytest.raises(ValueError, match="alpha"):
        fg.render_explain(maps, alpha=1.5)


def test_overlays_differ_between_models_and_repeat_for_one(cub):
    images, labels, boxes = _images(cub, n=2)
    a, b = fg.Row(_small(0), "layer4", "m"), fg.Row(_small(1), "layer4", "m")

    def render(c, alpha):
        return _rgb(fg.render_explain(fg.explain_maps([c], images, labels, boxes), alpha=alpha, dpi=60))

    ra, rb = render(a, 0.7), render(b, 0.7)
    assert ra.shape == rb.shape
    assert np.abs(ra - rb).mean() > 1.0  # the overlays (not only captions) differ
    assert np.array_equal(ra, render(a, 0.7))  # deterministic


def test_box_is_drawn_on_its_pixel_boundaries():
    """64 x 64 px axes covering the whole figure: box edges lie between the pixels they name."""
    fig = Figure(figsize=(1, 1), dpi=64)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    x1, y1, x2, y2 = 10, 20, 40, 50
    fg.draw_cell(ax, np.zeros((64, 64, 3)), None, torch.tensor([[x1, y1, x2, y2]], dtype=torch.float32), alpha=0)
    rgb = _rgb(fig)
    assert rgb.shape == (64, 64, 3)
    green = (rgb[..., 1] > 150) & (rgb[..., 0] < 100) & (rgb[..., 2] < 100)
    rows, cols = slice(y1 + 2, y2 - 2), slice(x1 + 2, x2 - 2)
    assert (green[rows, x1 - 1] | green[rows, x1]).all() and (green[rows, x2 - 1] | green[rows, x2]).all()
    assert (green[y1 - 1, cols] | green[y1, cols]).all() and (green[y2 - 1, cols] | green[y2, cols]).all()
    assert not green[y1 + 3 : y2 - 3, x1 + 3 : x2 - 3].any()  # hollow
    assert not green[:, : x1 - 2].any() and not green[:, x2 + 2 :].any()
    assert not green[: y1 - 2].any() and not green[y2 + 2 :].any()


class _SymmetricCNN(nn.Module):
    """Stride-1 convs whose kernels are mirror-symmetric left-right: ``features`` commutes with a flip."""

    def __init__(self, symmetric: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1))
        if symmetric:
            with torch.no_grad():
                for conv in (self.features[0], self.features[2]):
                    conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.features(x)).mean(dim=(2, 3)))


def test_consistency_of_flip_equivariant_model_is_one():
    torch.manual_seed(1)
    images = torch.randn(3, 3, 16, 16)
    full_box = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(3, 4)
    flip = CropFlip(full_box, torch.ones(3, dtype=torch.bool))
    sym = fg.Row(_SymmetricCNN(True), "features", "sym")
    maps = fg.consistency_maps([sym], images, params=flip)
    assert maps.cos.shape == (1, 3)
    assert torch.allclose(maps.cos, torch.ones(1, 3), atol=1e-5)
    assert torch.allclose(maps.t_of_g, maps.g_of_t, atol=1e-5)
    assert torch.allclose(maps.t_images, maps.images.flip(2))  # N x S x S x 3: width is dim 2
    # the check can fail: the same net without mirror-symmetric kernels is not flip-equivariant
    asym = fg.Row(_SymmetricCNN(False), "features", "asym")
    assert fg.consistency_maps([asym], images, params=flip).cos.max() < 0.999
    fig = fg.render_consistency(maps, dpi=50)
    assert _rgb(fig).shape == (round(50 * (1.6 * 3 + 0.5)), round(50 * 1.6 * 4), 3)


def test_consistency_samples_T_from_seed_and_compares_like_the_loss(cub):
    images, _, _ = _images(cub, n=2)
    c = fg.Row(_small(0), "layer4", "a")
    m1 = fg.consistency_maps([c], images, seed=3)
    m2 = fg.consistency_maps([c], images, seed=3)
    assert torch.equal(m1.params.boxes, m2.params.boxes) and torch.equal(m1.cos, m2.cos)
    assert not torch.equal(m1.params.boxes, fg.consistency_maps([c], images, seed=4).params.boxes)
    assert ((m1.cos > -1) & (m1.cos <= 1 + 1e-6)).all()
    assert torch.equal(m1.targets[0], c.model(images).argmax(1))
    # the loss's own code path, T drawn from the same seed: its l2 ablation summed over pixels is 2 - 2 cos
    l2 = HELDOUT_METRIC.model_copy(update={"name": "cgc_no_neg", "no_neg_scale": "sum"})
    term = cgc_term(c.model, images, l2, layer="layer4", generator=torch.Generator().manual_seed(3))
    assert term.loss.item() == pytest.approx((2 - 2 * m1.cos[0]).mean().item(), abs=1e-5)
    assert m1.cos.std() > 1e-3  # two images that T moves differently: the check is not trivially 2 - 2


def test_load_row_from_cgc_checkpoint_and_plain_state_dict(tmp_path):
    model = _small(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint(ckpt, model, opt, None, 3, extra={"method": {"name": "cgc", "lam": 0.8, "layer": "layer3"}})
    c, loaded = fg.load_row(ckpt)
    assert (loaded.arch, c.layer) == ("resnet_small", "layer3") and "cgc λ=0.8" in c.label and not c.model.training
    assert all(torch.equal(c.model.state_dict()[k], v) for k, v in model.state_dict().items())
    assert load_classifier(ckpt).epochs == 4 and load_classifier(ckpt).method["lam"] == 0.8
    # λ = 0 of a λ ablation trains CE only: its row is labelled as the baseline it is
    zero = tmp_path / "zero" / "checkpoint.pt"
    save_checkpoint(zero, model, opt, None, 3, extra={"method": {"name": "cgc", "lam": 0.0, "layer": "layer3"}})
    assert fg.load_row(zero)[0].label.endswith("\nbaseline")

    torch.manual_seed(0)
    r18 = build_model("resnet18", 7)
    plain = tmp_path / "r18.pth"
    torch.save({f"module.{k}": v for k, v in r18.state_dict().items()}, plain)  # DataParallel prefix
    c18, loaded18 = fg.load_row(plain)
    assert (loaded18.arch, c18.layer, c18.label) == ("resnet18", "layer4", "r18")
    assert torch.equal(c18.model.fc.weight, r18.fc.weight)
    with pytest.raises(ValueError, match="do not fit arch='resnet34'"):
        fg.load_row(plain, arch="resnet34")


def test_pick_indices():
    assert fg.pick_indices(50, 5, seed=0) == fg.pick_indices(50, 5, seed=0)
    assert fg.pick_indices(50, 5, seed=0) != fg.pick_indices(50, 5, seed=1)
    assert sorted(fg.pick_indices(4, 10, seed=0)) == [0, 1, 2, 3]
    assert fg.pick_indices(50, 5, seed=0, indices=[7, 2]) == [7, 2]
    with pytest.raises(ValueError, match=r"\[50\] out of range"):
        fg.pick_indices(50, 5, seed=0, indices=[1, 50])


def test_cli_explain_and_sample_figure(cub, tmp_path):
    a, b = tmp_path / "cgc.pt", tmp_path / "plain.pth"
    save_checkpoint(a, _small(0), torch.optim.SGD(_small(0).parameters(), lr=0.1), None, 1,
                    extra={"method": {"name": "cgc", "lam": 0.5, "layer": "layer4"}})
    torch.save(_small(1).state_dict(), b)
    out = tmp_path / "fig" / "explain.png"
    common = ["--dataset", "cub200", "--data-root", str(cub), "--n", "3", "--dpi", "50"]
    assert cli_main(["explain", str(b), str(a), *common, "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == (round(50 * (1.8 * 3 + 0.6)), round(50 * (1.8 * 2 + 0.4)))
    cons = tmp_path / "cons.png"
    assert cli_main(["explain", str(b), str(a), *common, "--split", "conflict", "--consistency", "--out", str(cons)]) == 0
    with Image.open(cons) as im:
        assert im.size == (round(50 * 1.6 * 6), round(50 * (1.6 * 3 + 0.5)))
    assert cli_main(["explain", str(a), *common, "--where", "conflict", "--out", str(tmp_path / "x.png")]) == 2

    sample = fg.sample_explain_figure(a, tmp_path / "exp" / "explain.png", dataset="cub200", root=cub, baseline=b, n=2)
    with Image.open(sample) as im:
        assert im.size == (round(80 * (1.8 * 2 + 0.6)), round(80 * (1.8 * 2 + 0.4)))
