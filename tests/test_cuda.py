"""CUDA: the fp16 AMP + GradScaler CGC step, Grad-CAM on the GPU against the CPU, GPU trials end to end.

Every test is marked ``gpu`` and skipped where CUDA is absent; a GPU session runs
``python -m pytest -q -m gpu tests/test_cuda.py`` (``benchmarks/gpu_check.sh`` does).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import TINY

from cgc_ray.config import PRESETS, MethodSpec, apply_overrides, load_spec
from cgc_ray.method.cam import gradcam
from cgc_ray.method.cgc import cgc_term
from cgc_ray.models.resnet import build_model
from cgc_ray.results.table import read_rows
from cgc_ray.storage import Storage
from cgc_ray.train.engine import train_one_epoch
from cgc_ray.train.task import CGCObjective, Placement

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.is_available() is False)"),
]

CUDA = torch.device("cuda")


@pytest.fixture
def no_tf32():
    """Plain fp32 on the GPU: cuDNN convolutions use TF32 by default on Ampere and later (~1e-3 relative)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _batches(n: int = 12, B: int = 8, size: int = 64, classes: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """CPU batches (images B x 3 x size x size, labels B) whose label is readable from a bright patch."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(B, 3, size, size, generator=g)
        y = torch.randint(0, classes, (B,), generator=g)
        x[torch.arange(B), y % 3, 16:48, 16:48] += 2.0
        out.append((x, y))
    return out


def _cuda_model(classes: int = 5) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build_model("resnet18", classes).to(CUDA).to(memory_format=torch.channels_last)
    # a small lr: steps GradScaler skips while it settles its scale then barely part the AMP run from the fp32 one
    return model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)


def test_amp_grad_scaler_cgc_epoch_on_cuda():
    """fp16 autocast + GradScaler + channels_last, as ``engine.fit`` runs on a GPU: it trains, and computes
    the fp32 epoch's losses to fp16 precision."""
    losses = {}
    for amp in (False, True):
        model, opt = _cuda_model()
        before = [p.detach().clone() for p in model.parameters()]
        dtypes: set[torch.dtype] = set()
        hook = model.layer4.register_forward_hook(lambda m, i, o, seen=dtypes: seen.add(o.dtype))
        scaler = torch.amp.GradScaler("cuda") if amp else None
        task = CGCObjective(MethodSpec(lam=0.5), layer="layer4", lam=0.5, seed=0,
                            placement=Placement.on(CUDA, amp=amp, channels_last=True))
        m = train_one_epoch(model, task, opt, _batches(), scaler=scaler)
        hook.remove()
        assert dtypes == {torch.float16 if amp else torch.float32}
        assert m["train_steps"] == 12 and math.isfinite(m["train_loss"]) and m["train_cgc"] > 0
        assert m["train_loss"] == pytest.approx(m["train_ce"] + 0.5 * m["train_cgc"], rel=1e-4)
        assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before)), "no parameter changed"
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        if amp:
            assert math.isfinite(scaler.get_scale()) and scaler.get_scale() > 0
        losses[amp] = m
    for k in ("train_ce", "train_cgc"):
        assert losses[True][k] == pytest.approx(losses[False][k], rel=0.05), k
    assert losses[True]["train_ce"] != losses[False]["train_ce"]  # fp16 really ran


def test_amp_cgc_step_with_the_autograd_cam_on_cuda():
    model, _ = _cuda_model()
    x = torch.randn(8, 3, 64, 64, device=CUDA)
    loss = cgc_term(model, x, MethodSpec(), layer="layer3", generator=torch.Generator().manual_seed(0),
                    amp_dtype=torch.float16).loss
    loss.backward()
    assert torch.isfinite(loss) and model.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("closed_form", [True, False])
