"""A sweep's trials as Tune sees them: the swept fields under their spec names, from a grid or a search.

Every Tune trial's config is ``{<dotted spec path>: value, ..., "trial_id": <content hash>}`` (e.g.
``{"method.lam": 0.5, "seed": 1, "trial_id": "3f2a..."}``), so ``ResultGrid.get_dataframe()``,
``progress.csv``, TensorBoard and any callback show ``config/method.lam``; the trial id still names
the trial, its row and its checkpoint, and still decides "already done".

* A grid (:class:`GridSearcher`): the driver expands and claims the pending trials as before and Tune
  runs that list, in order.
* A search (``sweep.search``, :class:`SpecSearcher` around Tune's ``OptunaSearch``): each point the
  searcher samples runs once per combination of the replicate axes in ``sweep.grid`` (seeds, episodes),
  and the searcher learns the mean over them. A trial whose row is done (or ``stopped``) is not trained:
  :func:`searched_trial` reports its row at once. ASHA (``scheduler: asha``) stops trials early over
  their per-epoch validation reports; such a trial gets a ``stopped`` row (written here, in the driver,
  since a stopped trial's function never returns).
* The search's state is the experiment's rows in storage. A run first has the searcher re-evaluate the
  points of the rows that lie in the space (:func:`prior_points`): they cost a row read each, the searcher
  learns them, and they count towards ``num_samples``. So killing the driver and running again continues
  the search: nothing finished runs twice, and no more than ``num_samples`` trials are ever sampled. A
  trial killed before its row was written is not in the rows: its point is lost (its budget with it), and
  its checkpoint serves only if the searcher samples that point again.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
from typing import Any, Callable, Mapping

from ray.tune.search import Searcher

from cgc_ray.config import ExperimentSpec, SpecError, spec_hash, trial_id, validate_spec
from cgc_ray.config.base import canonical, get_path, set_path
from cgc_ray.config.sweep import SearchSpec
from cgc_ray.results.table import (
    METRIC_COLUMNS,
    SEARCH_DONE_STATUSES,
    UNREADABLE,
    read_rows,
    row_from_config,
    row_status,
    write_row,
)
from cgc_ray.storage import Storage

# optuna_multi's objectives, both maximised: validation top-1 and CH
MULTI_OBJECTIVE: tuple[str, ...] = ("top1", "ch")


def worker_config(trial: ExperimentSpec, tid: str, fixed: Mapping[str, Any]) -> dict[str, Any]:
    """What :func:`cgc_ray.runner.worker._trial_fn` gets: the trial's spec and id, and the run's ``fixed``
    settings (``use_gpu``, ``code_version``, ``driver``: the lease holder, which the trial checks)."""
    return {"spec": trial.model_dump(mode="json"), "trial_id": tid, "spec_hash": spec_hash(trial), **fixed}


def swept_paths(spec: ExperimentSpec) -> list[str]:
    """The dotted paths a sweep varies: grid axes, the variants' settings, searched fields (in that order)."""
    sweep = spec.sweep
    paths = [*sweep.grid, *(p for v in sweep.variants for p in v), *(sweep.search.space if sweep.search else ())]
    return list(dict.fromkeys(paths))


def tune_config(trial: ExperimentSpec, tid: str, paths: list[str]) -> dict[str, Any]:
    """The config Tune shows for ``trial``: its value at each swept path, and its id."""
    tree = trial.model_dump(mode="json")
    return {**{p: get_path(tree, p) for p in paths}, "trial_id": tid}


class GridSearcher(Searcher):
    """Tune's trials are the given configs, in order (a grid the driver expanded and claimed)."""

    def __init__(self, configs: list[dict[str, Any]]):
        super().__init__()
        self._configs = list(configs)

    def suggest(self, trial_id: str) -> dict[str, Any] | str:
        return self._configs.pop(0) if self._configs else Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        pass  # the trials' state is their rows and checkpoints in storage: a re-run expands the grid again

    def restore(self, checkpoint_path: str) -> None:
        pass


# ---------------------------------------------------------------- the search


def base_tree(spec: ExperimentSpec) -> dict[str, Any]:
    """``spec`` as JSON with an empty sweep: what every trial of its search is, before its settings."""
    tree = spec.model_dump(mode="json")
    tree["sweep"] = {"grid": {}, "variants": []}
    return tree


def trial_of(base: Mapping[str, Any], settings: Mapping[str, Any]) -> ExperimentSpec:
    """The trial ``base`` (a spec's JSON with an empty sweep) becomes with ``settings`` (dotted path -> value)."""
    tree = json.loads(json.dumps(base))
    for path, value in settings.items():
        set_path(tree, path, value)
    return validate_spec(tree)


def replicates(spec: ExperimentSpec) -> list[dict[str, Any]]:
    """Each combination of the replicate axes in ``sweep.grid`` ([{}] without any)."""
    grid = spec.sweep.grid
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


def _in_space(search: SearchSpec, settings: Mapping[str, Any]) -> bool:
    for path, dist in search.space.items():
        (kind, values), = dist.items()
        v = settings[path]
        if kind == "choice":
            if canonical(v) not in {canonical(c) for c in values}:
                return False
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not values[0] <= v <= values[1]:
            return False
    return True


