"""The Ray layer: run every trial of an experiment spec as a Ray Tune trial.

The only module (with ``cluster`` glue in the CLI) that imports Ray.

* A trial with one worker runs ``trial.run_trial`` inside the Tune function
  (no nested TorchTrainer: it costs ~30 s of start-up per trial), with
  fractional GPUs so several small trials share a GPU.
* A trial with several workers nests a Ray Train ``TorchTrainer`` (DDP; gloo
  on CPU, NCCL on GPU) in the Tune function and forwards its reports to Tune
  with ``TuneReportCallback``; rank 0 writes checkpoints, every rank reports.
* Nothing is lost and nothing runs twice. Trial ids are content hashes of the
  resolved trial config; a trial whose row is in the results is skipped; a
  trial's checkpoint lives under the storage URI
  (``<storage>/_checkpoints/<experiment>/<trial_id>/checkpoint.pt``), so a
  retried trial (``FailureConfig``), a trial moved off a lost node or a re-run
  of the whole command resumes from its last finished epoch.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from cgc_ray.results import (
    _filesystem,
    code_version,
    completed_trial_ids,
    result_metrics,
    row_from_config,
    write_row,
)
from cgc_ray.cluster import (
    BOOTSTRAP_CONFIG,
    ENV_AUTOSCALING_CONFIG,
    ClusterError,
    ClusterView,
    cluster_view,
    connect,
    find_cluster,
)
from cgc_ray.spec import (
    ExperimentSpec,
    SpecError,
    check_data_root,
    data_root_missing_here,
    expand_trials,
    is_uri,
    resolve_paths,
    spec_hash,
    trial_id,
    unresolved_paths,
    validate_spec,
)

# What the Tune function of a DDP trial reserves: 1 MiB of memory and no CPU.
WAITER_BUNDLE = {"memory": float(2**20)}


class ResourceError(RuntimeError):
    """One trial needs more than any node (or the cluster) has: it would wait forever."""


# ---------------------------------------------------------------- resources


def use_gpu(spec: ExperimentSpec, view: ClusterView, *, autoscale: bool = False) -> bool:
    """Whether the trials of ``spec`` request GPUs on this cluster.

    ``scaling.use_gpu`` true/false decides; "auto" asks the cluster: a GPU on
    an alive node or on a node type its autoscaler can add. With
    ``--autoscale`` and no node types to read, "auto" cannot be answered and
    is refused rather than guessed (it would train on CPUs on GPU nodes).
    """
    s = spec.scaling
    if s.use_gpu is False or (s.use_gpu == "auto" and s.gpus_per_worker == 0):
        return False
    if s.use_gpu is True:
        if not view.has_gpus() and not (autoscale and not view.node_types):
            raise ResourceError(
                "scaling.use_gpu=true but no node of this cluster has a GPU, alive or among the node types its "
                "autoscaler can add; set scaling.use_gpu=auto (or false), or attach to a GPU cluster (--address)"
            )
        return True
    if autoscale and not view.node_types and not view.has_gpus():
        raise ResourceError(
            "--autoscale: the autoscaler's node types are unknown (no cluster config in the GCS and no "
            f"{BOOTSTRAP_CONFIG}; set ${ENV_AUTOSCALING_CONFIG} to the cluster's YAML), so whether trials need "
            "GPUs cannot be told; add --set scaling.use_gpu=true (or false)"
        )
    return view.has_gpus()


def trial_bundles(spec: ExperimentSpec, gpu: bool) -> list[dict[str, float]]:
    """Resource bundles of one trial: [tune function] (+ one per Train worker under DDP).

    A single-worker trial trains inside the Tune function. Under DDP the Tune
    function only waits on the TorchTrainer (its controller takes no CPU) and
    the trainer reserves its workers itself, so the function holds no CPU,
    only :data:`WAITER_BUNDLE` (Tune needs a non-empty bundle): two 1-CPU
    workers then fit a 2-CPU node.
    """
    s = spec.scaling
    worker = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if gpu and s.gpus_per_worker else {})}
    if s.num_workers == 1:
        return [worker]
    return [dict(WAITER_BUNDLE)] + [dict(worker) for _ in range(s.num_workers)]


def check_fits(bundles: list[dict[str, float]], nodes: list[Mapping[str, float]], *, what: str = "one trial") -> None:
    """Fail at once when ``bundles`` cannot be placed on ``nodes`` (first-fit, largest first).

    nodes: the total resources of each alive node. Raises ResourceError saying
    what was asked and what exists, instead of letting Ray wait forever.
    """
    free = [dict(n) for n in nodes]
    for b in sorted(bundles, key=lambda b: (-b.get("GPU", 0), -b.get("CPU", 0))):
        for n in free:
            if all(n.get(k, 0) + 1e-9 >= v for k, v in b.items()):
                for k, v in b.items():
                    n[k] = n.get(k, 0) - v
                break
        else:
            asked = " + ".join(_fmt(b) for b in bundles if b != WAITER_BUNDLE)
            have = "; ".join(_fmt({k: v for k, v in n.items() if k in ("CPU", "GPU")}) for n in nodes) or "no nodes"
            raise ResourceError(
                f"{what} needs {asked} but the cluster's nodes have: {have}. "
                "Lower scaling.num_workers / scaling.cpus_per_worker / scaling.gpus_per_worker "
                "(e.g. --set scaling.cpus_per_worker=1), or add nodes."
            )


def _fmt(res: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())) + "}"


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
        self.fs, base = _filesystem(self.storage)
        self.remote = f"{base}/_checkpoints/{self.experiment}/{self.trial_id}/checkpoint.pt"
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

    from cgc_ray.trial import run_trial

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
            storage_path=_tune_storage(spec.storage),
            callbacks=[TuneReportCallback()],
        ),
    )
    final = trainer.fit().return_value
    if not isinstance(final, dict):
        raise RuntimeError(f"trial {tid}: the Train workers finished without final metrics (got {final!r})")
    return final


def _run_single(spec: ExperimentSpec, tid: str, gpu: bool) -> dict[str, Any]:
    from ray import tune

    from cgc_ray.trial import run_trial

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


# ---------------------------------------------------------------- the driver


def _tune_storage(storage: str) -> str:
    """Ray's own run state (logs, trial state) beside the results."""
    if "://" in storage:
        return storage.rstrip("/") + "/_ray"
    return str(Path(storage).expanduser().resolve() / "_ray")


