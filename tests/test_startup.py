"""Start-up at scale (benchmarks/startup.py times it): "is it done" reads footers, the report reads few configs."""

import datetime as dt
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import result_row

from cgc_ray.config import PRESETS, REPLICATE_FIELDS, apply_overrides, expand_trials, load_spec, trial_id
from cgc_ray.config.identity import group_key, identity
from cgc_ray.results import report as rp
from cgc_ray.results import table as tb
from cgc_ray.results.table import FILE_SCHEMA, PATH_COLUMN, read_rows, trial_status, write_row

LAMS, SEEDS = [0.0, 0.5, 1.0], [0, 1, 2, 3]


def _sweep(storage):
    spec = apply_overrides(load_spec(PRESETS["lambda_ablation_demo"]), [
        f"storage={storage}", f"sweep.grid={{method.lam: {LAMS}, seed: {SEEDS}}}"])
    return expand_trials(spec)


def _top1(t):
    return 50.0 + 10 * t.method.lam + t.seed


def _write(storage, trials, **fields):
    for t in trials:
        write_row(str(storage), t.name, result_row(t, {"top1": _top1(t)}, **fields))


def _old_row(storage, trial, top1):
    """A row as schema version 2 wrote it: no group_key column, no trial id in the footer."""
    row = {**result_row(trial, {"top1": top1}), "schema_version": 2}
    del row["group_key"]
    schema = FILE_SCHEMA.remove(FILE_SCHEMA.get_field_index("group_key")).with_metadata(None)
    path = tb.Storage(str(storage)).row_path(trial.name, row["trial_id"])
    pq.write_table(pa.Table.from_pylist([row], schema=schema), path)
    return path


