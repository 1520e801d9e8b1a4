"""One trial of an experiment: a resolved spec in, trained model and metrics out.

Builds data, model, optimiser and schedule from an ``ExperimentSpec`` and runs
``engine.fit``. Knows nothing of Ray: the Ray layer calls :func:`run_trial`
with a device, a trial directory and a report callback (and, under DDP, the
process group already initialised).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow.fs as pafs
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from cgc_ray import data as D
from cgc_ray.config import (
    ExperimentSpec,
    SpecError,
    check_data_root,
    contrast_group,
    is_uri,
    loader_workers,
    validate_against_data,
    validate_spec,
)
from cgc_ray.data.dataset import BoxDataset, collate, image_size
from cgc_ray.data.staging import staged_root
from cgc_ray.models.checkpoint import trial_record
from cgc_ray.models.resnet import build_model
from cgc_ray.config.pretrained import parse_trial_ref
from cgc_ray.storage import CHECKPOINT_NAME, Storage, resolve
from cgc_ray.train.engine import Callback, Evaluator, FitPlan, StepCallback, fit
from cgc_ray.train.sampling import ResumableSampler
from cgc_ray.train.task import Placement, build_task
from cgc_ray.train.optim import build_optimizer, build_scheduler


def data_root(spec: ExperimentSpec) -> str:
    """``data.root`` (a URI: the copy of the dataset staged on this node, :mod:`cgc_ray.data.staging`), or for
    the embedded dataset the local cache it is generated into."""
    if spec.data.root is not None and is_uri(spec.data.root):
        return str(staged_root(spec.data.root, entries=D.info(spec.data.dataset).subdirs))
    if spec.data.root is not None:
        return spec.data.root
    if spec.data.dataset != "synthetic":
        raise ValueError(f"data.root is required for data.dataset={spec.data.dataset!r}")
    return str(D.synthetic_root())


def synthetic_options(spec: ExperimentSpec) -> dict[str, Any]:
    """Generator options of the embedded dataset (data.synthetic + image size); {} for real datasets."""
    if spec.data.dataset != "synthetic":
        return {}
    return {**spec.data.synthetic.model_dump(), "image_size": spec.data.image_size}


@dataclass
class TrialData:
    """Record lists of one trial; ``episode_seed`` reproduces a few-shot split.

    ``eval_split``: what the metrics are computed on; ``labelled_split``: how
    a semi-supervised trial chose its labelled images (both go into its row).
    """

    train: list[D.ImageRecord]
    val: list[D.ImageRecord]
    unlabeled: list[D.ImageRecord] | None
    num_classes: int
    episode_seed: int | None
    eval_split: str
    labelled_split: str | None = None


def episode_seed(spec: ExperimentSpec) -> int:
    """The same seed for every method of one (dataset, shots, episode): paired comparisons."""
    return 1_000_003 * (spec.data.shots or 0) + spec.data.episode


def class_counts(records: Sequence[D.ImageRecord]) -> dict[int, int]:
    """label -> number of records with that label."""
    counts: dict[int, int] = {}
    for r in records:
        counts[r.label] = counts.get(r.label, 0) + 1
    return counts


def fewshot_pool(spec: ExperimentSpec) -> list[D.ImageRecord]:
    """The images few-shot episodes of this dataset draw from (its registry's ``fewshot_pool`` splits)."""
    name, root, opts = spec.data.dataset, data_root(spec), synthetic_options(spec)
    return [r for split in D.info(name).fewshot_pool for r in D.records(name, root, split, **opts)]


def check_trials_against_data(trials: Sequence[ExperimentSpec]) -> None:
    """Before any trial starts: few-shot trials must leave every class a validation image.

    Reads each distinct training split once (for ``synthetic`` this generates
    the dataset into the cache). Raises SpecError naming ``data.shots``.
    """
    seen: set[str] = set()
    for t in trials:
        if t.data.percent is not None and t.data.labelled == "list":
            labelled_list(t)  # the labelled-image list must exist before any trial starts
        if t.data.shots is None:
            continue
        key = json.dumps([t.data.dataset, data_root(t), synthetic_options(t), t.data.shots], sort_keys=True)
        if key not in seen:
            seen.add(key)
            validate_against_data(t, class_counts(fewshot_pool(t)))


def trial_data(spec: ExperimentSpec) -> TrialData:
    """Resolve the trial's train / validation (and unlabelled) records.

    Checks the data root first, on the node that reads it (a driver on a
    cluster's head may not see the workers' data).
    """
    try:
        check_data_root(spec, staged={spec.data.root: data_root(spec)} if spec.data.root else None)
    except SpecError as e:
        raise SpecError(f"on node {socket.gethostname()}: {e}") from None
    name, root, opts = spec.data.dataset, data_root(spec), synthetic_options(spec)
    num_classes = len(D.class_names(name, root, **opts))
    if D.info(name).train_split is None:
        raise ValueError(f"data.dataset={name!r} is an evaluation set only (no train split); use `cgc-ray evaluate`")
    if spec.data.shots is not None:
        pool = fewshot_pool(spec)
        validate_against_data(spec, class_counts(pool))
        seed = episode_seed(spec)
        train, val = D.episode(pool, spec.data.shots, seed)
        rest = f"{'+'.join(D.info(name).fewshot_pool)} minus the {spec.data.shots} shots"
        return TrialData(train, val, None, num_classes, seed, rest)
    facts = D.info(name)
    eval_split = spec.data.eval_split or facts.eval_split
    train = D.records(name, root, facts.train_split, **opts)
    val = D.records(name, root, eval_split, **opts)
    if spec.data.percent is not None:
        list_file = labelled_list(spec) if spec.data.labelled == "list" else None
        labelled, _ = D.percent_split(train, spec.data.percent, spec.seed, list_file=list_file)
        how = f"list:{list_file}" if list_file else f"random:{spec.data.percent:g}%"
        # the paper feeds all of the training set, unlabelled, to the CGC term
        return TrialData(labelled, val, train, num_classes, None, eval_split, how)
    return TrialData(train, val, None, num_classes, None, eval_split)


def labelled_list(spec: ExperimentSpec) -> str:
    """The labelled-image list of ``data.labelled=list``: ``data.split_file``, else ImageNet's ``1percent.txt``."""
    if spec.data.split_file is not None:
        if not Path(spec.data.split_file).is_file():
            raise SpecError(f"data.split_file={spec.data.split_file!r} does not exist: give the list of labelled "
                            "images (one relative path or file name a line)")
        return spec.data.split_file
    if spec.data.dataset == "imagenet":
        from cgc_ray.data.imagenet import one_percent_file

        try:
            return str(one_percent_file(data_root(spec)))
        except D.DatasetFormatError as e:
            raise SpecError(f"data.labelled=list: {e}") from None
    raise SpecError(f"data.labelled=list needs data.split_file for data.dataset={spec.data.dataset!r}")


def _loader(ds, batch: int, *, train: bool, seed: int, workers: int, distributed: bool, drop_last: bool):
    """Augmentations draw from the global RNG (main process) or from worker seeds drawn from the
    loader's generator each epoch; both are checkpointed, so a resumed run sees the same batches. A training
    loader's sampler can skip the batches a mid-epoch checkpoint had trained (``train.sampling``); it draws
    from the loader's generator as ``shuffle=True`` would."""
    generator = torch.Generator().manual_seed(seed)
    sampler = DistributedSampler(ds, shuffle=train, seed=seed, drop_last=drop_last) if distributed else None
    if train:
        sampler = ResumableSampler(sampler or RandomSampler(ds, generator=generator))
    return DataLoader(
        ds,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        # its own generator even for evaluation: iterating a loader must not draw from the global RNG
        # that training augmentations use, so how often we evaluate cannot change what is trained
        generator=generator,
    )


def heldout_order(records: Sequence[D.ImageRecord], seed: int) -> list[D.ImageRecord]:
    """The records sorted by path, then in a seeded random order: groups of consecutive ones mix classes,
    and the order (hence the held-out CGC loss) does not depend on how the files were listed."""
    by_path = sorted(records, key=lambda r: r.path)
    perm = torch.randperm(len(by_path), generator=torch.Generator().manual_seed(seed)).tolist()
    return [by_path[i] for i in perm]


def class_spread_sample(records: Sequence[D.ImageRecord], n: int | None, seed: int) -> list[D.ImageRecord]:
    """``n`` records (None: all) drawn with ``seed`` and spread over every class: round-robin over the
    classes, each in a seeded random order, so every class is represented before any gets a second image."""
    if n is None or n >= len(records):
        return sorted(records, key=lambda r: r.path)
    by_class: dict[int, list[D.ImageRecord]] = {}
    for r in heldout_order(records, seed):
        by_class.setdefault(r.label, []).append(r)
    out, depth = [], 0
    while len(out) < n:
        out += [rs[depth] for _, rs in sorted(by_class.items()) if depth < len(rs)][: n - len(out)]
        depth += 1
    return out


class FullImages(Dataset):
    """(image 3 x H' x W' with short side ``short_side``, label, boxes N x 4 in ORIGINAL pixels, (H, W) original):
    the authors' CH input (``engine.full_image_ch``), one image at a time."""

    def __init__(self, records: Sequence[D.ImageRecord], short_side: int):
        self.inner = BoxDataset(records, train=False, image_size=short_side, eval_resize="short_side")

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor, tuple[int, int]]:
        x, y, _ = self.inner[i]
        rec = self.inner.records[i]
        W, H = image_size(rec.path)
        return x, y, torch.tensor(rec.boxes, dtype=torch.float32).reshape(-1, 4), (H, W)


