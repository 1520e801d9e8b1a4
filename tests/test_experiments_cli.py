"""The experiment scripts end to end: tiny sweeps of each kind, report layouts, clear errors, kill + resume.

In-process runs (``experiment_cli.main``) share the session's Ray; the
subprocess tests run ``experiments/*.py`` exactly as a user does.
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
    imnet = _run("imagenet", tmp_path, "sweep.grid.method.name=[baseline, cgc_no_neg]")
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
