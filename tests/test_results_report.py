"""Parquet results (atomic, replace-not-duplicate, concurrent) and the report's statistics."""

import datetime as dt
import json
import math
import os
import threading

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import result_row

from cgc_ray.cli.main import main as cli_main
from cgc_ray.config import (
    PRESETS,
    apply_overrides,
    expand_trials,
    load_spec,
    trial_id,
)
from cgc_ray.results import report as rp
from cgc_ray.results import stats
from cgc_ray.results.table import (
    FILE_SCHEMA,
    SCHEMA,
    SCHEMA_VERSION,
    completed_trial_ids,
    read_rows,
    row_from_config,
    write_row,
)


def _row(spec, **metrics):
    return result_row(spec, metrics, epochs=spec.optim.epochs, wall_time_s=1.5, node="node-a",
                      finished_at=dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc))


def _write_all(storage, specs_and_metrics):
    for spec, metrics in specs_and_metrics:
        write_row(str(storage), spec.name, _row(spec, **metrics))


# --------------------------------------------------------------------------- results


def test_round_trip_and_plain_pandas(tmp_path):
    spec = apply_overrides(load_spec(PRESETS["fewshot_demo"]), ["sweep.grid={}", "data.episode=7", "seed=3"])
    path = write_row(str(tmp_path), spec.name, _row(spec, top1=61.25, ch=40.5))
    assert path.endswith(f"experiment=fewshot/{trial_id(spec)}.parquet")
    assert pq.read_schema(path).names == FILE_SCHEMA.names  # experiment lives in the directory name
    table = read_rows(str(tmp_path))
    assert table.schema.equals(SCHEMA)
    (row,) = table.to_pylist()
    assert row["experiment"] == "fewshot" and row["schema_version"] == SCHEMA_VERSION
    assert (row["dataset"], row["arch"], row["method"], row["lam"], row["tau"]) == ("synthetic", "resnet_small", "cgc", 0.5, 0.5)
    assert (row["shots"], row["episode"], row["seed"], row["percent"]) == (5, 7, 3, None)
    assert (row["top1"], row["ch"], row["top5"], row["iauc"]) == (61.25, 40.5, None, None)
    assert json.loads(row["config_json"]) == spec.model_dump(mode="json")
    assert row["finished_at"] == dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    df = pd.read_parquet(tmp_path)  # no cgc-ray needed to read results
    assert list(df["experiment"].astype(str)) == ["fewshot"] and df["top1"].iloc[0] == 61.25
    assert read_rows(f"file://{tmp_path}").num_rows == 1


def test_rewrite_replaces_and_leaves_no_temp_files(tmp_path):
    spec = load_spec(PRESETS["imagenet_demo"])
    write_row(str(tmp_path), "e", _row(spec, top1=10.0))
    write_row(str(tmp_path), "e", _row(spec, top1=20.0))
    table = read_rows(str(tmp_path), "e")
    assert table.num_rows == 1 and table["top1"].to_pylist() == [20.0]
    assert os.listdir(tmp_path / "experiment=e") == [f"{trial_id(spec)}.parquet"]
    assert completed_trial_ids(str(tmp_path), "e") == {trial_id(spec)}
    assert completed_trial_ids(str(tmp_path), "other") == set()


def test_bad_rows_are_rejected_before_writing(tmp_path):
    row = _row(load_spec(PRESETS["imagenet_demo"]), top1=1.0)
    with pytest.raises(ValueError, match=r"unknown columns \['acc'\]"):
        write_row(str(tmp_path), "e", {**row, "acc": 1.0})
    with pytest.raises(ValueError, match=r"missing columns \['node'\]"):
        write_row(str(tmp_path), "e", {k: v for k, v in row.items() if k != "node"})
    with pytest.raises(ValueError, match="unknown metric"):
        row_from_config(json.loads(row["config_json"]), {"acc1": 1.0}, trial_id="x", spec_hash="y", epochs=1,
                        wall_time_s=0.0, node="n", code_version="c")
    with pytest.raises(ValueError, match="experiment name .* cannot be a folder or file name"):
        write_row(str(tmp_path), "../x", row)
    assert not (tmp_path / "experiment=e").exists() or os.listdir(tmp_path / "experiment=e") == []


