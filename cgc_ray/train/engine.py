"""Plain-PyTorch training and evaluation for baseline and CGC models.

No Ray here: the Ray layer calls ``fit`` with a report callback. No ``.cuda()``:
the caller passes the device. The training step does not synchronise with
the host except for a finiteness check every ``check_every`` steps.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cgc_ray.method.cam import cam_and_logits, linear_head, unwrap
from cgc_ray.method.cgc import MethodConfig, cgc_term
from cgc_ray.method.metrics import content_heatmap, insertion_auc, topk_correct
from cgc_ray.models.checkpoint import load_checkpoint, save_checkpoint


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: deterministic, so the trial is not retried.

    ``step``: the optimiser step of the epoch by which it was seen; ``epoch``:
    that epoch, 1-based (set by :func:`fit`).
    """

    def __init__(self, message: str, *, step: int, epoch: int | None = None):
        super().__init__(message)
        self.step, self.epoch = step, epoch


def _cycle(loader: Iterable) -> Iterator:
    while True:
        yield from loader


def _center_view(batch, device: torch.device, mem: torch.memory_format) -> Tensor | None:
    """The centre views of a batch (images, labels, boxes, centres), when the loader provides them."""
    if len(batch) < 4:
        return None
    return batch[3].to(device, non_blocking=True).contiguous(memory_format=mem)


def _amp_dtype(amp: bool, device: torch.device) -> torch.dtype | None:
    if not amp:
        return None
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    method: MethodConfig,
    device: torch.device | str,
    *,
    scheduler: Any = None,
    unlabeled: Iterable | None = None,
    amp: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    channels_last: bool = False,
    generator: torch.Generator | None = None,
    check_every: int = 50,
) -> dict[str, float]:
    """One pass over ``loader`` (batches of (images, labels[, boxes, centre views])).

    scheduler: stepped after every optimiser step when given (per-iteration schedules).
    unlabeled: batches whose images feed only the CGC term (semi-supervised mode);
    the labelled batches then feed only cross-entropy, as in the authors' code.
    Returns mean loss, ce, cgc, train top-1, share of all-zero CAMs, images/s.
    """
    device = torch.device(device)
    model.train()
    amp_dtype = _amp_dtype(amp, device)
    mem = torch.channels_last if channels_last else torch.contiguous_format
    u_iter = _cycle(unlabeled) if unlabeled is not None else None
    z = torch.zeros((), device=device)
    sums = {"loss": z.clone(), "ce": z.clone(), "cgc": z.clone(), "correct": z.clone(), "zeros": z.clone()}
    n_img = n_cam = steps = 0
    start = time.perf_counter()
    for batch in loader:
        x = batch[0].to(device, non_blocking=True).contiguous(memory_format=mem)
        y = batch[1].to(device, non_blocking=True)
        B = x.shape[0]
        if method.uses_cgc and u_iter is None:
            logits, l_cgc, zeros = cgc_term(model, x, method, y=y, x_center=_center_view(batch, device, mem),
                                            generator=generator, amp_dtype=amp_dtype)
            n_cam += B
        else:
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(x).float()
            l_cgc, zeros = z, z
            if method.uses_cgc:
                ub = next(u_iter)
                xu = ub[0].to(device, non_blocking=True).contiguous(memory_format=mem)
                _, l_cgc, zeros = cgc_term(model, xu, method, x_center=_center_view(ub, device, mem),
                                           generator=generator, amp_dtype=amp_dtype)
                n_cam += xu.shape[0]
        l_ce = F.cross_entropy(logits, y)
        loss = l_ce + method.lam * l_cgc if method.uses_cgc else l_ce
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        d = loss.detach()
        sums["loss"] += d * B
        sums["ce"] += l_ce.detach() * B
        sums["cgc"] += l_cgc.detach() * B
        sums["correct"] += topk_correct(logits.detach(), y, ks=(1,))["top1"]
        sums["zeros"] += zeros
        n_img += B
        steps += 1
        if steps % check_every == 0:
            _check_finite(sums["loss"], steps)
    if n_img == 0:
        raise ValueError("the training loader yielded no batches; check the dataset split and batch size")
    _check_finite(sums["loss"], steps)
    elapsed = time.perf_counter() - start
    out = {k: v.item() for k, v in sums.items()}
    return {
        "train_loss": out["loss"] / n_img,
        "train_ce": out["ce"] / n_img,
        "train_cgc": out["cgc"] / n_img,
        "train_top1": out["correct"] / n_img,
        "train_zero_cam_frac": out["zeros"] / n_cam if n_cam else 0.0,
        "train_images_per_s": n_img / elapsed,
        "train_steps": steps,
    }


