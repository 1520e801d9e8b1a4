"""The selection rule of a search (results/selection.py): exact picks, the Pareto front, the cost in trial-epochs."""

import pytest

from cgc_ray.config.selection import SelectionSpec
from cgc_ray.results.selection import Candidate, candidates, pareto, trial_epochs
from cgc_ray.results.selection import select as _select
from cgc_ray.results.stats import Paired, describe


def select(cands, *, tolerance, min_pairs=1, rule="max_ch_within_top1"):
    return _select(cands, rule=rule, tolerance=tolerance, min_pairs=min_pairs)


def _cand(lam, d_top1, d_ch):
    """A candidate from per-seed paired differences (lists), so n and the means are exact."""
    return Candidate({"method.name": "cgc", "method.lam": lam}, describe(d_top1), describe(d_ch))


# λ: paired Δ top-1 per seed, Δ CH per seed (means: 0.05 -> -0.5/+4, 0.2 -> -1.5/+12, 0.5 -> -4/+20, 1 -> -9/+18)
CANDS = [
    _cand(0.05, [0.0, -1.0], [3.0, 5.0]),
    _cand(0.2, [-1.0, -2.0], [10.0, 14.0]),
    _cand(0.5, [-3.0, -5.0], [18.0, 22.0]),
    _cand(1.0, [-8.0, -10.0], [17.0, 19.0]),
]


@pytest.mark.parametrize("tolerance, lam", [
    (0.0, None),    # every λ costs top-1: keep the baseline
    (0.5, 0.05),
    (1.49, 0.05),   # λ 0.2 costs 1.5: just outside
    (1.5, 0.2),     # the bound is inclusive
    (4.0, 0.5),
    (100.0, 0.5),   # λ 1 costs most and gains less CH than 0.5: never the pick
])
def test_largest_ch_gain_within_tolerance(tolerance, lam):
    got = select(CANDS, tolerance=tolerance)
    assert (got.lam if got else None) == lam


def test_a_gain_in_top1_is_within_any_tolerance_and_too_few_pairs_do_not_count():
    up = _cand(0.3, [2.0, 4.0], [30.0, 30.0])
    assert select([*CANDS, up], tolerance=0.0).lam == 0.3
    lone = _cand(0.4, [0.0], [40.0])  # one seed finished (the others stopped by ASHA)
    assert select([*CANDS, lone], tolerance=1.0).lam == 0.4
    assert select([*CANDS, lone], tolerance=1.0, min_pairs=2).lam == 0.05


def test_ties_go_to_the_larger_top1_then_the_smaller_lambda():
    a, b, c = _cand(0.5, [-1.0, -1.0], [10.0, 10.0]), _cand(0.3, [0.0, 0.0], [10.0, 10.0]), \
        _cand(0.2, [0.0, 0.0], [10.0, 10.0])
    assert select([a, b, c], tolerance=2.0).lam == 0.2
    assert select([a, b], tolerance=2.0).lam == 0.3


def test_an_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="max_ch_within_top1"):
        select(CANDS, tolerance=1.0, rule="best_top1")


def test_the_spec_default_is_the_stated_rule():
    s = SelectionSpec()
    assert (s.rule, s.tolerance, s.min_pairs) == ("max_ch_within_top1", 1.0, 2)
    assert select(CANDS, tolerance=s.tolerance, min_pairs=s.min_pairs).lam == 0.05


def test_pareto_front_of_mean_top1_and_ch():
    assert [c.lam for c in pareto(CANDS)] == [0.5, 0.2, 0.05]  # λ 1 is beaten by 0.5 in both
    same = _cand(0.6, [-3.0, -5.0], [18.0, 22.0])  # equal to λ 0.5 in both: the first is kept
    assert [c.lam for c in pareto([*CANDS, same])] == [0.5, 0.2, 0.05]


def test_candidates_need_both_metrics_and_sort_by_lambda():
    def paired(lam, stats):
        return Paired("e", {"method.name": "cgc", "method.lam": lam}, {"method.name": "baseline"}, stats)

    both = {"top1": describe([-1.0, -3.0]), "ch": describe([5.0, 7.0])}
    got = candidates([paired(0.5, both), paired(0.1, both), paired(0.3, {"top1": describe([1.0])})])
    assert [(c.lam, c.d_top1.mean, c.d_ch.mean, c.n) for c in got] == [(0.1, -2.0, 6.0, 2), (0.5, -2.0, 6.0, 2)]


def test_trial_epochs_count_what_trained():
    rows = [{"status": "finished", "epochs": 20}, {"status": "stopped", "epochs": 5},
            {"status": "diverged", "epochs": 3}, {"status": "failed", "epochs": 0},
            {"status": None, "epochs": 20}]  # no status: a schema-v1 finished row
    assert trial_epochs(rows) == 48
