"""Time one training step: cross-entropy baseline vs CGC (closed-form CAM) vs CGC (autograd CAM)
vs the authors' step structure, for ResNet18 and ResNet50 at 224 px, in ONE process.

    python benchmarks/step.py                       # CPU, batch 8, resnet18 + resnet50
    python benchmarks/step.py --device cuda --batch 64 --amp

Every kind is one ``engine.train_step`` (the task's loss, backward, optimiser
step) of a ``train.task`` objective, so the numbers are those of the step users
run: "baseline" and "cgc*" are the tasks ``train.task.build_task`` makes from a
spec. The kinds are timed round-robin (rep 1 of each, rep 2 of each, ...) so machine
noise hits them alike; the ratios to the baseline step are the numbers to quote.
"baseline_2b" is a CE step on a batch of 2B (the floor for any step that runs
two views: on a CPU a batch of 2B often costs more than twice a batch of B).
"cgc" forwards [x; T(x)] as one batch (``method.forward=joint``); "cgc_separate"
forwards x and T(x) one after the other (``separate``, the authors' BatchNorm
treatment); "cgc_autograd" is "cgc" with the autograd Grad-CAM forced.
"authors" re-creates the structure of UCDvision/CGC's step for comparison
(docs/PAPER.md §5): three train-mode forwards (standard view, centre
view, CGC view) with the cross-entropy of all three, Grad-CAM by two
``autograd.grad(create_graph=True)`` calls, heatmaps upsampled to 224 and
transformed in a Python loop over the batch, one backward.
Peak memory: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the peak RSS
of a fresh subprocess running that one kind (``--no-memory`` skips it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from cgc_ray.config import ExperimentSpec, apply_overrides
from cgc_ray.config.presets import AUTHORS_STEP
from cgc_ray.method import transforms as T
from cgc_ray.method.cam import capture
from cgc_ray.method.loss import cgc_loss
from cgc_ray.models.resnet import build_model
from cgc_ray.train.engine import train_step
from cgc_ray.train.task import Batch, Placement, Task, build_task

KINDS = ("baseline", "baseline_2b", "cgc", "cgc_separate", "cgc_autograd", "cgc_authors", "authors")


def _authors_step(model, x, y, gen):
    """The authors' step structure (for timing only; see the module docstring)."""
    B, _, H, W = x.shape
    centre = x.flip(-1)  # stands in for the centre-crop view: same cost
    p = T.sample_params(B, (H, W), generator=gen, device=x.device)
    aug = T.apply(x, p)
    losses, cams = [], []
    for i, view in enumerate((x, centre, aug)):
        with capture(model, "layer4") as feat:
            logits = model(view)
        losses.append(F.cross_entropy(logits, y))
        if i == 0:
            continue
        if i == 1:
            t = logits.detach().argmax(1).cpu().to(x.device)  # the authors' GPU->CPU round trip
        score = logits.gather(1, t[:, None]).sum()
        (dA,) = torch.autograd.grad(score, feat.value, create_graph=True)
        cam = F.relu((dA * feat.value).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=(H, W), mode="bilinear", align_corners=False)[:, 0]
        cams.append(cam / (cam.flatten(1).sum(1)[:, None, None] + 1e-8))
    orig, augc = cams
    boxes = (p.boxes * torch.tensor([W, H, W, H], device=x.device)).round().long().tolist()
    flips = p.flip.tolist()
    moved = []
    for i in range(B):  # the authors' per-image transform loop
        x1, y1, x2, y2 = boxes[i]
        m = F.interpolate(orig[i : i + 1, None, y1:y2, x1:x2], size=(H, W), mode="bilinear", align_corners=False)
        moved.append(m.flip(-1) if flips[i] else m)
    q = torch.cat(moved)[:, 0]
    with torch.autocast(x.device.type, enabled=False):  # (the authors train in fp32; under --amp, the loss in fp32)
        return sum(losses) + cgc_loss(augc.float(), q.float(), anchor="authors")


class _AuthorsStep(Task):
    """:func:`_authors_step` as a task, so it runs through the same ``train_step`` as the product's."""

    def __init__(self, placement: Placement):
        self.placement = placement
        self.rng = torch.Generator().manual_seed(0)

    def __call__(self, model, batch):
        with self.placement.autocast():
            return _authors_step(model, batch.x, batch.y, self.rng), {}


