"""Training-loader throughput: JPEG decode + random resized crop + flip + normalise, images/s per CPU core.

The product's own pipeline: ``train.trial.build_loaders`` (``BoxDataset``, PIL
decode and resize, ``collate``, the trial's DataLoader) for the ``imagenet_r50``
preset at 224 px, over ``--n`` synthetic JPEGs of ImageNet-like size and file
size (500 x 375 or 375 x 500, a smooth background, shapes and pixel noise,
quality 90: ~106 KiB a file, as ImageNet's ~110 kB mean), one pass per ``--workers`` value (worker start-up included, as
each epoch pays it: the product's loaders are not persistent; the first batch's
latency is shown apart). "per core": images/s divided by the loader processes
(``max(1, workers)``), and images per CPU-second measured (this process and its
workers); the main process runs one torch thread.

Against it, a tensor path on the same files and the same output (3 x 224 x 224,
ImageNet-normalised; the crop and flip drawn by the dataset's own
``sample_crop`` in the dataset's order, so both paths cut the same boxes):
``torchvision.io.decode_jpeg`` + ``resized_crop`` (bilinear, antialiased) +
flip + normalise on tensors, on the CPU in one thread and, when CUDA is
present, with the decode and the transforms on the GPU (nvJPEG). The two
paths' outputs for the same crops are compared (mean and max absolute
difference, normalised units) so the faster one is seen to do the same work.

``--gpu-step``: also time the product's ResNet50 batch-256 CGC training step on
the GPU (``benchmarks.fewshot_packing.product_step``: fp16 AMP + GradScaler,
channels_last) and print how many CPU cores of each path it takes to feed it.

    python benchmarks/loader.py                          # 512 JPEGs, workers 0,1,2
    python benchmarks/loader.py --n 64 --workers 0       # a quick check
    python benchmarks/loader.py --gpu-step --json        # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cgc_ray.config import PRESETS, apply_overrides, load_spec
from cgc_ray.data.dataset import IMAGENET_MEAN, IMAGENET_STD, BoxDataset, sample_crop
from cgc_ray.data.formats import ImageRecord
from cgc_ray.train.trial import TrialData, build_loaders

PRESET = "imagenet_r50"


def make_jpegs(folder: Path, n: int, seed: int = 0, classes: int = 10) -> list[ImageRecord]:
    """``n`` JPEGs (500 x 375, a third 375 x 500) in ``folder``; each record's box is its first shape's."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        W, H = (375, 500) if rng.random() < 1 / 3 else (500, 375)
        grid = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)  # a smooth colour field
        img = Image.fromarray(grid).resize((W, H), Image.BICUBIC)
        draw = ImageDraw.Draw(img)
        boxes = []
        for _ in range(int(rng.integers(3, 7))):
            w, h = rng.integers(W // 8, W // 2), rng.integers(H // 8, H // 2)
            x0, y0 = int(rng.integers(0, W - w)), int(rng.integers(0, H - h))
            box = (x0, y0, x0 + int(w), y0 + int(h))
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
            boxes.append(tuple(float(v) for v in box))
        img = img.filter(ImageFilter.GaussianBlur(1.0))
        noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 26, (H, W, 3))  # ~106 KiB a file: ImageNet's mean
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        records.append(ImageRecord(str(path), i % classes, tuple(boxes[:1]), (W, H)))
    return records


def training_loader(records: list[ImageRecord], *, workers: int, batch: int, image_size: int):
    """The trial's training DataLoader for these records (``build_loaders`` of the preset, ``workers`` loaders)."""
    spec = apply_overrides(load_spec(PRESETS[PRESET]), [
        "sweep.grid={}", f"data.num_workers={workers}", f"scaling.cpus_per_worker={workers + 1}",
        f"data.batch_size={batch}", f"data.image_size={image_size}"])
    td = TrialData(train=records, val=records[:batch], unlabeled=None, num_classes=10, episode_seed=None,
                   eval_split="benchmark")
    return build_loaders(spec, td)[0]


def _cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def time_loader(records: list[ImageRecord], workers: int, batch: int, image_size: int) -> dict:
    """One pass of the product's training loader; worker processes are joined at its end, so their CPU counts."""
    loader = training_loader(records, workers=workers, batch=batch, image_size=image_size)
    cpu, t = _cpu_seconds(), time.perf_counter()
    n, first = 0, None
    for b in loader:
        n += b[0].shape[0]
        first = first or time.perf_counter() - t
    wall, cpu = time.perf_counter() - t, _cpu_seconds() - cpu
    return {"path": "PIL (product loader)", "workers": workers, "images": n, "wall_s": wall, "first_batch_s": first,
            "images_per_s": n / wall, "images_per_s_per_core": n / wall / max(1, workers),
            "images_per_cpu_s": n / cpu}


def _tensor_sample(img: torch.Tensor, ds: BoxDataset) -> torch.Tensor:
    """The dataset's training augmentation on a decoded uint8 image 3 x H x W: same RNG draws, uint8 3 x S x S."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    H, W = img.shape[-2:]
    x0, y0, cw, ch = sample_crop(W, H, ds.scale, ds.ratio)
    flip = bool(torch.rand(1).item() < ds.flip_p)
    out = TF.resized_crop(img, y0, x0, ch, cw, [ds.image_size] * 2, InterpolationMode.BILINEAR, antialias=True)
    return out.flip(-1) if flip else out


def _normalise(batch_u8: torch.Tensor) -> torch.Tensor:
    """uint8 B x 3 x S x S -> float, ImageNet-normalised (as ``BoxDataset._to_tensor``)."""
    mean = torch.tensor(IMAGENET_MEAN, device=batch_u8.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=batch_u8.device).view(1, 3, 1, 1)
    return (batch_u8.float() / 255 - mean) / std


def tensor_batches(records: list[ImageRecord], ds: BoxDataset, batch: int, device: str):
    """decode_jpeg (on ``device``) + the same crop/flip + normalise; yields float B x 3 x S x S on ``device``."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    for i in range(0, len(records), batch):
        data = [read_file(r.path) for r in records[i:i + batch]]
        if device == "cpu":
            imgs = [decode_jpeg(d, mode=ImageReadMode.RGB) for d in data]
        else:
            imgs = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)  # one batched nvJPEG call
        yield _normalise(torch.stack([_tensor_sample(im, ds) for im in imgs]))