def _one(batch: list) -> Any:
    return batch[0]


def full_image_loader(records: Sequence[D.ImageRecord], short_side: int, *, workers: int = 0) -> DataLoader:
    """:class:`FullImages` in file order, one image per batch (sizes differ), unbatched."""
    return DataLoader(FullImages(records, short_side), batch_size=1, num_workers=workers, collate_fn=_one)


def evaluator(spec: ExperimentSpec, records: Sequence[D.ImageRecord], *, batch: int,
              metrics: Sequence[str] | None = None) -> Evaluator:
    """What is evaluated on ``records`` (``metrics``, None: ``spec.metrics``), by ``spec.evaluation``, in batches of
    ``batch``: held-out CGC-loss groups of ``evaluation.cgc_batch`` from :func:`heldout_order` (whole groups; one
    group of all when fewer images), IAUC on :func:`class_spread_sample` of ``evaluation.iauc_images`` at
    ``evaluation.iauc_input``, CH by ``evaluation.ch_protocol`` (``authors``: :func:`full_image_loader`)."""
    ev, seed, metrics = spec.evaluation, spec.seed, tuple(spec.metrics if metrics is None else metrics)
    workers = loader_workers(spec)
    make = lambda recs, b, drop, resize="center_crop": _loader(
        BoxDataset(recs, train=False, image_size=spec.data.image_size, eval_resize=resize), b, train=False, seed=seed,
        workers=workers, distributed=False, drop_last=drop)
    heldout = iauc = full = None
    if "cgc_loss" in metrics:
        heldout = make(heldout_order(records, seed), min(ev.cgc_batch, len(records)), len(records) >= ev.cgc_batch)
    if "iauc" in metrics:
        iauc = make(class_spread_sample(records, ev.iauc_images, seed), batch, False, ev.iauc_input)
    if "ch" in metrics and ev.ch_protocol == "authors":
        full = full_image_loader(records, ev.ch_short_side, workers=workers)
    return Evaluator(make(records, batch, False), layer=spec.model.layer, metrics=metrics,
                     iauc_protocol=ev.iauc_protocol, seed=seed, every=spec.eval_every, heldout_loader=heldout,
                     iauc_loader=iauc, ch_loader=full, saliency=ev.saliency, saliency_window=ev.saliency_window)


