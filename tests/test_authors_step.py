"""The product's authors profile computes the authors' training step (issue 18, "the test that ties it together").

``tests/authors_reference.py`` re-implements one step of UCDvision/CGC without any product code. Here the
product's objective (``train.task.CGCObjective`` with the method settings of ``config.presets.AUTHORS_STEP``)
and that reference get the same batch, the same weights and the same T parameters (crop box and flip per
image, and the augmented image the product made from them), and must give the same total loss and the same
parameter gradients: on one process (the whole batch one group, and the authors' per-GPU groups cut from
it), and across two gloo ranks with each rank one group, as their DataParallel chunks. Both models run in
float64; the product computes its heatmaps in float32, which is the error left (~1e-6).
"""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cgc_ray.config import MethodSpec
from cgc_ray.config.presets import AUTHORS_STEP
from cgc_ray.method import transforms as T
from cgc_ray.method.cgc import groups, heatmap_pair
from cgc_ray.models.resnet import SmallResNet
from cgc_ray.train.task import Batch, CGCObjective, Placement
from tests import authors_reference as ref

TOL = 1e-4  # relative error of the loss and of every parameter's gradient (issue 18)
SIZE, CLASSES, LAM, TAU, SEED_T = 64, 5, 0.5, 0.5, 3
STEP = {path.removeprefix("method."): value for path, (value, _) in AUTHORS_STEP.items()}


def _method(name: str, group: int | None, **changes) -> MethodSpec:
    return MethodSpec(**{**STEP, "negatives_group": group, "name": name, "lam": LAM, "tau": TAU,
                         "no_neg_scale": "mean", **changes})


def _model() -> SmallResNet:
    torch.manual_seed(0)
    return SmallResNet(CLASSES).double().train()


