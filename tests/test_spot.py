"""Spot nodes: a lost node resumes mid-epoch from the last step checkpoint; a bug is retried max_retries times.

The two-node test starts a simulated cluster of its own (``two_node_cluster`` of test_ray_runner, which shuts
the shared session Ray down first; ``ray_session`` restarts it for later tests).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY
from test_ray_runner import two_node_cluster  # noqa: F401 - the fixture

from cgc_ray.config import PRESETS, apply_overrides, expand_trials, load_spec, trial_id
from cgc_ray.results.table import read_rows
from cgc_ray.runner.driver import run_experiment
from cgc_ray.runner.worker import _count_error, lost_node
from cgc_ray.storage import Storage

EVERY = 10  # failure.checkpoint_every_steps
STEPS = 60  # one epoch: 5 classes x 96 images / batch 8


def _spec(storage: str, *overrides: str):
    return apply_overrides(load_spec(PRESETS["lambda_ablation_demo"]),
                           [f"storage={storage}", *TINY, "sweep.grid.method.lam=[1.0]", "sweep.grid.seed=[0]",
                            *overrides])


def _step_checkpoints(path: Path, *, count: int, deadline: float) -> list[tuple[float, int]]:
    """(mtime, step) of the first ``count`` mid-epoch checkpoints seen at ``path`` (read once per new mtime)."""
    seen: list[tuple[float, int]] = []
    while len(seen) < count:
        assert time.monotonic() < deadline, f"only {seen} step checkpoints before the deadline"
        try:
            mtime = path.stat().st_mtime
            if not seen or mtime != seen[-1][0]:
                step = (torch.load(path, weights_only=True, mmap=True)["progress"] or {}).get("steps", 0)
                if step and (not seen or step != seen[-1][1]):
                    seen.append((mtime, step))
        except (FileNotFoundError, KeyError):
            pass
        time.sleep(0.02)
    return seen


@pytest.mark.slow
def test_a_lost_node_resumes_mid_epoch_from_its_last_step_checkpoint(two_node_cluster, tmp_path):  # noqa: F811
    """The worker node is removed after two step checkpoints of the one epoch: the trial moves to a new node,
    resumes mid-epoch at the last pushed step or later, and finishes; max_retries=0 shows a lost node is not
    counted as a bug."""
    cluster, node_a = two_node_cluster
    storage = f"file://{tmp_path}"
    spec = _spec(storage, "data.synthetic.n_train_per_class=96", f"failure.checkpoint_every_steps={EVERY}",
                 "failure.max_retries=0")
    tid = trial_id(expand_trials(spec)[0])
    ckpt = Path(Storage(storage).checkpoint_path(spec.name, tid))
    out: dict[str, object] = {}

    def run():  # in a thread: Ray's node start/stop must happen on the main thread
        try:
            out["res"] = run_experiment(spec, progress=False)
        except BaseException as e:  # re-raised below on the main thread
            out["error"] = e

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    (t1, s1), (t2, s2) = _step_checkpoints(ckpt, count=2, deadline=time.monotonic() + 240)
    per_step = (t2 - t1) / (s2 - s1)  # node A's pace
    time.sleep(max(0.0, t2 + per_step * EVERY / 2 - time.time()))  # halfway to the next checkpoint: a typical loss
    cluster.remove_node(node_a, allow_graceful=False)
    killed = time.time()
    node_b = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    runner.join(timeout=300)
    assert "error" not in out and "res" in out, out.get("error")
    res = out["res"]
    assert res.failed == {} and res.ran == [tid]
    m = res.metrics[tid]
    assert m["node_id"] == node_b.node_id != node_a.node_id
    assert m["resumed_from_epoch"] == 0 and s2 <= m["resumed_from_step"] < STEPS  # mid-epoch, no earlier than seen
    assert m["resumed_from_step"] % EVERY == 0 and m["epoch"] == 1
    (row,) = read_rows(storage, spec.name).to_pylist()
    assert row["trial_id"] == tid and row["status"] == "finished" and row["epochs"] == 1
    assert pq.read_table(tmp_path / f"experiment={spec.name}" / f"{tid}.parquet").num_rows == 1
    # the work lost: the steps node A trained after the checkpoint the trial resumed from
    lost = (killed - t2) / per_step - (m["resumed_from_step"] - s2)
    print(f"\nlost work: resumed at step {m['resumed_from_step']} (seen {s2}); {per_step * 1e3:.0f} ms/step on node A; "
          f"killed {killed - t2:.2f} s after the step-{s2} checkpoint: ~{max(lost, 0):.1f} steps lost "
          f"(bound {EVERY})")


def test_a_bug_is_retried_max_retries_times_then_gets_a_failed_row(ray_session, tmp_path):
    spec = _spec(str(tmp_path), "failure.max_retries=1", f"model.weights={tmp_path / 'missing.pt'}")
    res = run_experiment(spec, progress=False)
    (tid,) = res.trial_ids
    assert list(res.failed) == [tid] and "raised on 2 attempts" in res.failed[tid] and "missing.pt" in res.failed[tid]
    (row,) = read_rows(str(tmp_path), spec.name).to_pylist()
    assert row["status"] == "failed" and row["error"] == res.failed[tid]
    errors = Storage(str(tmp_path)).errors_path(spec.name, tid)
    assert json.loads(Path(errors).read_text())["errors"] == 2  # one attempt and one retry, counted in storage


def test_the_count_of_a_trials_errors_is_per_driver_run(tmp_path):
    spec = _spec(str(tmp_path), "failure.max_retries=1")
    storage, bug = Storage(str(tmp_path)), ValueError("line 1\nthe bug")
    assert _count_error(storage, spec, "t1", "host:1", bug) is None  # the first: retried
    assert _count_error(storage, spec, "t1", "host:1", bug) == (
        "ValueError: the bug (raised on 2 attempts; failure.max_retries=1)")
    assert _count_error(storage, spec, "t2", "host:1", bug) is None  # another trial counts its own
    assert _count_error(storage, spec, "t1", "host:2", bug) is None  # a new run (driver) counts from zero


def test_lost_node_tells_a_node_or_process_death_from_an_exception_of_the_code():
    import ray.exceptions as X
    from ray.train import WorkerGroupError

    died = X.ActorDiedError()
    assert lost_node(died) and lost_node(X.NodeDiedError("node gone"))
    assert lost_node(WorkerGroupError("rank 1 died", {1: died}))  # a DDP worker group that lost a node
    assert not lost_node(WorkerGroupError("rank 0 raised", {0: ValueError("bug")}))
    try:
        try:
            raise died
        except X.RayActorError as e:
            raise RuntimeError("the trainer stopped") from e
    except RuntimeError as wrapped:
        assert lost_node(wrapped)
    assert not lost_node(FileNotFoundError("missing.pt")) and not lost_node(KeyError("x"))
