"""Faults that must cost neither results nor compute: bad files, bad storage, NaN losses, failures, two drivers."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, result_row

from cgc_ray.cli.main import main as cli_main
from cgc_ray.config import (
    PRESETS,
    apply_overrides,
    expand_trials,
    load_spec,
    trial_id,
)
from cgc_ray.results.report import report
from cgc_ray.results.table import read_rows, trial_status, write_row
from cgc_ray.runner import leases as L
from cgc_ray.runner.driver import StorageError, check_storage, run_experiment

REPO = Path(__file__).resolve().parent.parent
UNREACHABLE_S3 = "s3://bucket/prefix?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"


def _spec(storage, *overrides, preset="lambda_ablation_demo"):
    return apply_overrides(load_spec(PRESETS[preset]), [f"storage={storage}", *TINY, *overrides])


def _row_file(storage, spec):
    t = expand_trials(spec)[0]
    row = result_row(t, {"top1": 50.0})
    return Path(write_row(str(storage), t.name, row)), trial_id(t)


# ---------------------------------------------------------------- corrupt files and leftovers


def test_a_truncated_row_file_is_moved_aside_and_its_trial_counts_as_not_done(tmp_path):
    path, tid = _row_file(tmp_path, _spec(tmp_path, "sweep.grid={}"))
    path.write_bytes(path.read_bytes()[:40])  # truncated: no footer
    with pytest.warns(UserWarning, match="left out 1 unreadable"):
        assert read_rows(str(tmp_path)).num_rows == 0  # the reader does not crash on it
    with pytest.warns(UserWarning, match="not a valid trial row"):
        assert trial_status(str(tmp_path), "lambda_ablation") == {}
    assert not path.exists() and len(list((path.parent / "_corrupt").iterdir())) == 1


def test_a_row_file_holding_another_trial_is_not_done(tmp_path):
    path, tid = _row_file(tmp_path, _spec(tmp_path, "sweep.grid={}"))
    wrong = path.with_name("0123456789ab.parquet")
    path.rename(wrong)
    with pytest.warns(UserWarning, match=f"holds trial '{tid}'"):
        assert trial_status(str(tmp_path), "lambda_ablation") == {}


def test_leftover_temporary_files_of_dead_writers_are_removed(tmp_path):
    path, tid = _row_file(tmp_path, _spec(tmp_path, "sweep.grid={}"))
    old, new = path.with_name(f".{tid}.dead.tmp"), path.with_name(f".{tid}.live.tmp")
    old.write_bytes(b"x")
    new.write_bytes(b"x")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    assert trial_status(str(tmp_path), "lambda_ablation") == {tid: "finished"}
    assert not old.exists() and new.exists()  # a writer may still be writing the recent one


# ---------------------------------------------------------------- storage that cannot be written


def test_storage_that_cannot_be_written_fails_in_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    with pytest.raises(StorageError, match=f"storage '{blocker}/results' cannot be written: "):
        check_storage(str(blocker / "results"))
    with pytest.raises(StorageError, match="storage '/proc/cgc-ray-results' cannot be written"):
        check_storage("/proc/cgc-ray-results")  # no one, not even root, may create a folder there
    check_storage(str(tmp_path / "fine"))
    assert [p.name for p in (tmp_path / "fine").iterdir()] == []  # the probe leaves nothing behind


def test_cli_refuses_bad_storage_before_ray_with_one_line(tmp_path, capsys, monkeypatch):
    import cgc_ray.runner.driver as drv

    monkeypatch.setattr(drv, "connect", lambda *a, **k: pytest.fail("Ray must not start"))
    (tmp_path / "f").write_text("x")
    from cgc_ray.cli import experiment

    code = experiment.main("lambda_ablation", ["--storage", str(tmp_path / "f" / "r"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: storage '{tmp_path}/f/r' cannot be written")


@pytest.mark.slow
def test_unreachable_object_store_one_clean_line(capsys):
    with pytest.raises(StorageError, match="cannot be written: .*(connect|NETWORK)"):
        check_storage(UNREACHABLE_S3)
    assert cli_main(["report", "--storage", UNREACHABLE_S3]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


# ---------------------------------------------------------------- leases


def test_a_live_drivers_claims_are_left_to_it(tmp_path):
    a = L.Leases(str(tmp_path), "exp").start()
    b = L.Leases(str(tmp_path), "exp").start()
    try:
        got_a, held_a = a.claim(["t1", "t2"])
        got_b, held_b = b.claim(["t1", "t2", "t3"])
        assert (got_a, held_a) == (["t1", "t2"], {})
        assert got_b == ["t3"] and set(held_b) == {"t1", "t2"} and held_b["t1"]["driver"] == a.driver
    finally:
        a.release()
        b.release()
    assert not any((tmp_path / "_leases" / "exp").glob("t*.json"))


def test_claims_of_a_dead_driver_are_taken_over_once(tmp_path):
    dead = L.Leases(str(tmp_path), "exp").start()
    dead.claim(["t1"])
    dead._stop.set()  # it stops beating; and its process is gone:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    beat = tmp_path / "_leases" / "exp" / "_drivers" / f"{dead.driver}.json"
    beat.write_text(beat.read_text().replace(f'"pid": {os.getpid()}', f'"pid": {proc.stdout.strip()}'))
    b, c = L.Leases(str(tmp_path), "exp").start(), L.Leases(str(tmp_path), "exp").start()
    try:
        got_b, _ = b.claim(["t1"])
        got_c, held_c = c.claim(["t1"])
        assert got_b == ["t1"] and got_c == [] and held_c["t1"]["driver"] == b.driver
    finally:
        b.release()
        c.release()


def test_a_silent_driver_elsewhere_goes_stale(tmp_path, monkeypatch):
    other = L.Leases(str(tmp_path), "exp").start()
    other.claim(["t1"])
    other._stop.set()
    beat = tmp_path / "_leases" / "exp" / "_drivers" / f"{other.driver}.json"
    beat.write_text(beat.read_text().replace(f'"host": "{os.uname().nodename}"', '"host": "another-node"'))
    b = L.Leases(str(tmp_path), "exp").start()
    try:
        assert b.claim(["t1"]) == ([], {"t1": pytest.approx(b.owner(other.driver))})  # a fresh beat: live
        monkeypatch.setattr(L, "STALE_S", -1.0)  # ... until it is older than STALE_S
        assert b.claim(["t1"])[0] == ["t1"]
    finally:
        b.release()


@pytest.mark.slow
def test_two_drivers_at_once_run_every_trial_once(tmp_path):
    overrides = [*TINY, "sweep.grid.method.lam=[0.0, 0.5, 1.0]", "sweep.grid.seed=[0, 1]",
                 "data.synthetic.n_train_per_class=16"]
    cmd = [sys.executable, str(REPO / "experiments/lambda_ablation.py"), "--storage", str(tmp_path / "store"),
           "--no-progress", "--no-report", "--max-concurrent", "1", *[a for o in overrides for a in ("--set", o)]]
    # each driver starts a Ray of its own (conftest's RAY_ADDRESS=local, inherited): they share only the storage
    drivers = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    outs = [d.communicate(timeout=400)[1] for d in drivers]
    assert [d.returncode for d in drivers] == [0, 0], outs
    ran = [int(o.split(" ran now")[0].rsplit(" ", 1)[1]) for o in outs]
    assert sum(ran) == 6, outs  # no trial ran in both
    rows = read_rows(str(tmp_path / "store"), "lambda_ablation").to_pylist()
    assert len(rows) == 6 and len({r["trial_id"] for r in rows}) == 6


# ---------------------------------------------------------------- diverged and failed trials, end to end


def test_nan_loss_writes_a_diverged_row_and_is_not_retried(ray_session, tmp_path):
    spec = _spec(tmp_path, "sweep.grid.method.lam=[0.5]", "sweep.grid.seed=[0]", "optim.lr=1e30",
                 "failure.max_retries=2")
    res = run_experiment(spec, progress=False)
    (tid,) = res.trial_ids
    assert res.diverged == [tid] and res.ran == [tid] and res.failed == {}
    (row,) = read_rows(str(tmp_path)).to_pylist()
    assert row["status"] == "diverged" and row["top1"] is None and row["diverged_epoch"] == 1
    assert "loss is nan" in row["error"].lower() or "loss is inf" in row["error"].lower()
    again = run_experiment(spec, progress=False)  # deterministic: done, not run again
    assert again.skipped == [tid] and again.ran == []
    assert "+1 diverged" in report(str(tmp_path), "lambda_ablation", "markdown")


def test_a_failing_trial_gets_a_failed_row_and_runs_again_next_time(ray_session, tmp_path):
    spec = _spec(tmp_path, "sweep.grid.method.lam=[0.5]", "sweep.grid.seed=[0]", "failure.max_retries=0",
                 f"model.weights={tmp_path / 'missing.pt'}")
    res = run_experiment(spec, progress=False)
    (tid,) = res.trial_ids
    assert list(res.failed) == [tid] and "missing.pt" in res.failed[tid]
    (row,) = read_rows(str(tmp_path)).to_pylist()
    assert row["status"] == "failed" and "missing.pt" in row["error"]
    assert "+1 failed" in report(str(tmp_path), "lambda_ablation", "markdown")
    assert run_experiment(spec, progress=False).skipped == []  # a failed trial is tried again
    # Ray's own run state: one folder per experiment, however often it runs
    assert [p.name for p in (tmp_path / "_ray").iterdir() if p.is_dir()] == ["lambda_ablation"]


def test_checkpoint_every_sets_how_often_a_trial_checkpoints(tmp_path):
    import torch

    from cgc_ray.train.trial import run_trial

    spec = _spec(tmp_path, "sweep.grid={}", "optim.epochs=3", "failure.checkpoint_every=2")
    saved = []
    run_trial(spec, trial_dir=tmp_path / "t", report=lambda m, ckpt: saved.append((m["epoch"], ckpt is not None)))
    assert saved == [(1, False), (2, True), (3, True)]  # every 2nd epoch, and the last
    assert torch.load(tmp_path / "t" / "checkpoint.pt", weights_only=True)["epoch"] == 2  # 0-based: the third
