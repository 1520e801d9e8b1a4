"""Inside a Tune trial: train one trial (one process, or a nested DDP TorchTrainer), then write its row.

* A trial with one worker runs ``train.trial.run_trial`` inside the Tune
  function (a nested TorchTrainer costs ~30 s of start-up per trial), with
  fractional GPUs so several small trials share a GPU.
* A trial with several workers nests a Ray Train ``TorchTrainer`` (DDP; gloo
  on CPU, NCCL on GPU) and forwards its reports to Tune with
  ``TuneReportCallback``; rank 0 writes checkpoints, every rank reports.
* The checkpoint lives in storage (:meth:`cgc_ray.storage.Storage.checkpoint_path`),
  so a retried trial, a trial moved off a lost node or a re-run of the command
  resumes from its last checkpoint: an epoch's end, or mid-epoch with
  ``failure.checkpoint_every_steps``.
* A lost node (:func:`lost_node`) is retried up to ``failure.max_preemptions``
  times; an exception of the trial's code is counted in storage and retried
  ``failure.max_retries`` times, after which the trial reports the error
  (``trial_error``) instead of raising, and the driver writes its failed row.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cgc_ray.config import ExperimentSpec, SpecError, unresolved_paths, validate_spec
from cgc_ray.results.table import DETAIL_COLUMNS, result_metrics, row_from_config, write_row
from cgc_ray.runner.leases import check_lease
from cgc_ray.runner.tracking import write_error_txt
from cgc_ray.storage import CHECKPOINT_NAME, Storage

# ---------------------------------------------------------------- checkpoints in storage


WORKDIR_PREFIX = "cgc-ckpt-"  # <tmp>/cgc-ckpt-<pid>-<unique>: a working copy of a checkpoint kept in a URI storage


def remove_dead_workdirs() -> list[Path]:
    """Delete the working-copy folders of trials whose process died (killed workers leave a checkpoint there)."""
    from cgc_ray.models.checkpoint import pid_alive

    owned = re.compile(rf"{re.escape(WORKDIR_PREFIX)}(\d+)-.+")
    dead = [d for d in Path(tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*")
            if (m := owned.fullmatch(d.name)) and d.is_dir() and not pid_alive(int(m[1]))]
    for d in dead:
        shutil.rmtree(d, ignore_errors=True)
    return dead


@dataclass
class CheckpointStore:
    """A trial's checkpoint in storage, with a local working copy.

    For a local storage folder the working copy is the stored file itself; for
    a URI (``s3://``, ``file://``) it is pulled before training into
    ``<tmp>/cgc-ckpt-<pid>-<unique>/`` and pushed, atomically, whenever the
    trial writes one. A stored checkpoint that does not parse is set aside
    (``checkpoint.pt.corrupt-<time>``) and the trial trains from scratch.
    """

    storage: Storage | str
    experiment: str
    trial_id: str

    def __post_init__(self) -> None:
        self.storage = Storage.of(self.storage)
        self.remote = self.storage.checkpoint_path(self.experiment, self.trial_id)
        self.is_local = self.storage.is_local
        if self.is_local:
            self.workdir = Path(self.remote).parent
        else:
            remove_dead_workdirs()
            self.workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)

    @property
    def local_path(self) -> Path:
        return self.workdir / CHECKPOINT_NAME

    def pull(self) -> None:
        """Fetch the stored checkpoint into the working copy (a local one is read in place by the engine,
        which sets it aside itself if it does not parse)."""
        from cgc_ray.models.checkpoint import UnreadableCheckpoint, check_readable

        if self.is_local:
            return
        if self.storage.posix:  # temporary files of pushes whose workers were killed (object stores have none)
            self.storage.remove_stale_temps(self.storage.files(self.remote.rpartition("/")[0]))
        if not self._download():
            return
        try:
            check_readable(self.local_path)
        except UnreadableCheckpoint as e:
            self.local_path.unlink()
            warnings.warn(f"{e}; {self._set_aside()}, and the trial trains from scratch", RuntimeWarning)

    def _download(self) -> bool:
        """Copy the stored checkpoint to the working copy; False when there is none, or when another rank of
        this trial set it aside meanwhile."""
        if not self.storage.exists(self.remote):
            return False
        try:
            self.storage.download(self.remote, self.local_path)
        except OSError:
            self.local_path.unlink(missing_ok=True)
            if self.storage.exists(self.remote):
                raise
            return False
        return True

    def _set_aside(self) -> str:
        """Move the stored checkpoint to ``checkpoint.pt.corrupt-<time>`` beside it; says where it went."""
        from cgc_ray.models.checkpoint import corrupt_suffix

        aside = f"{self.remote}.{corrupt_suffix()}"
        try:
            self.storage.fs.move(self.remote, aside)
        except OSError as e:  # another rank moved it first, or the store refused: the next push replaces it
            return f"not moved aside ({e})"
        return f"moved to {aside}"

    def push(self) -> None:
        """Upload the working copy; a push that fails (or is killed) leaves the previous checkpoint."""
        if self.is_local or not self.local_path.exists():
            return
        self.storage.upload(self.local_path, self.remote)

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


def _train(spec: ExperimentSpec, storage: Storage, tid: str, device: Any, *, distributed: bool, rank: int,
           send: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Train one trial on this process (one rank under DDP); the final metrics, or what diverged.

    Every rank pulls the same checkpoint, so all resume identically; rank 0
    pushes a checkpoint to storage whenever one is written (after an epoch, and
    every ``failure.checkpoint_every_steps`` steps), the last one
    without its training state unless ``failure.keep_checkpoint=full``. ``send`` gets each
    epoch's metrics (``tune.report`` or ``ray.train.report``). A NaN loss is
    deterministic: it ends the trial as diverged instead of failing it, so it
    is not retried (and every rank sees it at the same step).
    """
    from cgc_ray.models.checkpoint import keep_model_only, read_header
    from cgc_ray.train.engine import NonFiniteLossError
    from cgc_ray.train.trial import run_trial

    _worker_threads(spec)
    store = CheckpointStore(storage, spec.name, tid)
    store.pull()
    first: dict[str, int] = {}  # the first epoch this attempt finished
    resumed_step = read_header(store.local_path).get("step", 0)  # > 0: this attempt resumes mid-epoch

    def report(metrics: dict[str, Any], checkpoint: str | None) -> None:
        first.setdefault("epoch", int(metrics["epoch"]))
        if checkpoint is not None and rank == 0:
            if spec.failure.keep_checkpoint != "full" and int(metrics["epoch"]) == spec.optim.epochs:
                keep_model_only(store.local_path)  # training is over: a retry finds a finished model
            store.push()
        send(metrics)

    def step_report(epoch: int, step: int, checkpoint: str) -> None:
        if rank == 0:
            store.push()  # atomic: a node lost mid-upload leaves the previous checkpoint

    where = {"node": socket.gethostname(), "node_id": _node_id(), "resumed_from_step": resumed_step}
    try:
        final = run_trial(spec, trial_dir=store.workdir, device=device, report=report, step_report=step_report,
                          distributed=distributed)
    except NonFiniteLossError as e:
        resumed = first.get("epoch", e.epoch) - 1
        return {"diverged": True, "error": str(e), "diverged_epoch": e.epoch, "diverged_step": e.step,
                "epoch": e.epoch - 1, **where, "resumed_from_epoch": resumed}
    finally:
        store.cleanup()
    return {**final, **where, "resumed_from_epoch": first.get("epoch", int(final.get("epoch", 0)) + 1) - 1}


def tune_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """An epoch's numbers as Tune gets them: the metric columns in the table's units (top1, ch in %), as the
    trial's last report and its row have them, so a scheduler, a searcher or a tracker sees one scale."""
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    return {**numbers, **result_metrics(numbers)}


def _train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker (DDP): every rank trains and reports; returns rank 0's result (``Result.return_value``).

    Every rank calls ``ray.train.report`` once per epoch (Train V2 requires the
    same number of reports on every rank; the controller forwards rank 0's to Tune).
    """
    import ray.train
    import ray.train.torch

    spec = validate_spec(config["spec"])
    rank = ray.train.get_context().get_world_rank()
    return _train(spec, Storage(spec.storage), config["trial_id"], ray.train.torch.get_device(),
                  distributed=True, rank=rank, send=lambda m: ray.train.report({**tune_metrics(m), "rank": rank}))


def _run_ddp(spec: ExperimentSpec, storage: Storage, tid: str, config: dict[str, Any], gpu: bool) -> dict[str, Any]:
    """Nest a TorchTrainer in the Tune function; rank 0's per-epoch reports reach Tune."""
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
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
            storage_path=storage.ray_path,
            callbacks=[TuneReportCallback()],
            # a drained (preempted) node restarts the worker group here, from the last checkpoint; a crash of a
            # worker's code is left to the Tune function's count (failure.max_retries)
            failure_config=FailureConfig(max_failures=0, max_preemption_failures=spec.failure.max_preemptions),
        ),
    )
    final = trainer.fit().return_value
    if not isinstance(final, dict):
        raise RuntimeError(f"trial {tid}: the Train workers finished without final metrics (got {final!r})")
    return final


