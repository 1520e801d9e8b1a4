"""The paper's protocols, each against an independent reference: IAUC (the authors' script), the held-out
CGC loss, UnRel, the BatchNorm treatment and the view of the CGC term, the l2 ablation's scale, few-shot
pools, the semi-supervised labelled split."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures_data import write_cub, write_imagenet, write_unrel
from scipy.ndimage import convolve, gaussian_filter

from cgc_ray.config import (
    PRESETS,
    ExperimentSpec,
    MethodSpec,
    SpecError,
    apply_overrides,
    load_spec,
    validate_against_data,
)
from cgc_ray.data import ImageRecord, info, records
from cgc_ray.explain.evaluation import checkpoint_spec, evaluate_checkpoint
from cgc_ray.method.cgc import cgc_term
from cgc_ray.method.loss import cgc_loss
from cgc_ray.method.metrics import insertion_auc
from cgc_ray.models.resnet import build_model
from cgc_ray.train.trial import class_spread_sample, evaluator, heldout_order, trial_data

# ---------------------------------------------------------------- IAUC, the authors' script in NumPy


def _authors_iauc_numpy(model, image: torch.Tensor, saliency_hw: np.ndarray, step: int) -> float:
    """RISE's insertion game as the authors' evaluate_auc_metrics.py plays it, one image, NumPy + the model."""
    klen, nsig = 11, 5
    delta = np.zeros((klen, klen))
    delta[klen // 2, klen // 2] = 1
    kern = gaussian_filter(delta, nsig)  # their gkern
    img = image.numpy()
    blurred = np.stack([convolve(c, kern, mode="constant", cval=0.0) for c in img])  # conv2d, zero padding
    H, W = saliency_hw.shape
    order = np.flip(np.argsort(saliency_hw.reshape(-1)))  # their salient order
    n_steps = (H * W + step - 1) // step
    with torch.no_grad():
        c = model(image[None]).argmax(1).item()
        start, finish = blurred.reshape(3, -1).copy(), img.reshape(3, -1)
        scores = []
        for i in range(n_steps + 1):
            p = torch.softmax(model(torch.from_numpy(start.reshape(1, 3, H, W)).float()), 1)[0, c].item()
            scores.append(p)
            coords = order[step * i: step * (i + 1)]
            start[:, coords] = finish[:, coords]
    scores = np.array(scores)
    return float((scores.sum() - scores[0] / 2 - scores[-1] / 2) / (len(scores) - 1))


def test_authors_iauc_protocol_matches_a_numpy_reimplementation_of_their_script():
    torch.manual_seed(0)
    model = build_model("resnet_small", 5).eval()
    images = torch.randn(3, 3, 32, 32)
    saliency = torch.rand(3, 8, 8)
    saliency[0, :4] = 0  # ties: the order of tied pixels is NumPy's, as in their script
    ours = insertion_auc(model, images, saliency, protocol="authors", pixels_per_step=64)
    up = F.interpolate(saliency[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0].numpy()
    ref = [_authors_iauc_numpy(model, images[i], up[i], 64) for i in range(3)]
    assert ours.tolist() == pytest.approx(ref, abs=1e-5)
    fast = insertion_auc(model, images, saliency, protocol="fast", pixels_per_step=64)
    assert not torch.allclose(fast, ours, atol=1e-4)  # their blur and order give other numbers


def test_iauc_sample_is_seeded_and_spread_over_every_class():
    recs = [ImageRecord(f"/d/c{c}/{i:03d}.jpg", c) for c in range(5) for i in range(20)]  # class-sorted, like disk
    sample = class_spread_sample(recs, 10, seed=0)
    assert len(sample) == 10 and {r.label for r in sample} == set(range(5))
    assert [r.label for r in sample].count(0) == 2
    assert sample == class_spread_sample(list(reversed(recs)), 10, seed=0)  # file order does not matter
    assert sample != class_spread_sample(recs, 10, seed=1)
    assert len(class_spread_sample(recs, None, seed=0)) == 100  # None: every image


# ---------------------------------------------------------------- the held-out CGC loss


def test_heldout_cgc_loss_does_not_depend_on_file_order(tmp_path):
    cub = write_cub(tmp_path)
    recs = sorted(records("cub200", cub, "train") + records("cub200", cub, "test"), key=lambda r: r.label)
    torch.manual_seed(0)
    model = build_model("resnet_small", 3).eval()
    values = []
    for order in (recs, list(reversed(recs)), recs[3:] + recs[:3]):
        spec = apply_overrides(ExperimentSpec(), ["data.image_size=32", "seed=5", "evaluation.cgc_batch=4",
                                                  "data.num_workers=0", "metrics=[cgc_loss]"])
        values.append(evaluator(spec, order, batch=4)(model, "cpu")["cgc_loss"])
    assert values[0] == pytest.approx(values[1], abs=1e-6) == pytest.approx(values[2], abs=1e-6)
    assert [r.label for r in recs[:2]] == [0, 0]  # class-sorted, as folders list them
    assert [r.label for r in heldout_order(recs, 5)] != [r.label for r in recs]  # groups are drawn, not listed


# ---------------------------------------------------------------- UnRel with an ImageNet head


def test_unrel_is_scored_with_the_checkpoints_own_1000_class_head(tmp_path):
    unrel = write_unrel(tmp_path)
    torch.manual_seed(0)
    model = build_model("resnet_small", 1000)
    path = tmp_path / "imagenet.pt"
    torch.save(model.state_dict(), path)
    result = evaluate_checkpoint(checkpoint_spec(path, {"data.dataset": "unrel", "data.root": str(unrel),
                                                        "metrics": ["top1", "ch"], "data.image_size": 32}))
    recs = records("unrel", unrel, "test")
    assert {r.label for r in recs} == {817, 207, 779}  # ImageNet class indices
    with torch.no_grad():
        from cgc_ray.data.dataset import BoxDataset, collate

        x, y, _ = collate([BoxDataset(recs, train=False, image_size=32)[i] for i in range(len(recs))])
        expected = (model.eval()(x).argmax(1) == y).float().mean().item()
    assert result["top1"] == pytest.approx(expected) and result["n_eval"] == 3 and 0 <= result["ch"] <= 1
    assert info("unrel").label_space == 1000


# ---------------------------------------------------------------- BatchNorm treatment, view, cam class


def _batch(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_separate_forward_gives_the_cross_entropy_batchnorm_of_x_alone():
    torch.manual_seed(0)
    model = build_model("resnet_small", 3).train()
    x, _ = _batch()
    with torch.no_grad():
        alone = model(x)  # train mode: BatchNorm statistics of x only
    sep, joint = (cgc_term(model, x, MethodSpec(forward=f), layer="layer4", generator=torch.Generator().manual_seed(1))
                  .logits[0] for f in ("separate", "joint"))
    assert torch.allclose(sep, alone, atol=1e-5)
    assert not torch.allclose(joint, alone, atol=1e-3)  # BatchNorm saw [x; T(x)]


def test_center_view_applies_T_to_the_centre_view():
    torch.manual_seed(0)
    model = build_model("resnet_small", 3).train()
    x, _ = _batch(0)
    xc, _ = _batch(1)
    on_center = cgc_term(model, x, MethodSpec(forward="separate", view="center"), layer="layer4", x_center=xc,
                         generator=torch.Generator().manual_seed(2))
    as_if_train = cgc_term(model, xc, MethodSpec(forward="separate", view="train"), layer="layer4",
                           generator=torch.Generator().manual_seed(2))
    assert on_center.loss.item() == pytest.approx(as_if_train.loss.item(), rel=1e-5)  # the pair is (xc, T(xc))
    with torch.no_grad():
        assert torch.allclose(on_center.logits[0], model(x), atol=1e-5)  # cross-entropy stays on the training view
        assert torch.allclose(on_center.logits[1], model(xc), atol=1e-5)  # then the centre view, then T(xc)
    assert len(on_center.logits) == 3 and len(as_if_train.logits) == 2
    with pytest.raises(ValueError, match="x_center"):
        cgc_term(model, x, MethodSpec(view="center"), layer="layer4")


def test_cam_class_label_explains_the_ground_truth():
    torch.manual_seed(0)
    model = build_model("resnet_small", 3).eval()
    x, y = _batch()
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = (pred + 1) % 3  # never the prediction
    g = lambda: torch.Generator().manual_seed(3)
    by_label = cgc_term(model, x, MethodSpec(cam_class="label"), layer="layer4", y=y, generator=g()).loss
    by_pred = cgc_term(model, x, MethodSpec(cam_class="pred"), layer="layer4", generator=g()).loss
    forced = cgc_term(model, x, MethodSpec(cam_class="label"), layer="layer4", y=pred, generator=g()).loss
    assert forced.item() == pytest.approx(by_pred.item(), rel=1e-6) and by_label.item() != by_pred.item()


def test_no_negatives_mean_scale_is_the_authors_mse():
    torch.manual_seed(0)
    k, q = torch.rand(4, 7, 7), torch.rand(4, 7, 7)
    qn, kn = F.normalize(q.flatten(1), dim=1), F.normalize(k.flatten(1), dim=1)
    assert cgc_loss(k, q, negatives=False, l2_reduction="mean").item() == pytest.approx(F.mse_loss(qn, kn).item())
    assert cgc_loss(k, q, negatives=False, l2_reduction="sum").item() == pytest.approx(
        49 * F.mse_loss(qn, kn).item(), rel=1e-5)
    assert load_spec(PRESETS["imagenet_r18"]).method.no_neg_scale == "mean"  # Tables 5/11 use the authors' code


# ---------------------------------------------------------------- few-shot pools at the datasets' real sizes


REAL_COUNTS = {  # images per class in each split (min, max), from the datasets' own lists
    "cub200": {"train": (29, 30), "test": (11, 30)},
    "cars196": {"train": (24, 68), "test": (24, 68)},
    "aircraft": {"train": (33, 34), "val": (33, 34), "trainval": (66, 67), "test": (33, 34)},
    "flowers102": {"train": (10, 10), "val": (10, 10), "test": (20, 238)},
}


@pytest.mark.parametrize("dataset", sorted(REAL_COUNTS))
def test_every_fewshot_preset_fits_its_datasets_real_class_counts(dataset):
    spec = load_spec(PRESETS[f"fewshot_{dataset}"])
    pool = info(dataset).fewshot_pool
    smallest = {c: sum(REAL_COUNTS[dataset][s][c % 2] for s in pool) for c in range(4)}  # per class, min and max
    validate_against_data(spec, smallest)  # 1, 5 and 10 shots leave validation images in every class
    assert max(spec.sweep.grid["data.shots"]) == 10


def test_flowers_train_split_alone_would_not_fit_ten_shots():
    spec = load_spec(PRESETS["fewshot_flowers102"])
    with pytest.raises(SpecError, match="data.shots=10"):
        validate_against_data(spec, {c: 10 for c in range(102)})  # train only: exactly 10 per class
    assert info("flowers102").fewshot_pool == ("train", "val")


# ---------------------------------------------------------------- semi-supervised: the standard list


def test_semisup_paper_preset_requires_the_1percent_list(tmp_path):
    imnet = write_imagenet(tmp_path)
    spec = apply_overrides(load_spec(PRESETS["semisup"]), [f"data.root={tmp_path}", "sweep.grid={}"])
    td = trial_data(spec)
    assert td.labelled_split == f"list:{imnet / '1percent.txt'}"
    assert sorted(Path(r.path).name for r in td.train) == ["n01440764_10026.JPEG", "n01484850_2.JPEG"]
    (imnet / "1percent.txt").unlink()
    with pytest.raises(SpecError, match=r"1percent.txt.*simclr.*data.split_file"):
        trial_data(spec)
    demo = load_spec(PRESETS["semisup_demo"])
    assert demo.data.labelled == "random"
    assert math.isclose(demo.data.percent, 5.0)