def _no_decoding(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a column was decoded")

    monkeypatch.setattr(pq, "read_table", refuse)
    monkeypatch.setattr(pq.ParquetFile, "read", refuse)


# --------------------------------------------------------------------------- is it done


def test_trial_status_decodes_no_column(tmp_path, monkeypatch):
    trials = _sweep(tmp_path)
    _write(tmp_path, trials[:3])
    write_row(str(tmp_path), trials[3].name, result_row(trials[3], {}, status="failed", error="boom"))
    _old_row(tmp_path, trials[4], 1.0)
    _no_decoding(monkeypatch)
    assert trial_status(str(tmp_path), "lambda_ablation") == {
        **{trial_id(t): "finished" for t in [*trials[:3], trials[4]]}, trial_id(trials[3]): "failed"}


def test_rows_an_older_version_wrote_are_still_read(tmp_path):
    trials = _sweep(tmp_path)
    _write(tmp_path, trials[1:])
    _old_row(tmp_path, trials[0], _top1(trials[0]))
    assert trial_status(str(tmp_path), "lambda_ablation") == {trial_id(t): "finished" for t in trials}
    results = rp.load(str(tmp_path))  # the old row joins its group, found from its config
    assert [g.n_finished for g in results.groups] == [4, 4, 4] and not results.left_out
    (base,) = [g for g in results.groups if g.method == "baseline"]
    assert base.stats["top1"].mean == pytest.approx(51.5)


# --------------------------------------------------------------------------- the report


def test_the_report_reads_one_config_per_group_and_lambda(tmp_path, monkeypatch):
    trials = _sweep(tmp_path)
    _write(tmp_path, trials)
    read = []

    def counting(*args, **kwargs):
        table = read_rows(*args, **kwargs)
        if "config_json" in table.column_names:
            read.append(table.num_rows)
        return table

    monkeypatch.setattr(rp, "read_rows", counting)
    results = rp.load(str(tmp_path))
    assert sum(read) == len(LAMS)  # of 12 rows
    assert sum(c is not None for c in results.table["config_json"].to_pylist()) == len(LAMS)
    assert [(g.labels["method.lam"] if g.method != "baseline" else 0.0, g.stats["top1"].n) for g in
            sorted(results.groups, key=lambda g: g.labels.get("method.lam", 0))] == [(0.0, 4), (0.5, 4), (1.0, 4)]
    assert results.layouts == {"lambda_ablation": "lambda"}
    assert [p.stats["top1"].mean for p in sorted(results.paired, key=lambda p: p.labels["method.lam"])] == \
        pytest.approx([5.0, 10.0])
    from cgc_ray.results.plots import plot_results  # the CLI's --plot analyses Results.table again

    assert [p.name for p in plot_results(results.table, tmp_path / "plots")] == ["lambda_ablation.png"]


def test_a_group_key_written_under_other_rules_is_not_trusted(tmp_path):
    """Rows whose stored key no longer matches their config (an older version's rules) are grouped from it."""
    trials = _sweep(tmp_path)
    for t in trials:
        stale = t.method.lam == 1.0 and t.seed < 2
        row = result_row(t, {"top1": _top1(t)})
        write_row(str(tmp_path), t.name, {**row, "group_key": "0123456789ab"} if stale else row)
    results = rp.load(str(tmp_path))
    assert sorted(g.stats["top1"].n for g in results.groups) == [4, 4, 4]


def test_group_key_is_the_digest_of_the_group_labels(tmp_path):
    t = _sweep(tmp_path)[7]
    row = result_row(t, {"top1": 1.0})
    labels = {k: v for k, v in identity(t).items() if k not in REPLICATE_FIELDS}
    assert row["group_key"] == group_key(identity(t)) == group_key(labels)
    assert set(tb.REPLICATE_COLUMNS) == REPLICATE_FIELDS
    assert (row["seed"], row["episode"]) == (t.seed, t.data.episode)  # the columns the report pairs by


# --------------------------------------------------------------------------- read_rows


def test_read_rows_takes_each_row_off_its_footer_and_decodes_only_where_it_cannot(tmp_path, monkeypatch):
    """Every value equals what decoding the file gives; only files whose footer cannot tell are decoded."""
    trials = _sweep(tmp_path)
    _write(tmp_path, trials[:6])
    write_row(str(tmp_path), trials[6].name, result_row(trials[6], {}, status="diverged", diverged_epoch=2))
    _old_row(tmp_path, trials[7], 61.5)
    storage = tb.Storage(str(tmp_path))
    nan = {**result_row(trials[8], {"top1": 1.0}), "top1": float("nan"), "schema_version": 3}  # no statistics
    pq.write_table(pa.Table.from_pylist([nan], schema=FILE_SCHEMA), storage.row_path(trials[8].name, nan["trial_id"]))
    plain = {**result_row(trials[9], {"top1": 2.0, "ch": 3.0}), "schema_version": 3}  # another writer's file
    pq.write_table(pa.Table.from_pylist([plain], schema=FILE_SCHEMA),
                   storage.row_path(trials[9].name, plain["trial_id"]), write_statistics=False)
    decoded = []
    real = tb._decode
    monkeypatch.setattr(tb, "_decode", lambda st, files, *a: decoded.extend(files) or real(st, files, *a))

    table = read_rows(str(tmp_path), columns=[PATH_COLUMN, *tb.SCHEMA.names])
    assert sorted(p.rsplit("/", 1)[1] for p in decoded) == sorted(f"{trial_id(t)}.parquet" for t in trials[8:10])
    by_id = {row["trial_id"]: row for row in table.to_pylist()}
    assert len(by_id) == 10
    for path in table[PATH_COLUMN].to_pylist():  # the reference: the file decoded whole
        (want,) = pq.read_table(path).to_pylist()
        got = by_id[want["trial_id"]]
        for column, value in want.items():
            assert got[column] == value or (value != value and got[column] != got[column]), (column, value)
        assert got["experiment"] == "lambda_ablation" and got.get("group_key") == want.get("group_key")
    assert by_id[trial_id(trials[7])]["group_key"] is None and by_id[trial_id(trials[6])]["status"] == "diverged"


def test_read_rows_reads_the_columns_and_files_asked_for(tmp_path, monkeypatch):
    monkeypatch.setattr(tb, "_CHUNK_FILES", 5)  # several chunks, one of them holding a bad file
    trials = _sweep(tmp_path)
    _write(tmp_path, trials, finished_at=dt.datetime(2024, 1, 2, tzinfo=dt.timezone.utc))
    bad = tmp_path / "experiment=lambda_ablation" / "0badf11e0000.parquet"
    bad.write_bytes(b"PAR1 not parquet")
    left_out = []
    table = read_rows(str(tmp_path), "lambda_ablation", columns=["trial_id", PATH_COLUMN, "top1"], left_out=left_out)
    assert table.column_names == ["trial_id", PATH_COLUMN, "top1"]
    assert sorted(table["trial_id"].to_pylist()) == sorted(trial_id(t) for t in trials)
    assert {p.rsplit("/", 1)[1] for p in table[PATH_COLUMN].to_pylist()} == {f"{trial_id(t)}.parquet" for t in trials}
    assert len(left_out) == 1 and left_out[0].startswith(f"{bad}: not a readable Parquet file")
    some = table[PATH_COLUMN].to_pylist()[:2]
    picked = read_rows(str(tmp_path), columns=["experiment", "config_json"], files=some)
    assert picked["experiment"].to_pylist() == ["lambda_ablation"] * 2
    assert [json.loads(c)["seed"] for c in picked["config_json"].to_pylist()] == \
        [json.loads(c)["seed"] for c in read_rows(str(tmp_path), files=some)["config_json"].to_pylist()]
    with pytest.raises(ValueError, match=r"unknown result column\(s\) \['acc'\]"):
        read_rows(str(tmp_path), columns=["acc"])
    assert read_rows(str(tmp_path / "nowhere"), columns=["top1"]).column_names == ["top1"]
