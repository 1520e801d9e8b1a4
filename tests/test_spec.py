"""ExperimentSpec: validation messages, overrides, grid expansion, trial ids, presets, data checks."""

import json
import math

import pytest
import yaml

from cgc_ray.config import (
    CGC_ONLY_FIELDS,
    HELDOUT_METRIC,
    NON_IDENTITY_FIELDS,
    PRESETS,
    ExperimentSpec,
    MethodSpec,
    SpecError,
    apply_overrides,
    check_data_root,
    effective_lam,
    effective_method,
    expand_trials,
    load_spec,
    spec_hash,
    trial_id,
    validate_against_data,
    validate_spec,
)
from cgc_ray.config.base import flatten
from cgc_ray.data import DATASETS


def _err(overrides, base=None):
    with pytest.raises(SpecError) as e:
        apply_overrides(base or ExperimentSpec(), overrides)
    return str(e.value)


# --------------------------------------------------------------------------- validation messages


@pytest.mark.parametrize(
    "override, must_contain",
    [
        ("method.lam=-0.1", ["method.lam", "greater than or equal to 0", "-0.1"]),
        ("method.tau=0", ["method.tau", "greater than 0", "got 0"]),
        ("method.tau=-1", ["method.tau", "greater than 0"]),
        ("data.batch_size=1", ["data.batch_size", "greater than or equal to 2", "got 1"]),
        ("data.dataset=cub", ["data.dataset", "'cub'", *[f"'{d}'" for d in DATASETS]]),
        ("model.arch=vgg16", ["model.arch", "'resnet50'", "'resnet_small'", "'vgg16'"]),
        ("method.name=gradcam", ["method.name", "'baseline'", "'cgc'", "'cgc_no_neg'"]),
        ("method.crop_scale=[0.5, 0.2]", ["method.crop_scale", "0 < low <= high <= 1"]),
        ("scaling.gpus_per_worker=1.5", ["scaling.gpus_per_worker", "whole number"]),
        ("data.percent=150", ["data.percent", "less than or equal to 100"]),
        ("optim.schedule.milestones=[60, 30]", ["milestones", "strictly increasing"]),
        ("optim.warmup_epochs=90", ["optim.warmup_epochs=90", "optim.epochs=90"]),
        ("name=my/exp", ["name 'my/exp'", "cannot be a folder or file name"]),
        ("model.weights=ResNet50_Weights.IMAGENET1K_V1", ["resnet50", "model.arch='resnet18'"]),
    ],
)
def test_bad_values_name_field_and_allowed_values(override, must_contain):
    msg = _err([override])
    for text in must_contain:
        assert text in msg, (text, msg)


def test_unknown_field_in_dict_is_forbidden_and_named():
    with pytest.raises(SpecError, match=r"method\.lamda: unknown field"):
        validate_spec({"method": {"lamda": 1.0}})


def test_shots_and_percent_are_exclusive():
    msg = _err(["data.shots=5", "data.percent=1"])
    assert "data.shots=5" in msg and "data.percent=1.0" in msg


def test_dict_round_trip_is_identity():
    """Specs cross into Ray as plain JSON dicts and are re-validated on the worker."""
    spec = load_spec(PRESETS["fewshot_cub200"])
    again = validate_spec(json.loads(json.dumps(spec.model_dump(mode="json"))))
    assert again == spec and trial_id(again) == trial_id(spec)


# --------------------------------------------------------------------------- overrides


def test_overrides_parse_yaml_values():
    spec = apply_overrides(
        ExperimentSpec(),
        ["method.lam=0.25", "data.shots=5", "optim.schedule.milestones=[12, 16]", "model.weights=null",
         "scaling.use_gpu=false", "optim.schedule={name: cosine, min_lr: 0.001}", "name=abc"],
    )
    assert spec.method.lam == 0.25 and isinstance(spec.method.lam, float)
    assert spec.data.shots == 5
    assert spec.model.weights is None and spec.scaling.use_gpu is False
    assert spec.optim.schedule.name == "cosine" and spec.optim.schedule.min_lr == 0.001
    assert spec.name == "abc"


