"""Fine-tuning from this product's own pretraining: experiment:/trial: weights, local and URI storage, run once."""

import pytest
import torch
import yaml

from cgc_ray.config import PRESETS, SpecError, apply_overrides, expand_trials, load_spec, resolve_paths, trial_id
from cgc_ray.config.pretrained import parse_trial_ref, pin_pretrained
from cgc_ray.models.checkpoint import read_state_dict
from cgc_ray.models.resnet import build_model
from cgc_ray.results.table import read_rows
from cgc_ray.runner.driver import run_experiment
from conftest import TINY


def _pretraining_file(tmp_path, storage=None):
    """A tiny pretraining spec on the base shapes, written as a user would."""
    spec = apply_overrides(load_spec(PRESETS["pretrain_demo"]), [*TINY, "data.synthetic.n_train_per_class=6",
                                                                 "scaling.cpus_per_worker=1"])
    tree = spec.model_dump(mode="json")
    if storage is not None:
        tree["storage"] = storage
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_base_and_novel_classes_are_disjoint():
    from cgc_ray.data.synthetic import CLASS_SETS

    pre = load_spec(PRESETS["pretrain_demo"])
    assert pre.data.synthetic.classes == "base" and pre.method.name == "baseline"
    for demo in ("fewshot_demo", "finegrained_demo", "semisup_demo"):
        s = load_spec(PRESETS[demo])
        assert s.data.synthetic.classes == "novel" and s.model.weights == "experiment:pretrain_demo"
    assert not set(CLASS_SETS["base"]) & set(CLASS_SETS["novel"]) and len(CLASS_SETS["base"]) >= 10


def test_experiment_reference_pins_the_pretraining_trial(tmp_path):
    spec = apply_overrides(load_spec(PRESETS["fewshot_demo"]), [f"storage={tmp_path}"])
    pinned, pres = pin_pretrained(spec)
    (pre,) = pres
    assert pre.name == "pretrain" and pre.storage == str(tmp_path) and len(expand_trials(pre)) == 1
    assert pinned.model.weights == f"trial:pretrain/{trial_id(pre)}"
    assert parse_trial_ref(pinned.model.weights) == ("pretrain", trial_id(pre))
    # the downstream trial's identity holds the pretraining's identity, not where results are stored
    moved = pin_pretrained(apply_overrides(spec, ["storage=s3://bucket/prefix"]))[0]
    assert trial_id(expand_trials(moved)[0]) == trial_id(expand_trials(pinned)[0])
    with pytest.raises(SpecError, match="neither a preset"):
        pin_pretrained(apply_overrides(spec, ["model.weights=experiment:no_such_preset"]))


def test_a_relative_pretraining_spec_file_is_resolved_at_the_edge(tmp_path, monkeypatch):
    _pretraining_file(tmp_path)
    monkeypatch.chdir(tmp_path)
    spec = resolve_paths(apply_overrides(load_spec(PRESETS["fewshot_demo"]), ["model.weights=experiment:pretrain.yaml"]))
    assert spec.model.weights == f"experiment:{tmp_path / 'pretrain.yaml'}"


@pytest.mark.parametrize("uri", [False, True], ids=["local storage", "URI storage"])
def test_fine_tunes_from_the_pretraining_which_runs_once(ray_session, tmp_path, uri):
    storage = f"file://{tmp_path / 'store'}" if uri else str(tmp_path / "store")
    pre_file = _pretraining_file(tmp_path)
    downstream = apply_overrides(load_spec(PRESETS["fewshot_demo"]), [
        f"storage={storage}", *TINY, f"model.weights=experiment:{pre_file}", "data.shots=2",
        "sweep.grid.data.shots=[2]", "sweep.grid.data.episode=[0]"])
    first = run_experiment(downstream, progress=False)
    assert first.failed == {} and len(first.ran) == 2
    (pre_row,) = read_rows(storage, "pretrain").to_pylist()
    rows = read_rows(storage, "fewshot").to_pylist()
    assert {r["weights"] for r in rows} == {f"trial:pretrain/{pre_row['trial_id']}"}
    # the fine-tuned models started from the pretrained backbone: a layer they barely moved matches it
    pre_ckpt = tmp_path / "store" / "_checkpoints" / "pretrain" / pre_row["trial_id"] / "checkpoint.pt"
    pre_state, _, _ = read_state_dict(str(pre_ckpt), arch="resnet_small")
    tuned = torch.load(tmp_path / "store" / "_checkpoints" / "fewshot" / rows[0]["trial_id"] / "checkpoint.pt",
                       weights_only=True)["model"]
    torch.manual_seed(0)
    fresh = build_model("resnet_small", 5)  # what a trial without pretrained weights starts from
    w = "layer1.0.conv1.weight"
    assert (tuned[w] - pre_state[w]).abs().mean() < (fresh.state_dict()[w] - pre_state[w]).abs().mean() / 10
    # a second downstream sweep (another episode) reuses the pretraining: it does not train again
    more = run_experiment(apply_overrides(downstream, ["sweep.grid.data.episode=[1]"]), progress=False)
    assert more.failed == {} and len(more.ran) == 2
    (again,) = read_rows(storage, "pretrain").to_pylist()
    assert again["finished_at"] == pre_row["finished_at"]  # the same row: not retrained
