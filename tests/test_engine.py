"""Engine: training steps, evaluation, checkpoint resume, failure modes."""

import copy
import math

import pytest
import torch
import torchvision
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from cgc_ray.config import MethodSpec
from cgc_ray.method.cgc import cgc_term
from cgc_ray.models.resnet import build_model
from cgc_ray.train.engine import Evaluator, FitPlan, NonFiniteLossError, evaluate, fit, train_one_epoch
from cgc_ray.train.sampling import ResumableSampler
from cgc_ray.train.task import CGCObjective, CrossEntropy, Placement

CPU = Placement.on("cpu")


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    x[torch.arange(n), y, 8:24, 8:24] += 2.0  # the label is readable from a patch
    return TensorDataset(x, y)


def _boxed(batch):
    x, y = torch.utils.data.default_collate(batch)
    return x, y, [torch.tensor([[8.0, 8.0, 24.0, 24.0]])] * len(x)


def _loaders(seed=0):
    train = DataLoader(_data(48, seed), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed))
    val = DataLoader(_data(32, seed + 1), batch_size=16, collate_fn=_boxed)
    return train, val


def _task(name="cgc", lam=0.5, placement=CPU, unlabeled=None, **method):
    """The task a spec with this method trains (λ as given, T seeded with 0), on the CPU by default."""
    if name == "baseline" or lam == 0:
        return CrossEntropy(placement)
    return CGCObjective(MethodSpec(name=name, lam=lam, **method), layer="layer4", lam=lam, placement=placement,
                        seed=0, unlabeled=unlabeled)


def _evaluator(val, **over):
    return Evaluator(val, **{"layer": "layer4", "metrics": ("top1", "top5", "ch", "cgc_loss"),
                             "iauc_protocol": "authors", "seed": 0, **over})


