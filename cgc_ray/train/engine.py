"""Plain-PyTorch training and evaluation loops; the objective is a task (``train.task``).

No Ray here: the Ray layer calls ``fit`` with a report callback. No ``.cuda()``:
the task's placement names the device. The loops know no method: a step is
``loss, logs = task(model, batch)``, a backward and an optimiser step; the
training step does not synchronise with the host except for a finiteness check
every ``check_every`` steps.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping

import torch
from torch import Tensor, nn

from cgc_ray.config import HELDOUT_METRIC
from cgc_ray.method.cam import cam_and_logits, linear_head, unwrap
from cgc_ray.method.cgc import cgc_term
from cgc_ray.method.metrics import content_heatmap, content_heatmap_saliency, insertion_auc, topk_correct
from cgc_ray.models.checkpoint import resume_checkpoint, save_checkpoint
from cgc_ray.train.sampling import skip_batches
from cgc_ray.train.task import Batch, Logs, Task

METRICS: tuple[str, ...] = ("top1", "top5", "ch", "cgc_loss", "iauc")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: deterministic, so the trial is not retried.

    ``step``: the optimiser step of the epoch by which it was seen; ``epoch``:
    that epoch, 1-based (set by :func:`fit`).
    """

    def __init__(self, message: str, *, step: int, epoch: int | None = None):
        super().__init__(message)
        self.step, self.epoch = step, epoch


def train_step(model: nn.Module, task: Task, batch: Batch, optimizer: torch.optim.Optimizer, *,
               scaler: torch.amp.GradScaler | None = None) -> tuple[Tensor, Logs]:
    """One optimiser step on ``batch``: the task's loss, its backward (through ``scaler`` when given), the step."""
    loss, logs = task(model, batch)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss, logs


@dataclass
class EpochProgress:
    """What of an epoch is trained: optimiser ``steps``, ``images``, and each log's running [sum, count]."""

    steps: int = 0
    images: int = 0
    sums: dict[str, list] = field(default_factory=dict)


def train_one_epoch(
    model: nn.Module,
    task: Task,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    *,
    scheduler: Any = None,
    scaler: torch.amp.GradScaler | None = None,
    check_every: int = 50,
    progress: EpochProgress | None = None,
    on_step: Callable[[EpochProgress], None] | None = None,
) -> dict[str, float]:
    """One pass over ``loader`` (batches of (images, labels[, boxes, centre views])), placed by the task.

    scheduler: stepped after every optimiser step when given (per-iteration schedules).
    progress: where a resumed epoch stands (a mid-epoch checkpoint's): its batches are skipped unread
    (``train.sampling.skip_batches``) and its sums carry on. on_step(progress): after every step.
    Returns ``train_loss`` and ``train_<name>`` of every log of the task (e.g. ce, cgc,
    top1, zero_cam_frac), each averaged over the epoch, then images/s and steps.
    """
    model.train()
    p = progress or EpochProgress()
    skip_batches(loader, p.steps)
    task.start_epoch(skip=p.steps)
    resumed_images = p.images
    start = time.perf_counter()
    for raw in loader:
        batch = task.placement.batch(raw)
        loss, logs = train_step(model, task, batch, optimizer, scaler=scaler)
        if scheduler is not None:
            scheduler.step()
        B = batch.x.shape[0]
        for name, (value, n) in {"loss": (loss.detach() * B, B), **logs}.items():
            acc = p.sums.setdefault(name, [0, 0])
            acc[0], acc[1] = acc[0] + value, acc[1] + n
        p.images += B
        p.steps += 1
        if p.steps % check_every == 0:
            _check_finite(p.sums["loss"][0], p.steps)
        if on_step is not None:
            on_step(p)
    if p.images == 0:
        raise ValueError("the training loader yielded no batches; check the dataset split and batch size")
    _check_finite(p.sums["loss"][0], p.steps)
    elapsed = time.perf_counter() - start
    out = {f"train_{name}": float(value) / n if n else 0.0 for name, (value, n) in p.sums.items()}
    return {**out, "train_images_per_s": (p.images - resumed_images) / elapsed, "train_steps": p.steps}


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