def evaluation_details(spec: ExperimentSpec, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """How the row's metrics were measured (``results.table.DETAIL_COLUMNS``), for the metrics ``metrics`` holds."""
    ev = spec.evaluation
    out: dict[str, Any] = {}
    if "ch" in metrics:
        out.update(ch_protocol=ev.ch_protocol, ch_saliency=ev.saliency)
    if "n_iauc" in metrics:
        out.update(iauc_protocol=ev.iauc_protocol, iauc_images=int(metrics["n_iauc"]))
    return out


def worker_batch(spec: ExperimentSpec, distributed: bool) -> int:
    """Images per batch on one worker: ``data.batch_size`` / world size (at least 2, for the contrastive loss)."""
    world = torch.distributed.get_world_size() if distributed else 1
    return max(2, spec.data.batch_size // world)


def build_loaders(spec: ExperimentSpec, td: TrialData, *, distributed: bool = False):
    """(train, unlabeled or None): the training loaders, in batches of :func:`worker_batch`."""
    batch = worker_batch(spec, distributed)
    small = spec.data.dataset == "synthetic"
    center = spec.method.view == "center" and spec.method.name != "baseline"
    mk = lambda recs, train: BoxDataset(recs, train=train, image_size=spec.data.image_size,
                                          scale=spec.data.train_crop_scale, cache_in_memory=small, center_view=center)
    # A final batch of one image breaks the contrastive loss (an authors' defect): drop that batch and nothing
    # else. Each rank's sampler holds ceil(N / world) images (DistributedSampler pads); with drop_last it holds
    # floor(N / world), so every rank drops the same at most world images and runs the same number of steps.
    per_rank = -(-len(td.train) // (torch.distributed.get_world_size() if distributed else 1))
    train = _loader(mk(td.train, True), batch, train=True, seed=spec.seed, workers=loader_workers(spec),
                    distributed=distributed, drop_last=per_rank % batch == 1)
    unl = None
    if td.unlabeled is not None:
        unl = _loader(mk(td.unlabeled, True), batch, train=True, seed=spec.seed + 1,
                      workers=loader_workers(spec), distributed=distributed, drop_last=True)
    return train, unl


def local_weights(spec: ExperimentSpec) -> str | None:
    """``model.weights`` as something ``models.weights`` reads: a ``trial:`` reference becomes that trial's
    checkpoint in this spec's storage, and a checkpoint in an object store is cached (:func:`_fetch`)."""
    weights = spec.model.weights
    if weights is None:
        return None
    if weights.startswith("trial:"):
        experiment, tid = parse_trial_ref(weights)
        storage = Storage(spec.storage)
        weights = storage.checkpoint_path(experiment, tid)
        if storage.posix:  # this machine's files (a folder or a file:// mount): read in place
            if not Path(weights).is_file():
                raise SpecError(f"model.weights={spec.model.weights!r}: no checkpoint at {weights}; run that "
                                "pretraining first (an experiment: reference runs it for you)")
            return weights
        return _fetch(storage.uri, storage.fs, weights)
    if is_uri(weights):
        fs, path = resolve(weights)
        return _fetch(weights, fs, path)
    return weights


# The weights cache's bound on one node: beyond it, the copies used least recently are deleted.
WEIGHTS_CACHE_BYTES = 10 * 2**30


def _fetch(uri: str, fs, path: str) -> str:
    """A local copy of the file ``path`` in ``fs`` (the filesystem of ``uri``), from the weights cache.

    A copy is keyed on the file and on its size and modification time, so a file that changed since it was
    fetched (the checkpoint of a pretraining that went on) is fetched again, and its older copies are
    deleted. The cache holds at most :data:`WEIGHTS_CACHE_BYTES`, dropping the least recently used copies.
    """
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise SpecError(f"model.weights: no file at {path} in {uri}")
    cache = D.cache_dir() / "weights"
    source = cache / hashlib.sha256(f"{uri}|{path}".encode()).hexdigest()[:16]
    version = source / hashlib.sha256(f"{info.size}|{info.mtime_ns}".encode()).hexdigest()[:16]
    local = version / Path(path).name
    if not local.is_file():
        version.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{os.getpid()}.tmp")
        try:
            pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)
        for old in source.iterdir():  # copies of what the file held before
            if old != version:
                shutil.rmtree(old, ignore_errors=True)
    os.utime(local)  # its last use, for the bound
    _bound_weights_cache(cache, keep=version)
    return str(local)


def _bound_weights_cache(cache: Path, *, keep: Path) -> None:
    """Delete the least recently used copies (``<source>/<version>/`` folders) until the cache fits its bound."""
    versions = [(v, *_usage(v)) for v in cache.glob("*/*")]
    total = sum(size for _, _, size in versions)
    for v, _, size in sorted(versions, key=lambda t: t[1]):
        if total <= WEIGHTS_CACHE_BYTES:
            break
        if v != keep:
            shutil.rmtree(v, ignore_errors=True)
            total -= size


def _usage(version: Path) -> tuple[float, int]:
    """(last use, bytes) of one cached copy; (0, 0) for one another process is deleting."""
    try:
        stats = [f.stat() for f in version.iterdir()]
    except FileNotFoundError:
        return 0.0, 0
    return max((st.st_mtime for st in stats), default=0.0), sum(st.st_size for st in stats)


def run_trial(
    spec: ExperimentSpec | Mapping[str, Any],
    *,
    trial_dir: str | os.PathLike,
    device: torch.device | str = "cpu",
    report: Callback | None = None,
    step_report: StepCallback | None = None,
    distributed: bool = False,
) -> dict[str, Any]:
    """Train and evaluate one trial; resumes from ``trial_dir/checkpoint.pt`` if present.

    Returns the last epoch's metrics plus ``wall_time_s``, ``episode_seed``,
    ``n_train`` and ``n_val``.
    """
    spec = validate_spec(spec)
    if spec.sweep.grid:
        raise ValueError("run_trial takes one trial; expand the sweep with spec.expand_trials first")
    start = time.perf_counter()
    device = torch.device(device)
    td = trial_data(spec)
    train, unl = build_loaders(spec, td, distributed=distributed)
    is_main = not distributed or torch.distributed.get_rank() == 0
    # rank 0 evaluates the whole validation set (on the bare module, see engine.fit)
    ev = evaluator(spec, td.val, batch=worker_batch(spec, distributed)) if is_main else None
    torch.manual_seed(spec.seed)
    model = build_model(spec.model.arch, td.num_classes, weights=local_weights(spec)).to(device)
    if distributed:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    opt = build_optimizer(spec, model.module if distributed else model)
    sched = build_scheduler(spec, opt, len(train))
    on_gpu = device.type == "cuda"  # autocast and channels_last pay off on GPUs only
    placement = Placement.on(device, amp=spec.scaling.amp and on_gpu,
                             channels_last=spec.scaling.channels_last and on_gpu)
    task = build_task(spec, num_classes=td.num_classes, placement=placement, unlabeled=unl)
    plan = FitPlan(epochs=spec.optim.epochs, checkpoint_path=Path(trial_dir) / CHECKPOINT_NAME,
                   checkpoint_every=spec.failure.checkpoint_every,
                   checkpoint_every_steps=spec.failure.checkpoint_every_steps, is_main=is_main,
                   scheduler_interval="step",
                   record=trial_record(method=spec.method.model_dump(mode="json"), layer=spec.model.layer,
                                       arch=spec.model.arch, num_classes=td.num_classes, dataset=spec.data.dataset,
                                       image_size=spec.data.image_size))
    metrics = fit(model, task, opt, train, plan, scheduler=sched, evaluator=ev, callback=report,
                  step_callback=step_report)
    metrics.update(wall_time_s=time.perf_counter() - start, episode_seed=td.episode_seed,
                   n_train=len(td.train), n_val=len(td.val), eval_split=td.eval_split,
                   labelled_split=td.labelled_split,
                   negatives_group=contrast_group(spec) if spec.method.uses_cgc else None)
    metrics.update(evaluation_details(spec, metrics))
    return metrics