def _run_single(spec: ExperimentSpec, storage: Storage, tid: str, gpu: bool) -> dict[str, Any]:
    from ray import tune

    return _train(spec, storage, tid, _trial_device(gpu), distributed=False, rank=0,
                  send=lambda m: tune.report(tune_metrics(m)))


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
    storage = Storage(spec.storage)  # the spec crossed into Ray as a dict: the storage, as its location string
    try:
        check_lease(storage, spec.name, tid, config["driver"])  # another driver may have taken the trial over
        final = (_run_ddp(spec, storage, tid, config, gpu) if spec.scaling.num_workers > 1
                 else _run_single(spec, storage, tid, gpu))
    except Exception as e:
        if lost_node(e):
            raise  # retried by Tune without counting against failure.max_retries
        given_up = _count_error(storage, spec, tid, config["driver"], e)
        if given_up is None:
            raise
        # the traceback where Tune keeps a raised one: this trial ends without raising (the failure message names it)
        write_error_txt(storage, spec.name, tid, traceback.format_exc())
        tune.report({"trial_error": given_up})  # the driver writes the failed row with it
        return
    diverged = bool(final.get("diverged"))
    row = row_from_config(
        config["spec"],
        {} if diverged else result_metrics(final),
        trial_id=tid,
        spec_hash=config["spec_hash"],
        epochs=int(final.get("epoch", spec.optim.epochs)),
        wall_time_s=float(final.get("wall_time_s", time.time() - start)),
        node=str(final.get("node", socket.gethostname())),
        code_version=config["code_version"],
        status="diverged" if diverged else "finished",
        error=final.get("error"),
        diverged_epoch=final.get("diverged_epoch"),
        diverged_step=final.get("diverged_step"),
        details={k: final[k] for k in DETAIL_COLUMNS if final.get(k) is not None},
    )
    check_lease(storage, spec.name, tid, config["driver"])  # a driver that lost the trial writes no row
    write_row(storage, spec.name, row)
    if spec.failure.keep_checkpoint == "none":  # only now: until the row exists, it is the trial's progress
        storage.delete_quietly(storage.checkpoint_path(spec.name, tid))
    storage.delete_quietly(storage.errors_path(spec.name, tid))
    tune.report({"row_written": 1, "status": row["status"], **({} if diverged else result_metrics(final)),
                 "epoch": row["epochs"], "node_id": final["node_id"], "resumed_from_epoch": final["resumed_from_epoch"],
                 "resumed_from_step": final.get("resumed_from_step", 0)})


