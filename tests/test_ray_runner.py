"""The Ray layer: resource checks, checkpoints in storage, DDP trials, a simulated two-node cluster.

End-to-end runs use tiny synthetic data (conftest.TINY). The cluster tests
shut the shared session Ray down and start their own; ``ray_session``
restarts the shared one for later tests.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import TINY

from cgc_ray.config import (
    PRESETS,
    apply_overrides,
    expand_trials,
    load_spec,
    trial_id,
)
from cgc_ray.results.table import completed_trial_ids, read_rows
from cgc_ray.runner.driver import run_experiment
from cgc_ray.runner.resources import (
    WAITER_BUNDLE,
    ResourceError,
    check_fits,
    trial_bundles,
)
from cgc_ray.runner.worker import CheckpointStore


def _spec(preset: str, storage: Path | str, *overrides: str):
    return apply_overrides(load_spec(PRESETS[preset]), [f"storage={storage}", *TINY, *overrides])


# ---------------------------------------------------------------- pure functions


def test_trial_bundles_single_worker_trains_in_the_tune_function():
    spec = _spec("lambda_ablation_demo", Path("/tmp/unused"), "scaling.cpus_per_worker=2",
                 "scaling.gpus_per_worker=0.25")
    assert trial_bundles(spec, gpu=False) == [{"CPU": 2.0}]
    assert trial_bundles(spec, gpu=True) == [{"CPU": 2.0, "GPU": 0.25}]


def test_trial_bundles_ddp_waiter_holds_no_cpu():
    spec = _spec("lambda_ablation_demo", Path("/tmp/unused"), "scaling.num_workers=3",
                 "scaling.gpus_per_worker=1")
    b = trial_bundles(spec, gpu=True)
    assert b == [WAITER_BUNDLE] + [{"CPU": 1.0, "GPU": 1.0}] * 3
    assert "CPU" not in b[0]


def test_check_fits_places_bundles_per_node():
    two_cpus = [{"CPU": 2.0, "memory": 1e9}]
    check_fits([dict(WAITER_BUNDLE), {"CPU": 1.0}, {"CPU": 1.0}], two_cpus)  # DDP x2 on a 2-CPU node
    check_fits([{"CPU": 1.0}, {"CPU": 1.0}], [{"CPU": 1.0}, {"CPU": 1.0}])  # one bundle per node
    with pytest.raises(ResourceError):
        check_fits([{"CPU": 1.0}] * 3, two_cpus)
    # 2 CPUs in total, but no single node can hold a 2-CPU bundle
    with pytest.raises(ResourceError) as e:
        check_fits([{"CPU": 2.0}], [{"CPU": 1.0}, {"CPU": 1.0}])
    assert "{CPU: 2}" in str(e.value) and "{CPU: 1}; {CPU: 1}" in str(e.value)
    # GPU bundles first: the fractional GPU bundles share the one GPU
    check_fits([{"CPU": 1.0, "GPU": 0.5}, {"CPU": 1.0, "GPU": 0.5}], [{"CPU": 2.0, "GPU": 1.0}])
    with pytest.raises(ResourceError, match=r"GPU: 1"):
        check_fits([{"CPU": 1.0, "GPU": 1.0}], [{"CPU": 8.0}])
    with pytest.raises(ResourceError, match="no nodes"):
        check_fits([{"CPU": 1.0}], [])


def test_checkpoint_store_pulls_and_pushes_through_a_uri_filesystem(tmp_path):
    """A ``file://`` URI goes the remote way (pyarrow filesystem copy), like s3:// would."""
    uri = f"file://{tmp_path / 'store'}"
    a = CheckpointStore(uri, "exp", "abc123")
    assert not a.is_local and a.remote == f"{tmp_path}/store/_checkpoints/exp/abc123/checkpoint.pt"
    a.pull()  # nothing stored yet: no file appears
    assert not a.local_path.exists()
    import torch

    from cgc_ray.models.checkpoint import save_checkpoint

    model = torch.nn.Linear(2, 2)
    save_checkpoint(a.local_path, model, torch.optim.SGD(model.parameters(), lr=0.1), None, 1)
    epoch_1 = a.local_path.read_bytes()
    a.push()
    assert Path(a.remote).read_bytes() == epoch_1
    a.cleanup()
    assert not a.workdir.exists()

    b = CheckpointStore(uri, "exp", "abc123")  # another attempt, elsewhere
    assert b.workdir != a.workdir
    b.pull()
    assert b.local_path.read_bytes() == epoch_1
    b.cleanup()

    local = CheckpointStore(str(tmp_path / "plain"), "exp", "t1")
    assert local.is_local and local.local_path == tmp_path / "plain/_checkpoints/exp/t1/checkpoint.pt"


# ---------------------------------------------------------------- resources on a live Ray


def test_unfittable_request_fails_in_seconds(ray_session, tmp_path):
    spec = _spec("lambda_ablation_demo", tmp_path, "scaling.cpus_per_worker=64")
    t0 = time.monotonic()
    with pytest.raises(ResourceError) as e:
        run_experiment(spec, progress=False)
    assert time.monotonic() - t0 < 10
    msg = str(e.value)
    assert "{CPU: 64}" in msg and "{CPU: 2}" in msg and "scaling.cpus_per_worker" in msg
    assert not (tmp_path / "experiment=lambda_ablation").exists()


# ---------------------------------------------------------------- DDP


