"""Checkpoints: every write atomic, an unreadable one set aside (the trial still finishes), retention, leftovers.

Truncation is real (a saved checkpoint cut to a third of its bytes, as a killed copy leaves it) and goes
through the product's resume paths: ``run_trial`` on a trial folder, the worker's pull from a URI storage,
and a whole run through Ray.
"""

import errno
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import TINY

from cgc_ray.config import PRESETS, SpecError, apply_overrides, load_spec, trial_id
from cgc_ray.config.pretrained import pretraining_spec
from cgc_ray.models import checkpoint as C
from cgc_ray.models.resnet import build_model
from cgc_ray.results.table import read_rows
from cgc_ray.runner.worker import CheckpointStore
from cgc_ray.storage import Storage


def _spec(storage, *overrides):
    return apply_overrides(load_spec(PRESETS["lambda_ablation_demo"]),
                           [f"storage={storage}", *TINY, "sweep.grid={}", "method.lam=0.5", *overrides])


def _truncate_to_a_third(path: Path) -> bytes:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return data[: len(data) // 3]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _small_run(path: Path, epoch: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build_model("resnet_small", 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()  # momentum buffers exist, as in any checkpoint after the first step
    C.save_checkpoint(path, model, opt, None, epoch, metrics={"top1": 12.5}, extra={"arch": "resnet_small"})
    return model, opt


# ---------------------------------------------------------------- an unreadable checkpoint


def test_a_truncated_checkpoint_is_set_aside_and_run_trial_finishes_from_scratch(tmp_path):
    from cgc_ray.train.trial import run_trial

    spec = _spec(tmp_path, "optim.epochs=2")
    ckpt = tmp_path / "t" / "checkpoint.pt"

    def killed_after_first_epoch(metrics, checkpoint):
        raise KeyboardInterrupt  # after epoch 1 was checkpointed

    with pytest.raises(KeyboardInterrupt):
        run_trial(spec, trial_dir=tmp_path / "t", report=killed_after_first_epoch)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 0
    cut = _truncate_to_a_third(ckpt)

    seen = []
    with pytest.warns(RuntimeWarning, match=r"cannot be read .*moved to .*checkpoint\.pt\.corrupt-.*from scratch"):
        final = run_trial(spec, trial_dir=tmp_path / "t", report=lambda m, c: seen.append(m["epoch"]))
    assert seen == [1, 2] and final["epoch"] == 2  # trained from scratch, to the end
    (aside,) = (tmp_path / "t").glob("checkpoint.pt.corrupt-*")
    assert aside.read_bytes() == cut  # the bad bytes are kept for a look, out of the resume path
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1  # a whole checkpoint of the last epoch
    assert not [p for p in (tmp_path / "t").iterdir() if p.name.endswith(".tmp")]


def test_the_worker_sets_a_truncated_stored_checkpoint_aside(tmp_path):
    """A URI storage (``file://``, like ``s3://``): the stored file is moved aside, nothing reaches the engine."""
    uri = f"file://{tmp_path / 'store'}"
    store = CheckpointStore(uri, "exp", "abc123abc123")
    Path(store.remote).parent.mkdir(parents=True)
    _small_run(Path(store.remote))
    cut = _truncate_to_a_third(Path(store.remote))
    with pytest.warns(RuntimeWarning, match="cannot be read.*moved to.*corrupt-.*from scratch"):
        store.pull()
    assert not store.local_path.exists() and not Path(store.remote).exists()
    (aside,) = Path(store.remote).parent.glob("checkpoint.pt.corrupt-*")
    assert aside.read_bytes() == cut
    store.cleanup()

    again = CheckpointStore(uri, "exp", "abc123abc123")  # a second rank, or the next retry: nothing to resume
    again.pull()
    assert not again.local_path.exists()
    again.cleanup()


def test_a_read_error_is_not_taken_for_a_corrupt_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    model, opt = _small_run(path)

    def io_error(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(C.torch, "load", io_error)
    with pytest.raises(OSError, match="Input/output"):
        C.resume_checkpoint(path, model, opt, epochs=3)
    assert path.exists() and not list(tmp_path.glob("*.corrupt-*"))


def test_a_run_through_ray_finishes_a_trial_whose_stored_checkpoint_is_truncated(ray_session, tmp_path):
    """The product path: the driver, Tune, the worker pulling from a ``file://`` storage, the row."""
    from cgc_ray.runner.driver import run_experiment

    storage = f"file://{tmp_path}"
    spec = _spec(storage, "optim.epochs=2")
    tid = trial_id(spec)
    stored = Path(Storage(storage).checkpoint_path(spec.name, tid))
    stored.parent.mkdir(parents=True)
    _small_run(stored)  # a checkpoint of another model: it never loads, it is cut short first
    _truncate_to_a_third(stored)

    res = run_experiment(spec, progress=False)
    assert res.failed == {} and res.ran == [tid]
    assert res.metrics[tid]["resumed_from_epoch"] == 0
    (row,) = read_rows(storage, spec.name).to_pylist()
    assert row["status"] == "finished" and row["epochs"] == 2
    assert len(list(stored.parent.glob("checkpoint.pt.corrupt-*"))) == 1
    final = torch.load(stored, weights_only=True)  # the default retention: the finished model, no training state
    assert final["epoch"] == 1 and final["optimizer"] is None and final["rng"] is None
    assert "conv1.weight" in final["model"]


# ---------------------------------------------------------------- atomic writes and leftovers


def test_a_failed_save_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    model, opt = _small_run(path, epoch=3)
    before = path.read_bytes()
    real_save = torch.save

    def disk_full(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(C.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        C.save_checkpoint(path, model, opt, None, 4)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    monkeypatch.setattr(C.torch, "save", real_save)
    assert C.resume_checkpoint(path, model, opt, epochs=10)["epoch"] == 3


def test_a_push_cut_short_leaves_the_stored_checkpoint_whole(tmp_path, monkeypatch):
    """The worker's upload to a ``file://`` storage (a shared mount) goes through a temporary file too."""
    import pyarrow.fs as pafs

    store = CheckpointStore(f"file://{tmp_path / 'store'}", "exp", "abc123abc123")
    _small_run(store.local_path, epoch=1)
    store.push()
    stored = Path(store.remote).read_bytes()
    _small_run(store.local_path, epoch=2)

    def killed_mid_copy(source, destination, **kwargs):
        Path(destination).write_bytes(Path(source).read_bytes()[:1000])
        raise OSError(errno.EIO, "connection reset")

    monkeypatch.setattr(pafs, "copy_files", killed_mid_copy)
    with pytest.raises(OSError, match="connection reset"):
        store.push()
    assert Path(store.remote).read_bytes() == stored
    assert sorted(p.name for p in Path(store.remote).parent.iterdir()) == ["checkpoint.pt"]
    store.cleanup()


def test_temporary_files_of_killed_saves_are_removed_and_live_ones_kept(tmp_path):
    path = tmp_path / "checkpoint.pt"
    dead = tmp_path / f".checkpoint.pt.{_dead_pid()}.0123abcd.tmp"
    live = tmp_path / f".checkpoint.pt.{os.getppid()}.4567cdef.tmp"  # a save in progress in another process
    other = tmp_path / f".other.pt.{_dead_pid()}.89abcdef.tmp"
    for p in (dead, live, other):
        p.write_bytes(b"partial")
    _small_run(path)
    assert not dead.exists() and live.exists() and other.exists()


def test_working_folders_of_killed_workers_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = tmp_path / f"cgc-ckpt-{_dead_pid()}-x1y2"
    live = tmp_path / f"cgc-ckpt-{os.getppid()}-z3w4"
    unrelated = tmp_path / "cgc-ckpt-notapid"
    for d in (dead, live, unrelated):
        d.mkdir()
        (d / "checkpoint.pt").write_bytes(b"205 MB, in real life")
    store = CheckpointStore(f"file://{tmp_path / 'store'}", "exp", "abc123abc123")
    assert not dead.exists() and live.exists() and unrelated.exists()
    assert store.workdir.parent == tmp_path and store.workdir.name.startswith(f"cgc-ckpt-{os.getpid()}-")
    store.cleanup()


# ---------------------------------------------------------------- retention


def test_keep_model_only_halves_the_file_and_every_reader_but_resume_still_reads_it(tmp_path):
    path = tmp_path / "checkpoint.pt"
    model, _ = _small_run(path, epoch=4)
    full = path.stat().st_size
    C.keep_model_only(path)
    params = sum(p.numel() for p in model.parameters()) * 4
    assert 0 <= full - path.stat().st_size - params < 40_000  # the momentum buffers, and some KB of RNG states
    state, _, _ = C.read_state_dict(str(path), arch="resnet_small")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)
    assert C.read_header(path) == {"epoch": 4, "step": 0, "extra": {"arch": "resnet_small"}}
    clf = C.load_classifier(path)
    assert clf.arch == "resnet_small" and clf.epochs == 5


def test_a_model_only_checkpoint_ends_a_finished_run_and_restarts_an_unfinished_one(tmp_path):
    path = tmp_path / "checkpoint.pt"
    trained, _ = _small_run(path, epoch=4)
    C.keep_model_only(path)
    torch.manual_seed(1)
    model = build_model("resnet_small", 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = C.resume_checkpoint(path, model, opt, epochs=5)  # epoch 4 was the last: nothing left to train
    assert state["metrics"] == {"top1": 12.5}
    torch.testing.assert_close(model.state_dict(), trained.state_dict(), rtol=0, atol=0)

    fresh = build_model("resnet_small", 3)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="without its optimiser state.*from scratch"):
        assert C.resume_checkpoint(path, fresh, opt, epochs=10) is None
    torch.testing.assert_close(fresh.state_dict(), before, rtol=0, atol=0)  # nothing half-restored


def test_keep_checkpoint_is_not_part_of_a_trials_identity(tmp_path):
    ids = {trial_id(_spec(tmp_path, f"failure.keep_checkpoint={keep}")) for keep in ("full", "model", "none")}
    assert len(ids) == 1
    assert _spec(tmp_path).failure.keep_checkpoint == "model"


def test_a_pretraining_that_keeps_no_checkpoint_is_refused(tmp_path):
    pre = tmp_path / "pre.yaml"
    pre.write_text(_spec(tmp_path, "failure.keep_checkpoint=none").model_dump_json())
    with pytest.raises(SpecError, match="keep_checkpoint=none, which leaves no checkpoint"):
        pretraining_spec(f"experiment:{pre}", str(tmp_path))


def test_keep_none_removes_the_checkpoint_once_the_row_is_written(ray_session, tmp_path):
    from cgc_ray.runner.driver import run_experiment

    spec = _spec(tmp_path, "failure.keep_checkpoint=none", "method.lam=0.25")
    res = run_experiment(spec, progress=False)
    (tid,) = res.ran
    (row,) = read_rows(str(tmp_path), spec.name).to_pylist()
    assert row["trial_id"] == tid and row["status"] == "finished"
    assert not Path(Storage(str(tmp_path)).checkpoint_path(spec.name, tid)).exists()
