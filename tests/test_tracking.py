"""Tracking and Ray's own files: --callback mlflow into a real local MLflow store, Tune's files per trial, the
failed trial's error.txt named in the one-line failure message, and --dashboard bound to loopback."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY

from cgc_ray.cli import experiment as experiment_cli
from cgc_ray.config import expand_trials, trial_id
from cgc_ray.results.table import read_rows
from cgc_ray.runner import cluster
from cgc_ray.runner.tracking import TrackingError, check_trackers, tune_trial_dir


def _args(storage: Path, *overrides: str, flags: tuple[str, ...] = ()) -> list[str]:
    out = ["--storage", str(storage), "--no-progress", "--no-report", *flags]
    for o in [*TINY, *overrides]:
        out += ["--set", o]
    return out


@pytest.mark.slow
def test_mlflow_store_tune_files_and_the_failed_trials_error_txt(ray_session, tmp_path, monkeypatch, capsys):
    """One sweep, two trials (one fails at start): MLflow's file store has each trial's params and per-epoch
    metrics, Tune's files are under the storage, and the failure's one line points to its error.txt."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = f"file://{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this before it writes a file store
    storage = tmp_path / "results"
    missing = tmp_path / "missing.pt"
    overrides = ("sweep.grid.method.lam=[0.5]", "sweep.grid.seed=[0]", "optim.epochs=2", "eval_every=1",
                 "failure.max_retries=0", f"sweep.variants=[{{}}, {{model.weights: '{missing}'}}]")
    args = _args(storage, *overrides, flags=("--callback", "mlflow"))
    assert experiment_cli.main("lambda_ablation", args) == 1  # a failed trial: exit 1
    spec = experiment_cli.resolve_spec(experiment_cli.build_parser("t", "").parse_args(args), "lambda_ablation")
    ok, bad = [trial_id(t) for t in expand_trials(spec)]

    rows = {r["trial_id"]: r for r in read_rows(str(storage), "lambda_ablation").to_pylist()}
    assert rows[ok]["status"] == "finished" and rows[bad]["status"] == "failed"
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("lambda_ablation").experiment_id])
    by_id = {r.data.params["trial_id"]: r for r in runs}
    # a trial out of retries reports its error and returns (runner.worker), so Tune, and MLflow, call it finished
    assert set(by_id) == {ok, bad} and by_id[ok].info.status == "FINISHED"
    # the hyperparameters under their spec names: the sweep's axes (runner.search's param space), as MLflow keeps them
    params = by_id[ok].data.params
    assert (params["method.lam"], params["seed"], params["model.weights"]) == ("0.5", "0", "None")
    assert by_id[bad].data.params["model.weights"] == str(missing)
    run = by_id[ok].info.run_id
    # per epoch: top-1 at epochs 1 and 2 (then the row's report, at the end); the last is the row's value
    history = sorted(client.get_metric_history(run, "top1"), key=lambda m: m.step)
    assert [m.step for m in history][:2] == [1, 2] and history[-1].value == pytest.approx(rows[ok]["top1"])
    assert [m.value for m in sorted(client.get_metric_history(run, "epoch"), key=lambda m: m.step)][:2] == [1, 2]

    # Tune's own files of each trial, under the storage (README and runner/tracking.py say where)
    folder = Path(tune_trial_dir(str(storage), "lambda_ablation", ok))
    assert (folder / "progress.csv").is_file() and (folder / "params.json").is_file()
    assert list(folder.glob("events.out.tfevents.*"))  # TensorBoard's, which Tune writes by default
    error_txt = tune_trial_dir(str(storage), "lambda_ablation", bad, "error.txt")
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip().startswith(f"failed {bad}:")]
    assert "missing.pt" in line and line.endswith(f"(traceback: {error_txt})")
    assert "missing.pt" in Path(error_txt).read_text()  # the full traceback