def test_concurrent_writers_never_clobber(tmp_path):
    """Threads write distinct trials and all race on one shared trial id."""
    base = load_spec(PRESETS["imagenet_demo"])
    specs = [apply_overrides(base, ["sweep.grid={}", f"seed={i}"]) for i in range(24)]
    shared = apply_overrides(base, ["sweep.grid={}", "seed=999"])
    errors = []

    def worker(k):
        try:
            for s in specs[k::6]:
                write_row(str(tmp_path), "race", _row(s, top1=float(s.seed)))
                write_row(str(tmp_path), "race", _row(shared, top1=float(k)))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    table = read_rows(str(tmp_path), "race")
    assert table.num_rows == 25
    assert sorted(table["trial_id"].to_pylist()) == sorted({trial_id(s) for s in specs} | {trial_id(shared)})
    by_id = dict(zip(table["trial_id"].to_pylist(), table["top1"].to_pylist()))
    assert all(by_id[trial_id(s)] == float(s.seed) for s in specs)
    assert by_id[trial_id(shared)] in {float(k) for k in range(6)}
    assert all(not n.startswith(".") for n in os.listdir(tmp_path / "experiment=race"))


def test_missing_storage_reads_empty(tmp_path):
    table = read_rows(str(tmp_path / "nothing"))
    assert table.num_rows == 0 and table.schema.equals(SCHEMA)


# --------------------------------------------------------------------------- statistics


def test_t_quantile_is_scipys():
    from scipy import stats as st

    for df in (1, 2, 5, 30, 31, 100, 1000):
        assert stats.t_quantile(df) == st.t.ppf(0.975, df)
    assert stats.t_quantile(2) == pytest.approx(4.302653, abs=1e-6)  # the table value
    with pytest.raises(ValueError):
        stats.t_quantile(0)


def test_describe_hand_values():
    s = stats.describe([50.0, 52.0, 57.0])
    assert s.mean == pytest.approx(53.0) and s.std == pytest.approx(math.sqrt(13.0)) and s.n == 3
    half = 4.302653 * math.sqrt(13.0) / math.sqrt(3)
    assert s.ci == pytest.approx((53.0 - half, 53.0 + half), abs=1e-5)
    one = stats.describe([4.0])
    assert (one.mean, one.std, one.n, one.ci) == (4.0, None, 1, None)


def _fewshot_results(tmp_path):
    """Baseline top1 per episode 50, 52, 57; CGC 53, 52, 61 -> paired d = 3, 0, 4."""
    base = apply_overrides(load_spec(PRESETS["fewshot_demo"]), ["sweep.grid.data.shots=[5]", "sweep.grid.data.episode=[0, 1, 2]"])
    trials = expand_trials(base)
    assert len(trials) == 6
    values = {("baseline", 0): 50.0, ("baseline", 1): 52.0, ("baseline", 2): 57.0,
              ("cgc", 0): 53.0, ("cgc", 1): 52.0, ("cgc", 2): 61.0}
    _write_all(tmp_path, [(t, {"top1": values[(t.method.name, t.data.episode)], "ch": 40.0 + t.data.episode})
                          for t in trials])


def test_paired_difference_hand_computed(tmp_path):
    _fewshot_results(tmp_path)
    table = read_rows(str(tmp_path))
    groups = {g.labels["method.name"]: g for g in stats.summarize(table)}
    assert set(groups) == {"baseline", "cgc"}
    assert groups["baseline"].stats["top1"].mean == pytest.approx(53.0)
    assert groups["baseline"].stats["top1"].std == pytest.approx(math.sqrt(13.0))
    assert groups["cgc"].stats["top1"].mean == pytest.approx(166 / 3)
    (p,) = stats.paired_differences(table)
    d = p.stats["top1"]
    mean, sd = 7 / 3, math.sqrt(13 / 3)  # d = (3, 0, 4)
    half = 4.302653 * sd / math.sqrt(3)
    assert (p.method, d.n, p.unpaired) == ("cgc", 3, 0)
    assert d.mean == pytest.approx(mean) and d.std == pytest.approx(sd)
    assert d.ci == pytest.approx((mean - half, mean + half), abs=1e-5)
    from scipy import stats as st

    assert d.ci == pytest.approx(st.t.interval(0.95, 2, loc=mean, scale=sd / math.sqrt(3)), abs=1e-5)
    assert p.stats["ch"].mean == pytest.approx(0.0) and p.stats["ch"].std == pytest.approx(0.0)


