"""The training objective as an object: ``loss, logs = task(model, batch)``.

As timm's ``TrainingTask`` and the ``criterion`` of torchvision's
``train_one_epoch``, the task keeps the method out of the loop:
``engine.train_one_epoch`` places each batch (:class:`Placement`), calls the
task, steps the optimiser and averages the logs; it never asks which method
runs. :func:`build_task` makes the task a spec trains:

- :class:`CrossEntropy`: ``L_CE`` of the training view (a baseline, or a CGC
  variant at λ = 0);
- :class:`CGCObjective`: ``L_CE + λ L_CGC`` (``cgc_ray.method.cgc.cgc_term``
  with the spec's ``MethodSpec``). L_CE is :func:`view_cross_entropy` of the
  views ``method.ce_views`` names, averaged over ``method.negatives_group``'s
  groups as L_CGC is. With an unlabelled loader (semi-supervised, as the
  authors' script) the task draws one unlabelled batch a step for the CGC
  term, and the labelled batch feeds cross-entropy alone.

A task's randomness (T's parameters, the unlabelled loader's shuffle) lives
in :meth:`Task.generators`, which ``engine.fit`` checkpoints, so a resumed run
draws what an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cgc_ray.config import effective_lam
from cgc_ray.method.cgc import cgc_term, groups
from cgc_ray.method.metrics import topk_correct
from cgc_ray.train.sampling import skip_batches

if TYPE_CHECKING:
    from cgc_ray.config import ExperimentSpec, MethodSpec

Logs = dict[str, tuple[Tensor, int]]
"""name -> (sum over the items it averages, number of items); the loop reports each as sum / items over the epoch."""


class Batch(NamedTuple):
    """One batch on the device: the training view x (B x 3 x H x W), labels y (B) and, when the loader
    makes one, the centre view of each image (B x 3 x H x W)."""

    x: Tensor
    y: Tensor
    x_center: Tensor | None = None


@dataclass(frozen=True)
class Placement:
    """Where a step runs: the device, the autocast dtype (None: fp32) and the memory layout of images."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    @classmethod
    def on(cls, device: torch.device | str, *, amp: bool = False, channels_last: bool = False) -> Placement:
        """fp16 autocast on CUDA (with a grad scaler, see ``engine.fit``), bf16 on a CPU, when ``amp``."""
        device = torch.device(device)
        dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if amp else None
        return cls(device, dtype, channels_last)

    def batch(self, raw: Sequence[Any]) -> Batch:
        """A loader's (images, labels[, boxes, centre views]) on the device."""
        mem = torch.channels_last if self.channels_last else torch.contiguous_format
        image = lambda t: t.to(self.device, non_blocking=True).contiguous(memory_format=mem)
        return Batch(image(raw[0]), raw[1].to(self.device, non_blocking=True),
                     image(raw[3]) if len(raw) > 3 else None)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)


class Task:
    """A training objective: ``loss, logs = task(model, batch)`` (see the module docstring)."""

    placement: Placement

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Logs]:
        raise NotImplementedError

    def start_epoch(self, skip: int = 0) -> None:
        """Called by the loop before each pass over the training data; ``skip``: steps of this epoch trained
        before a mid-epoch checkpoint, whose draws from the task's loaders the resumed epoch skips."""

    def generators(self) -> dict[str, torch.Generator]:
        """The task's random number generators, by name, for checkpoints."""
        return {}

    def epoch_generators(self) -> dict[str, torch.Generator]:
        """Those of :meth:`generators` that draw an epoch's data order: a mid-epoch checkpoint keeps their state
        at the epoch's start, from which :meth:`start_epoch` (skip) replays the order."""
        return {}


def _ce_logs(ce: Tensor, logits: Tensor, y: Tensor) -> Logs:
    B = y.shape[0]
    return {"ce": (ce.detach() * B, B), "top1": (topk_correct(logits.detach(), y, ks=(1,))["top1"], B)}


class CrossEntropy(Task):
    """``L_CE`` of the training view."""

    def __init__(self, placement: Placement):
        self.placement = placement

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Logs]:
        with self.placement.autocast():
            logits = model(batch.x).float()  # B x K
        ce = F.cross_entropy(logits, batch.y)
        return ce, _ce_logs(ce, logits, batch.y)


def view_cross_entropy(logits: Sequence[Tensor], y: Tensor, parts: Sequence[slice]) -> Tensor:
    """L_CE of a step: in each group of ``parts`` the sum over views (``logits``: one B x K tensor per view) of
    the group's mean cross-entropy, then the mean over groups, as the authors' DataParallel averages the losses
    of its GPU chunks (an unweighted mean: a smaller last group weighs as much as a full one)."""
    return torch.stack([sum(F.cross_entropy(z[s], y[s]) for z in logits) for s in parts]).mean()


