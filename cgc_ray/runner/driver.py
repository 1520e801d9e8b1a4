"""The sweep driver: validate, schedule every pending trial of a spec as a Ray Tune trial, collect.

It orchestrates only: figures and reports are drawn after it returns, by the
caller. What runs inside each trial is :mod:`cgc_ray.runner.worker`; what a
trial asks of the cluster, :mod:`cgc_ray.runner.resources`; which Ray it
attaches to, :mod:`cgc_ray.runner.cluster`.

* Nothing is lost and nothing runs twice. Trial ids are content hashes of the
  resolved trial config; a trial whose row is in the results is skipped; a
  trial's checkpoint lives in storage (:mod:`cgc_ray.storage`), so a
  retried trial (``FailureConfig``), a trial moved off a lost node or a re-run
  of the whole command resumes from its last finished epoch. Trials are leased
  (:mod:`cgc_ray.runner.leases`): another live driver's are left to it, and a
  trial whose lease this driver loses is stopped.
* Nothing is hidden. When the run ends, every trial is done, failed (a
  ``failed`` row, never over a done or unreadable one), held by a live driver,
  or unsettled, with the reason (:class:`ExperimentResult`); the command exits
  non-zero for failed and unsettled trials.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from cgc_ray.config import (
    ExperimentSpec,
    SpecError,
    check_data_root,
    data_root_missing_here,
    data_root_uris,
    expand_trials,
    resolve_paths,
    trial_id,
    validate_spec,
)
from cgc_ray.config.pretrained import pin_pretrained
from cgc_ray.data.staging import source
from cgc_ray.results.table import (
    DONE_STATUSES,
    SEARCH_DONE_STATUSES,
    UNREADABLE,
    code_version,
    row_from_config,
    row_status,
    trial_status,
    write_row,
)
from cgc_ray.runner.cluster import cluster_view, connect, find_cluster
from cgc_ray.runner.leases import Claims, Leases
from cgc_ray.runner.resources import (
    ResourceError,
    check_fits,
    concurrent_room,
    trial_bundles,
    use_gpu,
)
from cgc_ray.runner.tracking import tracking_callbacks
from cgc_ray.runner.worker import trial_by_id
from cgc_ray.storage import Storage, advice

# ---------------------------------------------------------------- the driver


def _ray_initialized() -> bool:
    import ray

    return ray.is_initialized()


def _local_storage_message(storage: Storage, reason: str) -> str:
    return (
        f"storage={storage.uri!r} is a local folder but {reason}: rows and checkpoints would land on the disks of "
        "whichever node runs each trial. Use storage every node reaches: --storage s3://BUCKET/PREFIX (or set "
        "CGC_RAY_STORAGE in the cluster's config), or file:///shared/mount for a filesystem all nodes mount"
    )


def _check_data_where_we_can(spec: ExperimentSpec, *, on_this_node: bool) -> None:
    """Check the data root (and few-shot class counts) here, or say why the check is left to the trials.

    On our own Ray this machine is the node that reads the data. Attached to a
    cluster, the driver checks only what exists here; a root missing on this
    node is checked by each trial on the node that reads it.
    """
    from cgc_ray.train.trial import (
        check_trials_against_data,  # torch: not needed to import this module
    )

    for uri in data_root_uris(spec):  # before any GPU node starts: a URI root each node stages must exist
        try:
            source(uri)
        except (OSError, ValueError) as e:
            raise SpecError(str(e)) from None
    missing = data_root_missing_here(spec)
    if missing and not on_this_node:
        print(f"cgc-ray: data.root {', '.join(missing)} is not on this node (the driver's): the data check is "
              "skipped here; each trial checks it (a URI: in its staged copy) on the node that reads it",
              file=sys.stderr)
        return
    check_data_root(spec)
    check_trials_against_data(expand_trials(spec))


@dataclass
class ExperimentResult:
    """What one ``run_experiment`` call did.

    ``skipped``: trials done (finished or diverged) that this call did not run;
    ``ran``: trials this call finished; ``diverged``: those whose loss went NaN
    (their rows say so); ``failed``: trial id -> error (a ``failed`` row was
    written; a re-run tries them again); ``held``: trial id -> the other live
    driver running it (host:pid) when this call ended; ``unsettled``: trial id
    -> why it is none of these (its row could not be read, its claim could not
    be read or written, or the driver holding it died): the command exits
    non-zero and names them. ``metrics``: trial id -> the last result Tune
    got from that trial in this call (for a finished trial: the result columns
    plus ``epoch``, ``node_id`` (the Ray node of rank 0) and
    ``resumed_from_epoch``). ``stopped``: trials of a search its scheduler ended early (``stopped`` rows).
    ``dataframe``: Tune's ``ResultGrid.get_dataframe()`` of this call (None when nothing ran): one row per
    Tune trial, the swept fields as ``config/<dotted path>`` (``runner.search``).
    """

    trial_ids: list[str]
    skipped: list[str]
    ran: list[str]
    failed: dict[str, str]
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    diverged: list[str] = field(default_factory=list)
    held: dict[str, str] = field(default_factory=dict)
    unsettled: dict[str, str] = field(default_factory=dict)
    stopped: list[str] = field(default_factory=list)
    dataframe: Any = None


class StorageError(RuntimeError):
    """The storage location cannot be written (a file in the way, no permission, bad credentials)."""


def check_storage(location: str) -> Storage:
    """The storage at ``location``, resolved; fails at once, in one line naming it and why, if it cannot be written."""
    import pyarrow as pa

    try:
        storage = Storage(location)
        storage.check_writable()
    except (OSError, pa.ArrowException, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        todo = advice(reason)
        raise StorageError(f"storage {location!r} cannot be written: {reason}" + (f"; {todo}" if todo else "")) from None
    return storage


def _quiet_tune() -> None:
    """No Tune banner or INFO lines: the caller shows its own progress (or none)."""
    import logging

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    for name in ("ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_experiment(
    spec: ExperimentSpec | Mapping[str, Any],
    *,
    address: str | None = None,
    progress: bool = True,
    max_concurrent: int | None = None,
    autoscale: bool = False,
    tracking: Sequence[str] = (),
) -> ExperimentResult:
    """Run every trial of ``spec`` not yet done; returns what ran, diverged, failed or another driver holds.

    Before any trial starts: validates the spec, checks that the storage can
    be written and the data root holds the dataset, claims the pending trials
    (``runner.leases``: another live driver's trials are left to it), and
    checks that one trial fits the cluster's nodes or node types. ``tracking``: tracker names
    (``runner.tracking.TRACKERS``) whose Tune callbacks see every trial's config and reports.
    """
    spec = resolve_paths(validate_spec(spec))  # idempotent; the CLI resolved against the user's folder already
    storage = check_storage(spec.storage)
    if autoscale and storage.is_local:
        raise ResourceError(_local_storage_message(storage, "--autoscale adds nodes"))
    spec = _run_pretrainings(spec, address=address, progress=progress, autoscale=autoscale, tracking=tracking)
    if _ray_initialized():  # a caller's Ray (a notebook, the tests): this process is already attached
        view = cluster_view(own=False)
        on_this_node = not view.multi_node
    else:
        view, on_this_node = None, find_cluster(address) is None
    _check_data_where_we_can(spec, on_this_node=on_this_node)
    trials = expand_trials(spec)  # a search's: its base at each replicate (resources are checked on them)
    if spec.sweep.search is not None:
        return _run_search(spec, storage, trials, view, address=address, progress=progress,
                           max_concurrent=max_concurrent, autoscale=autoscale, tracking=tracking)
    ids = [trial_id(t) for t in trials]
    before = trial_status(storage, spec.name)
    leases = Leases(storage, spec.name).start()
    try:
        # a row that cannot be read may be a finished trial's: neither run nor overwritten (it is unsettled)
        claims = leases.claim([i for i in ids if before.get(i) not in (*DONE_STATUSES, UNREADABLE)])
        mine = set(claims.got) - _done_meanwhile(storage, spec.name, claims.got, before)
        pending = [(t, i) for t, i in zip(trials, ids) if i in mine]
        configs, errors, metrics, dataframe = {}, {}, {}, None
        if pending:
            configs, errors, metrics, dataframe = _run_pending(
                spec, storage, pending, len(ids), sum(before.get(i) in DONE_STATUSES for i in ids), view, leases,
                address=address, progress=progress, max_concurrent=max_concurrent, autoscale=autoscale,
                tracking=tracking)
        result = _settle(storage, spec.name, ids, before, leases, claims, configs, errors, metrics)
        result.dataframe = dataframe
        return result
    finally:
        leases.release()


def _run_search(spec: ExperimentSpec, storage: Storage, trials: list[ExperimentSpec], view, **run_options: Any
                ) -> ExperimentResult:
    """Run ``sweep.search`` (``runner.search``): trials are leased as the searcher hands them out; a trial whose
    row is done or stopped is replayed from its row, never trained again."""
    from cgc_ray.runner.search import check_search

    check_search(spec)
    before = trial_status(storage, spec.name)
    leases = Leases(storage, spec.name).start()
    claims = Claims([], {}, {})
    try:
        configs, errors, metrics, dataframe = _run_pending(
            spec, storage, [(t, trial_id(t)) for t in trials], spec.sweep.search.num_samples, 0, view, leases,
            claims=claims, **run_options)
        result = _settle(storage, spec.name, list(configs), before, leases, claims, configs, errors, metrics,
                         done_statuses=SEARCH_DONE_STATUSES)
        result.dataframe = dataframe
        return result
    finally:
        leases.release()


def _claim_one(leases: Leases, claims: Claims, tid: str) -> None:
    """Lease one trial a search hands out; what :meth:`Leases.claim` found is added to ``claims``."""
    found = leases.claim([tid])
    claims.got.extend(found.got)
    claims.held.update(found.held)
    claims.unknown.update(found.unknown)


def _done_meanwhile(storage: Storage, experiment: str, got: list[str], before: dict[str, str]) -> set[str]:
    """Trials of ``got`` whose row says done now but did not when ``before`` was read.

    Another driver may finish a trial and drop its claim between this driver's reading of the rows
    and its claim: one listing of the rows, then a read of each such trial's row only.
    """
    present = {i.base_name.removesuffix(".parquet") for i in storage.files(storage.experiment_dir(experiment))}
    return {t for t in got if t in present and before.get(t) not in DONE_STATUSES
            and row_status(storage, experiment, t) in DONE_STATUSES}


def _settle(storage: Storage, experiment: str, ids: list[str], before: dict[str, str], leases: Leases,
            claims: Claims, configs: dict[str, dict[str, Any]], errors: dict[str, str | None],
            metrics: dict[str, dict[str, Any]], done_statuses: frozenset[str] = DONE_STATUSES) -> ExperimentResult:
    """Where every trial stands when the run ends: done, failed, held by a live driver, or unsettled (and why).

    ``done_statuses``: a search counts its ``stopped`` trials done too.

    A trial this run tried and still holds, without a done row, gets a ``failed`` row, unless its row
    turned done or unreadable meanwhile: a ``failed`` row never replaces a finished one. A trial this
    run lost to another driver, or never got, is held if its holder lives, and unsettled otherwise.
    """
    status = dict(trial_status(storage, experiment) if errors else before)
    open_ = [t for t in ids if status.get(t) not in done_statuses]
    try:
        holders = leases.holders(open_) if open_ else {}
    except OSError as e:
        holders = {t: (None, None) for t in open_}
        claims.unknown.update({t: f"the lease folder could not be read at the end of the run: {e}" for t in open_})
    failed, held, unsettled = {}, {}, {}
    for t in open_:
        driver, beat = holders[t]
        if t in errors and driver == leases.driver:
            error = errors[t] or "no result row was written"
            status[t] = _write_failed_row(storage, experiment, configs[t], error)
            if status[t] == "failed":
                failed[t] = error
            elif status[t] == UNREADABLE:
                unsettled[t] = _why_unsettled(t, UNREADABLE, driver, claims, leases)
        elif beat is not None and driver != leases.driver:
            held[t] = f"{beat.get('host')}:{beat.get('pid')}"
        else:
            unsettled[t] = _why_unsettled(t, status.get(t), driver, claims, leases)
    done = [t for t in ids if status.get(t) in done_statuses]
    ran = [t for t in done if t in errors]
    diverged = [t for t in ran if status[t] == "diverged"]
    stopped = [t for t in ran if status[t] == "stopped"]
    return ExperimentResult(ids, [t for t in done if t not in errors], ran, failed, metrics, diverged, held,
                            unsettled, stopped)


def _why_unsettled(t: str, status: str | None, driver: str | None, claims: Claims, leases: Leases) -> str:
    if status == UNREADABLE:
        return "its row file could not be read (see the warning above); run again once the storage answers"
    if t in claims.unknown:
        return claims.unknown[t]
    if t in leases.lost:
        return f"this driver lost its lease to driver {driver or '(none)'}, which is no longer live"
    if driver == leases.driver:
        return "this run held it, but Tune returned no result for it; run again"
    if driver is not None:
        return f"driver {driver} held it and is no longer live; run again to take it over"
    return "no driver holds it and it has no done row; run again"


def _run_pretrainings(spec: ExperimentSpec, **run_options: Any) -> ExperimentSpec:
    """Run the pretrainings ``experiment:`` weights name (if not done yet); the spec pinned to their trials."""
    spec, pretrainings = pin_pretrained(spec)
    for pre in pretrainings:
        res = run_experiment(pre, **run_options)
        if set(res.trial_ids) - set(res.ran) - set(res.skipped):
            why = "; ".join([*(f"{t}: {e}" for t, e in {**res.failed, **res.unsettled}.items()),
                             *(f"{t}: held by the driver at {w}" for t, w in res.held.items())])
            raise SpecError(f"the pretraining {pre.name!r} that model.weights names did not finish: {why}")
    return spec


def _run_pending(spec: ExperimentSpec, storage: Storage, pending: list, total: int, already_done: int, view,
                 leases: Leases, *, address: str | None, progress: bool, max_concurrent: int | None, autoscale: bool,
                 tracking: Sequence[str] = (), claims: Claims | None = None
                 ) -> tuple[dict[str, dict[str, Any]], dict[str, str | None], dict[str, dict[str, Any]], Any]:
    """Run the ``pending`` (trial, id) pairs this driver holds with Tune (a search: ``total`` trials it samples,
    ``pending`` its base at each replicate): (config, error or None, last metrics) by id, and the dataframe.

    A trial whose lease ``leases`` finds lost (after a heartbeat) is stopped at its next report. A search's
    trials replayed from their rows are in none of the three: they did not run.
    """
    from ray import tune

    if view is None:
        view = cluster_view(own=connect(address))
    if view.multi_node and storage.is_local:
        reason = (f"this cluster has {len(view.nodes)} nodes" if len(view.nodes) > 1
                  else f"its autoscaler can add nodes ({', '.join(view.node_types)})")
        raise ResourceError(_local_storage_message(storage, reason))
    gpu = use_gpu(spec, view, autoscale=autoscale)
    nodes = view.placement_nodes()
    if not (autoscale and not view.node_types):  # without the node types, nodes may still be coming
        for t, _ in pending:
            check_fits(trial_bundles(t, gpu), nodes, what=f"one trial of {spec.name!r}")
    lost = leases.lost  # updated in place after every heartbeat; Tune pickles its stopper, which a lock would stop
    by_id, trainable, searcher, scheduler = _tune_trials(spec, storage, pending, gpu, leases, claims)
    # one resource shape per experiment: scaling is not a sweep axis that changes bundles mid-run
    bundles = trial_bundles(pending[0][0], gpu)
    if len(bundles) > 1:
        # DDP: the TorchTrainer reserves its workers itself; Tune holds only the waiting function, and
        # starts no more trials than the cluster has room for workers (else trainers queue for resources)
        room = concurrent_room(bundles[1:], nodes)
        max_concurrent = min(max_concurrent or room, room)
        bundles = bundles[:1]
    callbacks = tracking_callbacks(tracking, spec.name)
    if progress:
        from cgc_ray.runner.progress import RichProgress

        callbacks.append(RichProgress(total=total, already_done=already_done, experiment=spec.name))
    _quiet_tune()
    # Tune shows the swept fields under their spec names and names trials by id; the worker builds the full config
    tuner = tune.Tuner(
        tune.with_resources(trainable, tune.PlacementGroupFactory(bundles, strategy="PACK")),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=total if spec.sweep.search is not None else len(pending),
            max_concurrent_trials=max_concurrent,
            # one worker process runs trial after trial: no process start or imports per trial, and the
            # small datasets it decoded stay decoded (data.dataset.decoded_image); each trial seeds itself
            reuse_actors=True,
            trial_name_creator=lambda tr: tr.config["trial_id"],
            trial_dirname_creator=lambda tr: tr.config["trial_id"],
        ),
        run_config=tune.RunConfig(
            name=spec.name,  # Ray's run state, one folder per experiment (results are keyed by trial id)
            storage_path=storage.ray_path,
            # lost nodes and code errors alike to Tune: the trial counts its code's own (runner.worker.lost_node)
            failure_config=tune.FailureConfig(max_failures=spec.failure.max_retries + spec.failure.max_preemptions),
            stop=lambda _, result: result.get("config", {}).get("trial_id") in lost,
            callbacks=callbacks,
            verbose=0,
        ),
    )
    grid = tuner.fit()
    ran = [r for r in grid if not (r.metrics or {}).get("replayed")]
    # a trial out of failure.max_retries reports its error (trial_error) rather than raising it
    errors = {r.config["trial_id"]: _last_line(r.error) if r.error else (r.metrics or {}).get("trial_error")
              for r in ran}
    metrics = {r.config["trial_id"]: dict(r.metrics or {}) for r in ran}
    return by_id, errors, metrics, grid.get_dataframe()


def _tune_trials(spec: ExperimentSpec, storage: Storage, pending: list, gpu: bool, leases: Leases,
                 claims: Claims | None) -> tuple[dict[str, dict[str, Any]], Any, Any, Any]:
    """(worker config by trial id, Tune trainable, search algorithm, scheduler or None) of a grid's ``pending``
    trials, or of ``sweep.search`` (whose configs fill in as its searcher hands trials out)."""
    from ray import tune

    from cgc_ray.runner import search as sweeps

    fixed = {"use_gpu": gpu, "code_version": code_version(), "driver": leases.driver}  # driver: the lease holder
    if spec.sweep.search is None:
        paths = sweeps.swept_paths(spec)
        by_id = {i: sweeps.worker_config(t, i, fixed) for t, i in pending}
        grid = sweeps.GridSearcher([sweeps.tune_config(t, i, paths) for t, i in pending])
        return by_id, tune.with_parameters(trial_by_id, table=by_id), grid, None
    searcher = sweeps.SpecSearcher(
        spec, sweeps.optuna_searcher(spec, sweeps.prior_points(spec, storage)), fixed=fixed, lost=leases.lost,
        claim=lambda tid: _claim_one(leases, claims, tid))
    trainable = tune.with_parameters(sweeps.searched_trial, base=sweeps.base_tree(spec), fixed=fixed)
    return searcher.configs, trainable, searcher, sweeps.asha(spec) if spec.sweep.search.scheduler == "asha" else None


def _last_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__


def _write_failed_row(storage: Storage, experiment: str, config: dict[str, Any], error: str) -> str:
    """A ``failed`` row, so the report shows the trial; the next run tries it again (not a done status).

    Not over a row that says done or cannot be read now (read just before): returns that row's status, else "failed".
    """
    now = row_status(storage, experiment, config["trial_id"])
    if now in DONE_STATUSES or now == UNREADABLE:
        return now
    row = row_from_config(config["spec"], {}, trial_id=config["trial_id"], spec_hash=config["spec_hash"], epochs=0,
                          wall_time_s=0.0, node=socket.gethostname(), code_version=config["code_version"],
                          status="failed", error=error)
    write_row(storage, experiment, row)
    return "failed"