# ---------------------------------------------------------------- a lost node or a bug


def lost_node(error: BaseException) -> bool:
    """Whether ``error`` (or what it wraps) says a node or a worker process was lost, not that the code raised.

    A spot node taken back, a node removed, a process killed: Ray raises an actor's or a node's death, which
    Ray Train wraps (a worker group's failures, a failed health check). Such a trial is retried as often as
    ``failure.max_preemptions`` allows; an exception of the trial's code counts against ``failure.max_retries``.
    """
    import ray.exceptions as X

    lost = (X.RayActorError, X.NodeDiedError, X.WorkerCrashedError, X.LocalRayletDiedError, X.OwnerDiedError,
            X.ObjectLostError)
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, lost) or type(e).__name__ in ("PreemptionError", "WorkerHealthCheckFailedError",
                                                       "WorkerHealthCheckTimeoutError"):
            return True
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None), getattr(e, "health_check_failure", None),
                 getattr(e, "controller_failure", None), *(getattr(e, "worker_failures", None) or {}).values()]
    return False


def _count_error(storage: Storage, spec: ExperimentSpec, tid: str, driver: str, error: BaseException) -> str | None:
    """Count one more exception of the trial's code in this driver's run (in storage, beside the checkpoint,
    since a retry may run on another node); None while ``failure.max_retries`` allows a retry, else the error
    the failed row records. A new run (another driver id) counts from zero."""
    path = storage.errors_path(spec.name, tid)
    try:
        record = json.loads(storage.read_bytes(path))
    except (FileNotFoundError, ValueError):  # none yet, or garbled: count afresh
        record = {}
    errors = (record.get("errors", 0) if record.get("driver") == driver else 0) + 1
    storage.write_bytes(path, json.dumps({"driver": driver, "errors": errors}).encode())
    if errors <= spec.failure.max_retries:
        return None
    text = str(error).strip()
    line = text.splitlines()[-1] if text else ""
    return (f"{type(error).__name__}: {line} (raised on {errors} attempts; failure.max_retries="
            f"{spec.failure.max_retries})")


def trial_by_id(config: dict[str, Any], table: dict[str, dict[str, Any]]) -> None:
    _trial_fn(table[config["trial_id"]])
