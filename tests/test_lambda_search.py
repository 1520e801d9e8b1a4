"""experiments/lambda_search.py: the specs each step runs, the demo preset, and one tiny run end to end."""

from __future__ import annotations

import pytest
from conftest import TINY

from cgc_ray.cli import lambda_search
from cgc_ray.config import PRESETS, apply_overrides, expand_trials, load_spec
from cgc_ray.config.identity import identity
from cgc_ray.results.stats import context_of


def _demo(*overrides: str):
    return apply_overrides(load_spec(PRESETS["lambda_search_demo"]), ["storage=/tmp/unused", *overrides])


def test_demo_searches_lambda_on_validation_within_the_issues_budget():
    spec = _demo()
    search = spec.sweep.search
    assert spec.name == "lambda_search" and spec.data.eval_split == "val" and spec.optim.epochs == 10
    assert spec.model.weights == "experiment:pretrain_demo"  # fine-tuning, as the fine-grained demo
    assert search.num_samples <= 12 and search.scheduler == "asha" and list(search.space) == ["method.lam"]
    assert spec.sweep.grid == {"seed": [0, 1, 2]}
    # ASHA compares validation reports: every rung (grace_period · reduction_factorᵏ < epochs) is an eval epoch
    rungs = [search.grace_period * search.reduction_factor ** k for k in range(4)]
    assert all(r % spec.eval_every == 0 for r in rungs if r < spec.optim.epochs)
    # the grid it is measured against: 4 λ × 3 seeds × 10 epochs
    assert lambda_search.grid_trial_epochs(spec) == 120


def test_each_step_pairs_with_the_search_seed_by_seed():
    from cgc_ray.runner.search import base_tree, trial_of

    spec = _demo()
    base = lambda_search.baseline_spec(spec)
    assert base.name == spec.name and base.sweep.search is None and base.data.eval_split == "val"
    assert [(t.method.lam, t.seed) for t in expand_trials(base)] == [(0.0, 0), (0.0, 1), (0.0, 2)]
    searched = trial_of(base_tree(spec), {"method.lam": 0.137, "seed": 1})
    # the searched trial and the baseline differ in the method only: the report pairs them by seed
    assert context_of(identity(searched)) == context_of(identity(expand_trials(base)[1]))

    test = lambda_search.on_test_split(spec, {"method.lam": 0.137})
    assert test.name == "lambda_search_test" and test.data.eval_split == "test"
    pairs = sorted((t.method.lam, t.seed) for t in expand_trials(test))
    assert pairs == [(0.0, 0), (0.0, 1), (0.0, 2), (0.137, 0), (0.137, 1), (0.137, 2)]
    # the test run trains the searched setting itself: only the split it is scored on differs
    again = [t for t in expand_trials(test) if t.method.lam == 0.137 and t.seed == 1][0]
    assert {k: v for k, v in identity(again).items() if k != "data.eval_split"} == \
        {k: v for k, v in identity(searched).items() if k != "data.eval_split"}

    grid = lambda_search.grid_spec(spec)
    assert grid.name == "lambda_search_grid" and grid.data.eval_split == "val"
    assert sorted({t.method.lam for t in expand_trials(grid)}) == [0.0, 0.1, 0.25, 0.5, 1.0]
    assert len(expand_trials(grid)) == 15


def test_the_pick_is_tested_with_every_searched_setting():
    spec = _demo("sweep.search.space={method.lam: {loguniform: [0.02, 2.0]}, method.tau: {choice: [0.2, 0.5]}}")
    pick = lambda_search.picked_settings(spec, {"method.name": "cgc", "method.lam": 0.3, "method.tau": 0.2,
                                                "optim.lr": 0.05})
    assert pick == {"method.lam": 0.3, "method.tau": 0.2}
    test = lambda_search.on_test_split(spec, pick)
    cgc = [t for t in expand_trials(test) if t.method.lam > 0]  # λ = 0: the baseline
    assert {(t.method.lam, t.method.tau) for t in cgc} == {(0.3, 0.2)} and len(expand_trials(test)) == 6


