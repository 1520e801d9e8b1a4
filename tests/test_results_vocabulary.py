"""One vocabulary for results: layouts from what the trials are (never the experiment's name), a report that
writes nothing, and `cgc-ray report` errors: a missing or file storage exits 2 in one line, an odd row file is
named in one line and the rest is reported."""

import json
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import result_row

from cgc_ray.cli.main import main as cli_main
from cgc_ray.config import CGC_ONLY_FIELDS, PRESETS, apply_overrides, expand_trials, load_spec
from cgc_ray.results import report as rp
from cgc_ray.results.labels import config_label, field_name, layout_of
from cgc_ray.results.stats import cgc_settings_that_differ
from cgc_ray.results.table import FILE_SCHEMA, write_row
from cgc_ray.storage import Storage


def _write(storage, spec, metric):
    trials = expand_trials(spec)
    for t in trials:
        write_row(str(storage), t.name, result_row(t, metric(t)))
    return trials


def _lambda_with_views(name: str):
    """λ ∈ {0, 0.5} × view variants × 2 seeds: its CGC configurations differ in view, not λ, so only the λ axis of
    the sweep (a CGC trial at λ = 0 beside one at 0.5) says it is the λ ablation."""
    return apply_overrides(load_spec(PRESETS["lambda_ablation_demo"]), [
        f"name={name}", "sweep.grid.method.lam=[0.0, 0.5]", "sweep.grid.seed=[0, 1]",
        "sweep.variants=[{}, {method.view: center}]"])


def _top1(t):
    return {"top1": 60.0 + t.seed + (t.method.lam > 0) * (2 + 3 * (t.method.view == "center"))}


# ---------------------------------------------------------------- layouts from the trials, not the name


def test_renaming_an_experiment_keeps_its_layout(tmp_path):
    for name in ("lambda_ablation", "my_sweep"):
        _write(tmp_path, _lambda_with_views(name), _top1)
    fewshot = apply_overrides(load_spec(PRESETS["fewshot_demo"]), [
        "name=episodes", "sweep.grid.data.shots=[5]", "sweep.grid.data.episode=[0, 1]"])
    _write(tmp_path, fewshot, lambda t: {"top1": 50.0 + t.data.episode})
    # a methods comparison whose name starts with "lambda" (the old rule made it a λ table)
    methods = apply_overrides(load_spec(PRESETS["imagenet_demo"]), ["name=lambda_imagenet"])
    _write(tmp_path, methods, lambda t: {"top1": {"baseline": 70.0, "cgc": 68.0, "cgc_no_neg": 66.0}[t.method.name]})

    results = rp.load(str(tmp_path))
    assert results.layouts == {"lambda_ablation": "lambda", "my_sweep": "lambda", "episodes": "fewshot",
                               "lambda_imagenet": "methods"}
    original = rp.report(str(tmp_path), "lambda_ablation", "markdown")
    renamed = rp.report(str(tmp_path), "my_sweep", "markdown")
    assert "| metric | λ=0 (baseline) | λ=0.5 view=center | λ=0.5 view=train |" in renamed.splitlines()
    assert renamed == original.replace("lambda_ablation", "my_sweep")
    assert "| dataset | shots | top1 baseline | top1 cgc |" in rp.report(str(tmp_path), "episodes", "markdown")
    md = rp.report(str(tmp_path), "lambda_imagenet", "markdown").splitlines()
    # without negatives differs from CGC in its l2's scale (at CGC's λ), which the table names
    assert "| method | no_neg_scale | top1 | trials |" in md and "| cgc_no_neg | sum | 66.00 (1) | 1 |" in md