def test_fewshot_layout_and_formats(tmp_path):
    _fewshot_results(tmp_path)
    md = rp.report(str(tmp_path), "fewshot", "markdown")
    header = next(line for line in md.splitlines() if line.startswith("| dataset"))
    assert header.startswith("| dataset | shots | top1 baseline | top1 cgc | top1 Δ cgc−baseline [95% CI]")
    row = next(line for line in md.splitlines() if line.startswith("| synthetic"))
    assert "| 5 | 53.00±3.61 (3) | 55.33±" in row and "+2.33 [-2.84, 7.50] (3)" in row
    recs = json.loads(rp.report(str(tmp_path), None, "json"))
    paired = [r for r in recs if r["kind"] == "paired" and r["metric"] == "top1"]
    assert len(paired) == 1 and paired[0]["mean"] == pytest.approx(7 / 3) and paired[0]["n"] == 3
    assert paired[0]["method"] == "cgc" and paired[0]["ci_low"] == pytest.approx(7 / 3 - 4.302653 * math.sqrt(13 / 3)
                                                                                   / math.sqrt(3), abs=1e-5)
    csv_text = rp.report(str(tmp_path), None, "csv")
    assert csv_text.splitlines()[0].startswith("schema_version,experiment,kind,method,")
    assert len(csv_text.splitlines()) == 1 + len(recs)
    rich_text = rp.report(str(tmp_path), None, "rich", width=250)
    assert "55.33±" in rich_text and "+2.33 [-2.84, 7.50] (3)" in rich_text


def test_lambda_layout(tmp_path):
    spec = apply_overrides(load_spec(PRESETS["lambda_ablation_demo"]),
                           ["sweep.grid.method.lam=[0.0, 0.1, 1.0]", "sweep.grid.seed=[0, 1]"])
    trials = expand_trials(spec)
    assert len(trials) == 6
    _write_all(tmp_path, [(t, {"top1": 60 + 10 * t.method.lam + t.seed, "ch": 50 - t.method.lam}) for t in trials])
    md = rp.report(str(tmp_path), "lambda_ablation", "markdown")
    lines = md.splitlines()
    assert "| metric | λ=0 (baseline) | λ=0.1 | λ=1 |" in lines
    assert "| top1 | 60.50±0.71 (2) | 61.50±0.71 (2) | 70.50±0.71 (2) |" in lines
    assert "| ch | 50.00±0.00 (2) | 49.90±0.00 (2) | 49.00±0.00 (2) |" in lines
    assert "| cgc λ=1 − baseline | +10.00 [10.00, 10.00] (2) | -1.00 [-1.00, -1.00] (2) |" in lines


def test_baselines_of_different_lambda_presets_are_one_trial(tmp_path):
    """A baseline ignores λ (and τ, T, ...): the same trial id whatever the preset's CGC settings."""
    spec = load_spec(PRESETS["imagenet_demo"])
    base = apply_overrides(spec, ["sweep.grid={}", "method.name=baseline"])
    other = apply_overrides(base, ["method.lam=0.5", "method.tau=0.1", "method.crop_scale=[0.5, 1.0]"])
    assert trial_id(base) == trial_id(other)
    assert trial_id(apply_overrides(base, ["method.name=cgc", "method.lam=0"])) == trial_id(base)  # λ = 0: CE only
    assert trial_id(apply_overrides(base, ["method.name=cgc"])) != trial_id(base)
    trials = expand_trials(spec)
    metrics = {"baseline": 70.0, "cgc": 68.0, "cgc_no_neg": 66.0}
    _write_all(tmp_path, [(t, {"top1": metrics[t.method.name]}) for t in trials])
    md = rp.report(str(tmp_path), fmt="markdown")
    # the no-negatives ablation differs from CGC in its l2's scale, so the table names it
    assert "| method | no_neg_scale | top1 | trials |" in md and "| cgc | – | 68.00 (1) | 1 |" in md
    assert "| baseline | – | 70.00 (1) | 1 |" in md and "| cgc_no_neg | sum | 66.00 (1) | 1 |" in md
    assert "| cgc λ=1 − baseline | – | -2.00 (1) |" in md


