"""The report's numbers for every sweep shape the presets produce, against hand-computed values.

Rows are written with made-up metrics (no training), for the exact trials the
preset's sweep expands to, so these tests also show how many trials each
shape trains: one baseline per seed or episode, whatever λ values cross it.
"""

import json
import math

import pyarrow.parquet as pq
import pytest
from conftest import result_row
from scipy import stats as st

from cgc_ray.config import (
    PRESETS,
    apply_overrides,
    effective_method,
    expand_trials,
    load_spec,
)
from cgc_ray.results import report as rp
from cgc_ray.results.stats import paired_differences, summarize
from cgc_ray.results.summary import SUMMARY_SCHEMA, write_summary
from cgc_ray.results.table import read_rows, write_row
from cgc_ray.storage import Storage


def _write(storage, spec, metric, status=lambda t: "finished"):
    """One row per trial of ``spec``'s sweep; ``metric(trial)`` -> dict of metric values."""
    trials = expand_trials(spec)
    for t in trials:
        s = status(t)
        row = result_row(t, metric(t) if s == "finished" else {}, status=s,
                         error=None if s == "finished" else "loss is nan by step 3",
                         diverged_epoch=1 if s == "diverged" else None, diverged_step=3 if s == "diverged" else None)
        write_row(str(storage), t.name, row)
    return trials


def _half(values):
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, sd, st.t.ppf(0.975, n - 1) * sd / math.sqrt(n)


def _paired(storage, experiment):
    table = read_rows(str(storage), experiment)
    return {(p.method, p.labels.get("method.lam")): p for p in paired_differences(table)}


# ---------------------------------------------------------------- Table 10: the λ ablation


LAM_TOP1 = {0.0: [76.0, 77.0, 78.0], 0.5: [70.0, 73.0, 73.0], 1.0: [64.0, 71.0, 66.0]}  # per seed 0, 1, 2
LAM_CH = {0.0: [35.0, 36.0, 34.0], 0.5: [50.0, 44.0, 52.0], 1.0: [55.0, 50.0, 51.0]}


def _lambda(tmp_path):
    spec = apply_overrides(load_spec(PRESETS["lambda_ablation_demo"]), ["sweep.grid.seed=[0, 1, 2]"])
    return _write(tmp_path, spec, lambda t: {"top1": LAM_TOP1[t.method.lam][t.seed], "ch": LAM_CH[t.method.lam][t.seed]})


def test_lambda_ablation_pairs_every_lambda_with_lambda_0_of_the_same_seed(tmp_path):
    trials = _lambda(tmp_path)
    assert len(trials) == 9 and sum(effective_method(t) == "baseline" for t in trials) == 3
    pairs = _paired(tmp_path, "lambda_ablation")
    assert set(pairs) == {("cgc", 0.5), ("cgc", 1.0)}
    for lam in (0.5, 1.0):
        d = [c - b for c, b in zip(LAM_TOP1[lam], LAM_TOP1[0.0])]
        mean, sd, half = _half(d)
        s = pairs[("cgc", lam)].stats["top1"]
        assert (s.n, s.mean, s.std) == (3, pytest.approx(mean), pytest.approx(sd))
        assert s.ci == pytest.approx((mean - half, mean + half))
    md = rp.report(str(tmp_path), "lambda_ablation", "markdown")
    assert "| metric | λ=0 (baseline) | λ=0.5 | λ=1 |" in md
    assert "| top1 | 77.00±1.00 (3) | 72.00±1.73 (3) | 67.00±3.61 (3) |" in md
    # λ = 0.5: top-1 d = (-6, -4, -5): mean -5, sd 1, half = t(0.975, 2) / sqrt(3) = 2.484; CH d = (15, 8, 18)
    assert "| cgc λ=0.5 − baseline | -5.00 [-7.48, -2.52] (3) | +13.67 [0.92, 26.41] (3) |" in md
    recs = json.loads(rp.report(str(tmp_path), "lambda_ablation", "json"))
    paired = {(r["lam"], r["metric"]): r for r in recs if r["kind"] == "paired"}
    assert paired[(1.0, "top1")]["mean"] == pytest.approx(-10.0) and paired[(1.0, "top1")]["n"] == 3


# ---------------------------------------------------------------- Tables 7/8: few-shot, method × λ


FS_TOP1 = {("baseline", None): [50.0, 52.0, 57.0], ("cgc", 0.4): [52.0, 54.0, 58.0], ("cgc", 0.8): [46.0, 48.0, 55.0]}


