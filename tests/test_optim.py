"""Learning-rate schedules (torch's schedulers) against the formulas they must follow, step by step."""

import math

import pytest

from cgc_ray.config import ExperimentSpec, SpecError, apply_overrides
from cgc_ray.models.resnet import build_model
from cgc_ray.train.optim import build_optimizer, build_scheduler

STEPS = 5  # per epoch


def _run(overrides, epochs_to_run=None):
    spec = apply_overrides(ExperimentSpec(), ["optim.lr=0.1", *overrides])
    model = build_model("resnet_small", 3)
    opt = build_optimizer(spec, model)
    sched = build_scheduler(spec, opt, STEPS)
    trunk, head = [], []
    for _ in range((epochs_to_run or spec.optim.epochs) * STEPS):
        trunk.append(opt.param_groups[0]["lr"])
        head.append(opt.param_groups[1]["lr"])
        opt.step()
        sched.step()
    return trunk, head, spec


def test_step_schedule_multiplies_by_gamma_at_each_milestone_epoch():
    trunk, _, _ = _run(["optim.epochs=6", "optim.schedule={name: step, milestones: [2, 4], gamma: 0.1}"])
    expected = [0.1 * 0.1 ** sum(step // STEPS >= m for m in (2, 4)) for step in range(30)]
    assert trunk == pytest.approx(expected, rel=1e-9)


def test_linear_warmup_then_step():
    trunk, _, _ = _run(["optim.epochs=6", "optim.warmup_epochs=2",
                        "optim.schedule={name: step, milestones: [4], gamma: 0.1}"])
    warm = 2 * STEPS
    # LinearLR from lr/warm to lr over the warm-up steps, then the step schedule (milestone at epoch 4)
    for step in range(warm):
        assert trunk[step] == pytest.approx(0.1 * (1 / warm + (1 - 1 / warm) * step / warm), rel=1e-9)
    assert trunk[warm:4 * STEPS] == pytest.approx([0.1] * (4 * STEPS - warm))
    assert trunk[4 * STEPS:] == pytest.approx([0.01] * (2 * STEPS))


def test_cosine_after_warmup_reaches_min_lr():
    trunk, _, _ = _run(["optim.epochs=4", "optim.warmup_epochs=1", "optim.schedule={name: cosine, min_lr: 0.001}"])
    warm, total = STEPS, 4 * STEPS
    for step in range(warm, total):
        t = (step - warm) / (total - warm)
        assert trunk[step] == pytest.approx(0.001 + (0.1 - 0.001) * 0.5 * (1 + math.cos(math.pi * t)), rel=1e-6)


def test_onecycle_rises_to_lr_and_falls_to_lr_over_25e4():
    trunk, head, _ = _run(["optim.epochs=4", "optim.head_lr=5.0", "optim.schedule={name: onecycle, pct_start: 0.3}"])
    total = 4 * STEPS
    peak = round(0.3 * total) - 1
    assert trunk[0] == pytest.approx(0.1 / 25) and head[0] == pytest.approx(5.0 / 25)
    assert max(trunk) == pytest.approx(0.1) and trunk.index(max(trunk)) == peak
    assert trunk[-1] == pytest.approx(0.1 / 25e4)  # the last step is at lr / 25e4
    # the head follows the same shape at its own scale (the semi-supervised preset's head_lr is 5.0)
    assert [h / 50 for h in head] == pytest.approx(trunk, rel=1e-9)


def test_head_lr_is_its_own_parameter_group():
    spec = apply_overrides(ExperimentSpec(), ["optim.lr=0.02", "optim.head_lr=5.0", "optim.weight_decay=0"])
    model = build_model("resnet_small", 3)
    opt = build_optimizer(spec, model)
    trunk, head = opt.param_groups
    assert (trunk["lr"], head["lr"]) == (0.02, 5.0)
    assert {id(p) for p in head["params"]} == {id(model.fc.weight), id(model.fc.bias)}
    assert len(trunk["params"]) + 2 == len(list(model.parameters()))


@pytest.mark.parametrize("schedule", ["{name: step, milestones: [2], gamma: 0.1}", "{name: cosine}",
                                      "{name: onecycle}"])
def test_resume_mid_training_continues_the_per_step_schedule(schedule):
    overrides = ["optim.epochs=4", f"optim.schedule={schedule}"]
    if "onecycle" not in schedule:
        overrides.append("optim.warmup_epochs=1")
    full, _, spec = _run(overrides)
    model = build_model("resnet_small", 3)
    opt = build_optimizer(spec, model)
    sched = build_scheduler(spec, opt, STEPS)
    for _ in range(7):  # stop mid-epoch 2
        opt.step()
        sched.step()
    state = {"opt": opt.state_dict(), "sched": sched.state_dict()}
    opt2 = build_optimizer(spec, build_model("resnet_small", 3))
    sched2 = build_scheduler(spec, opt2, STEPS)
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    resumed = []
    for _ in range(4 * STEPS - 7):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert resumed == pytest.approx(full[7:], rel=1e-12)


def test_schedules_the_spec_refuses():
    with pytest.raises(SpecError, match="one-cycle warms up"):
        apply_overrides(ExperimentSpec(), ["optim.warmup_epochs=1", "optim.schedule={name: onecycle}"])
    with pytest.raises(SpecError, match="after the warm-up"):
        apply_overrides(ExperimentSpec(), ["optim.warmup_epochs=30"])