def _setup(seed=0):
    torch.manual_seed(seed)
    model = build_model("resnet_small", 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    return model, opt, sched


def test_cgc_gradients_reach_the_backbone():
    torch.manual_seed(0)
    model = build_model("resnet_small", 3)
    x = torch.randn(6, 3, 32, 32)
    loss = cgc_term(model, x, MethodSpec(), layer="layer4", generator=torch.Generator().manual_seed(0)).loss
    loss.backward()
    assert model.conv1.weight.grad.abs().sum() > 0
    assert model.layer1[0].conv1.weight.grad.abs().sum() > 0
    assert math.log(6) * 0.5 < loss.item() < math.log(6) * 1.5


@pytest.mark.parametrize("resolution", ["image", "feature"])
def test_each_method_trains_and_reports(resolution):
    for name in ("baseline", "cgc", "cgc_no_neg"):
        model, opt, _ = _setup()
        train, _ = _loaders()
        m = train_one_epoch(model, _task(name, resolution=resolution), opt, train)
        assert m["train_steps"] == 6 and math.isfinite(m["train_loss"])
        if name == "baseline":
            assert "train_cgc" not in m and m["train_loss"] == pytest.approx(m["train_ce"])
        else:
            assert m["train_cgc"] > 0
            assert m["train_loss"] == pytest.approx(m["train_ce"] + 0.5 * m["train_cgc"], rel=1e-5)


def test_semi_supervised_unlabelled_batches_feed_only_the_cgc_term(monkeypatch):
    import cgc_ray.train.task as task_module

    model, _, _ = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # no update: the forwards below see the same weights
    train, _ = _loaders()
    unl_data = _data(40, 7)
    unl = DataLoader(unl_data, batch_size=8)
    seen = []
    real = task_module.cgc_term
    monkeypatch.setattr(task_module, "cgc_term",
                        lambda model, x, *a, **k: seen.append(x.clone()) or real(model, x, *a, **k))
    m = train_one_epoch(model, _task(lam=0.25, unlabeled=unl), opt, train)
    assert m["train_cgc"] > 0 and m["train_steps"] == 6
    # the CGC term saw the unlabelled images, in order, and nothing else
    assert torch.equal(torch.cat(seen), torch.cat([unl_data.tensors[0], unl_data.tensors[0][:8]]))
    # cross-entropy saw the labelled batches alone (BatchNorm statistics of those batches only)
    model.train()
    same_order, _ = _loaders()  # the same shuffle seed: the batches train_one_epoch saw
    ce = [torch.nn.functional.cross_entropy(model(x), y).item() * len(y) for x, y in same_order]
    assert m["train_ce"] == pytest.approx(sum(ce) / 48, rel=1e-5)


def test_resume_then_continue_equals_an_uninterrupted_run(tmp_path):
    model, opt, sched = _setup()
    train, val = _loaders()
    full = fit(model, _task(), opt, train, FitPlan(3, tmp_path / "a.pt"), scheduler=sched, evaluator=_evaluator(val))

    model2, opt2, sched2 = _setup()
    train2, val2 = _loaders()
    fit(model2, _task(), opt2, train2, FitPlan(2, tmp_path / "b.pt"), scheduler=sched2, evaluator=_evaluator(val2))
    # a new process: fresh objects, different global RNG state; only the checkpoint carries over
    torch.manual_seed(1234)
    model3, opt3, sched3 = _setup(seed=99)
    train3, val3 = _loaders()
    resumed = fit(model3, _task(), opt3, train3, FitPlan(3, tmp_path / "b.pt"), scheduler=sched3,
                  evaluator=_evaluator(val3))

    for (n, a), b in zip(model.state_dict().items(), model3.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    assert resumed["epoch"] == full["epoch"] == 3
    assert resumed["top1"] == full["top1"] and resumed["train_loss"] == full["train_loss"]
    assert opt3.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.05 * 0.5**3
    # the classifier is restored (the authors' resume replaced it with a fresh one)
    state = torch.load(tmp_path / "b.pt", weights_only=True)
    assert state["epoch"] == 2
    torch.testing.assert_close(state["model"]["fc.weight"], model.fc.weight)


class _Jittered(torch.utils.data.Dataset):
    """_data with noise drawn from the global RNG per image (an augmentation in the loading process); counts reads."""

    def __init__(self, n, seed):
        self.data, self.reads = _data(n, seed), 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        self.reads += 1
        x, y = self.data[i]
        return x + 0.1 * torch.randn(x.shape), y


def _resumable(n, seed, batch=8):
    g = torch.Generator().manual_seed(seed)
    ds = _Jittered(n, seed)
    return DataLoader(ds, batch_size=batch, sampler=ResumableSampler(RandomSampler(ds, generator=g)), generator=g)


class _Preempted(Exception):
    pass


def test_resume_mid_epoch_then_continue_equals_an_uninterrupted_run(tmp_path):
    """Stopped after step 4 of epoch 1 (of 6 steps; checkpoints every 2 steps): the resumed run skips the 4
    batches unread and ends bit-identical to an uninterrupted one, with the semi-supervised task's unlabelled
    stream (4 batches a pass: the resume skips one whole pass, and each epoch leaves its second pass half-drawn)
    and a per-step schedule."""

    def run(path, *, every=None, stop=None, seed=0):
        model, opt, _ = _setup(seed)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
        train, unl = _resumable(48, 0), _resumable(32, 7)
        _, val = _loaders()

        def step_callback(epoch, step, p):
            steps.append((epoch, step))
            if (epoch, step) == stop:
                raise _Preempted

        steps = []
        plan = FitPlan(2, path, checkpoint_every_steps=every, scheduler_interval="step")
        m = fit(model, _task(lam=0.25, unlabeled=unl), opt, train, plan, scheduler=sched,
                evaluator=_evaluator(val, metrics=("top1",)), step_callback=step_callback)
        return model, opt, m, steps, train.dataset

    model, opt, full, no_steps, _ = run(tmp_path / "a.pt")
    assert no_steps == []  # checkpoint_every_steps=None: epoch ends only
    with pytest.raises(_Preempted):
        run(tmp_path / "b.pt", every=2, stop=(1, 4))
    state = torch.load(tmp_path / "b.pt", weights_only=True)
    assert state["epoch"] == -1 and state["progress"]["steps"] == 4  # no epoch finished, 4 steps of the first
    torch.manual_seed(1234)  # a new process: only the checkpoint carries over
    model2, opt2, resumed, steps, ds = run(tmp_path / "b.pt", every=2, seed=99)
    assert steps == [(2, 2), (2, 4)]  # epoch 1 goes on from step 5; none at an epoch's last step
    assert ds.reads == 2 * 8 + 48  # the rest of epoch 1, then epoch 2: the 4 trained batches were not loaded
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    assert resumed["train_loss"] == full["train_loss"] and resumed["top1"] == full["top1"]
    assert resumed["train_steps"] == 6 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.05 * 0.5**2


def test_a_finished_checkpoint_is_not_trained_again(tmp_path):
    model, opt, sched = _setup()
    train, val = _loaders()
    plan = FitPlan(1, tmp_path / "c.pt")
    first = fit(model, _task("baseline"), opt, train, plan, evaluator=_evaluator(val))
    calls = []
    again = fit(model, _task("baseline"), opt, train, plan, evaluator=_evaluator(val),
                callback=lambda m, p: calls.append(m))
    assert calls == [] and again["top1"] == first["top1"]


def test_checkpoint_loads_into_a_plain_torchvision_resnet(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    train, val = _loaders()
    fit(model, _task(), opt, train, FitPlan(1, tmp_path / "r.pt"))
    plain = torchvision.models.resnet18(num_classes=3)
    plain.load_state_dict(torch.load(tmp_path / "r.pt", weights_only=True)["model"])
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain.eval()(x), model.eval()(x))


def test_nan_loss_fails_with_a_clear_error():
    model, opt, _ = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=1e12)
    train, _ = _loaders()
    with pytest.raises(NonFiniteLossError, match="loss is"):
        for _ in range(3):
            train_one_epoch(model, _task("baseline"), opt, train, check_every=1)


def test_evaluate_reports_every_metric_and_leaves_batchnorm_alone():
    model, _, _ = _setup()
    model.train()
    _, val = _loaders()
    before = copy.deepcopy(model.state_dict())
    first4 = DataLoader(torch.utils.data.Subset(val.dataset, range(4)), batch_size=4, collate_fn=_boxed)
    m = evaluate(model, val, "cpu", layer="layer4", metrics=("top1", "top5", "ch", "cgc_loss", "iauc"),
                 iauc_loader=first4, iauc_protocol="fast")
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert 0 <= m["top1"] <= m["top5"] <= 1 and 0 <= m["ch"] <= 1 and 0 <= m["iauc"] <= 1
    assert m["cgc_loss"] > 0 and m["n_eval"] == 32 and m["n_iauc"] == 4
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate(model, val, "cpu", layer="layer4", metrics=("top1", "fid"))


@pytest.mark.parametrize("forward", ["joint", "separate"])
def test_bf16_autocast_with_the_autograd_cam(forward):
    """Under autocast the autograd Grad-CAM (a layer without the closed form) differentiates the captured
    activation itself, and its maps are the fp32 maps to bf16 precision."""
    torch.manual_seed(0)
    model = build_model("resnet_small", 5)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 5
    out = {}
    for amp in (None, torch.bfloat16):
        model.zero_grad()
        # the label's CAM: an untrained model's top-1 class can flip between fp32 and bf16
        loss = cgc_term(model, x, MethodSpec(forward=forward, cam_class="label"), layer="layer3", y=y,
                        generator=torch.Generator().manual_seed(0), amp_dtype=amp).loss
        loss.backward()
        out[amp] = loss.item(), model.conv1.weight.grad.clone()
    (l32, g32), (l16, g16) = out[None], out[torch.bfloat16]
    assert math.isfinite(l16) and l16 == pytest.approx(l32, rel=0.05)
    # the first layer's gradient through the double backward: bf16 (8-bit mantissa) keeps its direction roughly
    assert torch.isfinite(g16).all() and torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > 0.5


def test_bf16_autocast_and_channels_last_step_on_cpu():
    """The mixed-precision step computes the fp32 step's losses (to bf16 precision) in channels_last."""
    losses = {}
    for amp in (False, True):
        model, opt, _ = _setup()
        model = model.to(memory_format=torch.channels_last)
        train, _ = _loaders()
        torch.manual_seed(0)
        placement = Placement.on("cpu", amp=amp, channels_last=True)
        losses[amp] = train_one_epoch(model, _task(lam=1.0, placement=placement), opt, train)
        assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    for k in ("train_ce", "train_cgc"):
        assert losses[True][k] == pytest.approx(losses[False][k], rel=0.05), k
    assert losses[True]["train_ce"] != losses[False]["train_ce"]  # bf16 really ran


def test_a_reused_worker_process_gives_the_same_results(tmp_path):
    """Tune reuses trial processes (runner.driver: reuse_actors): a trial must not depend on what ran before it."""
    from cgc_ray.config import PRESETS, apply_overrides, expand_trials, load_spec
    from cgc_ray.train.trial import run_trial

    from conftest import TINY

    spec = apply_overrides(load_spec(PRESETS["lambda_ablation_demo"]), [*TINY, "sweep.grid.method.lam=[0.5]"])
    first, second = expand_trials(spec)[:2]  # seeds 0 and 1
    alone = run_trial(second, trial_dir=tmp_path / "alone")
    run_trial(first, trial_dir=tmp_path / "before")
    after = run_trial(second, trial_dir=tmp_path / "after")
    for k in ("train_loss", "top1", "ch", "cgc_loss"):
        assert after[k] == alone[k], k


def test_small_datasets_are_decoded_once_per_process(tmp_path, monkeypatch):
    from cgc_ray.data import dataset as ds_module
    from cgc_ray.data import records
    from cgc_ray.config import DataSpec

    options = {**DataSpec().synthetic.model_dump(), "image_size": 64, "n_train_per_class": 3, "n_test_per_class": 2}
    recs = records("synthetic", tmp_path, "train", **options)
    calls = []
    real = ds_module.read_image
    monkeypatch.setattr(ds_module, "read_image", lambda p: calls.append(p) or real(p))
    a = ds_module.BoxDataset(recs, train=False, image_size=32, cache_in_memory=True)
    b = ds_module.BoxDataset(recs, train=False, image_size=32, cache_in_memory=True)
    assert len(calls) == len(recs)  # the second dataset (the next trial) decoded nothing
    assert torch.equal(a[0][0], b[0][0])


def test_the_loop_runs_any_task_and_build_task_picks_the_spec_objective():
    """train_one_epoch knows no method: a task of its own (a weighted cross-entropy) trains and logs through it."""
    from cgc_ray.config import ExperimentSpec, apply_overrides
    from cgc_ray.train.task import Task, build_task

    class Weighted(Task):
        placement = CPU

        def __call__(self, model, batch):
            ce = torch.nn.functional.cross_entropy(model(batch.x), batch.y)
            return 3 * ce, {"ce": (ce.detach() * len(batch.y), len(batch.y)), "half": (torch.tensor(4.0), 8)}

    model, opt, _ = _setup()
    train, _ = _loaders()
    m = train_one_epoch(model, Weighted(), opt, train)
    assert m["train_loss"] == pytest.approx(3 * m["train_ce"], rel=1e-6) and m["train_half"] == 0.5
    spec = lambda *o: apply_overrides(ExperimentSpec(), list(o))
    assert isinstance(build_task(spec("method.lam=0"), num_classes=3, placement=CPU), CrossEntropy)
    assert isinstance(build_task(spec("method.name=baseline"), num_classes=3, placement=CPU), CrossEntropy)
    normalised = build_task(spec("method.lam_normalization=imagenet", "data.batch_size=64"), num_classes=5,
                            placement=CPU, unlabeled=train)
    assert isinstance(normalised, CGCObjective) and normalised.unlabeled is train
    assert normalised.lam == pytest.approx((math.log(5) / math.log(64)) / (math.log(1000) / math.log(256)))
    assert set(normalised.generators()) == {"T", "unlabeled_loader"}
