"""The experiment scripts end to end: tiny sweeps of each kind, report layouts, clear errors, kill + resume.

In-process runs (``experiment_cli.main``) share the session's Ray; the
subprocess tests run ``experiments/*.py`` exactly as a user does, each with a Ray of its own (they inherit
conftest's ``RAY_ADDRESS=local``, so a ``ray start`` Ray on this machine is not theirs).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import TINY

from cgc_ray.cli import experiment as experiment_cli
from cgc_ray.results.report import report
from cgc_ray.results.table import read_rows
from cgc_ray.storage import Storage

REPO = Path(__file__).resolve().parent.parent


def _args(storage: Path, *overrides: str) -> list[str]:
    out = ["--storage", str(storage), "--no-progress", "--no-report"]
    for o in [*TINY, *overrides]:
        out += ["--set", o]
    return out


def _run(experiment: str, storage: Path, *overrides: str) -> list[dict]:
    assert experiment_cli.main(experiment, _args(storage, *overrides)) == 0
    return read_rows(str(storage), experiment).to_pylist()


def _script(name: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "experiments" / f"{name}.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, **kw)


# ---------------------------------------------------------------- tiny sweeps of every kind


def test_lambda_ablation_sweep_and_lambda_table(ray_session, tmp_path):
    rows = _run("lambda_ablation", tmp_path, "sweep.grid.method.lam=[0.0, 1.0]", "sweep.grid.seed=[0]")
    assert sorted((r["lam"], r["method"]) for r in rows) == [(0.0, "baseline"), (1.0, "cgc")]  # λ = 0 trains L_CE only
    for r in rows:
        assert r["status"] == "finished" and r["dataset"] == "synthetic" and r["arch"] == "resnet_small"
        assert r["epochs"] == 1 and r["shots"] is None and r["episode"] == 0
        assert 0 <= r["top1"] <= 100 and 0 <= r["ch"] <= 100 and r["cgc_loss"] > 0
        assert r["top5"] is None  # the demo preset does not compute top-5
    md = report(str(tmp_path), "lambda_ablation", "markdown")
    header = next(line for line in md.splitlines() if line.startswith("| metric"))
    assert header.split("|")[2:4] == [" λ=0 (baseline) ", " λ=1 "]
    top1 = next(line for line in md.splitlines() if line.startswith("| top1"))
    by_lam = {r["lam"]: r["top1"] for r in rows}
    assert f"{by_lam[0.0]:.2f} (1)" in top1.split("|")[2] and f"{by_lam[1.0]:.2f} (1)" in top1.split("|")[3]
    # the sample figure of the best CGC trial (below the baseline) lands next to the results
    from PIL import Image

    with Image.open(tmp_path / "_figures" / "lambda_ablation" / "explain.png") as im:
        assert im.width > 100 and im.height > 100
    # and the report page beside the summary, with the heatmaps of the kept checkpoints (tests/test_html*.py)
    page = Path(Storage(str(tmp_path)).summary_html_path("lambda_ablation")).read_text(encoding="utf-8")
    assert 'alt="lambda_ablation: Grad-CAM heatmaps, ' in page and 'id="exp-lambda_ablation"' in page
    # and the storage folder, checkpoints and figures included, still reads as one Parquet dataset
    import pandas as pd

    assert len(pd.read_parquet(tmp_path)) == 2


def test_fewshot_sweep_pairs_episodes(ray_session, tmp_path):
    rows = _run("fewshot", tmp_path, "data.shots=2", "sweep.grid.data.shots=[2]", "sweep.grid.data.episode=[0, 1]")
    assert len(rows) == 4
    assert sorted((r["method"], r["episode"]) for r in rows) == [
        ("baseline", 0), ("baseline", 1), ("cgc", 0), ("cgc", 1)]
    assert {r["shots"] for r in rows} == {2}
    # the same episode split for both methods: paired by (shots, episode)
    config = {(r["method"], r["episode"]): r["config_json"] for r in rows}
    assert '"episode":1' in config[("cgc", 1)] and '"shots":2' in config[("baseline", 0)]
    md = report(str(tmp_path), "fewshot", "markdown")
    assert "Δ paired by episode" in md and "top1 Δ cgc−baseline [95% CI]" in md
    row = next(line for line in md.splitlines() if line.startswith("| synthetic"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2"  # shots
    top1 = {m: [r["top1"] for r in rows if r["method"] == m] for m in ("baseline", "cgc")}
    diffs = [c - b for c, b in zip(
        [r["top1"] for r in sorted(rows, key=lambda r: r["episode"]) if r["method"] == "cgc"],
        [r["top1"] for r in sorted(rows, key=lambda r: r["episode"]) if r["method"] == "baseline"])]
    mean_b = sum(top1["baseline"]) / 2
    assert cells[2].startswith(f"{mean_b:.2f}±")
    header = next(line for line in md.splitlines() if line.startswith("| dataset"))
    delta = [c.strip() for c in header.strip("|").split("|")].index("top1 Δ cgc−baseline [95% CI]")
    assert cells[delta].startswith(f"{sum(diffs) / 2:+.2f} [") and cells[delta].endswith("(2)")


def test_semisup_finegrained_imagenet_method_rows(ray_session, tmp_path):
    semi = _run("semisup", tmp_path, "sweep.grid.method.name=[cgc]", "sweep.grid.seed=[0]")
    assert [(r["method"], r["percent"]) for r in semi] == [("cgc", 5.0)]
    fine = _run("finegrained", tmp_path, "sweep.grid.seed=[0]")
    assert sorted(r["method"] for r in fine) == ["baseline", "cgc"] and {r["seed"] for r in fine} == {0}
    imnet = _run("imagenet", tmp_path, "sweep.variants=[{method.name: baseline}, {method.name: cgc_no_neg}]")
    assert sorted(r["method"] for r in imnet) == ["baseline", "cgc_no_neg"]
    md = report(str(tmp_path), "imagenet", "markdown")
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| method"))
    assert "top1" in header and "ch" in header
    method_rows = [line.split("|")[1].strip() for line in lines if line.startswith(("| baseline", "| cgc_no_neg"))]
    assert method_rows[:2] == ["baseline", "cgc_no_neg"]
    rich = report(str(tmp_path), "finegrained", "rich")
    assert "baseline" in rich and "cgc" in rich


# ---------------------------------------------------------------- errors before Ray starts


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the runner tries to start or attach to Ray."""
    import cgc_ray.runner.driver as tr

    def refuse(*a, **k):
        raise AssertionError("Ray must not start for a bad spec")

    monkeypatch.setattr(tr, "connect", refuse)


