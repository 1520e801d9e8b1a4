"""The storage root: every path under it, its one atomic write, and the one rule of ``--storage``."""

import json
import threading
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from cgc_ray.config import PRESETS, expand_trials, load_spec
from cgc_ray.config.paths import storage_location
from cgc_ray.results.summary import write_summary
from cgc_ray.results.table import write_row
from cgc_ray.runner.worker import CheckpointStore
from cgc_ray.storage import Storage
from conftest import result_row

S3 = "s3://bucket/prefix?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"


# ---------------------------------------------------------------- where things live


def test_local_root_is_made_absolute_and_owns_every_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Storage("results")
    root = str(tmp_path / "results")
    assert (s.root, s.uri, s.is_local, s.posix) == (root, root, True, True)
    assert s.experiment_dir("fewshot") == f"{root}/experiment=fewshot"
    assert s.row_path("fewshot", "0123456789ab") == f"{root}/experiment=fewshot/0123456789ab.parquet"
    assert s.corrupt_dir("fewshot") == f"{root}/experiment=fewshot/_corrupt"
    assert s.checkpoint_path("fewshot", "0123456789ab") == f"{root}/_checkpoints/fewshot/0123456789ab/checkpoint.pt"
    assert s.summary_path("fewshot") == f"{root}/_summary/fewshot.parquet"
    assert s.leases_dir("fewshot") == f"{root}/_leases/fewshot"
    assert s.figures_dir("fewshot") == f"{root}/_figures/fewshot"
    assert s.ray_path == f"{root}/_ray"


def test_s3_query_parameters_stay_at_the_end_of_rays_path():
    s = Storage(S3)
    assert (s.root, s.is_local, s.posix) == ("bucket/prefix", False, False)
    assert s.checkpoint_path("e", "t1") == "bucket/prefix/_checkpoints/e/t1/checkpoint.pt"
    assert s.ray_path == "s3://bucket/prefix/_ray?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"
    fs, path = pafs.FileSystem.from_uri(s.ray_path)  # pyarrow (as Ray does) reads the endpoint back out of it
    assert path == "bucket/prefix/_ray" and fs.type_name == "s3"


def test_file_and_gs_uris(tmp_path):
    f = Storage(f"file://{tmp_path}/store/")
    assert (f.root, f.is_local, f.posix) == (f"{tmp_path}/store", False, True)  # shared mount: a URI, POSIX files
    assert f.ray_path == f"file://{tmp_path}/store/_ray"
    g = Storage("gs://bucket/p")
    assert (g.root, g.is_local, g.posix, g.ray_path) == ("bucket/p", False, False, "gs://bucket/p/_ray")
    assert g.summary_path("x") == "bucket/p/_summary/x.parquet"


@pytest.mark.parametrize("name", ["", "a/b", "_hidden", ".dot", "abc\n", "a b", "a\\b"])
def test_names_that_are_not_one_plain_folder_are_refused(tmp_path, name):
    s = Storage(str(tmp_path))
    with pytest.raises(ValueError, match="cannot be a folder or file name"):
        s.experiment_dir(name)
    with pytest.raises(ValueError, match="trial_id"):
        s.checkpoint_path("exp", name)


# ---------------------------------------------------------------- the one atomic write


def _only_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    s = Storage(str(tmp_path))
    path = s.summary_path("exp")
    s.write_bytes(path, b"old")

    def half_then_fail(target):
        with s.fs.open_output_stream(target) as f:
            f.write(b"ha")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        s.write_atomic(path, half_then_fail)
    assert Path(path).read_bytes() == b"old" and _only_files(Path(path).parent) == ["exp.parquet"]
    with pytest.raises(OSError):
        s.write_atomic(s.summary_path("new"), half_then_fail)
    assert _only_files(Path(path).parent) == ["exp.parquet"]  # no final file, no temporary


def test_two_summary_writers_at_once_both_succeed(tmp_path, monkeypatch):
    """Both write their temporary file before either renames: with one shared temp name the second rename fails."""
    both_written = threading.Barrier(2, timeout=20)
    real = pq.write_table

    def write_then_wait(table, where, **kw):
        real(table, where, **kw)
        both_written.wait()

    monkeypatch.setattr(pq, "write_table", write_then_wait)
    errors, paths = [], []

    def writer():
        try:
            paths.append(write_summary(str(tmp_path), "fewshot", [], []))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and paths == [Storage(str(tmp_path)).summary_path("fewshot")] * 2
    assert _only_files(tmp_path / "_summary") == ["fewshot.parquet"]
    assert pq.read_table(paths[0]).num_rows == 0