def test_override_does_not_mutate_input():
    base = ExperimentSpec()
    apply_overrides(base, ["method.lam=0.3"])
    assert base.method.lam == 1.0


def test_unknown_override_path_lists_valid_keys():
    msg = _err(["method.lamda=1"])
    assert "'method.lamda'" in msg
    assert ("valid keys there: anchor, cam_class, cam_transform, ce_views, crop_scale, forward, lam, "
            "lam_normalization, name, negatives, negatives_group, no_neg_scale, resolution, tau, view, zero_cam") in msg
    msg = _err(["optimizer.lr=1"])
    assert "<top level>" in msg and "optim" in msg


def test_override_below_a_leaf_is_rejected():
    assert "not a section" in _err(["method.lam.x=1"])


def test_malformed_override():
    assert "section.field=value" in _err(["method.lam"])


def test_sweep_grid_override_uses_rest_of_path_as_key():
    spec = apply_overrides(ExperimentSpec(), ["sweep.grid.method.lam=[0, 0.5]", "sweep.grid.seed=[0, 1, 2]"])
    assert spec.sweep.grid == {"method.lam": [0, 0.5], "seed": [0, 1, 2]}
    assert len(expand_trials(spec)) == 6


# --------------------------------------------------------------------------- sweeps and ids


def test_sweep_validates_paths_and_values():
    assert "sweep.grid['method.lamda'][0]" in _err(["sweep.grid.method.lamda=[1]"])
    msg = _err(["sweep.grid.method.lam=[0.1, -1]"])
    assert "sweep.grid['method.lam'][1] = -1" in msg and "greater than or equal to 0" in msg
    assert "is empty" in _err(["sweep.grid.seed=[]"])
    assert "repeated values" in _err(["sweep.grid.seed=[1, 1]"])
    assert "sweep over itself" in _err(["sweep.grid.sweep.grid=[{}]"])


def test_expand_counts_order_and_content():
    spec = load_spec(PRESETS["fewshot_cub200"])
    trials = expand_trials(spec)
    assert len(trials) == 2 * 3 * 20
    assert all(t.sweep.grid == {} for t in trials)
    # Axes in insertion order, last axis fastest.
    first = [(t.method.name, t.data.shots, t.data.episode) for t in trials[:3]]
    assert first == [("baseline", 1, 0), ("baseline", 1, 1), ("baseline", 1, 2)]
    combos = {(t.method.name, t.data.shots, t.data.episode) for t in trials}
    assert len(combos) == 120
    assert [trial_id(t) for t in trials] == [trial_id(t) for t in expand_trials(spec)]
    assert len({trial_id(t) for t in trials}) == 120


def test_spec_without_sweep_is_one_trial():
    spec = ExperimentSpec()
    assert expand_trials(spec) == [spec]