def _check_finite(loss_sum: Tensor, step: int) -> None:
    """Raise NonFiniteLossError when the running loss is not finite; under DDP every rank agrees on it."""
    finite = torch.isfinite(loss_sum).to(torch.int32)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # all ranks stop at the same step, or the ones still training would wait in a collective for ever
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    if not finite:
        raise NonFiniteLossError(
            f"training loss is {loss_sum.item()} by step {step}; lower the learning rate or lambda, "
            "or enable gradient clipping; the run stops instead of training on garbage", step=step)


def _heldout_cgc(model: nn.Module, images: Tensor, method: MethodConfig, generator: torch.Generator) -> Tensor:
    """CGC loss of one held-out group; autograd only where the CAM needs it."""
    with torch.set_grad_enabled(linear_head(model, method.layer) is None):
        _, loss, _ = cgc_term(model, images, method, generator=generator, create_graph=False)
    return loss.detach()


def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str,
    *,
    method: MethodConfig,
    metrics: Iterable[str] = ("top1", "top5", "ch", "cgc_loss"),
    heldout_loader: Iterable | None = None,
    iauc_loader: Iterable | None = None,
    iauc_protocol: str = "authors",
    seed: int = 0,
) -> dict[str, float]:
    """Eval-mode metrics (the model's mode is restored afterwards).

    ``loader`` (batches of images, labels, boxes): top1/top5 accuracy; ch, the
    Content Heatmap of the Grad-CAM of the ground-truth class at the input
    resolution, mean over images with boxes; zero_cam_frac, the share of
    all-zero ground-truth heatmaps.
    ``heldout_loader``: cgc_loss, the CGC loss (``method``'s settings, the
    paper's contrastive loss) of each of its batches as one group, averaged
    over groups; T drawn from ``seed``. Build its batches from a seeded
    permutation (``train.trial.evaluation_loaders``), so the value does not
    depend on file order. Default: ``loader`` (its batches as the groups).
    ``iauc_loader``: iauc, insertion AUC by ``iauc_protocol``
    (``method.metrics.insertion_auc``) on every image it yields.
    Default: ``loader``. n_eval and n_iauc count the images.
    """
    device = torch.device(device)
    wanted = set(metrics)
    unknown = wanted - {"top1", "top5", "ch", "cgc_loss", "iauc"}
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from top1, top5, ch, cgc_loss, iauc")
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    # the held-out loss is the paper's contrastive CGC loss whatever was trained (a baseline too), on local negatives
    heldout_method = replace(method, name="cgc", global_negatives=False, view="train", cam_class="pred")
    n, zeros = 0, 0
    correct = {"top1": 0.0, "top5": 0.0}
    ch_sum, ch_n = 0.0, 0
    out: dict[str, float] = {}
    try:
        for batch in loader:
            x = batch[0].to(device, non_blocking=True)
            y = batch[1].to(device, non_blocking=True)
            boxes = batch[2] if len(batch) > 2 else [torch.zeros(0, 4)] * x.shape[0]
            with torch.no_grad():
                cams, logits, _ = cam_and_logits(model, x, targets=y, layer=method.layer)
            for k, v in topk_correct(logits, y, ks=(1, 5)).items():
                correct[k] += v.item()
            zeros += int((cams.flatten(1).sum(1) == 0).sum())
            if "ch" in wanted:
                ch = content_heatmap(cams, [b.to(device) for b in boxes], tuple(x.shape[-2:]))
                ok = ~torch.isnan(ch)
                ch_sum += ch[ok].sum().item()
                ch_n += int(ok.sum())
            n += x.shape[0]
        if "cgc_loss" in wanted:
            sums = [(_heldout_cgc(model, b[0].to(device), heldout_method, gen).item(), b[0].shape[0])
                    for b in (heldout_loader if heldout_loader is not None else loader) if b[0].shape[0] >= 2]
            out["cgc_loss"] = sum(v * k for v, k in sums) / sum(k for _, k in sums) if sums else math.nan
        if "iauc" in wanted:
            scores = []
            for b in iauc_loader if iauc_loader is not None else loader:
                x, y = b[0].to(device), b[1].to(device)
                scores.append(iauc_batch(model, x, y, layer=method.layer, protocol=iauc_protocol))
            out["iauc"] = torch.cat(scores).mean().item() if scores else math.nan
            out["n_iauc"] = float(sum(s.numel() for s in scores))
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("the evaluation loader yielded no images")
    out.update(n_eval=float(n), zero_cam_frac=zeros / n)
    if "top1" in wanted:
        out["top1"] = correct["top1"] / n
    if "top5" in wanted:
        out["top5"] = correct["top5"] / n
    if "ch" in wanted:
        out["ch"] = ch_sum / ch_n if ch_n else math.nan
    return out