def test_cuda_gradcam_equals_the_cpu_gradcam(closed_form, no_tf32):
    """Same weights and images: the maps and the parameter gradients of a loss on them agree in fp32."""
    torch.manual_seed(0)
    cpu = build_model("resnet18", 10).eval()
    gpu = copy.deepcopy(cpu).to(CUDA)
    x = torch.randn(4, 3, 96, 96)
    t = torch.tensor([0, 3, 3, 9])
    out = {}
    for model, dev in ((cpu, torch.device("cpu")), (gpu, CUDA)):
        cam = gradcam(model, x.to(dev), t.to(dev), create_graph=True, closed_form=closed_form)  # 4 x 3 x 3
        (cam.flatten(1) / (cam.flatten(1).norm(dim=1, keepdim=True) + 1e-6)).pow(3).sum().backward()
        grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}
        out[dev.type] = cam.detach().cpu(), grads
    (cam_cpu, g_cpu), (cam_gpu, g_gpu) = out["cpu"], out["cuda"]
    peak = cam_cpu.abs().max().item()
    assert peak > 0
    torch.testing.assert_close(cam_gpu, cam_cpu, rtol=1e-4, atol=1e-4 * peak)
    assert g_gpu.keys() == g_cpu.keys() and {"conv1.weight", "layer4.1.conv2.weight"} <= g_cpu.keys()
    for n in g_cpu:
        scale = g_cpu[n].abs().max().item()
        torch.testing.assert_close(g_gpu[n], g_cpu[n], rtol=0, atol=5e-4 * scale + 1e-8, msg=n)


def _gpu_spec(storage, *overrides: str):
    """One tiny demo trial (CGC, λ 0.5) with the GPU defaults (fp16 AMP, channels_last) on a GPU."""
    return apply_overrides(load_spec(PRESETS["lambda_ablation_demo"]), [
        f"storage={storage}", *TINY, "sweep.grid={}", "method.lam=0.5", "scaling.use_gpu=true", *overrides])


def _assert_trained_on_cuda(checkpoint) -> None:
    """The checkpoint holds CUDA tensors and a GradScaler state: only a CUDA trial with AMP writes both."""
    state = torch.load(checkpoint, weights_only=True)  # tensors come back on the device they were saved from
    assert state["model"]["conv1.weight"].device.type == "cuda"
    assert state["scaler"] is not None and math.isfinite(state["scaler"]["scale"]) and state["scaler"]["scale"] > 0


def test_a_trial_trains_on_cuda_in_process(tmp_path):
    from cgc_ray.train.trial import run_trial

    spec = _gpu_spec(tmp_path)
    assert spec.scaling.amp and spec.scaling.channels_last
    m = run_trial(spec, trial_dir=tmp_path / "t", device="cuda:0")
    assert m["epoch"] == 1 and math.isfinite(m["train_loss"]) and m["train_cgc"] > 0
    for k in ("top1", "ch", "cgc_loss"):
        assert math.isfinite(m[k]), k
    _assert_trained_on_cuda(tmp_path / "t" / "checkpoint.pt")


def test_a_gpu_trial_through_ray_writes_its_row(ray_session, tmp_path):
    """The product's path: the driver asks Ray for a quarter GPU, the worker trains on cuda:0 and writes the row
    (rows record no device: the checkpoint in storage tells where it ran)."""
    from cgc_ray.runner.driver import run_experiment

    gpus = ray_session.cluster_resources().get("GPU", 0)
    assert gpus >= 1, f"the test Ray sees {gpus} GPUs although torch sees {torch.cuda.device_count()}"
    spec = _gpu_spec(tmp_path, "scaling.gpus_per_worker=0.25", "failure.keep_checkpoint=full")  # scaler kept
    res = run_experiment(spec, progress=False)
    (tid,) = res.trial_ids
    assert res.ran == [tid] and res.failed == {} and res.diverged == []
    (row,) = read_rows(str(tmp_path), spec.name).to_pylist()
    assert row["trial_id"] == tid and row["status"] == "finished" and row["epochs"] == 1
    assert math.isfinite(row["top1"]) and 0 <= row["top1"] <= 100 and math.isfinite(row["cgc_loss"])
    assert json.loads(row["config_json"])["scaling"]["use_gpu"] is True
    _assert_trained_on_cuda(Storage(str(tmp_path)).checkpoint_path(spec.name, tid))