# One change per leaf of the spec (a path may need companions to stay valid). A new field fails
# test_every_field_is_covered until it is listed here, so its effect on trial ids is decided, not assumed.
CHANGES = {
    "name": ["name=other"], "seed": ["seed=1"], "storage": ["storage=s3://b/p"],
    "data.dataset": ["data.dataset=cub200"], "data.root": ["data.root=/x"], "data.image_size": ["data.image_size=64"],
    "data.batch_size": ["data.batch_size=32"], "data.num_workers": ["data.num_workers=0"],
    "data.shots": ["data.shots=5"], "data.episode": ["data.episode=3"], "data.percent": ["data.percent=1"],
    "data.split_file": ["data.percent=1", "data.labelled=list", "data.split_file=/x/1percent.txt"],
    "data.labelled": ["data.percent=1", "data.labelled=list"],
    "data.train_crop_scale": ["data.train_crop_scale=[0.5, 1.0]"], "data.synthetic.variant": ["data.synthetic.variant=spurious"],
    "data.synthetic.seed": ["data.synthetic.seed=1"], "data.synthetic.n_val_per_class": ["data.synthetic.n_val_per_class=5"],
    "data.eval_split": ["data.eval_split=val"], "data.synthetic.classes": ["data.synthetic.classes=base"], "data.synthetic.n_train_per_class": ["data.synthetic.n_train_per_class=9"],
    "data.synthetic.n_test_per_class": ["data.synthetic.n_test_per_class=9"], "data.synthetic.p_cue": ["data.synthetic.p_cue=0.5"],
    "model.arch": ["model.arch=resnet50"], "model.weights": ["model.weights=/w.pt"], "model.layer": ["model.layer=layer3"],
    "method.name": ["method.name=cgc_no_neg"], "method.lam": ["method.lam=0.5"], "method.tau": ["method.tau=0.1"],
    "method.resolution": ["method.resolution=feature"], "method.anchor": ["method.anchor=authors"],
    "method.negatives": ["method.negatives=global"], "method.crop_scale": ["method.crop_scale=[0.3, 1.0]"],
    "method.forward": ["method.forward=separate"], "method.view": ["method.view=center"],
    "method.no_neg_scale": ["method.no_neg_scale=sum"], "method.cam_class": ["method.cam_class=label"],
    "method.lam_normalization": ["method.lam_normalization=imagenet"],
    "method.ce_views": ["method.view=center", "method.ce_views=3"],
    "method.negatives_group": ["method.negatives_group=32"],
    "method.zero_cam": ["method.zero_cam=uniform"], "method.cam_transform": ["method.cam_transform=upsampled"],
    "optim.lr": ["optim.lr=0.01"], "optim.head_lr": ["optim.head_lr=1.0"], "optim.momentum": ["optim.momentum=0.5"],
    "optim.weight_decay": ["optim.weight_decay=0"], "optim.nesterov": ["optim.nesterov=true"],
    "optim.epochs": ["optim.epochs=10"], "optim.warmup_epochs": ["optim.warmup_epochs=5"],
    "optim.schedule.name": ["optim.schedule={name: cosine}"], "optim.schedule.milestones": ["optim.schedule.milestones=[10]"],
    "optim.schedule.gamma": ["optim.schedule.gamma=0.5"], "scaling.num_workers": ["scaling.num_workers=2"],
    "scaling.cpus_per_worker": ["scaling.cpus_per_worker=4"], "scaling.gpus_per_worker": ["scaling.gpus_per_worker=0.5"],
    "scaling.use_gpu": ["scaling.use_gpu=false"], "scaling.amp": ["scaling.amp=false"],
    "scaling.channels_last": ["scaling.channels_last=false"], "failure.max_retries": ["failure.max_retries=0"],
    "failure.checkpoint_every": ["failure.checkpoint_every=5"],
    "failure.checkpoint_every_steps": ["failure.checkpoint_every_steps=100"],
    "failure.max_preemptions": ["failure.max_preemptions=3"],
    "failure.keep_checkpoint": ["failure.keep_checkpoint=full"], "sweep.grid": ["sweep.grid.seed=[0]"],
    "sweep.variants": ["sweep.variants=[{}]"],
    "sweep.search": ["sweep.search={space: {method.lam: {uniform: [0, 1]}}, num_samples: 2}"],
    "metrics": ["metrics=[top1]"], "eval_every": ["eval_every=5"],
    "evaluation.iauc_images": ["evaluation.iauc_images=100"], "evaluation.iauc_protocol": ["evaluation.iauc_protocol=fast"],
    "evaluation.cgc_batch": ["evaluation.cgc_batch=16"],
    "evaluation.iauc_input": ["evaluation.iauc_input=squash"],
    "evaluation.ch_protocol": ["evaluation.ch_protocol=authors"],
    "evaluation.ch_short_side": ["evaluation.ch_protocol=authors", "evaluation.ch_short_side=224"],
    "evaluation.saliency": ["evaluation.saliency=cmwp"],
    "evaluation.saliency_window": ["evaluation.saliency=cmwp", "evaluation.saliency_window=7"],
}


