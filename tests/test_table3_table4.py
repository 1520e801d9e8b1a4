"""The paper's measurement in the rows (issue 18, items 4 and 8): the authors' CH and IAUC inputs in the trial
evaluator, cMWP as an evaluation saliency (Table 4), and an imagenet sweep's checkpoints scored on UnRel (Table 3).

Each against an independent reference: torchvision's own resize, a NumPy CH of excitation backprop's map
(``method.excitation``, tested against TorchRay in test_excitation.py), a direct forward for top-1, and paired
differences computed by hand.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from conftest import TINY, result_row
from fixtures_data import write_cub, write_unrel
from PIL import Image
from test_evaluation import np_content_heatmap, np_gradcam_authors
from torch import nn

from cgc_ray.cli.main import main as cli
from cgc_ray.config import PRESETS, ExperimentSpec, SpecError, apply_overrides, expand_trials, load_spec
from cgc_ray.config.identity import identity, trial_id
from cgc_ray.config.spec import EvaluationSpec
from cgc_ray.data import records
from cgc_ray.data.dataset import IMAGENET_MEAN, IMAGENET_STD, BoxDataset, collate
from cgc_ray.explain.evaluation import checkpoint_spec, evaluate_checkpoint, evaluate_experiment
from cgc_ray.method.cam import gradcam
from cgc_ray.method.excitation import excitation_backprop
from cgc_ray.method.metrics import SALIENCIES, content_heatmap_saliency, insertion_auc
from cgc_ray.models.checkpoint import save_checkpoint, trial_record
from cgc_ray.models.resnet import build_model
from cgc_ray.results.report import report
from cgc_ray.results.stats import analyze
from cgc_ray.results.table import read_rows, write_row
from cgc_ray.storage import Storage
from cgc_ray.train.trial import evaluation_details, evaluator, run_trial

REPO = Path(__file__).resolve().parent.parent
NEW_FIELDS = ("iauc_input", "ch_protocol", "ch_short_side", "saliency", "saliency_window")


def _model(num_classes: int = 3, seed: int = 0) -> nn.Module:
    """A small ResNet whose BatchNorms are not the identity, in eval mode."""
    torch.manual_seed(seed)
    model = build_model("resnet_small", num_classes)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture
def cub(tmp_path):
    """The CUB fixture with textured images (uniform ones give near-uniform maps): test split, 3 images."""
    write_cub(tmp_path)
    rng = np.random.default_rng(0)
    for rec in records("cub200", tmp_path, "train") + records("cub200", tmp_path, "test"):
        Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).save(rec.path, format="PNG")
    return tmp_path


def _spec(*overrides: str) -> ExperimentSpec:
    return apply_overrides(ExperimentSpec(), ["data.image_size=32", "data.num_workers=0", "seed=3", *overrides])


# --------------------------------------------------------------------------- the settings and their ids


def test_the_saliency_names_are_the_metrics():
    assert get_args(EvaluationSpec.model_fields["saliency"].annotation) == SALIENCIES


def test_the_new_evaluation_fields_keep_every_existing_trial_id():
    """At today's behaviour each new field stays out of the identity; away from it, the id changes."""
    ident = identity(ExperimentSpec())
    assert not [k for k in ident if k.removeprefix("evaluation.") in NEW_FIELDS]
    for override in (["evaluation.ch_protocol=authors"], ["evaluation.iauc_input=squash"],
                     ["evaluation.saliency=cmwp"], ["evaluation.saliency=cmwp", "evaluation.saliency_window=7"],
                     ["evaluation.ch_protocol=authors", "evaluation.ch_short_side=224"]):
        assert trial_id(apply_overrides(ExperimentSpec(), override)) != trial_id(ExperimentSpec()), override


def test_settings_that_do_not_apply_are_refused():
    with pytest.raises(SpecError, match="ch_short_side=224 is the authors' protocol's resize"):
        _spec("evaluation.ch_short_side=224")
    with pytest.raises(SpecError, match="saliency_window=7 applies to excitation backprop"):
        _spec("evaluation.saliency_window=7")


