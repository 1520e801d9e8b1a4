"""Search, not only grids (runner.search): Tune sees the swept fields, a searched trial with a row is replayed from
it, ASHA's stopped trials get ``stopped`` rows the tables leave out, and a killed search continues where it was."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, result_row

from cgc_ray.config import PRESETS, SpecError, apply_overrides, expand_trials, load_spec, trial_id
from cgc_ray.results.report import report
from cgc_ray.results.stats import summarize
from cgc_ray.results.table import read_rows, write_row
from cgc_ray.runner.driver import run_experiment
from cgc_ray.runner.search import SpecSearcher, base_tree, trial_of

pytest.importorskip("optuna")

REPO = Path(__file__).resolve().parent.parent
# the λ demo on tiny synthetic data, evaluated on its validation split every epoch
SEARCHABLE = [*TINY, "data.eval_split=val", "data.synthetic.n_val_per_class=4", "eval_every=1",
              "sweep.grid={seed: [0]}"]


def _spec(storage, *overrides):
    return apply_overrides(load_spec(PRESETS["lambda_ablation_demo"]), [f"storage={storage}", *SEARCHABLE, *overrides])


def _search(storage, space: str, n: int, *overrides, search: str = ""):
    return _spec(storage, f"sweep.search={{space: {{{space}}}, num_samples: {n}, algorithm: optuna_tpe{search}}}",
                 *overrides)


def _mtimes(storage) -> dict[str, int]:
    return {p.stem: p.stat().st_mtime_ns for p in Path(storage).glob("experiment=*/*.parquet")}


def test_a_search_is_checked_where_the_spec_enters():
    base = _spec("/tmp/x")
    with pytest.raises(SpecError, match=r"sweep.search.space\['method.lamda'\].*'lamda' is not a key of method"):
        apply_overrides(base, ["sweep.search={space: {method.lamda: {uniform: [0, 1]}}, num_samples: 2}"])
    with pytest.raises(SpecError, match=r"sweep.search.space\['method.tau'\]\[0\] = 0"):  # tau must be > 0
        apply_overrides(base, ["sweep.search={space: {method.tau: {uniform: [0, 1]}}, num_samples: 2}"])
    with pytest.raises(SpecError, match="only replicate axes"):
        apply_overrides(base, ["sweep.grid={method.lam: [0, 1]}",
                               "sweep.search={space: {method.tau: {choice: [0.1, 0.5]}}, num_samples: 2}"])
    with pytest.raises(SpecError, match="num_samples=3 is not a multiple of the 2 replicates"):
        apply_overrides(base, ["sweep.grid={seed: [0, 1]}",
                               "sweep.search={space: {method.lam: {loguniform: [0.1, 1]}}, num_samples: 3}"])
    with pytest.raises(SpecError, match="loguniform = \\[0, 1\\]: the bounds must be > 0"):
        apply_overrides(base, ["sweep.search={space: {method.lam: {loguniform: [0, 1]}}, num_samples: 2}"])
    spec = apply_overrides(base, ["sweep.grid={seed: [0, 1]}",
                                  "sweep.search={space: {method.lam: {uniform: [0, 1]}}, num_samples: 4}"])
    # the search is no part of a trial: the replicates of its base have the ids a grid's trials have
    grid = apply_overrides(base, ["sweep.grid={seed: [0, 1]}"])
    assert [trial_id(t) for t in expand_trials(spec)] == [trial_id(t) for t in expand_trials(grid)]


class _SamePoint:
    """A stand-in for OptunaSearch that samples λ = 0.5 every time and records what it is told."""

    metric = ["top1", "ch"]

    def __init__(self):
        self.told = []

    def suggest(self, point):
        return {"method.lam": 0.5}

    def on_trial_complete(self, point, result=None, error=False):
        self.told.append((point, result, error))


def test_each_point_runs_per_replicate_a_twin_waits_and_the_searcher_learns_the_mean(tmp_path):
    spec = _search(tmp_path, "method.lam: {uniform: [0.1, 1.0]}", 4, "sweep.grid={seed: [0, 1]}")
    inner, claimed = _SamePoint(), []
    searcher = SpecSearcher(spec, inner, fixed={"use_gpu": False, "code_version": "t", "driver": "d"},
                            claim=claimed.append, lost={})
    a, b = searcher.suggest("a"), searcher.suggest("b")
    assert (a["method.lam"], a["seed"], b["seed"]) == (0.5, 0, 1) and claimed == [a["trial_id"], b["trial_id"]]
    assert searcher.suggest("c") is None  # the same point again: its trials are running, it waits for their rows
    searcher.on_trial_complete("a", {"row_written": 1, "top1": 40.0, "ch": 10.0})
    searcher.on_trial_complete("b", {"row_written": 1, "top1": 60.0, "ch": 30.0})
    assert inner.told == [("point-0", {"top1": 50.0, "ch": 20.0}, False)]  # the mean over the seeds
    assert searcher.suggest("c")["trial_id"] == a["trial_id"]  # now it runs (and is replayed from its row)
    assert list(searcher.configs) == [a["trial_id"], b["trial_id"]]
    assert searcher.configs[a["trial_id"]]["spec"]["method"]["lam"] == 0.5


def test_stopped_rows_are_counted_beside_n_and_never_averaged(tmp_path):
    spec = _spec(tmp_path, "sweep.grid={seed: [0, 1, 2]}")
    finished, other, stopped = expand_trials(spec)
    write_row(str(tmp_path), spec.name, result_row(finished, {"top1": 50.0, "ch": 20.0}))
    write_row(str(tmp_path), spec.name, result_row(other, {"top1": 70.0, "ch": 30.0}))
    write_row(str(tmp_path), spec.name, result_row(stopped, {"top1": 5.0, "ch": 1.0}, status="stopped"))
    (group,) = summarize(read_rows(str(tmp_path)))
    assert (group.n_finished, group.n_stopped) == (2, 1)
    assert group.stats["top1"].mean == 60.0 and group.stats["top1"].n == 2  # (50 + 70) / 2: the stopped 5 is out
    assert "+1 stopped" in report(str(tmp_path), spec.name, "markdown")


def test_the_hyperparameters_reach_tune_and_a_searched_config_with_a_row_is_not_trained_again(ray_session, tmp_path):
    grid = _spec(tmp_path, "sweep.grid={method.lam: [0.5], seed: [0]}", "optim.epochs=1")
    res = run_experiment(grid, progress=False)
    (tid,) = res.ran
    df = res.dataframe
    assert df["config/method.lam"].tolist() == [0.5] and df["config/seed"].tolist() == [0]
    assert df["config/trial_id"].tolist() == [tid]
    before = _mtimes(tmp_path)
    # every point of this space is that grid trial: two samples, both replayed from its row
    search = _search(tmp_path, "method.lam: {choice: [0.5]}", 2, "optim.epochs=1")
    again = run_experiment(search, progress=False)
    assert again.trial_ids == [tid] and again.skipped == [tid] and again.ran == [] and again.failed == {}
    assert _mtimes(tmp_path) == before  # not trained, not rewritten
    df = again.dataframe
    assert df["config/method.lam"].tolist() == [0.5, 0.5] and df["replayed"].tolist() == [1, 1]
    assert df["top1"].tolist() == [read_rows(str(tmp_path)).to_pylist()[0]["top1"]] * 2


def test_asha_stops_a_trial_below_the_rung_and_its_row_says_stopped(ray_session, tmp_path):
    # validation every 2nd epoch: the reports between them carry no metric for ASHA (nor must they fail)
    search = _search(tmp_path, "method.lam: {uniform: [0.1, 1.0]}", 2, "optim.epochs=3", "eval_every=2",
                     search=", scheduler: asha, grace_period: 2")
    # an earlier trial of this search, stopped at epoch 2 with a CH no trial reaches: the rung's cutoff
    prior = trial_of(base_tree(search), {"method.lam": 0.1, "seed": 0})
    write_row(str(tmp_path), search.name, result_row(prior, {"top1": 100.0, "ch": 100.0}, status="stopped", epochs=2))
    res = run_experiment(search, progress=False, max_concurrent=1)
    live = [t for t in res.trial_ids if t != trial_id(prior)]
    assert res.skipped == [trial_id(prior)] and res.stopped == live and len(live) == 1
    rows = {r["trial_id"]: r for r in read_rows(str(tmp_path)).to_pylist()}
    assert rows[live[0]]["status"] == "stopped" and rows[live[0]]["epochs"] == 2 and rows[live[0]]["ch"] < 100
    groups = summarize(read_rows(str(tmp_path)))
    assert sorted((g.n_finished, g.n_stopped, bool(g.stats)) for g in groups) == [(0, 1, False)] * 2


_DRIVER = """
import sys
from cgc_ray.config import load_spec
from cgc_ray.runner.driver import run_experiment
run_experiment(load_spec(sys.argv[1]), progress=False, max_concurrent=1)
"""


@pytest.mark.slow
def test_a_killed_search_continues_without_running_a_finished_trial_again(ray_session, tmp_path):
    store = tmp_path / "store"
    search = _search(store, "method.lam: {uniform: [0.1, 1.0]}", 4, "optim.epochs=1")
    path = tmp_path / "spec.json"
    path.write_text(search.model_dump_json())
    # the driver attaches to this session's Ray (which it then shares, as a second `cgc-ray run` would); Ray ends
    # a killed driver's trials with it
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, str(path)], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while len(_mtimes(store)) < 2 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert driver.poll() is None, driver.stderr.read()[-3000:]
    finally:
        driver.kill()
        driver.wait()
    before = _mtimes(store)
    assert 2 <= len(before) < 4
    res = run_experiment(search, progress=False, max_concurrent=1)
    after = _mtimes(store)
    assert len(after) == 4 and len(res.trial_ids) == 4  # the budget, not more: finished ones count
    assert {t: after[t] for t in before} == before  # replayed, not trained again
    assert sorted(res.skipped) == sorted(before) and sorted(res.ran) == sorted(set(after) - set(before))
    assert sorted(res.dataframe["config/trial_id"]) == sorted(after)  # each trial once in Tune's view


def test_a_search_without_optuna_says_what_to_install(monkeypatch, tmp_path):
    from cgc_ray.runner import search as sweeps

    spec = _search(tmp_path, "method.lam: {uniform: [0.1, 1.0]}", 2)
    real = sweeps.importlib.util.find_spec
    monkeypatch.setattr(sweeps.importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else real(name, *a))
    with pytest.raises(SpecError, match=r"pip install 'cgc-ray\[search\]'"):
        sweeps.check_search(spec)