def _fewshot(tmp_path):
    spec = apply_overrides(load_spec(PRESETS["fewshot_demo"]), ["sweep.grid.method.lam=[0.4, 0.8]", "sweep.grid.data.shots=[5]",
                                                                "sweep.grid.data.episode=[0, 1, 2]"])

    def top1(t):
        key = ("baseline", None) if t.method.name == "baseline" else ("cgc", t.method.lam)
        return {"top1": FS_TOP1[key][t.data.episode], "ch": 20.0 + t.data.episode}
    return _write(tmp_path, spec, top1)


def test_fewshot_crossing_method_and_lambda(tmp_path):
    trials = _fewshot(tmp_path)
    # the baseline trains once per episode (it ignores λ): 3 + 2 λ x 3 episodes
    assert len(trials) == 9 and sum(t.method.name == "baseline" for t in trials) == 3
    groups = summarize(read_rows(str(tmp_path), "fewshot"))
    base = next(g for g in groups if g.method == "baseline")
    assert base.stats["top1"].n == 3 and base.stats["top1"].mean == pytest.approx(53.0)  # not 6 merged copies
    pairs = _paired(tmp_path, "fewshot")
    assert pairs[("cgc", 0.4)].stats["top1"].mean == pytest.approx(5 / 3)  # d = 2, 2, 1
    assert pairs[("cgc", 0.8)].stats["top1"].mean == pytest.approx(-10 / 3)  # d = -4, -4, -2: not averaged over λ
    md = rp.report(str(tmp_path), "fewshot", "markdown")
    header = next(line for line in md.splitlines() if line.startswith("| dataset"))
    assert header.startswith("| dataset | shots | top1 baseline | top1 cgc λ=0.4 | top1 cgc λ=0.8 | "
                             "top1 Δ cgc λ=0.4−baseline [95% CI] | top1 Δ cgc λ=0.8−baseline [95% CI]")
    row = next(line for line in md.splitlines() if line.startswith("| synthetic"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    mean, sd, half = _half([-4.0, -4.0, -2.0])
    assert cells[2:5] == ["53.00±3.61 (3)", "54.67±3.06 (3)", "49.67±4.73 (3)"]
    assert cells[6] == f"{mean:+.2f} [{mean - half:.2f}, {mean + half:.2f}] (3)"


# ---------------------------------------------------------------- Table 6: fine-grained, seeds


def test_finegrained_seeds_pair_by_seed(tmp_path):
    spec = apply_overrides(load_spec(PRESETS["finegrained_demo"]), ["sweep.grid.seed=[0, 1, 2]"])
    vals = {"baseline": [80.0, 81.0, 79.5], "cgc": [81.5, 81.0, 82.0]}
    trials = _write(tmp_path, spec, lambda t: {"top1": vals[t.method.name][t.seed]})
    assert len(trials) == 6
    (p,) = paired_differences(read_rows(str(tmp_path), "finegrained"))
    mean, sd, half = _half([1.5, 0.0, 2.5])
    assert (p.stats["top1"].mean, p.stats["top1"].n) == (pytest.approx(mean), 3)
    md = rp.report(str(tmp_path), "finegrained", "markdown")
    assert "| baseline | 80.17±0.76 (3) |" in md and "| cgc | 81.50±0.50 (3) |" in md
    assert f"| cgc λ=1 − baseline | {mean:+.2f} [{mean - half:.2f}, {mean + half:.2f}] (3) |" in md


# ---------------------------------------------------------------- Tables 1/5: ImageNet, three methods


def test_imagenet_three_methods_each_against_the_baseline(tmp_path):
    spec = apply_overrides(load_spec(PRESETS["imagenet_demo"]), ["sweep.grid.seed=[0, 1]"])
    vals = {"baseline": [70.0, 71.0], "cgc": [67.0, 69.0], "cgc_no_neg": [68.0, 66.0]}
    trials = _write(tmp_path, spec, lambda t: {"top1": vals[t.method.name][t.seed], "ch": 50.0})
    assert len(trials) == 6
    pairs = _paired(tmp_path, "imagenet")
    assert pairs[("cgc", 1.0)].stats["top1"].mean == pytest.approx(-2.5)
    assert pairs[("cgc_no_neg", 1.0)].stats["top1"].mean == pytest.approx(-3.5)  # at CGC's λ
    assert pairs[("cgc_no_neg", 1.0)].stats["ch"].std == pytest.approx(0.0)


# ---------------------------------------------------------------- Table 9: semi-supervised


def test_semisup_pairs_and_records_the_labelled_share(tmp_path):
    spec = apply_overrides(load_spec(PRESETS["semisup_demo"]), ["sweep.grid.seed=[0, 1, 2]"])
    vals = {"baseline": [54.0, 53.0, 55.0], "cgc": [55.0, 55.5, 55.0]}
    _write(tmp_path, spec, lambda t: {"top1": vals[t.method.name][t.seed], "top5": 80.0})
    rows = read_rows(str(tmp_path), "semisup").to_pylist()
    assert {r["percent"] for r in rows} == {spec.data.percent}
    (p,) = paired_differences(read_rows(str(tmp_path), "semisup"))
    assert p.stats["top1"].mean == pytest.approx(3.5 / 3) and p.stats["top5"].mean == pytest.approx(0.0)  # d = 1, 2.5, 0


# ---------------------------------------------------------------- diverged trials are shown, not dropped


def test_a_diverged_seed_is_counted_beside_n_and_leaves_the_pairs(tmp_path):
    spec = apply_overrides(load_spec(PRESETS["lambda_ablation_demo"]), ["sweep.grid.seed=[0, 1, 2]"])
    _write(tmp_path, spec, lambda t: {"top1": LAM_TOP1[t.method.lam][t.seed]},
           status=lambda t: "diverged" if (t.method.lam, t.seed) == (1.0, 1) else "finished")
    groups = {g.labels.get("method.lam"): g for g in summarize(read_rows(str(tmp_path)))}
    assert (groups[1.0].n_finished, groups[1.0].n_diverged, groups[1.0].stats["top1"].n) == (2, 1, 2)
    p = _paired(tmp_path, "lambda_ablation")[("cgc", 1.0)]
    assert p.stats["top1"].n == 2 and p.unpaired == 1
    md = rp.report(str(tmp_path), "lambda_ablation", "markdown")
    assert "65.00±1.41 (2) +1 diverged" in md and "(1 unpaired)" in md
    (row,) = [r for r in read_rows(str(tmp_path)).to_pylist() if r["status"] == "diverged"]
    assert row["top1"] is None and (row["diverged_epoch"], row["diverged_step"]) == (1, 3)


# ---------------------------------------------------------------- the Arrow summary equals the printed report


def test_summary_parquet_has_the_reports_numbers_and_reads_in_pandas_and_duckdb(tmp_path):
    _fewshot(tmp_path)
    results = rp.load(str(tmp_path), "fewshot")  # computing the report writes nothing; the writer is explicit
    assert not (tmp_path / "_summary").exists()
    written = write_summary(str(tmp_path), "fewshot", results.groups, results.paired)
    assert written == Storage(str(tmp_path)).summary_path("fewshot")
    table = pq.read_table(written)
    assert table.schema.equals(SUMMARY_SCHEMA, check_metadata=False)
    import duckdb
    import pandas as pd

    df = pd.read_parquet(written)
    assert df.equals(table.to_pandas())
    paired = duckdb.sql(f"select lam, mean, ci_low, ci_high, n from '{written}' "
                        "where kind = 'paired' and metric = 'top1' order by lam").fetchall()
    pairs = _paired(tmp_path, "fewshot")
    assert [(lam, n) for lam, *_, n in paired] == [(0.4, 3), (0.8, 3)]
    for lam, mean, lo, hi, _ in paired:
        s = pairs[("cgc", lam)].stats["top1"]
        assert (mean, lo, hi) == pytest.approx((s.mean, *s.ci))
        text = f"{mean:+.2f} [{lo:.2f}, {hi:.2f}] (3)"  # the cell the printed report shows
        assert text in rp.report(str(tmp_path), "fewshot", "markdown")
    groups = duckdb.sql(f"select method, lam, mean, n from '{written}' where kind = 'group' and metric = 'top1' "
                        "order by method, lam").fetchall()
    assert groups == [("baseline", None, pytest.approx(53.0), 3), ("cgc", 0.4, pytest.approx(164 / 3), 3),
                      ("cgc", 0.8, pytest.approx(149 / 3), 3)]
    # the storage folder still reads as the per-trial rows alone: _summary/ is skipped
    assert len(pd.read_parquet(tmp_path)) == 9
