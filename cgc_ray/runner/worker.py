"""Inside a Tune trial: train one trial (one process, or a nested DDP TorchTrainer), then write its row.

* A trial with one worker runs ``train.trial.run_trial`` inside the Tune
  function (a nested TorchTrainer costs ~30 s of start-up per trial), with
  fractional GPUs so several small trials share a GPU.
* A trial with several workers nests a Ray Train ``TorchTrainer`` (DDP; gloo
  on CPU, NCCL on GPU) and forwards its reports to Tune with
  ``TuneReportCallback``; rank 0 writes checkpoints, every rank reports.
* The checkpoint lives under the storage URI
  (``<storage>/_checkpoints/<experiment>/<trial_id>/checkpoint.pt``), so a
  retried trial, a trial moved off a lost node or a re-run of the command
  resumes from its last finished epoch.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from cgc_ray.config import ExperimentSpec, SpecError, unresolved_paths, validate_spec
from cgc_ray.results.table import (
    checkpoint_path,
    filesystem,
    result_metrics,
    row_from_config,
    write_row,
)


def ray_storage_path(storage: str) -> str:
    """Ray's own run state (logs, trial state) beside the results."""
    if "://" in storage:
        return storage.rstrip("/") + "/_ray"
    return str(Path(storage).expanduser().resolve() / "_ray")



# ---------------------------------------------------------------- checkpoints in storage


@dataclass
class CheckpointStore:
    """A trial's checkpoint under the storage URI, with a local working copy.

    For a local storage path the working copy is the stored file itself; for
    a remote URI (s3://...) it is pulled before training and pushed after
    every epoch.
    """

    storage: str
    experiment: str
    trial_id: str

    def __post_init__(self) -> None:
        self.fs, _ = filesystem(self.storage)
        self.remote = checkpoint_path(self.storage, self.experiment, self.trial_id)
        self.is_local = "://" not in self.storage
        self.workdir = Path(self.remote).parent if self.is_local else Path(tempfile.mkdtemp(prefix="cgc-ckpt-"))
        self.workdir.mkdir(parents=True, exist_ok=True)

    @property
    def local_path(self) -> Path:
        return self.workdir / "checkpoint.pt"

    def pull(self) -> None:
        if self.is_local:
            return
        import pyarrow.fs as pafs

        if self.fs.get_file_info(self.remote).type == pafs.FileType.File:
            pafs.copy_files(self.remote, str(self.local_path), source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())

    def push(self) -> None:
        if self.is_local or not self.local_path.exists():
            return
        import pyarrow.fs as pafs

        self.fs.create_dir(str(Path(self.remote).parent), recursive=True)
        pafs.copy_files(str(self.local_path), self.remote, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)

    def cleanup(self) -> None:
        if not self.is_local:
            shutil.rmtree(self.workdir, ignore_errors=True)


# ---------------------------------------------------------------- the trial


def _worker_threads(spec: ExperimentSpec) -> None:
    import torch

    torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))


def _trial_device(gpu: bool) -> str:
    """``cuda:0`` (Ray sets CUDA_VISIBLE_DEVICES to the trial's GPU share) or ``cpu``; never a silent CPU fallback."""
    if not gpu:
        return "cpu"
    import ray
    import torch

    if not torch.cuda.is_available():
        held = ray.get_runtime_context().get_assigned_resources()
        raise RuntimeError(
            f"this trial holds {held} on node {socket.gethostname()} but torch.cuda.is_available() is False: "
            "install a CUDA build of torch on the GPU nodes, or set scaling.use_gpu=false to train on CPUs"
        )
    return "cuda:0"


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _resumed_from(first: Mapping[str, int], final: Mapping[str, Any]) -> int:
    """Epochs a checkpoint had already finished when this attempt started (0: from scratch)."""
    return first.get("epoch", int(final.get("epoch", 0)) + 1) - 1