def test_paper_presets_measure_as_the_authors_and_demos_keep_the_fast_protocol():
    for name, tree in PRESETS.items():
        for t in expand_trials(load_spec(tree)):
            ev = t.evaluation
            if name.endswith("_demo"):
                assert (ev.ch_protocol, ev.iauc_input) == ("fast", "center_crop"), name
                assert not [k for k in identity(t) if k.removeprefix("evaluation.") in NEW_FIELDS], name
            else:
                assert (ev.ch_protocol, ev.ch_short_side, ev.iauc_input) == ("authors", 448, "squash"), name


# --------------------------------------------------------------------------- item 4: the trial evaluator


def test_the_trial_evaluator_scores_ch_by_the_authors_protocol(cub):
    model = _model()
    recs = records("cub200", cub, "test")
    spec = _spec("metrics=[top1, ch]", "evaluation.ch_protocol=authors", "evaluation.ch_short_side=40")
    out = evaluator(spec, recs, batch=2)(model, "cpu")
    expected = [np_content_heatmap(np_gradcam_authors(model, Path(r.path), r.label, 40), r.boxes, 6, 8) for r in recs]
    assert out["ch"] == pytest.approx(float(np.mean(expected)), abs=1e-5) and out["n_ch"] == 3
    fast = evaluator(_spec("metrics=[top1, ch]"), recs, batch=2)(model, "cpu")
    assert fast["top1"] == out["top1"] and abs(fast["ch"] - out["ch"]) > 1e-3  # another measurement of CH
    assert evaluation_details(spec, out) == {"ch_protocol": "authors", "ch_saliency": "gradcam"}