def _heldout_cgc(model: nn.Module, images: Tensor, layer: str, generator: torch.Generator) -> Tensor:
    """The held-out CGC loss of one group (``config.HELDOUT_METRIC``); autograd only where the CAM needs it."""
    with torch.set_grad_enabled(linear_head(model, layer) is None):
        term = cgc_term(model, images, HELDOUT_METRIC, layer=layer, generator=generator, create_graph=False)
    return term.loss.detach()


def _accuracy_and_ch(model: nn.Module, loader: Iterable, device: torch.device, layer: str,
                     saliency: str | None, window: int | None) -> dict[str, float]:
    """top1/top5, zero_cam_frac (all-zero ground-truth Grad-CAMs), n_eval and, unless ``saliency`` is None, the CH of
    the ground-truth class's ``saliency`` map at the input resolution (mean over the images not left out, n_ch)."""
    n, zeros, ch = 0, 0, []
    correct = {"top1": 0.0, "top5": 0.0}
    for batch in loader:
        x = batch[0].to(device, non_blocking=True)
        y = batch[1].to(device, non_blocking=True)
        boxes = batch[2] if len(batch) > 2 else [torch.zeros(0, 4)] * x.shape[0]
        with torch.no_grad():
            cams, logits, _ = cam_and_logits(model, x, targets=y, layer=layer)
        for k, v in topk_correct(logits, y, ks=(1, 5)).items():
            correct[k] += v.item()
        zeros += int((cams.flatten(1).sum(1) == 0).sum())
        if saliency is not None:
            boxes, size = [b.to(device) for b in boxes], tuple(x.shape[-2:])
            ch.append(content_heatmap(cams, boxes, size) if saliency == "gradcam" else
                      ch_batch(model, x, y, boxes, size, layer=layer, saliency=saliency, window=window))
        n += x.shape[0]
    if n == 0:
        raise ValueError("the evaluation loader yielded no images")
    out = {"top1": correct["top1"] / n, "top5": correct["top5"] / n, "zero_cam_frac": zeros / n, "n_eval": float(n)}
    return {**out, **(_mean_ch(ch) if saliency is not None else {})}


def _mean_ch(per_image: list[Tensor]) -> dict[str, float]:
    """ch: the mean over the images CH did not leave out (NaN: no box, an all-zero (c)MWP map); n_ch: their number."""
    values = torch.cat(per_image) if per_image else torch.empty(0)
    ok = ~torch.isnan(values)
    return {"ch": values[ok].mean().item() if ok.any() else math.nan, "n_ch": float(ok.sum())}


def ch_batch(model: nn.Module, x: Tensor, y: Tensor, boxes: list[Tensor], image_size: tuple[int, int], *,
             layer: str, saliency: str = "gradcam", window: int | None = None) -> Tensor:
    """CH per image (Tensor[B], NaN where left out) of the ground-truth class ``y``'s ``saliency`` map, resized to
    ``image_size`` (``method.metrics.content_heatmap_saliency``): Grad-CAM of ``layer``, or excitation backprop at
    its own layer (TorchRay's layer3) with ``window``. x: B x 3 x H x W; boxes: B tensors N_i x 4 in image_size's
    pixels."""
    return content_heatmap_saliency(model, x, y, boxes, image_size, saliency=saliency,
                                    layer=layer if saliency == "gradcam" else None, window=window)


