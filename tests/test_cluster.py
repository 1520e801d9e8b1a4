"""Attaching to clusters, GPU detection from the autoscaler's node types, and refusals before Ray starts.

An opt-in test (``--autoscaler``) runs a real autoscaling cluster on this
machine with Ray's fake multi-node provider: a head with no CPUs and a GPU
worker type at ``min_workers: 0``, the way cluster/gpu.yaml is built. The last
test shows a user's ``ray start`` Ray is neither used nor stopped by the suite.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY, free_port, outside_ray

from cgc_ray.config import PRESETS, SpecError, apply_overrides, load_spec
from cgc_ray.runner.cluster import ClusterView, find_cluster, types_from_config
from cgc_ray.runner.driver import run_experiment
from cgc_ray.runner.resources import (
    ResourceError,
    concurrent_room,
    check_fits,
    trial_bundles,
    use_gpu,
)

REPO = Path(__file__).resolve().parent.parent
GPU_YAML = REPO / "cluster" / "gpu.yaml"


def _spec(*overrides: str, preset: str = "fewshot_demo"):
    return apply_overrides(load_spec(PRESETS[preset]), [*TINY, *overrides])


def _gpu_yaml_view(alive=({"CPU": 0.0},)) -> ClusterView:
    return ClusterView(False, [dict(a) for a in alive], types_from_config(yaml.safe_load(GPU_YAML.read_text())),
                       str(GPU_YAML))


# ---------------------------------------------------------------- node types and GPU detection


def test_node_types_read_from_the_launcher_config():
    types = types_from_config(yaml.safe_load(GPU_YAML.read_text()))
    config = yaml.safe_load(GPU_YAML.read_text())
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert set(types) == set(workers)
    for name, t in types.items():
        assert t.resources == {k: float(v) for k, v in workers[name]["resources"].items()}
        assert (t.min_workers, t.max_workers) == (workers[name]["min_workers"], workers[name]["max_workers"])


def test_bootstrap_config_on_the_head_is_found(tmp_path, monkeypatch):
    """``ray up`` writes the autoscaler config to ~/ray_bootstrap_config.yaml on the head."""
    from cgc_ray.runner import cluster

    monkeypatch.delenv(cluster.ENV_AUTOSCALING_CONFIG, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cluster._types_from_file() == ({}, None)
    (tmp_path / "ray_bootstrap_config.yaml").write_text(GPU_YAML.read_text())
    types, source = cluster._types_from_file()
    assert source == str(tmp_path / "ray_bootstrap_config.yaml") and any(t.resources.get("GPU") for t in types.values())


def test_gpus_come_from_node_types_when_gpu_workers_start_at_zero():
    view = _gpu_yaml_view()  # only the CPU: 0 head is alive
    assert view.autoscaling and view.multi_node and view.has_gpus()
    spec = _spec()
    assert use_gpu(spec, view, autoscale=True) is True
    assert trial_bundles(spec, gpu=True) == [{"CPU": 1.0, "GPU": 0.25}]
    check_fits(trial_bundles(spec, True), view.placement_nodes())  # fits a worker.gpu1 node yet to start
    with pytest.raises(ResourceError, match="GPU: 8"):
        check_fits(trial_bundles(_spec("scaling.gpus_per_worker=8"), True), view.placement_nodes())


def test_ddp_concurrency_counts_nodes_the_autoscaler_can_add():
    view = _gpu_yaml_view()
    ddp = _spec("scaling.num_workers=4", "scaling.gpus_per_worker=1", "scaling.cpus_per_worker=8")
    workers = trial_bundles(ddp, gpu=True)[1:]
    gpus = sum(t.resources.get("GPU", 0) * t.max_workers for t in view.node_types.values())
    assert gpus >= 8  # cluster/gpu.yaml: up to 8 single-GPU and 2 four-GPU nodes
    assert concurrent_room(workers, view.placement_nodes()) == gpus // 4
    assert concurrent_room(workers, view.nodes) == 1  # what the alive head alone would allow (at least one)


def test_gpu_decision_never_falls_back_silently():
    cpu_only = ClusterView(True, [{"CPU": 2.0}])
    assert use_gpu(_spec(), cpu_only) is False
    assert use_gpu(_spec("scaling.use_gpu=false"), _gpu_yaml_view()) is False
    with pytest.raises(ResourceError, match="scaling.use_gpu=true but no node"):
        use_gpu(_spec("scaling.use_gpu=true"), cpu_only)
    unknown = ClusterView(False, [{"CPU": 0.0}])  # --autoscale, but the node types cannot be read
    with pytest.raises(ResourceError, match="--set scaling.use_gpu=true"):
        use_gpu(_spec(), unknown, autoscale=True)
    assert use_gpu(_spec("scaling.use_gpu=true"), unknown, autoscale=True) is True


# ---------------------------------------------------------------- refused before Ray starts


def test_fractional_gpu_with_ddp_is_refused_by_the_spec():
    with pytest.raises(SpecError, match="DDP ranks cannot share a GPU"):
        _spec("scaling.num_workers=2", "scaling.gpus_per_worker=0.5")
    _spec("scaling.num_workers=2", "scaling.gpus_per_worker=0.5", "scaling.use_gpu=false")  # CPU DDP: fine


def test_loader_workers_sized_to_the_trials_cpus():
    from cgc_ray.config import loader_workers

    assert loader_workers(_spec("data.num_workers=auto", "scaling.cpus_per_worker=4")) == 3
    assert loader_workers(_spec("data.num_workers=auto", "scaling.cpus_per_worker=1")) == 0
    with pytest.raises(SpecError, match=r"data.num_workers=4 .*scaling.cpus_per_worker=5"):
        _spec("data.num_workers=4", "scaling.cpus_per_worker=2")


def test_local_storage_with_autoscale_is_refused_before_ray(monkeypatch, tmp_path):
    import cgc_ray.runner.driver as tr

    monkeypatch.setattr(tr, "connect", lambda *a, **k: pytest.fail("Ray must not start"))
    with pytest.raises(ResourceError, match="local folder but --autoscale adds nodes"):
        run_experiment(_spec(f"storage={tmp_path}"), autoscale=True, progress=False)


def test_find_cluster_follows_rays_own_rules(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert find_cluster("local") is None
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6380")  # what `ray job submit` sets for its driver
    assert find_cluster(None) == "10.1.2.3:6380" and find_cluster("auto") == "10.1.2.3:6380"
    assert find_cluster("local") is None


# ---------------------------------------------------------------- a real autoscaling cluster (fake provider)


def _fake_cluster_config(worker_types: dict) -> dict:
    """A fake_multinode launcher config (Ray's own test provider) with a head that holds no CPU."""
    return {
        "cluster_name": "cgc-ray-fake", "max_workers": 4,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            **copy.deepcopy(worker_types)},
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


def test_own_ray_listens_on_loopback_only(tmp_path):
    """With no cluster around the driver starts a Ray whose node is 127.0.0.1, not the host's address."""
    code = ("from cgc_ray.runner.cluster import connect; import ray; assert connect('local'); "
            "print(sorted({n['NodeManagerAddress'] for n in ray.nodes()})); ray.shutdown()")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "['127.0.0.1']"


@pytest.mark.slow
@pytest.mark.autoscaler
def test_autoscaler_starts_the_gpu_type_and_each_trial_holds_its_gpu_share(tmp_path):
    """`ray submit`-style driver on an autoscaling cluster whose GPU workers start at zero.

    The driver runs as a subprocess with no --address: it must attach to the
    Ray started with `ray start` on this node, read the node types from the
    autoscaler config, request a GPU share per trial and make the autoscaler
    launch the GPU type. The fake GPU has no CUDA behind it, so the trial
    stops at the device check, which names the resources the trial holds;
    that is where this test stops. Opt-in (``--autoscaler``); the cluster is
    an :func:`outside_ray` of its own, so no other Ray is touched.
    """
    port = free_port()
    config = _fake_cluster_config(
        {"gpu_node": {"resources": {"CPU": 2, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2}})
    config["provider"]["gcs_address"] = f"127.0.0.1:{port}"  # the fake provider's nodes join our head, not :6379
    config_path = tmp_path / "autoscaler.yaml"
    config_path.write_text(json.dumps(config))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    with outside_ray(f"--autoscaling-config={config_path}", "--num-cpus=0", env=env, port=port) as (_, env):
        driver = subprocess.run(
            [sys.executable, str(REPO / "experiments/fewshot.py"), "--storage", f"file://{tmp_path}/store",
             "--no-progress", "--no-report", "--set", "failure.max_retries=0",
             *[a for o in [*TINY, "data.shots=2", "sweep.grid.data.shots=[2]", "sweep.grid.data.episode=[0]",
                           "sweep.grid.method.name=[baseline]"] for a in ("--set", o)]],
            cwd=tmp_path, env={**env, "CGC_RAY_AUTOSCALING_CONFIG": str(config_path)},
            capture_output=True, text=True, timeout=300)
        assert driver.returncode == 1, driver.stderr[-3000:]
        failure = driver.stderr[driver.stderr.index("failed "):]
        assert "this trial holds" in failure and "'GPU': 0.25" in failure and "'CPU': 1.0" in failure, failure
        assert "torch.cuda.is_available() is False" in failure
        # attached the way the driver attaches (auto-detected, which also finds the cluster's auth token)
        code = "import json, ray; ray.init(log_to_driver=False); print(json.dumps(ray.nodes(), default=str))"
        nodes = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert nodes.returncode == 0, nodes.stderr[-2000:]
        alive = [n for n in json.loads(nodes.stdout.strip().splitlines()[-1]) if n["Alive"]]
        gpu_nodes = [n for n in alive if n["Resources"].get("GPU", 0) > 0]
        head = [n for n in alive if "node:__internal_head__" in n["Resources"]]
        assert len(gpu_nodes) >= 1 and gpu_nodes[0]["Resources"]["CPU"] == 2.0  # the autoscaler started gpu_node
        assert head and head[0]["Resources"].get("CPU", 0) == 0  # and nothing could have run on the head


# ---------------------------------------------------------------- a good neighbour to a user's Ray


def _attaches(env: dict[str, str]) -> bool:
    """Whether cgc-ray's driver, run with ``env``, attaches to a running Ray (rather than starting its own)."""
    p = subprocess.run([sys.executable, "-c", "from cgc_ray.runner.cluster import connect; print(connect(None))"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout.split() == ["False"]  # connect: True when it started its own


def _drivers_seen(session: Path) -> list[str]:
    """The driver logs of a Ray session (its folder): one per driver that attached to it."""
    return sorted(p.name for p in (session / "logs").glob("python-core-driver-*"))


@pytest.mark.slow
def test_a_users_ray_start_ray_is_neither_used_nor_stopped_by_the_tests(tmp_path):
    """With a `ray start` Ray running on this node, a driver run as the tests run it (in a subprocess, with
    the suite's environment) starts a Ray of its own: the outside Ray gets no driver and stays up."""
    with outside_ray("--num-cpus=1") as (_, outside_env):
        # the control: without the suite's pin, cgc-ray's driver would attach to the outside Ray
        assert _attaches(outside_env)
        # the outside Ray's session (a Ray started below, in the same temp dir, moves session_latest)
        session = Path(outside_env["RAY_TMPDIR"], "ray", "session_latest").resolve()
        seen = _drivers_seen(session)
        assert len(seen) == 1

        pinned = {**outside_env, "RAY_ADDRESS": os.environ["RAY_ADDRESS"]}  # what every test subprocess inherits
        p = subprocess.run(
            [sys.executable, str(REPO / "experiments/lambda_ablation.py"), "--storage", str(tmp_path / "store"),
             "--no-progress", "--no-report",
             *[a for o in [*TINY, "sweep.grid.method.lam=[0.5]", "sweep.grid.seed=[0]"] for a in ("--set", o)]],
            cwd=tmp_path, env=pinned, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0 and "1 ran now" in p.stderr, p.stderr[-3000:]
        assert _drivers_seen(session) == seen  # no driver of the run attached to the outside Ray
        assert Path(outside_env["RAY_TMPDIR"], "ray", "session_latest").resolve() != session  # it started its own
        assert _attaches(outside_env) and len(_drivers_seen(session)) == 2  # still up, and it takes drivers