def _ray_initialized() -> bool:
    import ray

    return ray.is_initialized()


def _is_local(storage: str) -> bool:
    return not is_uri(storage)


def _local_storage_message(storage: str, reason: str) -> str:
    return (
        f"storage={storage!r} is a local folder but {reason}: rows and checkpoints would land on the disks of "
        "whichever node runs each trial. Use storage every node reaches: --storage s3://BUCKET/PREFIX (or set "
        "CGC_RAY_STORAGE in the cluster's config), or file:///shared/mount for a filesystem all nodes mount"
    )


def _check_data_where_we_can(spec: ExperimentSpec, *, on_this_node: bool) -> None:
    """Check the data root (and few-shot class counts) here, or say why the check is left to the trials.

    On our own Ray this machine is the node that reads the data. Attached to a
    cluster, the driver checks only what exists here; a root missing on this
    node is checked by each trial on the node that reads it.
    """
    from cgc_ray.trial import check_trials_against_data  # torch: not needed to import this module

    missing = data_root_missing_here(spec)
    if missing and not on_this_node:
        print(f"cgc-ray: data.root {', '.join(missing)} is not on this node (the driver's): the data check is "
              "skipped here; each trial checks it on the node that reads it", file=sys.stderr)
        return
    check_data_root(spec)
    check_trials_against_data(expand_trials(spec))


@dataclass
class ExperimentResult:
    """What one ``run_experiment`` call did.

    ``metrics``: trial id -> the last result Tune got from that trial in this
    call (for a finished trial: the result columns plus ``epoch``,
    ``node_id`` (the Ray node of rank 0) and ``resumed_from_epoch`` (epochs a
    checkpoint had already done when its last attempt started)).
    """

    trial_ids: list[str]
    skipped: list[str]
    ran: list[str]
    failed: dict[str, str]
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)