def test_checkpoint_push_killed_mid_copy_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    store = CheckpointStore(f"file://{tmp_path}/store", "exp", "abc123")
    store.local_path.write_bytes(b"epoch-1")
    store.push()
    real = pafs.copy_files

    def copy_half(src, dst, **kw):  # the process dies after 3 bytes of the new checkpoint
        with open(dst, "wb") as f:
            f.write(Path(src).read_bytes()[:3])
        raise KeyboardInterrupt

    store.local_path.write_bytes(b"epoch-2")
    monkeypatch.setattr(pafs, "copy_files", copy_half)
    with pytest.raises(KeyboardInterrupt):
        store.push()
    assert Path(store.remote).read_bytes() == b"epoch-1"
    assert _only_files(Path(store.remote).parent) == ["checkpoint.pt"]
    monkeypatch.setattr(pafs, "copy_files", real)
    store.push()
    assert Path(store.remote).read_bytes() == b"epoch-2"
    store.cleanup()

    fresh = CheckpointStore(f"file://{tmp_path}/store", "exp", "def456")  # no previous checkpoint
    fresh.local_path.write_bytes(b"epoch-1")
    monkeypatch.setattr(pafs, "copy_files", copy_half)
    with pytest.raises(KeyboardInterrupt):
        fresh.push()
    assert not Path(fresh.remote).parent.exists() or _only_files(Path(fresh.remote).parent) == []
    fresh.cleanup()


# ---------------------------------------------------------------- one rule for --storage


def test_storage_location_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CGC_RAY_STORAGE", raising=False)
    assert storage_location(None) == str(tmp_path / "results")
    assert storage_location(None, "./results") == str(tmp_path / "results")  # the spec's default is no choice
    monkeypatch.setenv("CGC_RAY_STORAGE", S3)
    assert storage_location(None) == S3
    assert storage_location(None, "mine") == str(tmp_path / "mine")  # a spec that names its storage keeps it
    assert storage_location("flag", "mine") == str(tmp_path / "flag")
    assert storage_location("rel", cwd="/elsewhere") == "/elsewhere/rel"


def _a_row(experiment_preset: str = "lambda_ablation_demo") -> dict:
    trial = expand_trials(load_spec(PRESETS[experiment_preset]))[0]
    return result_row(trial, {"top1": 50.0})


def test_evaluate_writes_to_CGC_RAY_STORAGE(tmp_path, monkeypatch, capsys):
    import cgc_ray.explain.evaluation as evaluation
    from cgc_ray.cli.main import main

    row = _a_row()
    # what is under test is where the row goes: no checkpoint is read, nothing is evaluated
    monkeypatch.setattr(evaluation, "checkpoint_spec", lambda *a, **k: None)
    monkeypatch.setattr(evaluation, "evaluate_checkpoint", lambda *a, **k: {"ch_protocol": "fast", "n_eval": 4})
    monkeypatch.setattr(evaluation, "result_row", lambda result: row)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CGC_RAY_STORAGE", str(tmp_path / "cluster"))
    assert main(["evaluate", "ck.pt", "--dataset", "synthetic", "--format", "json"]) == 0
    written = json.loads(capsys.readouterr().out)["written"]
    assert written == Storage(str(tmp_path / "cluster")).row_path("evaluate", row["trial_id"])
    assert not (tmp_path / "results").exists()
    assert main(["evaluate", "ck.pt", "--dataset", "synthetic", "--format", "json", "--storage", "mine"]) == 0
    assert json.loads(capsys.readouterr().out)["written"].startswith(f"{tmp_path}/mine/")


def test_report_reads_CGC_RAY_STORAGE(tmp_path, monkeypatch, capsys):
    from cgc_ray.cli.main import main

    row = _a_row()
    write_row(str(tmp_path / "cluster"), "lambda_ablation", row)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CGC_RAY_STORAGE", str(tmp_path / "cluster"))
    top1 = lambda out: [(r["experiment"], r["n"], r["mean"]) for r in json.loads(out) if r["metric"] == "top1"]
    assert main(["report", "--format", "json"]) == 0
    assert top1(capsys.readouterr().out) == [("lambda_ablation", 1, 50.0)]
    monkeypatch.setenv("CGC_RAY_STORAGE", str(tmp_path / "empty"))
    assert main(["report", "--format", "json", "--storage", "cluster"]) == 0  # the flag wins, relative to cwd
    assert top1(capsys.readouterr().out) == [("lambda_ablation", 1, 50.0)]