@pytest.mark.parametrize("flags, message", [
    (["--preset", "lambda_ablation_demo"], "needs a spec with sweep.search"),
    (["--set", "sweep.search.space={optim.lr: {loguniform: [0.01, 0.1]}}"], "searches method.* settings only"),
])
def test_specs_it_cannot_run_are_refused_before_ray(capsys, flags, message):
    code = lambda_search.main([*flags, "--storage", "/tmp/unused", "--dry-run"])
    assert code == 2 and message in capsys.readouterr().err


def test_front_table_marks_the_front_and_the_pick():
    from cgc_ray.results.selection import Candidate
    from cgc_ray.results.stats import describe

    a = Candidate({"method.lam": 0.1}, describe([-1.0, -1.0]), describe([5.0, 7.0]))
    b = Candidate({"method.lam": 1.0}, describe([-9.0, -11.0]), describe([4.0, 4.0]))  # beaten by a in both
    text = lambda_search.front_table([a, b], a, 3.0, 2)
    rows = [line for line in text.splitlines() if line.startswith("| 0.1 |") or line.startswith("| 1 |")]
    assert rows[0].startswith("| 0.1 | 2 | -1.00 [-1.00, -1.00] | +6.00 [-6.71, +18.71] | * | ← pick |")
    assert rows[1].startswith("| 1 | 2 | -10.00") and "*" not in rows[1] and "pick" not in rows[1]


@pytest.mark.slow
def test_tiny_search_picks_and_tests_the_pick(ray_session, tmp_path, capsys):
    """Search (2 points, ASHA), baseline, front, pick, test split: every step's rows, paired by seed. ASHA lets the
    first trial to report go on, so at least one point finishes."""
    from cgc_ray.results.table import read_rows

    overrides = [*TINY, "model.weights=null", "optim.epochs=2", "eval_every=1", "data.synthetic.n_val_per_class=4", "sweep.grid.seed=[0]",
                 "sweep.search.num_samples=2", "sweep.search.grace_period=1", "sweep.search.selection.tolerance=100",
                 "sweep.search.selection.min_pairs=1"]
    args = ["--storage", str(tmp_path), "--no-progress", "--no-report"] + [a for o in overrides for a in ("--set", o)]
    assert lambda_search.main(args) == 0
    out = capsys.readouterr().out
    rows = read_rows(str(tmp_path), "lambda_search").to_pylist()
    searched = [r for r in rows if r["method"] == "cgc"]
    assert len(searched) == 2 and sum(r["method"] == "baseline" for r in rows) == 1
    assert {r["status"] for r in searched} <= {"finished", "stopped"}
    assert "← pick" in out and "trial-epochs" in out
    test = read_rows(str(tmp_path), "lambda_search_test").to_pylist()
    picked = {r["lam"] for r in test if r["method"] == "cgc"}
    assert len(picked) == 1 and picked <= {r["lam"] for r in searched if r["status"] == "finished"}
    assert sorted((r["method"], r["seed"]) for r in test) == [("baseline", 0), ("cgc", 0)]
    assert {r["status"] for r in test} == {"finished"} and all(r["epochs"] == 2 for r in test)
    assert f"test: method.lam = {picked.pop():.4g}: Δ top-1" in out


def test_the_demos_pairs_are_found_with_its_pretrained_weights_pinned(tmp_path):
    """The demo fine-tunes `experiment:pretrain_demo`; its rows name the pretraining's trial (the driver pins it),
    so the search's pairs with its baseline must be looked up the same way."""
    from conftest import result_row

    from cgc_ray.config import expand_trials
    from cgc_ray.config.pretrained import pin_pretrained
    from cgc_ray.results.report import load
    from cgc_ray.results.table import write_row

    spec = _demo(f"storage={tmp_path}", "sweep.grid.seed=[0]")
    for lam, top1, ch in [(0.0, 97.0, 49.0), (0.5, 97.5, 62.0)]:
        trial = expand_trials(pin_pretrained(lambda_search.derived(spec, method__lam=lam))[0])[0]
        write_row(str(tmp_path), spec.name, result_row(trial, {"top1": top1, "ch": ch}))
    (found,) = lambda_search._candidates_of(load(str(tmp_path), spec.name), lambda_search.baseline_spec(spec))
    assert found.lam == 0.5 and found.d_top1.mean == 0.5 and found.d_ch.mean == 13.0