def _train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker (DDP): every rank pulls the checkpoint, trains and reports; rank 0 checkpoints.

    Every rank calls ``ray.train.report`` once per epoch (Train V2 requires
    the same number of reports on every rank; the controller forwards rank
    0's to Tune). Returns rank 0's final metrics (``Result.return_value``).
    """
    import ray.train
    import ray.train.torch

    from cgc_ray.train.trial import run_trial

    spec = validate_spec(config["spec"])
    _worker_threads(spec)
    store = CheckpointStore(spec.storage, spec.name, config["trial_id"])
    rank = ray.train.get_context().get_world_rank()
    store.pull()  # every rank loads the same checkpoint, so all ranks resume identically
    first: dict[str, int] = {}  # the first epoch this attempt finished

    def report(metrics: dict[str, Any], _checkpoint: str | None) -> None:
        first.setdefault("epoch", int(metrics["epoch"]))
        if rank == 0:
            store.push()
        ray.train.report({**metrics, "rank": rank})

    try:
        final = run_trial(spec, trial_dir=store.workdir, device=ray.train.torch.get_device(), report=report,
                          distributed=True)
    finally:
        store.cleanup()
    return {**final, "node": socket.gethostname(), "node_id": _node_id(),
            "resumed_from_epoch": _resumed_from(first, final)}


def _run_ddp(spec: ExperimentSpec, tid: str, config: dict[str, Any], gpu: bool) -> dict[str, Any]:
    """Nest a TorchTrainer in the Tune function; rank 0's per-epoch reports reach Tune."""
    from ray.train import RunConfig as TrainRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    s = spec.scaling
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=gpu,
            resources_per_worker={"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if gpu else {})},
        ),
        run_config=TrainRunConfig(
            name=f"{spec.name}-{tid}",
            storage_path=ray_storage_path(spec.storage),
            callbacks=[TuneReportCallback()],
        ),
    )
    final = trainer.fit().return_value
    if not isinstance(final, dict):
        raise RuntimeError(f"trial {tid}: the Train workers finished without final metrics (got {final!r})")
    return final


def _run_single(spec: ExperimentSpec, tid: str, gpu: bool) -> dict[str, Any]:
    from ray import tune

    from cgc_ray.train.trial import run_trial

    _worker_threads(spec)
    store = CheckpointStore(spec.storage, spec.name, tid)
    store.pull()
    first: dict[str, int] = {}  # the first epoch this attempt finished

    def report(metrics: dict[str, Any], _checkpoint: str | None) -> None:
        first.setdefault("epoch", int(metrics["epoch"]))
        store.push()
        tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    device = _trial_device(gpu)
    try:
        final = run_trial(spec, trial_dir=store.workdir, device=device, report=report)
    finally:
        store.cleanup()
    return {**final, "node": socket.gethostname(), "node_id": _node_id(),
            "resumed_from_epoch": _resumed_from(first, final)}


def _trial_fn(config: dict[str, Any]) -> None:
    """The Tune function trainable: train (resuming if a checkpoint exists), then write the row."""
    from ray import tune

    spec = validate_spec(config["spec"])
    relative = unresolved_paths(spec)
    if relative:  # the driver resolves paths; a relative one here would resolve in Tune's trial folder
        raise SpecError(f"trial config has relative paths {relative}; resolve them with spec.resolve_paths first")
    tid = config["trial_id"]
    gpu = bool(config["use_gpu"])
    start = time.time()
    final = _run_ddp(spec, tid, config, gpu) if spec.scaling.num_workers > 1 else _run_single(spec, tid, gpu)
    row = row_from_config(
        config["spec"],
        result_metrics(final),
        trial_id=tid,
        spec_hash=config["spec_hash"],
        epochs=int(final.get("epoch", spec.optim.epochs)),
        wall_time_s=float(final.get("wall_time_s", time.time() - start)),
        node=str(final.get("node", socket.gethostname())),
        code_version=config["code_version"],
    )
    write_row(spec.storage, spec.name, row)
    tune.report({"row_written": 1, **result_metrics(final), "epoch": row["epochs"], "node_id": final["node_id"],
                 "resumed_from_epoch": final["resumed_from_epoch"]})


def _trial_by_id(config: dict[str, Any], table: dict[str, dict[str, Any]]) -> None:
    _trial_fn(table[config["trial_id"]])