def test_unknown_or_uninstalled_tracker_fails_before_ray(monkeypatch):
    with pytest.raises(TrackingError, match="not a tracker; choose from mlflow, wandb, tensorboard"):
        check_trackers(["neptune"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(TrackingError, match=r"pip install 'cgc-ray\[wandb\]'"):
        check_trackers(["tensorboard", "wandb"])


def test_each_tracker_is_tunes_own_callback_once_per_name():
    pytest.importorskip("mlflow")
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.logger import TBXLoggerCallback

    from cgc_ray.runner.tracking import tracking_callbacks

    got = tracking_callbacks(["tensorboard", "mlflow", "tensorboard"], "lambda_search")
    assert [type(c) for c in got] == [TBXLoggerCallback, MLflowLoggerCallback]
    assert got[1].experiment_name == "lambda_search" and got[1].tracking_uri is None  # MLflow's own rule decides
    assert tracking_callbacks([], "e") == []


def test_tune_trial_dir_keeps_a_uris_query_last():
    assert tune_trial_dir("/data/r", "exp", "abc") == "/data/r/_ray/exp/abc"
    uri = "s3://b/p?endpoint_override=127.0.0.1:9&scheme=http"
    assert tune_trial_dir(uri, "exp", "abc", "error.txt") == \
        "s3://b/p/_ray/exp/abc/error.txt?endpoint_override=127.0.0.1:9&scheme=http"


def test_error_txt_is_written_where_tune_keeps_a_trials_files(tmp_path):
    from cgc_ray.runner.tracking import write_error_txt
    from cgc_ray.storage import Storage

    write_error_txt(Storage(str(tmp_path)), "exp", "abc", "Traceback ...\nValueError: x")
    assert (tmp_path / "_ray" / "exp" / "abc" / "error.txt").read_text() == "Traceback ...\nValueError: x"


# ---------------------------------------------------------------- --dashboard


class _Init:
    """Stands in for ray.init: records its keyword arguments (no Ray, no dashboard is started)."""

    def __init__(self):
        self.kwargs = None

    def __call__(self, **kwargs):
        self.kwargs = kwargs
        return type("Context", (), {"dashboard_url": "127.0.0.1:8265"})()


@pytest.fixture
def fake_init(monkeypatch):
    import ray

    init = _Init()
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(cluster, "_check_dashboard_installed", lambda: None)
    return init


def test_dashboard_flag_reaches_ray_init_on_loopback(fake_init, capsys):
    assert cluster.connect("local", dashboard=True) is True
    assert fake_init.kwargs["include_dashboard"] is True and fake_init.kwargs["dashboard_host"] == "127.0.0.1"
    assert fake_init.kwargs["_node_ip_address"] == "127.0.0.1"
    assert "Ray dashboard at http://127.0.0.1:8265" in capsys.readouterr().err


def test_no_dashboard_unless_asked(fake_init, capsys):
    cluster.connect("local")
    assert fake_init.kwargs["include_dashboard"] is False and capsys.readouterr().err == ""


def test_cli_dashboard_flag_connects_with_the_dashboard_before_the_run(monkeypatch, tmp_path):
    from cgc_ray.runner import driver

    calls = []
    monkeypatch.setattr(cluster, "connect", lambda address, **kw: calls.append(("connect", address, kw)))

    def run(spec, **kw):
        calls.append(("run", kw["tracking"]))
        raise driver.StorageError("stop here")  # the flags are what this test checks, not a run

    monkeypatch.setattr(driver, "run_experiment", run)
    code = experiment_cli.main("lambda_ablation", _args(tmp_path, flags=("--dashboard", "--address", "local",
                                                                          "--callback", "tensorboard")))
    assert code == 2 and calls == [("connect", "local", {"dashboard": True}), ("run", ["tensorboard"])]


def test_missing_dashboard_packages_are_named(monkeypatch):
    import ray._private.utils as ray_utils

    monkeypatch.setattr(ray_utils, "get_dashboard_dependency_error", lambda: "No module named 'aiohttp'")
    with pytest.raises(cluster.ClusterError, match=r"pip install 'cgc-ray\[dashboard\]'"):
        cluster._check_dashboard_installed()
