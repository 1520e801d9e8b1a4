"""Faults that must cost neither results nor compute: bad files, bad storage, NaN losses, failures, two drivers."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, result_row
from fixtures_storage import flaky_storage, full_disk_for_claims, kill

import cgc_ray.storage as storage_module

from cgc_ray.cli.main import main as cli_main
from cgc_ray.config import (
    PRESETS,
    apply_overrides,
    expand_trials,
    load_spec,
    trial_id,
)
from cgc_ray.results import table
from cgc_ray.results.report import report
from cgc_ray.results.table import read_rows, trial_status, write_row
from cgc_ray.runner import driver
from cgc_ray.runner.driver import StorageError, check_storage, run_experiment
from cgc_ray.runner.leases import Leases
from cgc_ray.storage import Storage

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


def test_a_row_that_cannot_be_read_is_not_taken_for_corrupt(tmp_path, monkeypatch):
    monkeypatch.setattr(storage_module, "_RETRY_S", 0.01, raising=False)
    path, tid = _row_file(tmp_path, _spec(tmp_path, "sweep.grid={}"))
    storage, handler = flaky_storage(tmp_path, path.name, fails=2)
    assert trial_status(storage, "lambda_ablation") == {tid: "finished"}  # two timeouts, then read: retried
    handler.fails = 100  # the storage keeps failing
    with pytest.warns(UserWarning, match=f"{path} could not be read .*neither run again nor overwritten"):
        assert trial_status(storage, "lambda_ablation") == {tid: table.UNREADABLE}
    assert path.exists() and not (path.parent / "_corrupt").exists()  # the finished row stays where it is


def test_two_drivers_setting_one_bad_file_aside_at_once_do_not_crash(tmp_path, monkeypatch):
    path, tid = _row_file(tmp_path, _spec(tmp_path, "sweep.grid={}"))
    path.write_bytes(path.read_bytes()[:40])
    real = Storage.set_aside

    def the_other_driver_first(self, where, experiment, now):  # it moves the file between our read and our move
        real(self, where, experiment, now)
        return real(self, where, experiment, now)

    monkeypatch.setattr(Storage, "set_aside", the_other_driver_first)
    assert trial_status(str(tmp_path), "lambda_ablation") == {}
    assert len(list((path.parent / "_corrupt").iterdir())) == 1


def test_a_row_written_while_a_bad_file_is_set_aside_is_not_moved(tmp_path, monkeypatch):
    path, tid = _row_file(tmp_path, _spec(tmp_path, "sweep.grid={}"))
    good = path.read_bytes()
    path.write_bytes(good[:40])
    real = Storage.set_aside

    def finished_meanwhile(self, where, experiment, now):  # another driver's row lands between our read and move
        Path(where).write_bytes(good)
        return real(self, where, experiment, now)

    monkeypatch.setattr(Storage, "set_aside", finished_meanwhile)
    trial_status(str(tmp_path), "lambda_ablation")
    monkeypatch.undo()
    assert trial_status(str(tmp_path), "lambda_ablation") == {tid: "finished"}


def test_the_end_of_run_check_writes_no_failed_row_over_a_row_it_cannot_read(tmp_path, monkeypatch):
    monkeypatch.setattr(storage_module, "_RETRY_S", 0.01, raising=False)
    spec = _spec(tmp_path, "sweep.grid={}")
    path, tid = _row_file(tmp_path, spec)  # finished, by a driver this run lost the trial to, or a run before
    storage, _ = flaky_storage(tmp_path, path.name, fails=10**6)
    leases = Leases(storage, spec.name).start()
    try:
        claims = leases.claim([tid])
        config = {"spec": expand_trials(spec)[0].model_dump(mode="json"), "trial_id": tid, "spec_hash": "x",
                  "code_version": "test"}
        with pytest.warns(UserWarning, match="could not be read"):
            res = driver._settle(storage, spec.name, [tid], {}, leases, claims, {tid: config},
                                 {tid: "RuntimeError: boom"}, {})
    finally:
        leases.release()
    assert res.failed == {} and res.ran == [] and "row file could not be read" in res.unsettled[tid]
    assert trial_status(str(tmp_path), spec.name) == {tid: "finished"}  # still the finished row


def test_a_trial_whose_holder_dies_during_the_run_is_named_not_hidden(tmp_path):
    spec = _spec(tmp_path, "sweep.grid={}", "sweep.grid.seed=[0, 1]")
    ids = [trial_id(t) for t in expand_trials(spec)]
    other = Leases(str(tmp_path), spec.name).start()
    other.claim(ids[:1])
    this = Leases(str(tmp_path), spec.name).start()
    try:
        claims = this.claim(ids)
        assert claims.got == ids[1:] and list(claims.held) == ids[:1]
        kill(other)  # ... and the other driver dies while this one runs its own trial (here: fails it)
        config = {"spec": expand_trials(spec)[1].model_dump(mode="json"), "trial_id": ids[1], "spec_hash": "x",
                  "code_version": "test"}
        res = driver._settle(Storage(str(tmp_path)), spec.name, ids, {}, this, claims, {ids[1]: config},
                             {ids[1]: "RuntimeError: boom"}, {})
    finally:
        this.release()
    assert res.failed == {ids[1]: "RuntimeError: boom"} and res.held == {}
    assert res.unsettled == {ids[0]: f"driver {other.driver} held it and is no longer live; run again to take it over"}
    assert trial_status(str(tmp_path), spec.name) == {ids[1]: "failed"}


def test_a_run_that_cannot_claim_a_trial_exits_non_zero_and_names_it(tmp_path, monkeypatch, capsys):
    """A stale claim whose takeover fails on a full disk: the trial is neither done, held nor failed."""
    from cgc_ray.cli import experiment

    monkeypatch.setattr(driver, "connect", lambda *a, **k: pytest.fail("no trial can run: Ray must not start"))
    overrides = [*TINY, "sweep.grid={}"]
    (trial,) = expand_trials(_spec(tmp_path, *overrides[len(TINY):]))
    dead = Leases(str(tmp_path), trial.name).start()
    dead.claim([trial_id(trial)])
    kill(dead)
    full_disk_for_claims(monkeypatch)
    code = experiment.main("lambda_ablation", ["--storage", str(tmp_path), "--no-progress", "--no-report",
                                               *[a for o in overrides for a in ("--set", o)]])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "0 failed, 0 held by another driver, 1 not run" in err
    assert f"not run {trial_id(trial)}: its claim could not be written: [Errno 28] No space left on device" in err


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["abc\n", "a b", "a=b", "a\\b", "../up", ".hidden", ""])
def test_names_are_matched_whole(name, tmp_path):
    from cgc_ray.config import SpecError

    with pytest.raises((SpecError, ValueError), match="cannot be a folder or file name"):
        load_spec({**PRESETS["lambda_ablation_demo"], "name": name})
    with pytest.raises(ValueError, match="cannot be a folder or file name"):
        Storage(str(tmp_path)).row_path(name, "0123456789ab")


@pytest.mark.parametrize("name", ["abc\n", "a b", "a=b", "a\\b"])
def test_evaluate_refuses_an_experiment_name_before_any_work(name, capsys, monkeypatch):
    import cgc_ray.explain.evaluation as ev

    monkeypatch.setattr(ev, "checkpoint_spec", lambda *a, **k: pytest.fail("the name is checked first"))
    with pytest.raises(SystemExit) as exit_:
        cli_main(["evaluate", "some.pt", "--dataset", "synthetic", "--experiment", name])
    assert exit_.value.code == 2 and "cannot be a folder or file name" in capsys.readouterr().err


def test_references_with_a_trailing_newline_are_refused():
    from cgc_ray.config import SpecError
    from cgc_ray.config.model import TV_WEIGHTS_RE
    from cgc_ray.config.pretrained import parse_trial_ref

    assert TV_WEIGHTS_RE.match("ResNet50_Weights.IMAGENET1K_V1") and not TV_WEIGHTS_RE.match(
        "ResNet50_Weights.IMAGENET1K_V1\n")
    assert parse_trial_ref("trial:exp/0123456789ab") == ("exp", "0123456789ab")
    with pytest.raises(SpecError, match="a trial reference is"):
        parse_trial_ref("trial:exp/0123456789ab\n")


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


# ---------------------------------------------------------------- leases (the claims themselves: test_leases.py)


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


def test_a_trial_whose_lease_is_taken_over_mid_run_is_stopped_and_writes_no_row(ray_session, tmp_path, monkeypatch):
    """Another driver takes the trial over after its first checkpoint: this driver notices at its next heartbeat,
    Tune stops the trial at its next epoch, no row is written, and the trial is reported held by the other."""
    import threading

    from cgc_ray.runner import leases as L

    monkeypatch.setattr(L, "HEARTBEAT_S", 0.2)
    spec = _spec(tmp_path, "sweep.grid={}", "optim.epochs=40", "failure.checkpoint_every=1", "failure.max_retries=0")
    tid = trial_id(expand_trials(spec)[0])
    checkpoint = Path(Storage(str(tmp_path)).checkpoint_path(spec.name, tid))
    other = L.Leases(str(tmp_path), spec.name)

    def take_over_after_the_first_epoch():
        while not checkpoint.exists():
            time.sleep(0.05)
        other.start()
        other._create(tid, 1)  # a takeover: the next generation of the trial's claim

    thief = threading.Thread(target=take_over_after_the_first_epoch, daemon=True)
    thief.start()
    try:
        res = run_experiment(spec, progress=False)
    finally:
        thief.join(5)
        other.release()
    assert res.held == {tid: f"{os.uname().nodename}:{os.getpid()}"} and res.failed == {} and res.unsettled == {}
    assert res.metrics[tid]["epoch"] < 40  # stopped early, not trained to the end
    assert trial_status(str(tmp_path), spec.name) == {}  # and no row


def test_checkpoint_every_sets_how_often_a_trial_checkpoints(tmp_path):
    import torch

    from cgc_ray.train.trial import run_trial

    spec = _spec(tmp_path, "sweep.grid={}", "optim.epochs=3", "failure.checkpoint_every=2")
    saved = []
    run_trial(spec, trial_dir=tmp_path / "t", report=lambda m, ckpt: saved.append((m["epoch"], ckpt is not None)))
    assert saved == [(1, False), (2, True), (3, True)]  # every 2nd epoch, and the last
    assert torch.load(tmp_path / "t" / "checkpoint.pt", weights_only=True)["epoch"] == 2  # 0-based: the third