def run_experiment(
    spec: ExperimentSpec | Mapping[str, Any],
    *,
    address: str | None = None,
    progress: bool = True,
    max_concurrent: int | None = None,
    autoscale: bool = False,
) -> ExperimentResult:
    """Run every trial of ``spec`` not yet in the results; returns what ran and what failed.

    Validates the spec and the data root, and checks that one trial fits the
    cluster's nodes (unless ``autoscale``: nodes may still be coming) before
    any trial starts.
    """
    spec = resolve_paths(validate_spec(spec))  # idempotent; the CLI resolved against the user's folder already
    if autoscale and _is_local(spec.storage):
        raise ResourceError(_local_storage_message(spec.storage, "--autoscale adds nodes"))
    if _ray_initialized():  # a caller's Ray (a notebook, the tests): this process is already attached
        view = cluster_view(own=False)
        on_this_node = not view.multi_node
    else:
        view, on_this_node = None, find_cluster(address) is None
    _check_data_where_we_can(spec, on_this_node=on_this_node)
    trials = expand_trials(spec)
    ids = [trial_id(t) for t in trials]
    done = completed_trial_ids(spec.storage, spec.name)
    pending = [(t, i) for t, i in zip(trials, ids) if i not in done]
    skipped = [i for i in ids if i in done]
    if not pending:
        return ExperimentResult(ids, skipped, [], {})

    from ray import tune

    if view is None:
        view = cluster_view(own=connect(address))
    if view.multi_node and _is_local(spec.storage):
        reason = (f"this cluster has {len(view.nodes)} nodes" if len(view.nodes) > 1
                  else f"its autoscaler can add nodes ({', '.join(view.node_types)})")
        raise ResourceError(_local_storage_message(spec.storage, reason))
    gpu = use_gpu(spec, view, autoscale=autoscale)
    nodes = view.placement_nodes()
    if not (autoscale and not view.node_types):  # without the node types, nodes may still be coming
        for t, _ in pending:
            check_fits(trial_bundles(t, gpu), nodes, what=f"one trial of {spec.name!r}")
    version = code_version()
    configs = [
        {"spec": t.model_dump(mode="json"), "trial_id": i, "spec_hash": spec_hash(t), "use_gpu": gpu,
         "code_version": version}
        for t, i in pending
    ]
    by_id = {c["trial_id"]: c for c in configs}
    # one resource shape per experiment: scaling is not a sweep axis that changes bundles mid-run
    bundles = trial_bundles(pending[0][0], gpu)
    if len(bundles) > 1:
        # DDP: the TorchTrainer reserves its workers itself; Tune holds only the waiting function, and
        # starts no more trials than the cluster has room for workers (else trainers queue for resources)
        room = _concurrent_room(bundles[1:], nodes)
        max_concurrent = min(max_concurrent or room, room)
        bundles = bundles[:1]
    callbacks = []
    if progress:
        from cgc_ray.progress import RichProgress

        callbacks.append(RichProgress(total=len(ids), already_done=len(skipped), experiment=spec.name))
    # Tune shows and names trials by id; the full config is looked up on the worker
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trial_by_id, table=by_id),
                            tune.PlacementGroupFactory(bundles, strategy="PACK")),
        param_space={"trial_id": tune.grid_search(list(by_id))},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=max_concurrent,
            trial_name_creator=lambda tr: tr.config["trial_id"],
            trial_dirname_creator=lambda tr: tr.config["trial_id"],
        ),
        run_config=tune.RunConfig(
            name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",  # Ray's run state; results are keyed by trial id
            storage_path=_tune_storage(spec.storage),
            failure_config=tune.FailureConfig(max_failures=spec.failure.max_retries),
            callbacks=callbacks,
            verbose=0,
        ),
    )
    grid = tuner.fit()
    now_done = completed_trial_ids(spec.storage, spec.name)
    failed = {}
    for r in grid:
        tid = r.config["trial_id"]
        if tid not in now_done:
            failed[tid] = str(r.error) if r.error else "no result row was written"
    ran = [c for c in by_id if c in now_done]
    metrics = {r.config["trial_id"]: dict(r.metrics or {}) for r in grid}
    if ran:
        write_sample_figure(spec)
    return ExperimentResult(ids, skipped, ran, failed, metrics)


def _best(rows: list[dict[str, Any]], cgc: bool) -> dict[str, Any] | None:
    """The CGC trial with the highest CH, or the baseline (lambda 0) with the highest top-1."""
    if cgc:
        cands = [r for r in rows if r["method"] != "baseline" and r["lam"] > 0 and r["ch"] is not None]
        return max(cands, key=lambda r: r["ch"], default=None)
    cands = [r for r in rows if (r["method"] == "baseline" or r["lam"] == 0) and r["top1"] is not None]
    return max(cands, key=lambda r: r["top1"], default=None)


def write_sample_figure(spec: ExperimentSpec) -> Path | None:
    """``<storage>/_figures/<name>/explain.png``: the best CGC trial below the best baseline.

    Under a ``_`` folder, like ``_checkpoints`` and ``_ray``: pyarrow/pandas skip those when
    they read the storage folder as a Parquet dataset.

    Local storage only (checkpoints are read from disk). A failure is a
    warning, not an error: the results themselves are already written.
    """
    if "://" in spec.storage:
        return None
    import json
    import warnings

    from cgc_ray.results import read_rows

    rows = read_rows(spec.storage, spec.name).to_pylist()
    best_cgc, best_base = _best(rows, cgc=True), _best(rows, cgc=False)
    if best_cgc is None:
        return None
    ckpt = lambda r: CheckpointStore(spec.storage, spec.name, r["trial_id"]).local_path
    out = Path(_filesystem(spec.storage)[1]) / "_figures" / spec.name / "explain.png"
    try:
        from cgc_ray.figures import sample_explain_figure
        from cgc_ray.trial import data_root, synthetic_options

        trial = validate_spec(json.loads(best_cgc["config_json"]))
        return sample_explain_figure(
            ckpt(best_cgc), out, dataset=trial.data.dataset, root=data_root(trial),
            baseline=ckpt(best_base) if best_base is not None else None,
            image_size=trial.data.image_size, dataset_options=synthetic_options(trial),
        )
    except Exception as e:  # noqa: BLE001 - a figure must never cost the user their results
        warnings.warn(f"could not write the sample explain figure {out}: {e}")
        return None


def _concurrent_room(worker_bundles: list[dict[str, float]], nodes: list[Mapping[str, float]]) -> int:
    """How many trials' Train workers fit on ``nodes`` at once (at least 1)."""
    total = {k: sum(n.get(k, 0) for n in nodes) for k in ("CPU", "GPU")}
    need = {k: sum(b.get(k, 0) for b in worker_bundles) for k in ("CPU", "GPU")}
    return max(1, int(min(total[k] // need[k] for k in need if need[k] > 0)))


def _trial_by_id(config: dict[str, Any], table: dict[str, dict[str, Any]]) -> None:
    _trial_fn(table[config["trial_id"]])
