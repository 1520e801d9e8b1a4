"""Upgrades keep results: a field added at its legacy value keeps every trial id, and a replicate counts once."""

import datetime as dt
from typing import Literal

import pytest
from conftest import result_row
from pydantic import Field

from cgc_ray.config import PRESETS, ExperimentSpec, MethodSpec, apply_overrides, expand_trials, load_spec, trial_id
from cgc_ray.config.base import SpecError
from cgc_ray.config.identity import identity, legacy_values, with_legacy_values
from cgc_ray.config.section import Section
from cgc_ray.results import report as rp
from cgc_ray.results.table import write_row

# Ids of the lambda_ablation_demo preset's trials (λ 0, 0.5, 1 × seeds 0, 1) and of the default spec, as the code
# computed them before the legacy rule existed: the rule must not move a single existing id.
DEMO_IDS = ["be6360578953", "7cee7437e39e", "fd45521d57cf", "12263f5e1ce2", "c1026808f846", "2dcf2e1f8df3"]
DEFAULT_ID = "a98229524804"


# The next version of the spec, as a helper would write it: a CGC option added after ids existed, a top-level
# field, and a new section; each declares the value that reproduces the code before it existed.
class MethodV2(MethodSpec):
    view_jitter: float = Field(0.0, ge=0, json_schema_extra={"legacy": 0.0})
    pool: Literal["avg", "max"] = Field("max", json_schema_extra={"legacy": "avg"})  # a new default


class ProbeSpec(Section):
    every: int = Field(0, ge=0, json_schema_extra={"legacy": 0})


class SpecV2(ExperimentSpec):
    method: MethodV2 = MethodV2(pool="avg")
    probe: ProbeSpec = ProbeSpec()
    label_smoothing: float = Field(0.0, ge=0, json_schema_extra={"legacy": 0.0})


def _demo():
    return expand_trials(load_spec(PRESETS["lambda_ablation_demo"]))


CGC = 2  # the demo's trial at λ 0.5, seed 0


def _v2(trial, **method):
    tree = trial.model_dump(mode="json")
    tree["method"] = {**tree["method"], "pool": "avg", **method}
    return SpecV2.model_validate(tree)


def test_existing_ids_are_pinned():
    assert [trial_id(t) for t in _demo()] == DEMO_IDS
    assert trial_id(ExperimentSpec()) == DEFAULT_ID


def test_fields_added_at_their_legacy_value_keep_every_id():
    assert [trial_id(_v2(t)) for t in _demo()] == DEMO_IDS
    assert trial_id(SpecV2()) == DEFAULT_ID
    assert identity(_v2(_demo()[CGC])) == identity(_demo()[CGC])


def test_a_field_away_from_its_legacy_value_is_a_new_trial():
    trial = _demo()[CGC]
    assert trial_id(_v2(trial, view_jitter=0.1)) != trial_id(trial)
    assert identity(_v2(trial, view_jitter=0.1))["method.view_jitter"] == 0.1
    assert identity(_v2(trial, pool="max"))["method.pool"] == "max"
    tree = _v2(trial).model_dump(mode="json")
    tree["probe"] = {"every": 5}
    assert identity(SpecV2.model_validate(tree))["probe.every"] == 5
    # a baseline ignores every CGC setting, the new one too (CGC_ONLY_FIELDS is every method field but name)
    base = [t for t in _demo() if t.method.lam == 0][0]
    assert trial_id(_v2(base, pool="max")) == trial_id(base)


def test_an_undeclared_field_would_move_every_id():
    """The failure the rule prevents: a field without a legacy value changes every id."""

    class Plain(MethodSpec):
        view_jitter: float = 0.0

    class Spec(ExperimentSpec):
        method: Plain = Plain()

    tree = _demo()[CGC].model_dump(mode="json")
    assert trial_id(Spec.model_validate(tree)) != DEMO_IDS[CGC]


def test_a_stored_config_lacking_a_field_means_its_legacy_value():
    """A row written before ``pool`` existed ran with avg pooling, though the default is now max."""
    old = _demo()[CGC].model_dump(mode="json")
    filled = with_legacy_values(old, SpecV2)
    assert filled["method"]["pool"] == "avg" and filled["label_smoothing"] == 0.0
    assert filled["probe"] == {"every": 0} and old["method"].get("pool") is None  # the input is not changed
    assert trial_id(SpecV2.model_validate(filled)) == DEMO_IDS[CGC]
    assert trial_id(SpecV2.model_validate(old)) != DEMO_IDS[CGC]  # read with the new default: another trial
    assert with_legacy_values(old) == old  # today's spec declares no legacy value


def test_a_legacy_value_the_field_cannot_hold_is_refused():
    class Bad(Section):
        lam: float = Field(0.0, ge=0, json_schema_extra={"legacy": -1.0})

    with pytest.raises(SpecError, match=r"Bad\.lam declares legacy=-1\.0, which the field cannot hold"):
        legacy_values(Bad)


# --------------------------------------------------------------------------- the report counts a replicate once


def test_two_rows_of_one_replicate_count_once_the_newest(tmp_path):
    """An old row (another trial id, e.g. written before an upgrade) and its rerun: n and the mean use the rerun."""
    spec = apply_overrides(load_spec(PRESETS["lambda_ablation_demo"]), [
        f"storage={tmp_path}", "sweep.grid={method.lam: [0.0, 0.5], seed: [0, 1]}"])
    day = dt.datetime(2024, 1, 2, tzinfo=dt.timezone.utc)
    for t in expand_trials(spec):
        top1 = 50.0 + 10 * t.method.lam + t.seed
        write_row(str(tmp_path), t.name, result_row(t, {"top1": top1}, finished_at=day))
    rerun = [t for t in expand_trials(spec) if t.method.lam == 0.5 and t.seed == 0][0]
    stale = result_row(rerun, {"top1": 99.0}, trial_id="0123456789ab", finished_at=day - dt.timedelta(days=1))
    write_row(str(tmp_path), rerun.name, stale)

    results = rp.load(str(tmp_path))
    (cgc,) = [g for g in results.groups if g.method == "cgc"]
    (pair,) = results.paired
    assert cgc.n_finished == 2 and cgc.stats["top1"].n == 2 == pair.stats["top1"].n
    assert cgc.stats["top1"].mean == pytest.approx((55.0 + 56.0) / 2)  # the stale 99 is not in it
    assert pair.stats["top1"].mean == pytest.approx(5.0) and pair.unpaired == 0