def test_cli_report(tmp_path, capsys):
    assert cli_main(["report", "--storage", str(tmp_path), "--format", "markdown"]) == 0
    assert "no finished trials" in capsys.readouterr().out
    _fewshot_results(tmp_path)
    assert cli_main(["report", "--storage", str(tmp_path), "--experiment", "fewshot", "--format", "csv"]) == 0
    assert ",paired,cgc," in capsys.readouterr().out


def test_configurations_that_differ_beyond_lambda_have_their_own_labelled_columns(tmp_path):
    """Few-shot and λ tables: CGC configurations that differ in forward/view get distinct, named columns."""
    spec = apply_overrides(load_spec(PRESETS["fewshot_demo"]), [
        "sweep.grid.data.shots=[5]", "sweep.grid.data.episode=[0, 1]",
        "sweep.variants=[{}, {method.forward: separate}]"])
    trials = expand_trials(spec)
    assert len(trials) == 6  # one baseline per episode, two CGC configurations
    _write_all(tmp_path, [(t, {"top1": 50.0 + (t.method.name == "cgc") * (1 + 10 * (t.method.forward == "separate"))
                               + t.data.episode}) for t in trials])
    md = rp.report(str(tmp_path), "fewshot", "markdown")
    header = next(line for line in md.splitlines() if line.startswith("| dataset"))
    assert ("| top1 baseline | top1 cgc λ=0.5 forward=joint | top1 cgc λ=0.5 forward=separate "
            "| top1 Δ cgc λ=0.5 forward=joint−baseline [95% CI] | top1 Δ cgc λ=0.5 forward=separate−baseline") in header
    row = next(line for line in md.splitlines() if line.startswith("| synthetic"))
    assert "| 50.50±0.71 (2) | 51.50±0.71 (2) | 61.50±0.71 (2) | +1.00 [1.00, 1.00] (2) | +11.00 [11.00, 11.00] (2) |" in row

    lam = apply_overrides(load_spec(PRESETS["lambda_ablation_demo"]), [
        "sweep.grid.method.lam=[0.0, 0.5]", "sweep.grid.seed=[0, 1]", "sweep.variants=[{}, {method.view: center}]"])
    ltrials = expand_trials(lam)
    storage = tmp_path / "lam"
    _write_all(storage, [(t, {"top1": 60.0 + t.seed + (t.method.lam > 0) * (2 + 3 * (t.method.view == "center"))})
                         for t in ltrials])
    lines = rp.report(str(storage), "lambda_ablation", "markdown").splitlines()
    assert "| metric | λ=0 (baseline) | λ=0.5 view=center | λ=0.5 view=train |" in lines
    assert "| top1 | 60.50±0.71 (2) | 65.50±0.71 (2) | 62.50±0.71 (2) |" in lines
    assert "| cgc λ=0.5 − baseline | center | +5.00 [5.00, 5.00] (2) |" in lines
    assert "| cgc λ=0.5 − baseline | train | +2.00 [2.00, 2.00] (2) |" in lines


def test_rich_tables_are_never_cut(tmp_path):
    """Piped (no terminal): the table's own width, every cell whole; a narrow --width folds cells, no '…'."""
    _fewshot_results(tmp_path)
    piped = rp.report(str(tmp_path), "fewshot", "rich")
    assert "53.00±3.61 (3)" in piped and "+2.33 [-2.84, 7.50] (3)" in piped and "…" not in piped
    narrow = rp.report(str(tmp_path), "fewshot", "rich", width=70)
    assert "…" not in narrow and max(len(line) for line in narrow.splitlines()) <= 70