def full_image_ch(model: nn.Module, loader: Iterable, device: torch.device | str, *, layer: str,
                  saliency: str = "gradcam", window: int | None = None) -> Tensor:
    """CH per image by the authors' protocol (docs/PAPER.md §3), Tensor[N] on the CPU, NaN where left out.

    ``loader`` yields one image at a time (``train.trial.full_image_loader``):
    (x 3 x H' x W', the whole image at the authors' resolution; label; boxes
    N x 4 of that class in ORIGINAL pixels; (H, W) original size). The map of
    the ground-truth class (:func:`ch_batch`) is resized to (H, W), so the
    boxes are never resampled. Eval mode; the model's mode is restored.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    out = []
    try:
        for x, y, boxes, size in loader:
            with torch.no_grad():  # the saliency turns autograd back on where it needs it
                out.append(ch_batch(model, x[None].to(device), torch.tensor([y], device=device), [boxes.to(device)],
                                    tuple(size), layer=layer, saliency=saliency, window=window).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str,
    *,
    layer: str,
    metrics: Iterable[str],
    heldout_loader: Iterable | None = None,
    iauc_loader: Iterable | None = None,
    iauc_protocol: str | None = None,
    ch_loader: Iterable | None = None,
    saliency: str = "gradcam",
    saliency_window: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Eval-mode metrics of the Grad-CAM of ``layer`` (the model's mode is restored afterwards).

    ``loader`` (batches of images, labels, boxes): top1/top5 accuracy;
    zero_cam_frac, the share of all-zero ground-truth Grad-CAMs; ch, the
    Content Heatmap of the ground-truth class's ``saliency`` map
    (:func:`ch_batch`, ``saliency_window`` for excitation backprop) at the
    input resolution, mean over the images not left out (n_ch of them).
    ``ch_loader``: ch by the authors' protocol instead (:func:`full_image_ch`).
    ``heldout_loader``: cgc_loss, the held-out CGC loss (``config.HELDOUT_METRIC``:
    the same settings whatever was trained) of each of its batches as one
    group, averaged over groups; T drawn from ``seed``. Build its batches from
    a seeded permutation (``train.trial.evaluator``), so the value does not
    depend on file order. Default: ``loader`` (its batches as the groups).
    ``iauc_loader``: iauc, insertion AUC by ``iauc_protocol``
    (``method.metrics.insertion_auc``) on every image it yields.
    Default: ``loader``. n_eval and n_iauc count the images.
    """
    device = torch.device(device)
    wanted = set(metrics)
    if wanted - set(METRICS):
        raise ValueError(f"unknown metrics {sorted(wanted - set(METRICS))}; choose from {', '.join(METRICS)}")
    was_training = model.training
    model.eval()
    try:
        batched_ch = saliency if "ch" in wanted and ch_loader is None else None
        scores = _accuracy_and_ch(model, loader, device, layer, batched_ch, saliency_window)
        out = {k: v for k, v in scores.items() if k in wanted or k in ("zero_cam_frac", "n_eval", "n_ch")}
        if "ch" in wanted and ch_loader is not None:
            out.update(_mean_ch([full_image_ch(model, ch_loader, device, layer=layer, saliency=saliency,
                                               window=saliency_window)]))
        if "cgc_loss" in wanted:
            gen = torch.Generator().manual_seed(seed)
            sums = [(_heldout_cgc(model, b[0].to(device), layer, gen).item(), b[0].shape[0])
                    for b in (heldout_loader if heldout_loader is not None else loader) if b[0].shape[0] >= 2]
            out["cgc_loss"] = sum(v * k for v, k in sums) / sum(k for _, k in sums) if sums else math.nan
        if "iauc" in wanted:
            per_image = [iauc_batch(model, b[0].to(device), b[1].to(device), layer=layer, protocol=iauc_protocol)
                         for b in (iauc_loader if iauc_loader is not None else loader)]
            out["iauc"] = torch.cat(per_image).mean().item() if per_image else math.nan
            out["n_iauc"] = float(sum(s.numel() for s in per_image))
    finally:
        model.train(was_training)
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


# ---------------------------------------------------------------- fit

