"""Few-shot trials packed on one GPU: k = 1, 2, 4 trial processes side by side, each one's speed vs one alone.

The few-shot presets ask Ray for ``scaling.gpus_per_worker=0.25``, so four trials
share a GPU. This runs k copies of the product's training step
(``engine.train_one_epoch``: the CGC term, fp16 autocast + GradScaler,
channels_last, as ``engine.fit`` on a GPU) with the ``fewshot_cub200`` preset's
architecture (ResNet50), batch (256), image size (224), method (CGC, λ 0.8) and
torch threads (``scaling.cpus_per_worker``), each in its own process on a fixed
random batch already on the GPU (no data loading, no evaluation: the GPU side
only). The k processes warm up, then all start at the same instant and step for
``--seconds``; each reports steps/s and its peak memory
(``torch.cuda.max_memory_allocated`` and ``max_memory_reserved``).
A process that runs out of memory reports it, and the others go on.

    python benchmarks/fewshot_packing.py                 # k = 1, 2, 4; 10 s each
    python benchmarks/fewshot_packing.py --ks 1,2,3,4 --seconds 20 --json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESET = "fewshot_cub200"


def product_step(preset: str, arch: str | None, batch: int | None, size: int | None,
                 device: str = "cuda") -> tuple[Callable[[int], float], dict]:
    """The product's GPU training step for ``preset`` (arch, batch, image size, method, AMP and memory layout
    from the spec unless given), on one random batch on ``device``.

    Returns (run, settings): ``run(n)`` trains n steps (``engine.train_one_epoch`` over n copies of the batch)
    and returns the seconds they took, synchronised.
    """
    import torch

    from benchmarks.step import setup
    from cgc_ray.config import PRESETS, apply_overrides, effective_lam, load_spec
    from cgc_ray.train.engine import train_one_epoch
    from cgc_ray.train.task import Placement, build_task

    spec = apply_overrides(load_spec(PRESETS[preset]), ["sweep.grid={}"])
    arch, batch, size = arch or spec.model.arch, batch or spec.data.batch_size, size or spec.data.image_size
    dev = torch.device(device)
    cl = spec.scaling.channels_last
    model, opt, x, y = setup(arch, dev, batch, size, cl)  # a 1000-class head; the head's size hardly matters
    task = build_task(spec, num_classes=1000, placement=Placement.on(dev, amp=spec.scaling.amp, channels_last=cl))
    scaler = torch.amp.GradScaler("cuda") if spec.scaling.amp else None

    def run(n: int) -> float:
        torch.cuda.synchronize(dev)
        t = time.perf_counter()
        train_one_epoch(model, task, opt, [(x, y)] * n, scaler=scaler)
        torch.cuda.synchronize(dev)
        return time.perf_counter() - t

    settings = {"preset": preset, "arch": arch, "batch": batch, "size": size, "method": spec.method.name,
                "lam": effective_lam(spec, 1000), "amp": "fp16+GradScaler" if spec.scaling.amp else "fp32",
                "channels_last": cl,
                "cpus_per_worker": spec.scaling.cpus_per_worker, "gpus_per_worker": spec.scaling.gpus_per_worker}
    return run, settings


def child(a: argparse.Namespace) -> None:
    """One packed trial: warm up, say ready, wait for the shared start, step until the shared end."""
    import torch

    from cgc_ray.config import PRESETS, load_spec

    torch.set_num_threads(max(1, int(load_spec(PRESETS[PRESET]).scaling.cpus_per_worker)))  # as runner.worker
    try:
        run, _ = product_step(PRESET, a.arch, a.batch, a.size)
        run(a.warmup)
        torch.cuda.reset_peak_memory_stats()
        print("ready", flush=True)
        start, end = map(float, sys.stdin.readline().split())
        time.sleep(max(0.0, start - time.time()))
        t0, steps = time.perf_counter(), 0
        while time.time() < end:
            run(1)  # one step and a sync, as a 1-shot epoch (200 images: one batch)
            steps += 1
        elapsed = time.perf_counter() - t0
        out = {"steps": steps, "seconds": elapsed, "steps_per_s": steps / elapsed,
               "peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
               "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20}
    except torch.cuda.OutOfMemoryError as e:
        out = {"oom": True, "error": str(e).splitlines()[0]}
    print(json.dumps(out), flush=True)


def run_k(k: int, a: argparse.Namespace) -> list[dict]:
    """Start k child processes, start them together once all are warm; their reports (or failures)."""
    cmd = [sys.executable, __file__, "--child", "--warmup", str(a.warmup),
           *[f"--{n}={v}" for n, v in (("arch", a.arch), ("batch", a.batch), ("size", a.size)) if v]]
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(k)]
    first = [p.stdout.readline().strip() for p in procs]  # "ready", or the report of one that failed warming up
    start = time.time() + 1.0
    for p, line in zip(procs, first):
        if line == "ready":
            p.stdin.write(f"{start} {start + a.seconds}\n")
            p.stdin.flush()
    rows = []
    for p, line in zip(procs, first):
        out, err = p.communicate(timeout=a.seconds + 600)
        lines = [v for v in [line, *out.strip().splitlines()] if v and v != "ready"]
        last = lines[-1] if lines else ""
        try:
            rows.append(json.loads(last))
        except json.JSONDecodeError:
            rows.append({"failed": True, "returncode": p.returncode, "error": err.strip()[-2000:]})
    return rows


def summarise(results: dict[int, list[dict]], batch: int) -> list[dict]:
    """Per k: per-process steps/s, its ratio to one trial alone, total images/s and its ratio to one alone."""
    alone = None
    table = []
    for k, rows in results.items():
        ok = [r for r in rows if "steps_per_s" in r]
        rates = [r["steps_per_s"] for r in ok]
        row = {"k": k, "ran": len(ok), "oom": sum(bool(r.get("oom")) for r in rows),
               "failed": sum(bool(r.get("failed")) for r in rows), "steps_per_s_each": rates,
               "total_images_per_s": sum(rates) * batch,
               "peak_allocated_mib": max((r["peak_allocated_mib"] for r in ok), default=None),
               "peak_reserved_mib": max((r["peak_reserved_mib"] for r in ok), default=None)}
        if k == 1 and rates:
            alone = rates[0]
        if alone and rates:
            row["each_vs_alone"] = [r / alone for r in rates]
            row["total_vs_alone"] = sum(rates) / alone
        table.append(row)
    return table


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", default="1,2,4", help="numbers of trial processes side by side (include 1: the baseline)")
    p.add_argument("--seconds", type=float, default=10.0, help="timed steady state of each k")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (cuDNN, allocator)")
    p.add_argument("--arch", default=None, help=f"default: the {PRESET} preset's (resnet50)")
    p.add_argument("--batch", type=int, default=None, help=f"default: the {PRESET} preset's data.batch_size")
    p.add_argument("--size", type=int, default=None, help=f"default: the {PRESET} preset's data.image_size")
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        sys.exit("fewshot_packing.py measures trials sharing a CUDA GPU, and torch.cuda.is_available() is False "
                 "here; run it on a machine with a GPU (benchmarks/gpu_check.sh does)")
    if a.child:
        child(a)
        return
    from cgc_ray.config import PRESETS, apply_overrides, effective_lam, load_spec

    spec = apply_overrides(load_spec(PRESETS[PRESET]), ["sweep.grid={}"])
    batch = a.batch or spec.data.batch_size
    results = {k: run_k(k, a) for k in (int(v) for v in a.ks.split(","))}
    table = summarise(results, batch)
    gpu_mib = torch.cuda.mem_get_info()[1] / 2**20  # read after the runs: this process's context took none of it
    report = {"device": torch.cuda.get_device_name(0), "gpu_memory_mib": gpu_mib, "preset": PRESET,
              "arch": a.arch or spec.model.arch, "batch": batch, "size": a.size or spec.data.image_size,
              "seconds": a.seconds, "table": table, "raw": {str(k): v for k, v in results.items()}}
    if a.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{report['device']} ({gpu_mib:.0f} MiB)  {PRESET}: {report['arch']} batch {batch} at {report['size']} px, "
          f"CGC, fp16 AMP, {a.seconds:g} s each")
    print(f"{'k':>2} {'ran':>3} {'oom':>3} {'steps/s each':>18} {'each/alone':>16} {'img/s total':>11} "
          f"{'total/alone':>11} {'peak alloc MiB':>14} {'peak resv MiB':>13}")
    for r in table:
        each = ",".join(f"{v:.2f}" for v in r["steps_per_s_each"]) or "-"
        rel = ",".join(f"{v:.2f}" for v in r.get("each_vs_alone", [])) or "-"
        tot = f"{r['total_vs_alone']:.2f}" if "total_vs_alone" in r else "-"
        mem = lambda v: f"{v:.0f}" if v is not None else "-"
        print(f"{r['k']:>2} {r['ran']:>3} {r['oom']:>3} {each:>18} {rel:>16} {r['total_images_per_s']:>11.0f} "
              f"{tot:>11} {mem(r['peak_allocated_mib']):>14} {mem(r['peak_reserved_mib']):>13}")
    for k, rows in results.items():
        for r in rows:
            if r.get("failed") or r.get("oom"):
                print(f"k={k}: {'out of memory' if r.get('oom') else 'failed'}: {r.get('error', '')[-400:]}")


if __name__ == "__main__":
    main()