def test_layout_of_reads_the_sweep_axes_off_the_trials():
    base = load_spec(PRESETS["imagenet_demo"]).model_dump(mode="json")

    def trial(**over):
        tree = json.loads(json.dumps(base))
        for path, value in over.items():
            section, _, leaf = path.partition("__")
            tree[section][leaf] = value
        return tree

    # λ alone differs (seeds are replicates, storage is where it ran): a λ axis
    assert layout_of([trial(method__lam=0.0), {**trial(method__lam=1.0), "seed": 3, "storage": "/elsewhere"}]) \
        == "lambda"
    # each dataset at its own λ (the fine-grained presets in one experiment): λ is no axis
    assert layout_of([trial(method__lam=0.25, data__dataset="cub200"),
                      trial(method__lam=0.5, data__dataset="aircraft")]) == "methods"
    # the methods axis: the baseline's own spec says baseline, whatever λ it carries
    assert layout_of([trial(method__name="baseline", method__lam=0.5), trial(method__lam=1.0)]) == "methods"
    assert layout_of([trial(data__shots=5)]) == "fewshot"


def test_cgc_settings_are_named_from_the_identity_list():
    """Every CGC-only setting of config.identity tells configurations apart, with no list in results/ to update."""
    a = {"method.name": "cgc", **{k: 0 for k in CGC_ONLY_FIELDS}}
    b = {"method.name": "cgc", **{k: 1 for k in CGC_ONLY_FIELDS}, "optim.lr": 9}
    differ = cgc_settings_that_differ([a, b, {"method.name": "baseline", "optim.lr": 1}], with_lam=True)
    assert differ[0] == "method.lam" and set(differ) == set(CGC_ONLY_FIELDS)
    assert config_label(b, ["method.forward", "optim.lr"]) == "cgc λ=1 forward=1 lr=9"
    assert config_label({"method.name": "baseline"}, ["method.forward", "data.shots"]) == "baseline shots=–"
    assert [field_name(k) for k in ("method.tau", "data.percent", "seed", "data.synthetic.classes")] == \
        ["τ", "% labelled", "seed", "synthetic.classes"]


# ---------------------------------------------------------------- computing writes nothing


def test_the_report_writes_nothing_and_the_cli_writes_the_summary_on_request(tmp_path, capsys):
    _write(tmp_path, _lambda_with_views("lambda_ablation"), _top1)
    rp.report(str(tmp_path), None, "markdown")
    rp.load(str(tmp_path))
    assert not (tmp_path / "_summary").exists()
    with pytest.raises(ValueError, match="unknown report format 'parquet'.*write_summary"):
        rp.report(str(tmp_path), None, "parquet")
    assert cli_main(["report", "--storage", str(tmp_path), "--format", "parquet"]) == 0
    written = Storage(str(tmp_path)).summary_path("lambda_ablation")
    assert capsys.readouterr().out == f"{written}\n"
    assert pq.read_table(written).num_rows > 0


# ---------------------------------------------------------------- errors: one line, exit 2