Callback = Callable[[dict[str, float], "str | None"], None]


@dataclass(frozen=True)
class Evaluator:
    """What :func:`fit` evaluates every ``every`` epochs (and after the last): :func:`evaluate` with these
    arguments. ``train.trial.evaluator`` builds it from a spec."""

    loader: Iterable
    layer: str
    metrics: tuple[str, ...]
    iauc_protocol: str
    seed: int
    every: int = 1
    heldout_loader: Iterable | None = None
    iauc_loader: Iterable | None = None
    ch_loader: Iterable | None = None
    saliency: str = "gradcam"
    saliency_window: int | None = None

    def __call__(self, model: nn.Module, device: torch.device | str) -> dict[str, float]:
        return evaluate(model, self.loader, device, layer=self.layer, metrics=self.metrics,
                        heldout_loader=self.heldout_loader, iauc_loader=self.iauc_loader,
                        iauc_protocol=self.iauc_protocol, ch_loader=self.ch_loader, saliency=self.saliency,
                        saliency_window=self.saliency_window, seed=self.seed)


@dataclass(frozen=True)
class FitPlan:
    """How :func:`fit` runs, beyond the objects it trains (``train.trial.run_trial`` builds it from a spec).

    ``checkpoint_path``: where the run checkpoints every ``checkpoint_every``
    epochs (and after the last) and resumes from; None: no checkpoints.
    ``checkpoint_every_steps``: also every that many optimiser steps of an
    epoch (not at its last step, which the epoch's end follows); None: never mid-epoch.
    ``is_main``: whether this process writes them (rank 0 under DDP); ``record``:
    what a checkpoint's ``extra`` holds (the method's settings, the arch, ...);
    ``scheduler_interval``: whether the scheduler steps per epoch or per step.
    """

    epochs: int
    checkpoint_path: str | os.PathLike | None = None
    checkpoint_every: int = 1
    checkpoint_every_steps: int | None = None
    is_main: bool = True
    record: Mapping[str, Any] = field(default_factory=dict)
    scheduler_interval: Literal["epoch", "step"] = "epoch"


StepCallback = Callable[[int, int, str], None]
"""``(epoch, step, path)`` after each mid-epoch checkpoint: the epoch in progress (1-based), its steps done."""