def test_every_field_is_covered():
    assert set(CHANGES) == set(flatten(ExperimentSpec().model_dump(mode="json")))


@pytest.mark.parametrize("path", sorted(CHANGES))
def test_trial_id_changes_exactly_with_what_a_trial_computes(path):
    cgc = ExperimentSpec()
    baseline = apply_overrides(cgc, ["method.name=baseline"])
    for spec in (cgc, baseline):
        changed = apply_overrides(spec, CHANGES[path])
        if path.startswith("sweep."):  # a sweep's trials have an empty sweep: its one trial is the spec itself
            changed = expand_trials(changed)[0]
        kept = path in NON_IDENTITY_FIELDS or path.startswith("sweep.") or (
            spec.method.name == "baseline" and path in CGC_ONLY_FIELDS)
        if spec.method.name == "baseline" and path == "method.name":
            kept = False  # baseline -> cgc_no_neg
        if path == "data.split_file":  # the change also sets data.percent and data.labelled
            kept = False
        assert (trial_id(changed) == trial_id(spec)) == kept, (path, spec.method.name)
        assert spec_hash(changed) != spec_hash(spec) or path.startswith("sweep.")
    assert len(trial_id(cgc)) == 12 and trial_id(cgc) == trial_id(ExperimentSpec())


def test_lambda_zero_is_a_baseline_and_one_baseline_serves_every_lambda():
    spec = apply_overrides(ExperimentSpec(), ["sweep.grid.method.name=[baseline, cgc]",
                                              "sweep.grid.method.lam=[0.0, 0.4, 0.8]", "sweep.grid.seed=[0, 1]"])
    trials = expand_trials(spec)
    # baseline x {0, .4, .8} and cgc x {0} are one trial per seed; cgc x {.4, .8} two more
    assert len(trials) == 6
    assert sorted((effective_method(t), t.method.lam if t.method.name != "baseline" else None) for t in trials) == [
        ("baseline", None), ("baseline", None), ("cgc", 0.4), ("cgc", 0.4), ("cgc", 0.8), ("cgc", 0.8)]
    assert trial_id(apply_overrides(ExperimentSpec(), ["method.lam=0"])) == \
        trial_id(apply_overrides(ExperimentSpec(), ["method.name=baseline"]))


def test_cgc_only_fields_are_every_method_field_a_baseline_does_not_read():
    assert CGC_ONLY_FIELDS == {f"method.{f}" for f in MethodSpec.model_fields} - {"method.name"}
    # a trial id of a baseline ignores each of them; a CGC trial's changes with each
    for path in CGC_ONLY_FIELDS:
        assert path in CHANGES, path


def test_effective_lam_and_the_heldout_metric():
    spec = apply_overrides(ExperimentSpec(), ["method.lam=1", "method.lam_normalization=imagenet",
                                              "data.batch_size=64"])
    # λ normalised to ImageNet's CE / CGC ratio: K = 5 classes, B = 64 per batch
    assert effective_lam(spec, 5) == pytest.approx((math.log(5) / math.log(64)) / (math.log(1000) / math.log(256)))
    assert effective_lam(spec, 1000) == pytest.approx((math.log(1000) / math.log(64)) / (math.log(1000) / math.log(256)))
    assert effective_lam(apply_overrides(spec, ["method.lam_normalization=none", "method.lam=0.3"]), 5) == 0.3
    # the held-out CGC loss is the paper's term at the spec's defaults, whatever a trial trains
    assert HELDOUT_METRIC == MethodSpec(name="cgc")
    assert not MethodSpec(lam=0).uses_cgc and not MethodSpec(name="baseline").uses_cgc and MethodSpec().uses_cgc


# --------------------------------------------------------------------------- presets (docs/PAPER.md §2)


