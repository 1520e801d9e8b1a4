"""Shared fixtures: one quiet loopback Ray for the session, tiny synthetic data cached once.

Tests that need a Ray of their own (a simulated multi-node cluster, a driver
in a subprocess) call :func:`ray.shutdown` themselves; the ``ray_session``
fixture re-initialises Ray when a later test asks for it.

A good neighbour: the suite never attaches to, or stops, a Ray it did not
start (users run it beside their own sweeps). ``RAY_ADDRESS=local`` below pins
every driver, in this process and in every subprocess (they inherit it), to a
Ray of its own; :func:`outside_ray` stands in for a user's ``ray start`` Ray.
Tests marked ``autoscaler`` start a Ray with ``ray start`` on this machine:
they run only with ``--autoscaler`` (``.ci/run`` passes it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

# Ray on loopback only (read when Ray is imported): no traffic to this host's network address
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# A driver attaches to --address, else $RAY_ADDRESS, else a `ray start` Ray on this node (cgc_ray.runner.cluster);
# "local" makes it start its own. Set unconditionally: a user's RAY_ADDRESS must not lead the tests to their cluster.
os.environ["RAY_ADDRESS"] = "local"


def pytest_addoption(parser):
    parser.addoption("--autoscaler", action="store_true",
                     help="also run the tests marked autoscaler (they `ray start` a fake autoscaling cluster)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--autoscaler"):
        return
    skip = pytest.mark.skip(reason="opt-in: starts a fake autoscaling cluster with `ray start`; pass --autoscaler")
    for item in items:
        if "autoscaler" in item.keywords:
            item.add_marker(skip)

# Every --set a test passes to shrink a demo preset to seconds on 2 CPU cores.
TINY = [
    "model.weights=null",  # the fine-tuning demos' pretraining (experiment:pretrain_demo) is not tiny
    "optim.epochs=1",
    "data.synthetic.n_train_per_class=8",
    "data.synthetic.n_test_per_class=4",
    "data.batch_size=8",
    "data.image_size=32",
]


def result_row(trial, metrics: dict, **fields) -> dict:
    """The Parquet row a finished ``trial`` writes, with made-up ``metrics`` (no training). The run fields are
    test values (epochs 1, wall time 1 s, node "n", code version "test"); ``fields`` override them or add
    status, error, finished_at, ..."""
    from cgc_ray.config import spec_hash, trial_id
    from cgc_ray.results.table import row_from_config

    run = dict(trial_id=trial_id(trial), spec_hash=spec_hash(trial), epochs=1, wall_time_s=1.0, node="n",
               code_version="test")
    return row_from_config(trial.model_dump(mode="json"), metrics, **{**run, **fields})

@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """Synthetic data generated once per session into a temporary cache (also seen by Ray workers)."""
    cache = tmp_path_factory.mktemp("cgc-ray-cache")
    old = {k: os.environ.get(k) for k in ("CGC_RAY_CACHE_DIR", "RAY_USAGE_STATS_ENABLED")}
    os.environ["CGC_RAY_CACHE_DIR"] = str(cache)
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    yield cache
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def ray_session():
    """A 2-CPU loopback Ray shared by the tests that use it (started on first use)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
    yield ray


def pytest_sessionfinish(session, exitstatus):
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_of(marker: str) -> list[int]:
    """Processes whose command line names ``marker`` (a temp dir only our Ray uses)."""
    out = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                out.append(int(proc.name))
        except OSError:  # the process ended while we looked
            continue
    return out


@contextlib.contextmanager
def outside_ray(*start_args: str, env: dict[str, str] | None = None, port: int | None = None):
    """A ``ray start --head`` Ray, as a user leaves one running on this machine, that touches no real one.

    Yields ``(address, env)``; the GCS listens on 127.0.0.1:``port`` (a free one by default). ``env``
    (``RAY_ADDRESS`` removed) finds this Ray as "a Ray on this node": ``RAY_TMPDIR`` points at a fresh temp
    dir that holds its ``ray_current_cluster`` record, sockets and logs, so ``/tmp/ray`` is untouched.
    Every port with a fixed default gets a free one (but the Ray Client's, which needs ``ray[client]``).
    Stopped by killing its process group (``ray start`` runs in a new session, and Ray's daemons and
    workers stay in it), then any stray process naming the temp dir; never Ray's machine-wide stop command, which
    would end every Ray of the machine.
    """
    # short: Ray's Unix sockets live under it, and socket paths are limited to 107 bytes
    tmp = tempfile.mkdtemp(prefix="cgc-ray-", dir="/tmp")
    env = {**(env or os.environ), "RAY_TMPDIR": tmp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    port = port or free_port()
    cmd = ["ray", "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
           f"--dashboard-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats",
           *start_args]
    # Ray's daemons inherit the output of `ray start`: a file, not a pipe we would wait on for ever
    with open(Path(tmp) / "ray-start.log", "w") as log:
        start = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        assert start.wait(timeout=120) == 0, (Path(tmp) / "ray-start.log").read_text()[-3000:]
        yield f"127.0.0.1:{port}", env
    finally:
        if start.poll() is None:
            start.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(start.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (left := _pids_of(tmp)) and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        shutil.rmtree(tmp, ignore_errors=True)