@pytest.mark.slow
def test_ddp_trial_two_workers_writes_one_row(ray_session, tmp_path):
    """Two gloo workers (1 CPU each) on a 2-CPU Ray: the Tune function holds no CPU."""
    spec = _spec("lambda_ablation_demo", tmp_path, "sweep.grid.method.lam=[0.1]", "sweep.grid.seed=[0]",
                 "optim.epochs=2", "scaling.num_workers=2", "scaling.gpus_per_worker=1")
    res = run_experiment(spec, progress=False)
    (tid,) = res.trial_ids
    assert res.failed == {} and res.ran == [tid]
    rows = read_rows(str(tmp_path), "lambda_ablation").to_pylist()
    assert len(rows) == 1 and rows[0]["trial_id"] == tid and rows[0]["epochs"] == 2
    assert rows[0]["lam"] == 0.1 and 0 <= rows[0]["top1"] <= 100
    m = res.metrics[tid]
    assert m["row_written"] == 1 and m["resumed_from_epoch"] == 0
    assert m["node_id"] == ray_session.get_runtime_context().get_node_id()
    # rank 0 checkpointed into storage, after the last epoch
    import torch

    ckpt = torch.load(tmp_path / "_checkpoints/lambda_ablation" / tid / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1  # 0-based: the second epoch
    assert not any(k.startswith("module.") for k in ckpt["model"])


# ---------------------------------------------------------------- a simulated two-node cluster


@pytest.fixture
def two_node_cluster(monkeypatch):
    """Head with 0 CPUs (schedules nothing) + one 1-CPU worker node; the shared Ray is stopped first.

    All nodes listen on loopback; ``ray.init`` would rewrite a 127.0.0.1
    address to the host's network IP, which need not be reachable here.
    """
    import ray
    import ray._private.services
    from ray.cluster_utils import Cluster

    ray.shutdown()
    monkeypatch.setattr(ray._private.services, "resolve_ip_for_localhost", lambda host: host)
    # Ray's Cluster writes its address into the machine's `ray start` record (/tmp/ray/ray_current_cluster) "for
    # convenience in unit testing" and deletes that record at shutdown: a user's `cgc-ray run` meanwhile would
    # attach to this test's cluster, and the user's own `ray start` Ray would lose its record. We attach by address.
    record = Path(ray._common.utils.get_ray_address_file(None))
    before = record.read_bytes() if record.exists() else None
    monkeypatch.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
    monkeypatch.setattr(ray._common.utils, "reset_ray_address", lambda *a, **k: None)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "node_ip_address": "127.0.0.1"})
    worker = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    assert (record.read_bytes() if record.exists() else None) == before, f"the test's cluster is in {record}"
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()
    assert (record.read_bytes() if record.exists() else None) == before, f"{record} was changed"


@pytest.mark.slow
def test_trial_lands_on_worker_node_and_survives_losing_it(two_node_cluster, tmp_path):
    cluster, node_a = two_node_cluster
    # 0) a local storage folder on two nodes is refused before any trial runs (rows would land on worker disks)
    with pytest.raises(ResourceError, match=r"is a local folder but this cluster has 2 nodes.*s3://"):
        run_experiment(_spec("lambda_ablation_demo", tmp_path, "sweep.grid.seed=[0]"), progress=False)
    assert not (tmp_path / "experiment=lambda_ablation").exists()
    # 1) placement: the only node with CPUs runs the trial; file:// says "a filesystem every node mounts"
    storage = f"file://{tmp_path}"
    spec = _spec("lambda_ablation_demo", storage, "sweep.grid.method.lam=[0.0]", "sweep.grid.seed=[0]")
    res = run_experiment(spec, progress=False)
    (tid0,) = res.trial_ids
    assert res.ran == [tid0] and res.metrics[tid0]["node_id"] == node_a.node_id

    # 2) remove that node after its first checkpoint: the trial moves to a new node and resumes
    spec = _spec("lambda_ablation_demo", storage, "sweep.grid.method.lam=[1.0]", "sweep.grid.seed=[0]",
                 "optim.epochs=6", "data.synthetic.n_train_per_class=40")
    (trial,) = expand_trials(spec)
    tid = trial_id(trial)
    ckpt = tmp_path / "_checkpoints/lambda_ablation" / tid / "checkpoint.pt"
    out: dict[str, object] = {}

    def run():  # in a thread: Ray's node start/stop must happen on the main thread
        try:
            out["res"] = run_experiment(spec, progress=False)
        except BaseException as e:  # re-raised below on the main thread
            out["error"] = e

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    deadline = time.monotonic() + 240
    while not ckpt.exists() and runner.is_alive():
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.05)
    cluster.remove_node(node_a, allow_graceful=False)  # first: the trial must not finish on node A
    node_b = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    runner.join(timeout=300)
    assert "error" not in out and "res" in out, out.get("error")
    res = out["res"]
    assert res.failed == {} and res.ran == [tid]
    m = res.metrics[tid]
    assert m["node_id"] == node_b.node_id != node_a.node_id
    assert m["resumed_from_epoch"] >= 1 and m["epoch"] == 6
    files = sorted(p.name for p in (tmp_path / "experiment=lambda_ablation").iterdir())
    assert files.count(f"{tid}.parquet") == 1 and not any(f.startswith(".") for f in files)
    table = pq.read_table(tmp_path / "experiment=lambda_ablation" / f"{tid}.parquet")
    assert table.num_rows == 1 and table["epochs"][0].as_py() == 6
    assert completed_trial_ids(storage, "lambda_ablation") == {tid0, tid}