def _common_paper_optim(s):
    assert (s.optim.lr, s.optim.momentum, s.optim.weight_decay) == (0.1, 0.9, 1e-4)
    assert s.data.batch_size == 256 and s.method.tau == 0.5


@pytest.mark.parametrize("name, arch, lam", [("imagenet_r18", "resnet18", 1.0), ("imagenet_r50", "resnet50", 0.5)])
def test_imagenet_presets(name, arch, lam):
    s = load_spec(PRESETS[name])
    _common_paper_optim(s)
    assert (s.data.dataset, s.model.arch, s.model.weights, s.method.lam) == ("imagenet", arch, None, lam)
    assert s.optim.epochs == 90
    assert (s.optim.schedule.name, s.optim.schedule.milestones, s.optim.schedule.gamma) == ("step", (30, 60), 0.1)
    # without negatives at CGC's λ, the l2 summed over pixels (tests/test_presets_sources.py)
    assert [(t.method.name, t.method.lam) for t in expand_trials(s)] == [
        ("baseline", lam), ("cgc", lam), ("cgc_no_neg", lam)]
    assert {"top1", "top5", "ch", "iauc", "cgc_loss"} <= set(s.metrics)


def test_lambda_ablation_preset():
    s = load_spec(PRESETS["lambda_ablation"])
    _common_paper_optim(s)
    assert (s.model.arch, s.data.dataset, s.method.name) == ("resnet18", "imagenet", "cgc")
    assert s.sweep.grid == {"method.lam": [0.0, 0.01, 0.1, 0.5, 1.0, 2.0]}


@pytest.mark.parametrize("ds, lam", [("cub200", 0.25), ("cars196", 0.25), ("aircraft", 0.5), ("flowers102", 0.5)])
def test_finegrained_presets(ds, lam):
    s = load_spec(PRESETS[f"finegrained_{ds}"])
    _common_paper_optim(s)
    assert (s.data.dataset, s.method.lam, s.model.arch) == (ds, lam, "resnet50")
    assert s.model.weights == "ResNet50_Weights.IMAGENET1K_V1"
    assert s.sweep.grid == {"method.name": ["baseline", "cgc"], "seed": [0, 1, 2]}


@pytest.mark.parametrize("ds, lam", [("cub200", 0.8), ("cars196", 0.8), ("aircraft", 0.6), ("flowers102", 0.8)])
def test_fewshot_presets(ds, lam):
    s = load_spec(PRESETS[f"fewshot_{ds}"])
    assert (s.data.dataset, s.method.lam, s.model.arch) == (ds, lam, "resnet50")
    assert s.model.weights == "ResNet50_Weights.IMAGENET1K_V1"
    assert s.sweep.grid["data.shots"] == [1, 5, 10]
    assert s.sweep.grid["data.episode"] == list(range(20))
    # Paired design: both methods see every episode.
    assert s.sweep.grid["method.name"] == ["baseline", "cgc"]


def test_semisup_preset():
    s = load_spec(PRESETS["semisup"])
    assert (s.data.dataset, s.data.percent, s.data.batch_size) == ("imagenet", 1.0, 128)
    assert s.model.arch == "resnet50" and s.model.weights.startswith("swav:")
    assert (s.method.lam, s.method.tau) == (0.25, 0.5)
    assert (s.optim.lr, s.optim.head_lr, s.optim.weight_decay, s.optim.momentum) == (0.02, 5.0, 0.0, 0.9)
    assert s.optim.epochs == 50
    assert (s.optim.schedule.milestones, s.optim.schedule.gamma) == ((12, 16), 0.2)


# (most epochs, most trials) per demo: each runs in minutes on two cores; the few-shot demo's trials train on
# 5 to 50 images, the pretraining is one trial on both cores, the ablation is the one long demo
_DEMO_SCALE = {"fewshot_demo": (30, 60), "pretrain_demo": (30, 1), "ablation_demo": (40, 70),
               "ablation_more_demo": (20, 12), "ablation_base_demo": (20, 6), "semisup_demo": (10, 20)}