def _batch(B: int, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x, xc = (torch.randn(B, 3, SIZE, SIZE, generator=g, dtype=torch.float64) for _ in range(2))
    return Batch(x, torch.randint(0, CLASSES, (B,), generator=g), xc)


def _product(model, method: MethodSpec, batch: Batch, seed: int) -> tuple[torch.Tensor, T.CropFlip]:
    """The product's loss of ``batch`` (backward done) and the T parameters its task drew."""
    task = CGCObjective(method, layer="layer4", lam=LAM, placement=Placement.on("cpu"), seed=seed)
    loss, _ = task(model, batch)
    loss.backward()
    # the task's first draw from its seeded generator: the same call on a generator of the same seed
    params = T.sample_params(batch.x.shape[0], (SIZE, SIZE), scale=method.crop_scale,
                             generator=torch.Generator().manual_seed(seed))
    return loss.detach(), params


def _reference(model, method: MethodSpec, batch: Batch, params: T.CropFlip, group: int | None) -> torch.Tensor:
    out = ref.authors_step(model, batch.x, batch.x_center, ref.pixel_boxes(params.boxes, (SIZE, SIZE)), params.flip,
                           batch.y, lam=LAM, tau=TAU, group_size=group, negatives=method.name == "cgc",
                           x_aug=T.apply(batch.x_center, params))  # the augmented image the product made
    out.total.backward()
    return out.total.detach()


def _worst(loss, ref_loss, grads, ref_grads) -> tuple[float, str]:
    """The largest relative error, of the loss or of one parameter's gradient (its l2 norm), and where."""
    errs = {"loss": (abs(loss - ref_loss) / abs(ref_loss)).item()}
    for (name, g), r in zip(grads, ref_grads):
        errs[name] = ((g - r).norm() / r.norm()).item()
    where = max(errs, key=errs.get)
    return errs[where], where


def _compare(model, reference) -> list[tuple[str, torch.Tensor]]:
    return [(n, p.grad) for n, p in model.named_parameters()], [p.grad for p in reference.parameters()]


@pytest.mark.parametrize("name", ["cgc", "cgc_no_neg"])
@pytest.mark.parametrize("B,group", [(8, None), (8, 4), (10, 4)])  # one group; 4-image GPU chunks; 4, 4, 2
def test_one_process_gives_the_authors_loss_and_gradients(name, B, group):
    method, batch = _method(name, group), _batch(B)
    model = _model()
    reference = copy.deepcopy(model)
    loss, params = _product(model, method, batch, SEED_T)
    ref_loss = _reference(reference, method, batch, params, group)
    worst, where = _worst(loss, ref_loss, *_compare(model, reference))
    assert worst <= TOL, f"{name} B={B} group={group}: worst relative error {worst:.2e} ({where}) > {TOL}"
    print(f"{name} B={B} group={group}: worst relative error {worst:.2e} ({where})")


def test_the_comparison_sees_each_difference_of_our_own_step():
    """Control: the settings the profile changes each move the loss or gradients past the tolerance."""
    batch = _batch(8)
    for change in ({"cam_transform": "direct"}, {"anchor": "paper"}, {"ce_views": 1}, {"negatives_group": 4}):
        method = _method("cgc", None, **change)
        model = _model()
        reference = copy.deepcopy(model)
        loss, params = _product(model, method, batch, SEED_T)
        worst, where = _worst(loss, _reference(reference, method, batch, params, None), *_compare(model, reference))
        assert worst > 10 * TOL, f"{change}: the reference does not tell it apart ({worst:.2e} at {where})"


def test_zero_heatmaps_become_uniform_only_with_the_authors_rule():
    """A model whose layer4 output is all zero: every Grad-CAM is zero. Ours compares zero maps (similarity 0
    with every map); the authors' rule compares the uniform map 1e-8 (their m / (sum m + 1e-8) + 1e-8)."""
    model = _model()
    with torch.no_grad():  # layer4's block: relu(bn2(.) + downsample(.)) = relu(-1 - 1) = 0
        for bn in (model.layer4[0].bn2, model.layer4[0].downsample[1]):
            bn.weight.zero_(), bn.bias.fill_(-1.0)
    batch = _batch(4)
    params = T.sample_params(4, (SIZE, SIZE), generator=torch.Generator().manual_seed(0))
    for rule, value in (("zero", 0.0), ("uniform", 1e-8)):
        pair = heatmap_pair(model, batch.x, _method("cgc", None, zero_cam=rule), params, layer="layer4",
                            x_center=batch.x_center)
        assert torch.equal(pair.g_x, torch.zeros_like(pair.g_x))
        want = torch.full((4, SIZE, SIZE), value, dtype=pair.q.dtype)
        torch.testing.assert_close(pair.q, want, rtol=1e-6, atol=0)
        torch.testing.assert_close(pair.k, want, rtol=1e-6, atol=0)


def test_groups_are_consecutive_and_never_leave_one_image_alone():
    assert groups(8, None) == (slice(0, 8),) and groups(8, 64) == (slice(0, 8),)
    assert groups(10, 4) == (slice(0, 4), slice(4, 8), slice(8, 10))
    assert groups(9, 4) == (slice(0, 4), slice(4, 9))  # the last image joins the group before it
    assert groups(256, 64) == tuple(slice(i, i + 64) for i in range(0, 256, 64))


def test_semi_supervised_cuts_the_labelled_batch_into_the_same_groups():
    """The authors' semi-supervised script: one CE term on the labelled batch, which DataParallel cuts into the
    GPU chunks too (each its own BatchNorm statistics); the CGC term on the unlabelled batch."""
    model, batch, unl = _model(), _batch(8), _batch(8, seed=2)
    method = _method("cgc", 4, ce_views=1)
    with pytest.raises(ValueError, match="ce_views=1"):
        CGCObjective(_method("cgc", 4), layer="layer4", lam=LAM, placement=Placement.on("cpu"), seed=0,
                     unlabeled=[])
    task = CGCObjective(method, layer="layer4", lam=LAM, placement=Placement.on("cpu"), seed=0,
                        unlabeled=[(unl.x, unl.y, None, unl.x_center)])
    _, logs = task(model, batch)
    want = sum(torch.nn.functional.cross_entropy(model(batch.x[s]), batch.y[s]) for s in groups(8, 4)) / 2
    torch.testing.assert_close(logs["ce"][0].double() / 8, want.detach(), rtol=1e-6, atol=0)  # CE in fp32
    whole = torch.nn.functional.cross_entropy(model(batch.x), batch.y)
    assert abs(whole.item() - want.item()) > 1e-3  # one BatchNorm batch of 8 gives another CE


# ---------------------------------------------------------------- two gloo ranks, each rank one group


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        batch = _batch(8)
        B = 8 // world
        mine = Batch(*(t[rank * B:(rank + 1) * B] for t in batch))
        for name in ("cgc", "cgc_no_neg"):
            # what a DDP trial runs: the per-rank batch, negatives within it (the preset's group exceeds it)
            model = torch.nn.parallel.DistributedDataParallel(_model())
            loss, params = _product(model, _method(name, 64), mine, SEED_T + rank)  # DDP averages the gradients
            losses = [torch.zeros((), dtype=loss.dtype) for _ in range(world)]
            dist.all_gather(losses, loss)
            boxes = [torch.zeros_like(params.boxes) for _ in range(world)]
            flips = [torch.zeros_like(params.flip) for _ in range(world)]
            dist.all_gather(boxes, params.boxes), dist.all_gather(flips, params.flip)
            if rank == 0:
                out[name] = (torch.stack(losses).mean(), torch.cat(boxes), torch.cat(flips),
                             [(n, p.grad.clone()) for n, p in model.module.named_parameters()])
    finally:
        dist.barrier()  # no rank tears gloo down while another still talks to it (SIGABRT otherwise)
        dist.destroy_process_group()


def test_two_ranks_give_the_authors_loss_and_gradients_with_each_rank_one_group():
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(2, _free_port(), out), nprocs=2, join=True)
    batch = _batch(8)
    for name in ("cgc", "cgc_no_neg"):
        loss, boxes, flips, grads = out[name]
        reference = _model()
        ref_loss = _reference(reference, _method(name, 4), batch, T.CropFlip(boxes, flips), group=4)
        worst, where = _worst(loss, ref_loss, grads, [p.grad for p in reference.parameters()])
        assert worst <= TOL, f"{name}, 2 gloo ranks: worst relative error {worst:.2e} ({where}) > {TOL}"
        print(f"{name}, 2 gloo ranks: worst relative error {worst:.2e} ({where})")