def prior_points(spec: ExperimentSpec, storage: Storage) -> list[dict[str, Any]]:
    """The searched settings of the experiment's rows that are trials of this search (the spec at those settings
    and one of its replicates, by trial id) inside its space, oldest row first, each once."""
    search = spec.sweep.search
    table = read_rows(storage, spec.name, columns=["trial_id", "config_json", "finished_at"], left_out=[])
    base, points = base_tree(spec), {}
    for row in sorted(table.to_pylist(), key=lambda r: (r["finished_at"], r["trial_id"])):
        try:
            config = json.loads(row["config_json"])
            settings = {p: get_path(config, p) for p in search.space}
            reps = {p: get_path(config, p) for p in spec.sweep.grid}
        except (ValueError, KeyError, TypeError):  # not a config of this version's layout: not this search's
            continue
        if not _in_space(search, settings) or canonical(settings) in points:
            continue
        try:
            same = trial_id(trial_of(base, {**settings, **reps})) == row["trial_id"]
        except SpecError:
            continue
        if same:
            points[canonical(settings)] = settings
    return list(points.values())


def optuna_searcher(spec: ExperimentSpec, points: list[dict[str, Any]]) -> Searcher:
    """Tune's ``OptunaSearch`` over ``sweep.search.space``, the ``points`` evaluated first.

    TPE samples the first points at random: half of them (at most Optuna's default of 10), so that a small
    budget is still guided by what it found.
    """
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search = spec.sweep.search
    space = {}
    for path, dist in search.space.items():
        (kind, values), = dist.items()
        space[path] = (optuna.distributions.CategoricalDistribution(values) if kind == "choice" else
                       optuna.distributions.FloatDistribution(*values, log=kind == "loguniform"))
    n_points = search.num_samples // len(replicates(spec))
    sampler = optuna.samplers.TPESampler(seed=search.seed, n_startup_trials=max(1, min(10, n_points // 2)))
    metric = list(MULTI_OBJECTIVE) if search.algorithm == "optuna_multi" else search.metric
    mode = ["max"] * len(metric) if isinstance(metric, list) else "max"
    return OptunaSearch(space=space, metric=metric, mode=mode, sampler=sampler, points_to_evaluate=points or None)


def asha(spec: ExperimentSpec):
    """ASHA over the trials' per-epoch validation reports of ``sweep.search.metric`` (``epoch`` is its time),
    never at a trial's last epoch: its training is paid for, and a finished trial writes its row."""
    from ray.tune.schedulers import ASHAScheduler

    search, epochs = spec.sweep.search, spec.optim.epochs
    if search.grace_period >= epochs:
        raise SpecError(f"sweep.search.grace_period={search.grace_period} is not below optim.epochs={epochs}: "
                        "ASHA could stop no trial early; lower it, or set sweep.search.scheduler=none")

    class BeforeTheLastEpoch(ASHAScheduler):
        @property
        def metric(self):
            # what Tune's controller requires in every report; a trial reports validation metrics only on its
            # evaluation epochs (``eval_every``), and ASHA itself passes over a report without them
            return None

        def on_trial_result(self, tune_controller, trial, result):
            if result.get("epoch", 0) >= epochs:
                return self.CONTINUE
            return super().on_trial_result(tune_controller, trial, result)

    return BeforeTheLastEpoch(time_attr="epoch", metric=search.metric, mode="max", max_t=epochs,
                              grace_period=search.grace_period, reduction_factor=search.reduction_factor,
                              stop_last_trials=False)


def check_search(spec: ExperimentSpec) -> None:
    """A search needs Optuna, and chooses settings on the validation split (the metrics are ``data.eval_split``'s)."""
    if importlib.util.find_spec("optuna") is None:
        raise SpecError("sweep.search samples with Optuna, which is not installed: pip install 'cgc-ray[search]' "
                        "(or pip install optuna)")
    if spec.data.eval_split != "val":
        raise SpecError(f"sweep.search with data.eval_split={spec.data.eval_split!r}: a search must choose on the "
                        "validation split, not on the split results are reported on; set data.eval_split=val")


class SpecSearcher(Searcher):
    """Tune's searcher of a ``sweep.search``: ``inner`` (OptunaSearch) samples points, each runs once per replicate.

    Its own ``metric`` is None: Tune checks a searcher's metric in every report, and a trial reports its
    validation metrics only on evaluation epochs (and a diverged one none); ``inner`` keeps the objective.
    ``claim(trial id)``: the driver leases each trial it hands out that is not done. A point sampled again
    while its trial runs waits for that trial's row, and then replays it.
    """

    def __init__(self, spec: ExperimentSpec, inner: Searcher, *, fixed: Mapping[str, Any],
                 claim: Callable[[str], None], lost: Mapping[str, Any]):
        super().__init__()
        self.spec, self.inner, self.fixed = spec, inner, dict(fixed)
        self.storage = Storage(spec.storage)
        self.claim, self.lost = claim, lost
        self.objective = inner.metric if isinstance(inner.metric, list) else [inner.metric]
        self._base, self._replicates, self._paths = base_tree(spec), replicates(spec), swept_paths(spec)
        self.configs: dict[str, dict[str, Any]] = {}  # trial id -> worker config, of every trial handed out
        self._queue: list[tuple[str, dict[str, Any]]] = []  # (point, Tune config) not handed out yet
        self._running: dict[str, tuple[str, str]] = {}  # Tune's trial id -> (point, trial id)
        self._results: dict[str, list[dict | None]] = {}  # point -> its replicates' last results
        self._points = 0

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its search algorithm with the Tuner (tuner.pkl); the lease callbacks stay in this process
        return {**self.__dict__, "claim": None, "lost": {}}

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def save(self, checkpoint_path: str) -> None:
        pass  # the search's state is the experiment's rows (module docstring): a re-run replays them

    def restore(self, checkpoint_path: str) -> None:
        pass

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if not self._queue:
            point = f"point-{self._points}"
            settings = self.inner.suggest(point)
            if settings is None or settings == Searcher.FINISHED:
                return settings
            self._points += 1
            self._queue = [(point, self._config(settings, rep)) for rep in self._replicates]
        running = {tid for _, tid in self._running.values()}
        ready = [i for i, (_, config) in enumerate(self._queue) if config["trial_id"] not in running]
        if not ready:
            return None  # Tune asks again; by then the running twin may have written its row
        point, config = self._queue.pop(ready[0])
        tid = config["trial_id"]
        self._running[trial_id] = (point, tid)
        if row_status(self.storage, self.spec.name, tid) not in SEARCH_DONE_STATUSES:
            self.claim(tid)
        return dict(config)

    def _config(self, settings: Mapping[str, Any], replicate: Mapping[str, Any]) -> dict[str, Any]:
        trial = trial_of(self._base, {**settings, **replicate})
        tid = trial_id(trial)
        self.configs.setdefault(tid, worker_config(trial, tid, self.fixed))
        return tune_config(trial, tid, self._paths)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        point, tid = self._running.pop(trial_id)
        if not error and result is not None and "row_written" not in result and tid not in self.lost:
            self._write_stopped(tid, result)  # a scheduler stopped it: its function never returns to write a row
        results = self._results.setdefault(point, [])
        results.append(None if error else result)
        if len(results) < len(self._replicates):
            return
        del self._results[point]
        means = {m: _mean([r.get(m) for r in results if r is not None]) for m in self.objective}
        if any(v is None for v in means.values()):  # every replicate diverged or failed: no value to learn
            self.inner.on_trial_complete(point, error=True)
        else:
            self.inner.on_trial_complete(point, result=means)

    def _write_stopped(self, tid: str, result: Mapping[str, Any]) -> None:
        config = self.configs[tid]
        metrics = {m: float(result[m]) for m in METRIC_COLUMNS if _number(result.get(m)) is not None}
        row = row_from_config(config["spec"], metrics, trial_id=tid, spec_hash=config["spec_hash"],
                              epochs=int(result.get("epoch", 0)), wall_time_s=float(result.get("time_total_s", 0.0)),
                              node=str(result.get("hostname", "")), code_version=config["code_version"],
                              status="stopped")
        write_row(self.storage, self.spec.name, row)


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _mean(values: list[Any]) -> float | None:
    numbers = [x for x in map(_number, values) if x is not None]
    return math.fsum(numbers) / len(numbers) if numbers else None


# ---------------------------------------------------------------- inside a trial


def searched_trial(config: dict[str, Any], base: dict[str, Any], fixed: dict[str, Any]) -> None:
    """The Tune function of a searched trial: its row's result at once when it has a done (or stopped) row, else
    train it (:func:`cgc_ray.runner.worker._trial_fn`)."""
    from ray import tune

    from cgc_ray.runner.worker import _trial_fn

    trial = trial_of(base, {k: v for k, v in config.items() if k != "trial_id"})
    tid = trial_id(trial)
    if tid != config["trial_id"]:
        raise RuntimeError(f"trial {config['trial_id']}: its settings give id {tid} on this worker; the driver and "
                           "the workers run different versions of cgc-ray")
    storage = Storage(trial.storage)
    row = _done_row(storage, trial.name, tid)
    if row is None:
        _trial_fn(worker_config(trial, tid, fixed))
        return
    tune.report({"row_written": 1, "replayed": 1, "status": row["status"], "epoch": row["epochs"],
                 **{m: row[m] for m in METRIC_COLUMNS if row[m] is not None}})


def _done_row(storage: Storage, experiment: str, tid: str) -> dict[str, Any] | None:
    status = row_status(storage, experiment, tid)
    if status == UNREADABLE:  # perhaps a finished trial's row: neither trained again nor overwritten (as a grid)
        raise OSError(f"trial {tid}: its row file could not be read; run again once the storage answers")
    if status not in SEARCH_DONE_STATUSES:
        return None
    rows = read_rows(storage, experiment, files=[storage.row_path(experiment, tid)], left_out=[]).to_pylist()
    return rows[0] if rows else None