def test_squash_is_torchvisions_resize_to_a_square(cub):
    rec = records("cub200", cub, "test")[0]
    x, _, boxes = BoxDataset([rec], train=False, image_size=32, eval_resize="squash")[0]
    tv = T.Compose([T.Resize((32, 32)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    assert torch.allclose(x, tv(Image.open(rec.path).convert("RGB")), atol=1e-6)
    (x1, y1, x2, y2), = rec.boxes
    assert torch.allclose(boxes, torch.tensor([[x1 * 4, y1 * 32 / 6, x2 * 4, y2 * 32 / 6]]))  # 8 x 6 -> 32 x 32


def test_iauc_scores_the_squashed_images_with_the_authors_protocol(cub):
    model = _model()
    recs = records("cub200", cub, "test")
    spec = _spec("metrics=[iauc]", "evaluation.iauc_input=squash", "evaluation.iauc_protocol=authors")
    got = evaluator(spec, recs, batch=2)(model, "cpu")
    tv = T.Compose([T.Resize((32, 32)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    x = torch.stack([tv(Image.open(r.path).convert("RGB")) for r in recs])
    y = torch.tensor([r.label for r in recs])
    with torch.no_grad():
        expected = insertion_auc(model, x, gradcam(model, x, y), protocol="authors").mean().item()
    assert got["iauc"] == pytest.approx(expected, abs=1e-6) and got["n_iauc"] == 3
    crop = evaluator(_spec("metrics=[iauc]", "evaluation.iauc_protocol=authors"), recs, batch=2)(model, "cpu")
    assert crop["iauc"] != pytest.approx(got["iauc"], abs=1e-6)


def test_a_trial_records_how_it_measured_ch(tmp_path):
    spec = apply_overrides(load_spec(PRESETS["lambda_ablation_demo"]), [
        *TINY, f"storage={tmp_path}", "sweep.grid={}", "method.name=baseline", "metrics=[top1, ch]",
        "evaluation.ch_protocol=authors", "evaluation.ch_short_side=32", "evaluation.saliency=cmwp"])
    metrics = run_trial(spec, trial_dir=tmp_path / "t")
    assert (metrics["ch_protocol"], metrics["ch_saliency"]) == ("authors", "cmwp")
    assert 0 < metrics["n_ch"] <= metrics["n_eval"] and 0 <= metrics["ch"] <= 1


# --------------------------------------------------------------------------- item 8, Table 4: cMWP


def _np_cmwp_ch(model: nn.Module, path: str, label: int, boxes, short_side: int, window: int | None) -> float:
    """The authors' Table 4 measurement written out: PIL short-side resize, the cMWP map of the ground-truth class at
    layer3, resized to the original image, skipped when all zero, l1-normalised, summed inside the boxes."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    size = (short_side, int(short_side * h / w)) if w <= h else (int(short_side * w / h), short_side)
    arr = (np.asarray(img.resize(size, Image.BILINEAR), dtype=np.float32) / 255 - np.array(IMAGENET_MEAN)) \
        / np.array(IMAGENET_STD)
    x = torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1)[None]
    sal = excitation_backprop(model, x, torch.tensor([label]), layer="layer3", window=window)[0].numpy()
    return math.nan if sal.sum() <= 0 else np_content_heatmap(sal, boxes, h, w)


@pytest.mark.parametrize("window", [None, 2])
def test_cmwp_ch_by_the_authors_protocol_matches_a_numpy_reference(cub, tmp_path, window):
    model = _model()
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, torch.optim.SGD(model.parameters(), lr=0.1), None, 0, extra=trial_record(
        method={"name": "cgc"}, layer="layer4", arch="resnet_small", num_classes=3, dataset="cub200", image_size=32))
    spec = checkpoint_spec(path, {"data.dataset": "cub200", "data.root": str(cub), "metrics": ["top1", "ch"],
                                  "evaluation.ch_protocol": "authors", "evaluation.ch_short_side": 64,
                                  "evaluation.saliency": "cmwp", "evaluation.saliency_window": window})
    result = evaluate_checkpoint(spec)
    expected = [_np_cmwp_ch(model, r.path, r.label, r.boxes, 64, window) for r in records("cub200", cub, "test")]
    assert result["ch"] == pytest.approx(float(np.nanmean(expected)), abs=1e-5)
    assert result["n_ch"] == sum(not math.isnan(e) for e in expected) >= 2
    assert (result["ch_protocol"], result["ch_saliency"]) == ("authors", "cmwp")
    assert result["config"]["evaluate"]["saliency"] == "cmwp"


def test_cli_saliency_flag_writes_the_cmwp_ch_and_its_column(cub, tmp_path, capsys):
    model = _model()
    path = tmp_path / "plain.pth"
    torch.save(model.state_dict(), path)
    store = tmp_path / "results"
    args = ["evaluate", str(path), "--arch", "resnet_small", "--dataset", "cub200", "--data-root", str(cub),
            "--split", "test", "--metrics", "top1,ch", "--image-size", "32", "--num-workers", "0", "--device", "cpu",
            "--storage", str(store), "--format", "json"]
    assert cli(args + ["--saliency", "cmwp", "--saliency-window", "2"]) == 0
    assert cli(args) == 0
    rows = {r["ch_saliency"]: r for r in read_rows(str(store), "evaluate").to_pylist()}
    x, y, boxes = collate([BoxDataset(records("cub200", cub, "test"), train=False, image_size=32)[i] for i in range(3)])
    expected = content_heatmap_saliency(model, x, y, boxes, saliency="cmwp", window=2)
    assert rows["cmwp"]["ch"] == pytest.approx(100 * expected.nanmean().item(), abs=1e-4)
    assert rows["cmwp"]["ch_protocol"] == rows["gradcam"]["ch_protocol"] == "fast"
    assert rows["cmwp"]["top1"] == rows["gradcam"]["top1"] and rows["cmwp"]["ch"] != rows["gradcam"]["ch"]
    assert cli(args + ["--saliency-window", "2"]) == 2  # a window without excitation backprop is refused


# --------------------------------------------------------------------------- item 8, Table 3: UnRel


def _imagenet_sweep(storage: Path) -> dict[tuple[str, int], nn.Module]:
    """Rows and 1000-class checkpoints of a finished `imagenet` sweep (baseline and CGC, seeds 0 and 1; the
    trials measure CH by the authors' protocol at a 64 px short side), plus one 5-class demo trial."""
    store, models = Storage(str(storage)), {}
    base = ["name=imagenet", "data.dataset=imagenet", "data.root=/data/imagenet", "model.arch=resnet_small",
            "data.image_size=32", "metrics=[top1, top5, ch]", "evaluation.ch_protocol=authors",
            "evaluation.ch_short_side=64"]
    for method in ("baseline", "cgc"):
        for seed in (0, 1):
            trial = _spec(*base, f"method.name={method}", f"seed={seed}")
            models[method, seed] = model = _model(1000, seed=10 * seed + (method == "cgc"))
            _save(store, trial, model, 1000)
            write_row(str(storage), "imagenet", result_row(trial, {"top1": 1.0}))
    demo = _spec(*base, "data.dataset=synthetic", "data.root=null", "method.name=cgc", "seed=0")
    _save(store, demo, _model(5), 5)
    write_row(str(storage), "imagenet", result_row(demo, {"top1": 1.0}))
    return models


def _save(store: Storage, trial: ExperimentSpec, model: nn.Module, num_classes: int) -> None:
    save_checkpoint(store.checkpoint_path("imagenet", trial_id(trial)), model,
                    torch.optim.SGD(model.parameters(), lr=0.1), None, 89, extra=trial_record(
                        method=trial.method.model_dump(mode="json"), layer="layer4", arch="resnet_small",
                        num_classes=num_classes, dataset=trial.data.dataset, image_size=32))


def _top1(model: nn.Module, unrel: Path) -> float:
    x, y, _ = collate([BoxDataset(records("unrel", unrel, "test"), train=False, image_size=32)[i] for i in range(3)])
    with torch.no_grad():
        return 100 * (model(x).argmax(1) == y).float().mean().item()


def _unrel_script():
    spec = importlib.util.spec_from_file_location("unrel_script", REPO / "experiments" / "unrel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_imagenet_sweep_scored_on_unrel_pairs_baseline_and_cgc_by_seed(tmp_path, capsys):
    unrel, storage = write_unrel(tmp_path), tmp_path / "results"
    models = _imagenet_sweep(storage)
    settings = {"data.dataset": "unrel", "data.root": str(unrel), "data.eval_split": None, "metrics": ["top1", "ch"]}
    said = []
    written = evaluate_experiment(str(storage), "imagenet", "unrel", settings, log=said.append)
    assert len(written) == 4 and len(said) == 5
    assert [line for line in said if "left out" in line] == [
        line for line in said if "its head classifies 5 classes, unrel needs 1000" in line] != []

    rows = read_rows(str(storage), "unrel").to_pylist()
    assert {(r["method"], r["seed"]) for r in rows} == set(models)
    for r in rows:
        assert r["top1"] == pytest.approx(_top1(models[r["method"], r["seed"]], unrel), abs=1e-4)
        assert (r["dataset"], r["ch_protocol"], r["ch_saliency"], r["epochs"]) == ("unrel", "authors", "gradcam", 90)
        assert r["top5"] is None and 0 <= r["ch"] <= 100
    by = {(r["method"], r["seed"]): r for r in rows}
    (pair,) = analyze(read_rows(str(storage), "unrel")).paired
    for metric in ("top1", "ch"):
        diffs = [by["cgc", s][metric] - by["baseline", s][metric] for s in (0, 1)]
        assert pair.stats[metric].n == 2 and pair.stats[metric].mean == pytest.approx(np.mean(diffs))
    assert "− baseline" in report(str(storage), "unrel", "markdown")

    # the script: re-running scores nothing twice and prints Table 3's report
    script = _unrel_script()
    assert script.main(["--data-root", str(unrel), "--storage", str(storage), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("scored already") == 4 and "− baseline" in out
    assert len(read_rows(str(storage), "unrel")) == 4
    assert script.main(["--data-root", str(unrel), "--storage", str(storage), "--set", "optim.lr=1"]) == 2
    assert "a row keeps its trial's training" in capsys.readouterr().err


def test_unrel_under_another_protocol_is_another_row(tmp_path):
    unrel, storage = write_unrel(tmp_path), tmp_path / "results"
    _imagenet_sweep(storage)
    settings = {"data.dataset": "unrel", "data.root": str(unrel), "data.eval_split": None, "metrics": ["top1", "ch"]}
    evaluate_experiment(str(storage), "imagenet", "unrel", settings)
    evaluate_experiment(str(storage), "imagenet", "unrel", {**settings, "evaluation.ch_protocol": "fast",
                                                            "evaluation.ch_short_side": 448})
    rows = read_rows(str(storage), "unrel").to_pylist()
    assert sorted(r["ch_protocol"] for r in rows) == ["authors"] * 4 + ["fast"] * 4
    assert len(analyze(read_rows(str(storage), "unrel")).paired) == 2  # one pair per protocol, not mixed
    with pytest.raises(ValueError, match="no finished trials"):
        evaluate_experiment(str(storage), "nothing", "unrel", settings)