# ---------------------------------------------------------------- a trial with the authors' step, and its row


def test_a_trial_trains_the_authors_step_and_its_row_records_the_group(tmp_path):
    from conftest import TINY, result_row

    from cgc_ray.config import PRESETS, apply_overrides, contrast_group, expand_trials, load_spec
    from cgc_ray.results.table import read_rows, write_row
    from cgc_ray.train.trial import run_trial

    sets = [f"{path}={value}" for path, (value, _) in AUTHORS_STEP.items() if path != "method.negatives_group"]
    spec = apply_overrides(load_spec(PRESETS["lambda_ablation_demo"]),
                           [*TINY, *sets, "method.negatives_group=4", "sweep.grid={}", "method.lam=0.5"])
    (trial,) = expand_trials(spec)
    assert contrast_group(trial) == 4  # groups of 4 in the batch of 8
    assert contrast_group(trial.model_copy(update={"method": trial.method.model_copy(
        update={"negatives_group": 64})})) == 8  # a group larger than the batch is the batch
    metrics = run_trial(trial, trial_dir=tmp_path / "t")
    assert metrics["negatives_group"] == 4 and metrics["train_cgc"] > 0
    write_row(tmp_path / "results", "demo", result_row(trial, {"top1": 0.5}, details={"negatives_group": 4}))
    assert read_rows(tmp_path / "results", "demo")["negatives_group"].to_pylist() == [4]