def time_tensor_path(records: list[ImageRecord], ds: BoxDataset, batch: int, device: str) -> dict:
    """One pass of :func:`tensor_batches` in this process (one torch thread), after a one-batch warm-up."""
    for _ in tensor_batches(records[:batch], ds, batch, device):
        pass
    if device != "cpu":
        torch.cuda.synchronize()
    cpu, t = time.process_time(), time.perf_counter()
    n = 0
    for x in tensor_batches(records, ds, batch, device):
        n += x.shape[0]
    if device != "cpu":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    name = "decode_jpeg CPU" if device == "cpu" else f"decode_jpeg + transforms on {device}"
    return {"path": name, "workers": 0, "images": n, "wall_s": wall, "first_batch_s": None, "images_per_s": n / wall,
            "images_per_s_per_core": n / wall, "images_per_cpu_s": n / cpu}


def agreement(records: list[ImageRecord], ds: BoxDataset, device: str, k: int = 16) -> dict:
    k = min(k, len(records))
    """PIL path (``ds[i]``) vs tensor path on the same crops and flips (the RNG reseeded for each)."""
    torch.manual_seed(0)
    pil = torch.stack([ds[i][0] for i in range(k)])
    torch.manual_seed(0)
    tens = next(tensor_batches(records[:k], ds, k, device)).cpu()
    d = (pil - tens).abs()
    return {"device": device, "images": k, "mean_abs_diff": d.mean().item(), "max_abs_diff": d.max().item()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=512, help="synthetic JPEGs")
    p.add_argument("--workers", default="0,1,2", help="DataLoader workers, comma-separated")
    p.add_argument("--batch", type=int, default=32, help="loader batch (throughput per image hardly depends on it)")
    p.add_argument("--size", type=int, default=224, help="training resolution")
    p.add_argument("--no-tensor-path", action="store_true", help="skip the decode_jpeg comparison")
    p.add_argument("--gpu-step", action="store_true", help="time the ResNet50 batch-256 CGC step on CUDA too")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    cuda = torch.cuda.is_available()
    if a.gpu_step and not cuda:
        sys.exit("--gpu-step needs CUDA and torch.cuda.is_available() is False; run without it on a CPU")
    with tempfile.TemporaryDirectory(prefix="cgc-loader-bench-") as tmp:
        records = make_jpegs(Path(tmp), a.n)
        kb = sum(os.path.getsize(r.path) for r in records) / len(records) / 1024
        ds = training_loader(records, workers=0, batch=a.batch, image_size=a.size).dataset
        rows = [time_loader(records, int(w), a.batch, a.size) for w in a.workers.split(",")]
        checks = []
        if not a.no_tensor_path:
            for dev in ["cpu"] + (["cuda"] if cuda else []):
                rows.append(time_tensor_path(records, ds, a.batch, dev))
                checks.append(agreement(records, ds, dev))
    report = {"n_images": a.n, "mean_jpeg_kib": kb, "image_size": a.size, "batch": a.batch,
              "cpu_count": os.cpu_count(), "rows": rows, "agreement": checks, "gpu_step": None}
    if a.gpu_step:
        from benchmarks.fewshot_packing import product_step

        run, settings = product_step(PRESET, "resnet50", 256, a.size)
        run(3)  # warm-up
        reps = 10
        s = run(reps) / reps
        gpu_ips = settings["batch"] / s
        report["gpu_step"] = {**settings, "device": torch.cuda.get_device_name(0), "s_per_step": s,
                              "images_per_s": gpu_ips}
        for r in rows:
            r["cores_to_feed_gpu"] = gpu_ips / r["images_per_cpu_s"]
    if a.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{a.n} JPEGs, mean {kb:.0f} KiB, -> {a.size} px, batch {a.batch}, {os.cpu_count()} CPUs here")
    feed = " cores to feed GPU" if a.gpu_step else ""
    print(f"{'path':34} {'workers':>7} {'img/s':>8} {'img/s/core':>10} {'img/CPU-s':>9} {'1st batch s':>11}{feed}")
    for r in rows:
        tail = f" {r['cores_to_feed_gpu']:17.1f}" if a.gpu_step else ""
        first = f"{r['first_batch_s']:11.2f}" if r["first_batch_s"] is not None else f"{'-':>11}"
        print(f"{r['path']:34} {r['workers']:>7} {r['images_per_s']:8.1f} {r['images_per_s_per_core']:10.1f} "
              f"{r['images_per_cpu_s']:9.1f} {first}{tail}")
    for c in checks:
        print(f"PIL vs decode_jpeg on {c['device']} ({c['images']} images, same crops): mean |diff| "
              f"{c['mean_abs_diff']:.4f}, max {c['max_abs_diff']:.3f} (normalised units)")
    if report["gpu_step"]:
        g = report["gpu_step"]
        print(f"GPU step ({g['device']}): {g['arch']} batch {g['batch']} CGC {g['amp']} channels_last="
              f"{g['channels_last']}: {g['s_per_step'] * 1000:.0f} ms/step = {g['images_per_s']:.0f} img/s; "
              "'cores to feed GPU' = GPU img/s / the path's images per CPU-second")


if __name__ == "__main__":
    main()