def iauc_batch(model: nn.Module, x: Tensor, y: Tensor, *, layer: str, protocol: str) -> Tensor:
    """Insertion AUC of each image of a batch, by ``protocol`` (see ``method.metrics.insertion_auc``).

    The saliency is the Grad-CAM of the ground-truth class ``y`` (``authors``,
    as their script) or of the predicted class (``fast``, as RISE).
    """
    if protocol not in ("authors", "fast"):
        raise ValueError(f"iauc protocol {protocol!r}; choose 'authors' or 'fast'")
    with torch.no_grad():
        sal, _, _ = cam_and_logits(model, x, targets=y if protocol == "authors" else None, layer=layer)
    return insertion_auc(model, x, sal, protocol=protocol)


# ---------------------------------------------------------------- checkpoints


# ---------------------------------------------------------------- fit

Callback = Callable[[dict[str, float], "str | None"], None]


def fit(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable | None,
    optimizer: torch.optim.Optimizer,
    method: MethodConfig,
    device: torch.device | str,
    *,
    epochs: int,
    scheduler: Any = None,
    scheduler_interval: Literal["epoch", "step"] = "epoch",
    unlabeled_loader: Iterable | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    callback: Callback | None = None,
    seed: int = 0,
    amp: bool = False,
    channels_last: bool = False,
    eval_metrics: Iterable[str] = ("top1", "top5", "ch", "cgc_loss"),
    eval_every: int = 1,
    checkpoint_every: int = 1,
    is_main: bool = True,
    checkpoint_extra: dict[str, Any] | None = None,
    heldout: MethodConfig | None = None,
    eval_options: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Train for ``epochs`` epochs, evaluating every ``eval_every`` and checkpointing every ``checkpoint_every``.

    The last epoch is always evaluated and checkpointed. If ``checkpoint_path``
    exists the run resumes after its last checkpointed epoch with every RNG
    state restored, so resume-then-continue equals an uninterrupted run. Only
    ``is_main`` writes the checkpoint (with the method and
    ``checkpoint_extra``, e.g. the arch, in its "extra"); every caller gets
    ``callback(metrics, checkpoint_path or None)`` after each epoch (None when
    no checkpoint was written that epoch). ``heldout``: the CGC settings of the
    held-out CGC-loss metric (default: ``method``'s); ``eval_options``: more
    keyword arguments of :func:`evaluate` (its held-out and IAUC loaders, the
    IAUC protocol). A NaN loss raises
    :class:`NonFiniteLossError` with its epoch. Returns the last epoch's metrics.
    """
    device = torch.device(device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler("cuda") if amp and device.type == "cuda" else None
    gen = torch.Generator().manual_seed(seed)  # draws T's parameters
    generators = {"T": gen}
    for name, loader in (("train_loader", train_loader), ("unlabeled_loader", unlabeled_loader)):
        g = getattr(loader, "generator", None)
        if isinstance(g, torch.Generator):
            generators[name] = g
    start, metrics = 0, {}
    if checkpoint_path is not None and Path(checkpoint_path).exists():
        state = load_checkpoint(checkpoint_path, model, optimizer, scheduler, generators=generators,
                                scaler=scaler, map_location=device)
        start, metrics = state["epoch"] + 1, dict(state["metrics"])
    for epoch in range(start, epochs):
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        try:
            metrics = train_one_epoch(
                model, train_loader, optimizer, method, device,
                scheduler=scheduler if scheduler_interval == "step" else None,
                unlabeled=unlabeled_loader, amp=amp, scaler=scaler, channels_last=channels_last, generator=gen,
            )
        except NonFiniteLossError as e:
            e.epoch = epoch + 1
            raise
        if scheduler is not None and scheduler_interval == "epoch":
            scheduler.step()
        metrics["epoch"] = epoch + 1
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        if val_loader is not None and ((epoch + 1) % eval_every == 0 or epoch + 1 == epochs):
            # the bare module: a DDP forward syncs buffers with ranks that are not evaluating
            metrics.update(evaluate(unwrap(model), val_loader, device, method=heldout or method,
                                    metrics=eval_metrics, seed=seed, **(eval_options or {})))
        saved = checkpoint_path is not None and ((epoch + 1) % checkpoint_every == 0 or epoch + 1 == epochs)
        if saved and is_main:
            save_checkpoint(checkpoint_path, model, optimizer, scheduler, epoch, generators=generators,
                            scaler=scaler, metrics=metrics,
                            extra={"method": asdict(method), **(checkpoint_extra or {})})
        if callback is not None:
            callback(dict(metrics), str(checkpoint_path) if saved else None)
    return metrics