def build_kind(kind: str, placement: Placement) -> tuple[Task, bool]:
    """(the task of ``kind``, whether it runs on a batch of 2B): the product's objective as a spec builds it
    (``cgc``: λ 1 and the spec's defaults; ``cgc_authors``: the paper presets' ``AUTHORS_STEP``, the authors'
    computation as the product runs it), or the authors' step structure."""
    if kind == "authors":
        return _AuthorsStep(placement), False
    authors = [f"method.{k.removeprefix('method.')}={json.dumps(v)}" for k, (v, _) in AUTHORS_STEP.items()]
    method = {"baseline": ["method.name=baseline"], "baseline_2b": ["method.name=baseline"],
              "cgc_separate": ["method.forward=separate"], "cgc_authors": authors}.get(kind, [])
    task = build_task(apply_overrides(ExperimentSpec(), ["method.lam=1.0", *method]), num_classes=1000,
                      placement=placement)
    if kind == "cgc_autograd":
        task.closed_form = False
    return task, kind == "baseline_2b"


def make_step(kind: str, model, opt, placement: Placement, scaler=None):
    """One training step of ``kind`` on (x, y): ``engine.train_step`` of its task (:func:`build_kind`, built
    once, outside the timed step); under ``placement``'s autocast as the product trains (fp16 + GradScaler on
    CUDA, bf16 on CPU), the CGC heatmaps and loss in fp32."""
    task, double = build_kind(kind, placement)

    def step(x, y):
        # a flipped copy stands in for the centre view (same cost) where the step reads one
        batch = Batch(torch.cat([x, x.flip(-1)]), torch.cat([y, y])) if double else Batch(x, y, x.flip(-1))
        train_step(model, task, batch, opt, scaler=scaler)

    return step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def setup(arch, device, batch, size, channels_last):
    torch.manual_seed(0)
    model = build_model(arch, 1000).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    return model, opt, x, y


def time_kinds(arch, device, batch, size, reps, kinds, amp, channels_last):
    model, opt, x, y = setup(arch, device, batch, size, channels_last)
    placement = Placement.on(device, amp=amp, channels_last=channels_last)
    x, y, _ = placement.batch((x, y))  # in the memory layout the product's loop gives the task
    scaler = torch.amp.GradScaler("cuda") if placement.amp_dtype == torch.float16 else None
    steps = {k: make_step(k, model, opt, placement, scaler) for k in kinds}
    times = {k: [] for k in kinds}
    for k in kinds:  # warm-up
        steps[k](x, y)
    for _ in range(reps):
        for k in kinds:
            _sync(device)
            t = time.perf_counter()
            steps[k](x, y)
            _sync(device)
            times[k].append(time.perf_counter() - t)
    peak = {}
    if device.type == "cuda":
        for k in kinds:
            torch.cuda.reset_peak_memory_stats()
            steps[k](x, y)
            _sync(device)
            peak[k] = torch.cuda.max_memory_allocated() / 2**20
    return {k: statistics.median(v) for k, v in times.items()}, peak


def cpu_peak_rss(arch, kind, batch, size) -> float:
    """Peak RSS (MiB, VmHWM) of a fresh process that builds the model and runs two steps of ``kind``.

    VmHWM, not ru_maxrss: on Linux ru_maxrss survives exec and would report the parent's peak.
    """
    code = (
        "import torch,sys; sys.argv=['x'];"
        "from benchmarks.step import setup, make_step; from cgc_ray.train.task import Placement;"
        f"m,o,x,y=setup('{arch}',torch.device('cpu'),{batch},{size},False);"
        f"s=make_step('{kind}',m,o,Placement.on('cpu')); s(x,y); s(x,y);"
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))/1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="resnet18,resnet50")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--amp", action="store_true", help="autocast as the product trains: fp16 + GradScaler on CUDA, bf16 on CPU")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    rows = []
    for arch in a.archs.split(","):
        times, peak = time_kinds(arch, device, a.batch, a.size, a.reps, KINDS, a.amp, a.channels_last)
        if device.type == "cpu" and not a.no_memory:
            peak = {k: cpu_peak_rss(arch, k, a.batch, a.size) for k in KINDS}
        for k in KINDS:
            rows.append({"arch": arch, "kind": k, "s_per_step": times[k], "x_baseline": times[k] / times["baseline"],
                         "peak_mib": peak.get(k)})
    if a.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"device={device} batch={a.batch} size={a.size} reps={a.reps} threads={torch.get_num_threads()} amp={a.amp}")
    print(f"{'arch':10} {'step':14} {'s/step':>8} {'x CE':>6} {'peak MiB':>9}")
    for r in rows:
        mem = f"{r['peak_mib']:9.0f}" if r["peak_mib"] is not None else f"{'-':>9}"
        print(f"{r['arch']:10} {r['kind']:14} {r['s_per_step']:8.3f} {r['x_baseline']:6.2f} {mem}")
    for arch in a.archs.split(","):
        t = {r["kind"]: r["s_per_step"] for r in rows if r["arch"] == arch}
        print(f"{arch}: CGC/CE = {t['cgc'] / t['baseline']:.2f}x, CGC/CE(2B) = {t['cgc'] / t['baseline_2b']:.2f}x, "
              f"ours/authors = {t['cgc'] / t['authors']:.2f}")


if __name__ == "__main__":
    main()