_FINETUNED = {"fewshot_demo", "finegrained_demo", "semisup_demo", "lambda_search_demo"}


@pytest.mark.parametrize("name", [k for k in PRESETS if k.endswith("_demo")])
def test_demo_presets_are_cpu_scale(name):
    s = load_spec(PRESETS[name])
    assert (s.data.dataset, s.model.arch, s.data.image_size) == ("synthetic", "resnet_small", 64)
    # the fine-tuning demos start from the demo pretraining (run on demand), never from a download
    assert s.model.weights == ("experiment:pretrain_demo" if name in _FINETUNED else None)
    trials = expand_trials(s)
    epochs, n = _DEMO_SCALE.get(name, (20, 6))
    assert max(t.optim.epochs for t in trials) <= epochs and len(trials) <= n
    check_data_root(s)  # embedded data needs no root


def test_every_experiment_has_a_demo():
    experiments = {load_spec(v).name for v in PRESETS.values()}
    demos = {load_spec(v).name for k, v in PRESETS.items() if k.endswith("_demo")}
    assert experiments - {"imagenet100"} <= demos


# --------------------------------------------------------------------------- files and data


def test_load_yaml_and_json(tmp_path):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"method": {"lam": 0.5}, "sweep": {"grid": {"seed": [0, 1]}}}))
    (tmp_path / "s.json").write_text(json.dumps({"method": {"lam": 0.5}, "sweep": {"grid": {"seed": [0, 1]}}}))
    a, b = load_spec(tmp_path / "s.yaml"), load_spec(str(tmp_path / "s.json"))
    assert a == b and a.method.lam == 0.5
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(SpecError, match="mapping at the top level"):
        load_spec(tmp_path / "list.yaml")


def test_check_data_root_prints_layout(tmp_path):
    cub = apply_overrides(ExperimentSpec(), ["data.dataset=cub200"])
    with pytest.raises(SpecError, match="data.root is required") as e:
        check_data_root(cub)
    assert "bounding_boxes.txt" in str(e.value)
    with pytest.raises(SpecError, match="does not exist") as e:
        check_data_root(apply_overrides(cub, [f"data.root={tmp_path / 'nope'}"]))
    assert "image_class_labels.txt" in str(e.value)
    root = tmp_path / "CUB_200_2011"
    (root / "images").mkdir(parents=True)
    (root / "images.txt").write_text("")
    with pytest.raises(SpecError, match="lacks image_class_labels.txt, train_test_split.txt, bounding_boxes.txt"):
        check_data_root(apply_overrides(cub, [f"data.root={root}"]))
    for f in ("image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt"):
        (root / f).write_text("")
    check_data_root(apply_overrides(cub, [f"data.root={root}"]))
    check_data_root(apply_overrides(cub, [f"data.root={tmp_path}"]))  # the folder holding CUB_200_2011 works too


def test_check_data_root_covers_swept_datasets(tmp_path):
    spec = apply_overrides(ExperimentSpec(), ["sweep.grid.data.dataset=[synthetic, flowers102]"])
    with pytest.raises(SpecError, match="flowers102") as e:
        check_data_root(spec)
    assert "setid.mat" in str(e.value)


def test_validate_against_data_shots():
    spec = apply_overrides(ExperimentSpec(), ["data.shots=5"])
    validate_against_data(spec, {0: 10, 1: 6})
    with pytest.raises(SpecError) as e:
        validate_against_data(spec, {0: 10, 1: 5, 2: 3})
    msg = str(e.value)
    assert "data.shots=5" in msg and "class 1: 5" in msg and "class 2: 3" in msg and "class 0" not in msg
    assert "at most 2" in msg
    swept = apply_overrides(spec, ["sweep.grid.data.shots=[1, 5, 10]"])
    with pytest.raises(SpecError, match="data.shots=10"):
        validate_against_data(swept, {0: 8, 1: 9})
    with pytest.raises(SpecError, match="no images"):
        validate_against_data(spec, {})
