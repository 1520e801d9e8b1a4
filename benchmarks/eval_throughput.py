"""CH + top-1 evaluation throughput: our batched evaluator vs a per-image loop in the authors' style.

Same model (random init, eval mode), same images (random pixels with 1-2 random
boxes each, already decoded and normalised in memory, so decoding is not
timed), one run each after a 2-image warm-up (``--repeats N``: N alternating
runs, median time of each):

- batched:   ``cgc_ray.train.engine.evaluate(metrics=("top1", "ch"))`` over batches
             of ``--batch-size`` (closed-form Grad-CAM from the forward's layer4
             activation, heatmaps resized, normalised and masked on the batch);
- per-image: batch 1, a forward hook on layer4, ``torch.autograd.grad`` of the
             ground-truth logit, ``.item()`` for top-1, then the heatmap moved
             to NumPy and resized (bilinear, half-pixel centres), normalised and
             masked per image, as the authors' evaluation script does.

Both compute CH of the ground-truth class at the input resolution; the script
checks they agree before printing images/s and the ratio.

    python benchmarks/eval_throughput.py                      # resnet18, 64 images at 224 px
    python benchmarks/eval_throughput.py --threads 1 --images 32
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from cgc_ray.models import ARCHS
from cgc_ray.models.resnet import build_model
from cgc_ray.train.engine import evaluate


def make_images(n: int, size: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(images n x 3 x size x size, labels n, n box tensors of 1-2 boxes x 4 in pixels)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    boxes = []
    for _ in range(n):
        k = int(torch.randint(1, 3, (1,), generator=g))
        lo = torch.rand(k, 2, generator=g) * size * 0.6
        wh = (0.2 + 0.4 * torch.rand(k, 2, generator=g)) * size
        boxes.append(torch.cat([lo, (lo + wh).clamp(max=size)], dim=1))
    return x, y, boxes


def np_bilinear(src: np.ndarray, H: int, W: int) -> np.ndarray:
    """h x w -> H x W bilinear, half-pixel centres (cv2.resize / align_corners=False)."""
    h, w = src.shape

    def taps(n_out: int, n_in: int):
        s = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = np.minimum(np.floor(s).astype(np.int64), n_in - 1)
        return i0, np.minimum(i0 + 1, n_in - 1), (s - i0).astype(src.dtype)

    y0, y1, wy = taps(H, h)
    x0, x1, wx = taps(W, w)
    top = src[y0][:, x0] * (1 - wx) + src[y0][:, x1] * wx
    bottom = src[y1][:, x0] * (1 - wx) + src[y1][:, x1] * wx
    return top * (1 - wy)[:, None] + bottom * wy[:, None]


def authors_style(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, boxes: list[torch.Tensor]
) -> tuple[float, np.ndarray]:
    """(top-1 accuracy, CH per image): batch 1, autograd Grad-CAM, NumPy post-processing."""
    model.eval()
    H, W = x.shape[-2:]
    acts: list[torch.Tensor] = []
    handle = model.layer4.register_forward_hook(lambda m, i, o: acts.append(o))
    correct, chs = 0, []
    try:
        for i in range(x.shape[0]):
            acts.clear()
            logits = model(x[i : i + 1])
            label = int(y[i])
            correct += int(logits.argmax(dim=1).item() == label)
            (grad,) = torch.autograd.grad(logits[0, label], acts[0])
            alpha = grad.mean(dim=(2, 3), keepdim=True)
            cam = torch.relu((alpha * acts[0]).sum(dim=1))[0].detach().cpu().numpy()
            up = np.maximum(np_bilinear(cam, H, W), 0)
            total = up.sum()
            up = up / total if total > 0 else np.full_like(up, 1.0 / up.size)
            mask = np.zeros((H, W), dtype=bool)
            cy, cx = np.arange(H) + 0.5, np.arange(W) + 0.5
            for x1, y1, x2, y2 in boxes[i].tolist():
                mask |= ((cy >= y1) & (cy <= y2))[:, None] & ((cx >= x1) & (cx <= x2))[None, :]
            chs.append(float(up[mask].sum()))
    finally:
        handle.remove()
    return correct / x.shape[0], np.array(chs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=ARCHS, default="resnet18")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=1,
                   help="alternate the two evaluators this many times and report the median time of each "
                   "(steadier on a shared machine)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = build_model(args.arch, args.classes).eval().to(device)
    x, y, boxes = make_images(args.images, args.image_size, args.classes, args.seed)
    x, y = x.to(device), y.to(device)
    batches = [(x[i : i + args.batch_size], y[i : i + args.batch_size], boxes[i : i + args.batch_size])
               for i in range(0, args.images, args.batch_size)]

    evaluate(model, [(x[:2], y[:2], boxes[:2])], device, layer="layer4", metrics=("top1", "ch"))  # warm-up
    authors_style(model, x[:2], y[:2], boxes[:2])

    times_ours, times_ref = [], []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ours = evaluate(model, batches, device, layer="layer4", metrics=("top1", "ch"))  # returns host floats: synchronised
        times_ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        top1_ref, ch_ref = authors_style(model, x, y, boxes)
        times_ref.append(time.perf_counter() - t0)
    t_ours, t_ref = float(np.median(times_ours)), float(np.median(times_ref))

    if abs(ours["top1"] - top1_ref) > 1e-9 or abs(ours["ch"] - ch_ref.mean()) > 1e-4:
        raise SystemExit(
            f"the evaluators disagree: top1 {ours['top1']} vs {top1_ref}, CH {ours['ch']} vs {ch_ref.mean()}"
        )
    print(f"{args.arch}, {args.images} images at {args.image_size} px on {device}, "
          f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}, median of {args.repeats} run(s)")
    print(f"top-1 {ours['top1']:.4f} and CH {ours['ch']:.4f} agree between the two evaluators")
    print(f"batched (batch {args.batch_size}):        {args.images / t_ours:8.2f} images/s  ({t_ours:.2f} s)")
    print(f"per-image, authors' style:  {args.images / t_ref:8.2f} images/s  ({t_ref:.2f} s)")
    print(f"speed-up: {t_ref / t_ours:.2f}x")


if __name__ == "__main__":
    main()
