"""How a trial trains and runs: the ``optim`` (SGD and its schedule), ``scaling`` and ``failure`` sections."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, field_validator, model_validator

from cgc_ray.config.section import Section


class StepSchedule(Section):
    """Multiply the learning rate by ``gamma`` at each epoch in ``milestones``."""

    name: Literal["step"] = "step"
    milestones: tuple[int, ...] = (30, 60)
    gamma: float = Field(0.1, gt=0, le=1)

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(m < 1 for m in v) or list(v) != sorted(set(v)):
            raise ValueError(f"optim.schedule.milestones must be strictly increasing epochs >= 1, got {list(v)}")
        return v


class CosineSchedule(Section):
    """Cosine decay from ``optim.lr`` to ``min_lr`` over the training steps."""

    name: Literal["cosine"] = "cosine"
    min_lr: float = Field(0.0, ge=0)


class OneCycleSchedule(Section):
    """One-cycle policy peaking at ``optim.lr`` after ``pct_start`` of the steps."""

    name: Literal["onecycle"] = "onecycle"
    pct_start: float = Field(0.3, gt=0, lt=1)


Schedule = Annotated[Union[StepSchedule, CosineSchedule, OneCycleSchedule], Field(discriminator="name")]


class OptimSpec(Section):
    """SGD and its learning-rate schedule.

    ``head_lr``: a separate learning rate for the final linear layer (the
    authors' semi-supervised recipe); None uses ``lr`` everywhere.
    ``warmup_epochs``: linear warm-up before the schedule.
    """

    lr: float = Field(0.1, gt=0)
    head_lr: float | None = Field(None, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    nesterov: bool = False
    epochs: int = Field(90, ge=1)
    warmup_epochs: int = Field(0, ge=0)
    schedule: Schedule = StepSchedule()

    @model_validator(mode="after")
    def _warmup_shorter(self) -> "OptimSpec":
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"optim.warmup_epochs={self.warmup_epochs} must be smaller than optim.epochs={self.epochs}"
            )
        if self.nesterov and self.momentum == 0:
            raise ValueError("optim.nesterov=true needs optim.momentum > 0")
        if self.warmup_epochs and self.schedule.name == "onecycle":
            raise ValueError(
                f"optim.warmup_epochs={self.warmup_epochs} with optim.schedule.name=onecycle: one-cycle warms up "
                "itself (optim.schedule.pct_start); set optim.warmup_epochs=0"
            )
        if self.schedule.name == "step" and any(m <= self.warmup_epochs for m in self.schedule.milestones):
            raise ValueError(
                f"optim.schedule.milestones={list(self.schedule.milestones)} must all come after the warm-up "
                f"(optim.warmup_epochs={self.warmup_epochs})"
            )
        return self


class ScalingSpec(Section):
    """Resources of one trial: ``num_workers`` DDP workers, each with these CPUs/GPUs.

    ``gpus_per_worker`` may be fractional below 1 so several small trials
    share a GPU; it is used only when a GPU is used (``use_gpu``: ``auto``
    means "if the cluster has GPUs"). ``amp`` (fp16 autocast with a grad
    scaler) and ``channels_last`` apply on GPUs only.
    """

    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)
    use_gpu: bool | Literal["auto"] = "auto"
    amp: bool = True
    channels_last: bool = True

    @field_validator("gpus_per_worker")
    @classmethod
    def _whole_above_one(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError(f"scaling.gpus_per_worker above 1 must be a whole number (Ray's rule), got {v}")
        return v

    @model_validator(mode="after")
    def _ddp_whole_gpus(self) -> "ScalingSpec":
        if self.num_workers > 1 and 0 < self.gpus_per_worker < 1 and self.use_gpu is not False:
            raise ValueError(
                f"scaling.num_workers={self.num_workers} with scaling.gpus_per_worker={self.gpus_per_worker}: "
                "DDP ranks cannot share a GPU (NCCL needs one per rank); set scaling.gpus_per_worker=1, "
                "or scaling.num_workers=1 to pack single-worker trials, or scaling.use_gpu=false for CPU DDP"
            )
        if self.use_gpu is True and self.gpus_per_worker == 0:
            raise ValueError("scaling.use_gpu=true needs scaling.gpus_per_worker > 0")
        return self


class FailureSpec(Section):
    """Fault tolerance.

    ``max_retries``: retries of a trial whose code raised an exception, each
    from its last checkpoint; a NaN loss is deterministic and never retried.
    ``checkpoint_every``: epochs between checkpoints (the last epoch is always
    checkpointed); a retry or re-run resumes from the last one. On an object
    store each checkpoint is a full upload (a ResNet-50's is 205 MB: 18 GB over
    90 epochs at 1); a larger interval uploads less and redoes more after a failure.
    ``checkpoint_every_steps``: also checkpoint every that many optimiser steps
    of an epoch (None: at epoch ends only). A mid-epoch checkpoint holds the
    epoch's data order and every RNG state, so a resumed trial skips the
    batches already trained and continues as if never stopped; losing a node
    then costs at most one interval. Each one is a full upload, as above
    (docs/CLUSTER.md, "Spot nodes": choosing the interval).
    ``max_preemptions``: retries of a trial whose node or worker process was
    lost (a spot node taken back, a crash of the process), on top of
    ``max_retries``, which counts the exceptions the trial's code raised.
    Each such retry resumes from the last checkpoint, so it costs at most one
    interval; the cap stops a trial that kills its own process every time (an
    out-of-memory kill) from looping for ever.
    ``keep_checkpoint``: what of a trial's checkpoint stays in storage once it
    has finished: ``model``, the trained weights with their epoch, metrics and
    record, which is what fine-tuning from it (``trial:``, ``experiment:``),
    ``cgc-ray explain`` and ``evaluate`` read (ResNet-18 47 MB, ResNet-50
    103 MB); ``full``, also the optimiser (SGD momentum), schedule and RNG
    states (twice that); ``none``, nothing once the row is written. Checkpoints
    of an unfinished trial are always full, so it resumes exactly.
    """

    max_retries: int = Field(2, ge=0)
    checkpoint_every: int = Field(1, ge=1)
    checkpoint_every_steps: int | None = Field(None, ge=1)
    max_preemptions: int = Field(20, ge=0)
    keep_checkpoint: Literal["model", "full", "none"] = "model"