def fit(
    model: nn.Module,
    task: Task,
    optimizer: torch.optim.Optimizer,
    train_loader: Iterable,
    plan: FitPlan,
    *,
    scheduler: Any = None,
    evaluator: Evaluator | None = None,
    callback: Callback | None = None,
    step_callback: StepCallback | None = None,
) -> dict[str, float]:
    """Train ``task`` for ``plan.epochs`` epochs, evaluating with ``evaluator`` and checkpointing per ``plan``.

    If ``plan.checkpoint_path`` exists the run resumes where it was
    checkpointed, after an epoch or mid-epoch, with every RNG state restored
    (the task's, the loader's, the global ones) and, mid-epoch, the epoch's
    data order with the batches already trained skipped, so resume-then-continue
    equals an uninterrupted run (exactly when the loader loads in this process,
    ``num_workers=0``; its worker processes draw their augmentations afresh). A
    checkpoint that does not parse is set aside and the run starts from
    scratch (``models.checkpoint.resume_checkpoint``). Every caller gets
    ``callback(metrics, checkpoint path or None)`` after each epoch (None when
    no checkpoint was written that epoch) and ``step_callback`` after each
    mid-epoch checkpoint. A NaN loss raises :class:`NonFiniteLossError` with its epoch.
    Returns the last epoch's metrics.
    """
    device = task.placement.device
    model.to(device)
    if task.placement.channels_last:
        model.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler("cuda") if task.placement.amp_dtype == torch.float16 else None
    loader_generator = getattr(train_loader, "generator", None)
    epoch_generators = dict(task.epoch_generators())
    if isinstance(loader_generator, torch.Generator):
        epoch_generators["train_loader"] = loader_generator
    generators = {**task.generators(), **epoch_generators}
    path = plan.checkpoint_path
    start, metrics, progress = 0, {}, None
    state = None if path is None else resume_checkpoint(path, model, optimizer, scheduler, epochs=plan.epochs,
                                                        generators=generators, scaler=scaler, map_location=device)
    if state is not None:
        start, metrics = state["epoch"] + 1, dict(state["metrics"])
        progress = _mid_epoch(state, epoch_generators)
    save = functools.partial(save_checkpoint, path, model, optimizer, scheduler, generators=generators,
                             scaler=scaler, extra=dict(plan.record))
    for epoch in range(start, plan.epochs):
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        on_step = None
        if path is not None and plan.checkpoint_every_steps:
            on_step = _step_checkpoints(plan, epoch, _len(train_loader), save, dict(metrics), epoch_generators,
                                        step_callback)
        try:
            metrics = train_one_epoch(model, task, optimizer, train_loader, scaler=scaler, progress=progress,
                                      on_step=on_step,
                                      scheduler=scheduler if plan.scheduler_interval == "step" else None)
        except NonFiniteLossError as e:
            e.epoch = epoch + 1
            raise
        progress = None
        if scheduler is not None and plan.scheduler_interval == "epoch":
            scheduler.step()
        last = epoch + 1 == plan.epochs
        metrics.update(epoch=epoch + 1, lr=optimizer.param_groups[0]["lr"])
        if evaluator is not None and ((epoch + 1) % evaluator.every == 0 or last):
            metrics.update(evaluator(unwrap(model), device))  # the bare module: a DDP forward syncs buffers
        saved = path is not None and ((epoch + 1) % plan.checkpoint_every == 0 or last)
        if saved and plan.is_main:
            save(epoch, metrics=metrics)
        if callback is not None:
            callback(dict(metrics), str(path) if saved else None)
    return metrics


def _step_checkpoints(plan: FitPlan, epoch: int, steps: int | None, save: Callable[..., None], done: dict[str, Any],
                      epoch_generators: dict[str, torch.Generator], step_callback: StepCallback | None
                      ) -> Callable[[EpochProgress], None]:
    """What :func:`train_one_epoch` calls after each step of ``epoch`` (0-based, of ``steps`` steps): a checkpoint
    every ``plan.checkpoint_every_steps``, holding the last finished epoch's metrics ``done`` and ``progress``."""
    # the epoch's order is drawn from the generators' states now: a mid-epoch checkpoint replays it from there
    at_start = {name: g.get_state() for name, g in epoch_generators.items()}

    def on_step(p: EpochProgress) -> None:
        if p.steps % plan.checkpoint_every_steps or p.steps == steps:
            return
        _check_finite(p.sums["loss"][0], p.steps)  # never a checkpoint of a diverged run (every DDP rank agrees)
        if plan.is_main:
            save(epoch - 1, metrics=done, progress={"steps": p.steps, "images": p.images, "sums": p.sums,
                                                    "epoch_generators": at_start})
        if step_callback is not None:
            step_callback(epoch + 1, p.steps, str(plan.checkpoint_path))

    return on_step


def _len(loader: Iterable) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _mid_epoch(state: Mapping[str, Any], epoch_generators: dict[str, torch.Generator]) -> EpochProgress | None:
    """The progress of the epoch a mid-epoch checkpoint stopped in, its generators set back to the epoch's start
    (the rest are at the checkpoint's step, restored with it); None for a checkpoint written at an epoch's end."""
    saved = state.get("progress")
    if not saved:
        return None
    for name, g in epoch_generators.items():
        g.set_state(saved["epoch_generators"][name])
    return EpochProgress(steps=int(saved["steps"]), images=int(saved["images"]),
                         sums={k: list(v) for k, v in saved["sums"].items()})