@pytest.mark.parametrize(
    "overrides, flags, expected",
    [
        (["method.lam=-1"], [], "method.lam"),
        (["data.batch_size=1"], [], "data.batch_size"),
        (["data.dataset=mnist"], [], "data.dataset"),
        (["method.tau=0"], [], "method.tau"),
        ([], ["--dataset", "cub200"], "images.txt"),  # no root: the CUB layout is printed
        ([], ["--dataset", "cub200", "--data-root", "/nonexistent/cub"], "does not exist"),
        (["data.shots=8", "sweep.grid.data.shots=[8]"], [], "data.shots=8"),  # 8 images per class, 8 shots
    ],
)
def test_bad_specs_exit_2_naming_the_field(no_ray, tmp_path, capsys, overrides, flags, expected):
    experiment = "fewshot" if "shots" in "".join(overrides) or flags else "lambda_ablation"
    code = experiment_cli.main(experiment, _args(tmp_path, *overrides) + flags)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and expected in err
    assert not (tmp_path / f"experiment={experiment}").exists()


def test_missing_root_prints_layout(no_ray, tmp_path, capsys):
    assert experiment_cli.main("finegrained", ["--dataset", "aircraft", "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "data.root is required for data.dataset='aircraft'" in err
    assert "data/images_box.txt" in err and "--data-root" in err


def test_script_bad_spec_exits_2_before_ray(tmp_path):
    t0 = time.monotonic()
    p = _script("lambda_ablation", "--storage", str(tmp_path), "--set", "method.lam=-1")
    assert p.returncode == 2 and "method.lam" in p.stderr and "greater than or equal to 0" in p.stderr
    assert "Ray" not in p.stderr and time.monotonic() - t0 < 30


def test_script_unfittable_resources_exit_2(tmp_path):
    t0 = time.monotonic()
    p = _script("lambda_ablation", *_args(tmp_path, "scaling.cpus_per_worker=64"))
    assert p.returncode == 2, p.stderr[-2000:]
    assert "needs {CPU: 64}" in p.stderr and "the cluster's nodes have" in p.stderr
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "experiment=lambda_ablation").exists()


# ---------------------------------------------------------------- the front door: presets, --dry-run, --version


def test_presets_lists_every_preset_with_its_table_dataset_and_trial_count(capsys):
    from cgc_ray.cli.main import main as cli_main
    from cgc_ray.config import PRESETS, load_spec
    from cgc_ray.config.presets import PRESET_TABLES

    assert set(PRESET_TABLES) == set(PRESETS)  # a new preset names its paper table
    assert cli_main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header, body = lines[0].split(), lines[1:]
    assert header == ["preset", "paper", "dataset", "experiment", "trials"]
    listed = {line.split()[0]: line for line in body}
    assert list(listed) == list(PRESETS)
    for name, line in listed.items():
        spec = load_spec(PRESETS[name])
        assert f"  {PRESET_TABLES[name]}  " in line and f"  {spec.data.dataset}  " in line, line
    # the counts, from the sweeps by hand: grid sizes multiplied, times the variants (λ = 0 is the baseline, once)
    trials = {name: int(line.split()[-1].removeprefix("≤")) for name, line in listed.items()}
    assert listed["lambda_search_demo"].split()[-1] == "≤12"  # a search: at most its budget
    assert trials["lambda_ablation"] == 6 and trials["lambda_ablation_demo"] == 3 * 2
    assert trials["fewshot_cub200"] == 2 * 3 * 20 and trials["fewshot_demo"] == 2 * 3 * 10
    assert trials["finegrained_cub200"] == 2 * 3 and trials["imagenet_r50"] == 3
    assert trials["ablation_demo"] == 14 * 5 and trials["ablation_more_demo"] == 6 * 2
    assert trials["pretrain_demo"] == 1
    assert listed["imagenet100_r50"].split()[1:3] == ["Table", "11"]


def _dry_run_in_a_fresh_interpreter(script: str, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Run ``experiments/<script>.py --dry-run`` as a user does; also report which heavy modules it imported."""
    probe = (
        "import runpy, sys\n"
        f"sys.argv = [{script!r}, *{list(args)!r}, '--dry-run']\n"
        "try:\n"
        f"    runpy.run_path({str(REPO / 'experiments' / f'{script}.py')!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "print({m: m in sys.modules for m in ('ray', 'torch')}, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    p = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    return p, eval(p.stderr.strip().splitlines()[-1])


def test_dry_run_prints_the_spec_and_its_trials_with_their_rows_and_imports_no_ray(tmp_path):
    import yaml

    from cgc_ray.config import PRESETS, apply_overrides, expand_trials, load_spec, trial_id
    from cgc_ray.results.table import write_row
    from conftest import result_row

    overrides = ["sweep.grid.method.lam=[0.0, 0.5, 1.0]", "sweep.grid.seed=[0, 1]"]
    spec = apply_overrides(load_spec(PRESETS["lambda_ablation_demo"]), [f"storage={tmp_path}", *overrides])
    trials = expand_trials(spec)
    write_row(str(tmp_path), spec.name, result_row(trials[0], {"top1": 50.0}))  # done: skipped by a run
    write_row(str(tmp_path), spec.name, result_row(trials[3], {}, status="failed", error="boom"))  # runs again
    rows_before = sorted(p.name for p in tmp_path.rglob("*"))

    p, imported = _dry_run_in_a_fresh_interpreter("lambda_ablation", "--storage", str(tmp_path),
                                                  *(a for o in overrides for a in ("--set", o)))
    assert p.returncode == 0, p.stderr[-2000:]
    assert imported == {"ray": False, "torch": False}
    printed, plan = yaml.safe_load_all(p.stdout)
    assert printed == spec.model_dump(mode="json")
    assert "6 trials, 1 done already (skipped), 5 to run; nothing was started" in p.stdout
    expected = [{"trial_id": trial_id(t), "method.lam": t.method.lam, "seed": t.seed} for t in trials]
    assert [{k: e[k] for k in ("trial_id", "method.lam", "seed")} for e in plan["trials"]] == expected
    assert [(e["row"], e["runs"]) for e in plan["trials"]] == [
        ("finished", False), (None, True), (None, True), ("failed", True), (None, True), (None, True)]
    assert sorted(p.name for p in tmp_path.rglob("*")) == rows_before  # no checkpoints, leases or Ray folders


def test_dry_run_lists_the_pretraining_that_runs_first(tmp_path, capsys):
    from cgc_ray.config import PRESETS, apply_overrides, expand_trials, load_spec, trial_id
    from cgc_ray.cli.main import main as cli_main

    assert cli_main(["run", "--preset", "fewshot_demo", "--storage", str(tmp_path), "--dry-run"]) == 0
    import yaml

    _, plan = yaml.safe_load_all(capsys.readouterr().out)
    pretrain = expand_trials(apply_overrides(load_spec(PRESETS["pretrain_demo"]), [f"storage={tmp_path}"]))
    assert plan["pretrainings"] == [
        {"experiment": "pretrain", "trial_id": trial_id(pretrain[0]), "row": None, "runs": True}]
    swept = {tuple(e)[1:4] for e in plan["trials"]}
    assert len(plan["trials"]) == 60 and swept == {("method.name", "data.shots", "data.episode")}
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_version_is_the_package_version_and_commit(capsys):
    import importlib.metadata

    import cgc_ray
    from cgc_ray.cli.main import main as cli_main
    from cgc_ray.results.table import code_version

    with pytest.raises(SystemExit) as exit_:
        cli_main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out == code_version() + "\n"
    assert out.startswith(f"cgc-ray {importlib.metadata.version('cgc-ray')}") and cgc_ray.__version__ in out


# ---------------------------------------------------------------- errors a new user meets


@pytest.mark.parametrize("flags, named", [
    (["--spec", "SPEC", "--preset", "lambda_ablation_demo"], "--spec and --preset"),
    (["--preset", "fewshot_demo", "--dataset", "cub200"], "--preset and --dataset"),
    (["--spec", "SPEC", "--dataset", "cub200"], "--spec and --dataset"),
])
def test_flags_that_each_choose_the_spec_are_refused_together(no_ray, tmp_path, capsys, flags, named):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: mine\n")
    flags = [str(spec) if f == "SPEC" else f for f in flags]
    assert experiment_cli.main("fewshot", [*flags, "--storage", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {named} each choose the spec; give one of them") and err.count("\n") == 1


def test_spec_given_a_preset_name_points_to_preset(no_ray, tmp_path, capsys):
    assert experiment_cli.main(None, ["--spec", "lambda_ablation_demo", "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == ("error: --spec lambda_ablation_demo: no such file; 'lambda_ablation_demo' is a preset: "
                   "give --preset lambda_ablation_demo\n")
    assert experiment_cli.main(None, ["--spec", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "no such file; give the path of a .yaml/.json spec, or --preset NAME" in err and "preset name" not in err


def test_evaluate_without_the_dataset_prints_its_whole_layout(tmp_path, capsys):
    import torch

    from cgc_ray.cli.main import main as cli_main
    from cgc_ray.models.resnet import build_model

    torch.save(build_model("resnet_small", 200).state_dict(), tmp_path / "c.pt")
    code = cli_main(["evaluate", str(tmp_path / "c.pt"), "--dataset", "cub200", "--data-root", str(tmp_path / "cub"),
                     "--storage", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: cub200: root {tmp_path / 'cub'} does not exist")
    for line in ("images.txt", "bounding_boxes.txt", "images/<class dir>/*.jpg"):  # the layout's last line too
        assert line in err


def test_every_path_prints_errors_with_one_prefix(no_ray, tmp_path, capsys):
    from cgc_ray.cli.main import main as cli_main

    assert experiment_cli.main("lambda_ablation", ["--storage", str(tmp_path), "--set", "method.lam=-1"]) == 2
    with pytest.raises(SystemExit) as exit_:
        cli_main(["run", "--preset", "nope"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        cli_main(["report", "--format", "nope"])
    assert exit_.value.code == 2
    assert cli_main(["explain", "c.pt", "--dataset", "cub200", "--out", str(tmp_path / "x.png")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith(("usage:", " "))]
    assert len(errors) == 4 and all(line.startswith("error: ") for line in errors), errors


def test_the_script_prints_the_report_and_the_readme_does_not_print_it_again():
    first = (REPO / "README.md").read_text().split("```bash\n", 1)[1].splitlines()[0]
    assert first == "pip install -e . && python experiments/lambda_ablation.py"
    assert not experiment_cli.build_parser("x", "").parse_args([]).no_report  # the script prints the table


# ---------------------------------------------------------------- kill the driver, re-run


@pytest.mark.slow
def test_kill_driver_mid_sweep_then_rerun_each_trial_once(ray_session, tmp_path):
    from cgc_ray.config import (
        PRESETS,
        apply_overrides,
        expand_trials,
        load_spec,
        trial_id,
    )
    from cgc_ray.runner.driver import run_experiment

    overrides = ["sweep.grid.method.lam=[0.0, 0.1, 1.0]", "sweep.grid.seed=[0]", "optim.epochs=3",
                 "data.synthetic.n_train_per_class=16"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "experiments/lambda_ablation.py"), *_args(tmp_path, *overrides),
         "--max-concurrent", "1"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    rows_dir = tmp_path / "experiment=lambda_ablation"
    ckpt_dir = tmp_path / "_checkpoints/lambda_ablation"

    def mid_trial() -> bool:
        """A row exists and another trial has checkpointed but not finished."""
        rows = {p.stem for p in rows_dir.glob("*.parquet")}
        return bool(rows) and any((d / "checkpoint.pt").exists() and d.name not in rows for d in ckpt_dir.glob("*"))

    deadline = time.monotonic() + 180
    try:
        while not mid_trial():
            assert proc.poll() is None, "the driver exited before writing a row"
            assert time.monotonic() < deadline, "no row after 180 s"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    before = {p.stem: p.stat().st_mtime_ns for p in rows_dir.glob("*.parquet")}
    assert 1 <= len(before) < 3

    spec = apply_overrides(load_spec(PRESETS["lambda_ablation_demo"]),
                           [f"storage={tmp_path}", *TINY, *overrides])
    ids = [trial_id(t) for t in expand_trials(spec)]
    ckpts = {t for t in ids if (tmp_path / "_checkpoints/lambda_ablation" / t / "checkpoint.pt").exists()}
    interrupted = ckpts - set(before)
    assert interrupted

    res = run_experiment(spec, progress=False)
    assert res.failed == {} and sorted(res.skipped) == sorted(before)
    assert sorted(res.ran) == sorted(set(ids) - set(before))
    files = sorted(rows_dir.glob("*.parquet"))
    assert sorted(p.stem for p in files) == sorted(ids)
    assert sum(pq.read_table(p).num_rows for p in files) == 3
    for tid, mtime in before.items():  # finished before the kill: not run again
        assert (rows_dir / f"{tid}.parquet").stat().st_mtime_ns == mtime
    for tid in interrupted:  # cut short by the kill: resumed from its checkpoint, not restarted
        assert res.metrics[tid]["resumed_from_epoch"] >= 1
    for tid in set(res.ran) - interrupted:
        assert res.metrics[tid]["resumed_from_epoch"] == 0
    assert {r["epochs"] for r in read_rows(str(tmp_path), "lambda_ablation").to_pylist()} == {3}