def _cycle(loader: Iterable, skip: int = 0) -> Iterator:
    """The loader's batches, pass after pass; the first ``skip`` are drawn in order but not loaded."""
    while True:
        n = min(skip, len(loader))
        skip -= n
        skip_batches(loader, n)
        yield from loader


class CGCObjective(Task):
    """``L_CE + lam * L_CGC`` with the settings of ``method`` (a ``MethodSpec``) on the Grad-CAM ``layer``.

    ``lam``: the weight applied (the spec's λ after ``method.lam_normalization``);
    ``seed``: of T's parameters; ``unlabeled``: a loader whose batches feed only
    the CGC term (semi-supervised), drawn one per step and started afresh each epoch.
    ``closed_form``: None computes Grad-CAM in closed form where that is exact;
    False forces the autograd path (``benchmarks/step.py`` times both).
    Cross-entropy is on the views ``method.ce_views`` names; with ``unlabeled``,
    on the labelled batch alone (one view, in ``method.negatives_group`` groups).
    """

    closed_form: bool | None = None

    def __init__(self, method: MethodSpec, *, layer: str, lam: float, placement: Placement, seed: int,
                 unlabeled: Iterable | None = None):
        if unlabeled is not None and method.ce_views != 1:
            raise ValueError(f"method.ce_views={method.ce_views} sums cross-entropy over the CGC term's views, "
                             "but a semi-supervised trial computes that term on unlabelled images; set "
                             "method.ce_views=1 (the authors' semi-supervised script has one CE term)")
        self.method, self.layer, self.lam, self.placement = method, layer, lam, placement
        self.rng = torch.Generator().manual_seed(seed)  # draws T's parameters
        self.unlabeled = unlabeled
        self._stream: Iterator | None = None

    def start_epoch(self, skip: int = 0) -> None:
        # a new pass over the unlabelled images each epoch, shuffled by its loader's (checkpointed) generator;
        # one unlabelled batch per step
        self._stream = _cycle(self.unlabeled, skip) if self.unlabeled is not None else None

    def generators(self) -> dict[str, torch.Generator]:
        gens = {"T": self.rng}
        g = getattr(self.unlabeled, "generator", None)
        if isinstance(g, torch.Generator):
            gens["unlabeled_loader"] = g
        return gens

    def epoch_generators(self) -> dict[str, torch.Generator]:
        return {k: g for k, g in self.generators().items() if k == "unlabeled_loader"}

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Logs]:
        B = batch.x.shape[0]
        run = {"layer": self.layer, "generator": self.rng, "amp_dtype": self.placement.amp_dtype,
               "closed_form": self.closed_form}
        if self.unlabeled is None:
            term = cgc_term(model, batch.x, self.method, y=batch.y, x_center=batch.x_center, **run)
            # cross-entropy on the logits of the same forwards: the training view's, or all three views'
            ce = view_cross_entropy(term.logits[:self.method.ce_views], batch.y, term.groups)
            logits, n_cam = term.logits[0], B
        else:
            parts = groups(B, self.method.negatives_group)
            with self.placement.autocast():  # the labelled images feed cross-entropy alone
                logits = torch.cat([model(batch.x[s]) for s in parts]).float()  # B x K
            ce = view_cross_entropy([logits], batch.y, parts)
            if self._stream is None:
                self.start_epoch()
            u = self.placement.batch(next(self._stream))
            term = cgc_term(model, u.x, self.method, x_center=u.x_center, **run)
            n_cam = u.x.shape[0]
        loss = ce + self.lam * term.loss
        return loss, {**_ce_logs(ce, logits, batch.y), "cgc": (term.loss.detach() * B, B),
                      "zero_cam_frac": (term.zeros, n_cam)}


def build_task(spec: ExperimentSpec, *, num_classes: int, placement: Placement,
               unlabeled: Iterable | None = None) -> Task:
    """The objective ``spec`` trains on a dataset of ``num_classes`` classes; ``unlabeled``: the loader of a
    semi-supervised trial's unlabelled images (``data.percent``)."""
    if not spec.method.uses_cgc:
        return CrossEntropy(placement)
    return CGCObjective(spec.method, layer=spec.model.layer, lam=effective_lam(spec, num_classes),
                        placement=placement, seed=spec.seed, unlabeled=unlabeled)