def test_missing_storage_is_an_error_on_stderr(tmp_path, capsys):
    assert cli_main(["report", "--storage", str(tmp_path / "typo")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: storage {str(tmp_path / 'typo')!r} does not exist")
    assert "give the folder or URI your experiments wrote to (--storage, or $CGC_RAY_STORAGE)" in err


def test_a_file_as_storage_is_one_line_without_a_raw_warning(tmp_path, capsys):
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning (the reader's UserWarning) fails the test
        assert cli_main(["report", "--storage", str(passwd)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Warning" not in err
    assert err.startswith(f"error: storage {str(passwd)!r} is a file, not a results folder")


# ---------------------------------------------------------------- an odd row file: named, the rest reported


def _odd_config_json_1(row):
    return {**row, "config_json": "1"}, FILE_SCHEMA


def _odd_no_method_name(row):
    config = json.loads(row["config_json"])
    del config["method"]["name"]
    config["method"]["future_option"] = 1  # a spec this version cannot validate: its raw fields are used
    return {**row, "config_json": json.dumps(config)}, FILE_SCHEMA


def _odd_list_top1(row):
    field = FILE_SCHEMA.get_field_index("top1")
    return {**row, "top1": [1.0, 2.0]}, FILE_SCHEMA.set(field, pa.field("top1", pa.list_(pa.float64())))


@pytest.mark.parametrize("odd, reason", [
    (_odd_config_json_1, "config_json is a JSON int, not the trial's config"),  # was TypeError
    (_odd_no_method_name, "config_json has no method.name"),  # was KeyError
    (_odd_list_top1, "Unsupported cast from list"),  # was ArrowNotImplementedError
])
def test_an_odd_row_file_is_named_and_the_rest_reported(tmp_path, capsys, odd, reason):
    spec = _lambda_with_views("lambda_ablation")
    trials = _write(tmp_path / "clean", spec, _top1)
    assert cli_main(["report", "--storage", str(tmp_path / "clean"), "--format", "markdown"]) == 0
    clean = capsys.readouterr().out

    _write(tmp_path / "odd", spec, _top1)
    row, schema = odd({**result_row(trials[0], {"top1": 99.0}), "trial_id": "0dd000000000", "schema_version": 2})
    path = Storage(str(tmp_path / "odd")).row_path("lambda_ablation", "0dd000000000")
    pq.write_table(pa.Table.from_pylist([row], schema=schema), path)
    assert cli_main(["report", "--storage", str(tmp_path / "odd"), "--format", "markdown"]) == 0
    out, err = capsys.readouterr()
    assert out == clean  # every other row, with the numbers it has without the odd file
    assert "| top1 | 60.50±0.71 (2) | 65.50±0.71 (2) | 62.50±0.71 (2) |" in out.splitlines()
    assert err.count("\n") == 1 and err.startswith(f"warning: left out {path}: ") and reason in err


def test_a_setting_a_method_never_reads_is_not_shown_beside_it(tmp_path):
    """The imagenet demo's cgc trial holds no_neg_scale=mean (the spec's default) and its cgc_no_neg trial sum: the
    contrastive term never reads it, so a cgc row shows '–' there, never 'mean'."""
    spec = apply_overrides(load_spec(PRESETS["imagenet_demo"]), ["sweep.grid.seed=[0, 1]"])
    trials = _write(tmp_path, spec, lambda t: {"top1": {"baseline": 70.0, "cgc": 68.0, "cgc_no_neg": 66.0}
                                              [t.method.name] + t.seed})
    assert {(t.method.name, t.method.no_neg_scale) for t in trials} >= {("cgc", "mean"), ("cgc_no_neg", "sum")}
    lines = rp.report(str(tmp_path), "imagenet", "markdown").splitlines()
    assert "| method | no_neg_scale | top1 | trials |" in lines
    assert {"| baseline | – | 70.50±0.71 (2) | 2 |", "| cgc | – | 68.50±0.71 (2) | 2 |",
            "| cgc_no_neg | sum | 66.50±0.71 (2) | 2 |"} <= set(lines)
    assert "| cgc λ=1 − baseline | – | -2.00 [-2.00, -2.00] (2) |" in lines


def test_a_field_left_out_of_the_id_at_its_legacy_value_is_still_named(tmp_path):
    """ce_views 1 is its legacy value, so the id (and the stored labels) leave it out; beside a ce_views 3
    configuration the table must still say which is which."""
    spec = apply_overrides(load_spec(PRESETS["lambda_ablation_demo"]), [
        "sweep.grid.method.lam=[0.0, 0.5]", "sweep.grid.seed=[0]",
        "sweep.variants=[{}, {method.view: center, method.ce_views: 3}]"])
    _write(tmp_path, spec, lambda t: {"top1": 60.0 + 10 * (t.method.ce_views == 3) + (t.method.lam > 0)})
    lines = rp.report(str(tmp_path), spec.name, "markdown").splitlines()
    assert "| metric | λ=0 (baseline) | λ=0.5 ce_views=1 view=train | λ=0.5 ce_views=3 view=center |" in lines
    assert "| top1 | 60.00 (1) | 61.00 (1) | 71.00 (1) |" in lines
