"""Shared fixtures: one quiet loopback Ray for the session, tiny synthetic data cached once.

Tests that need a Ray of their own (a simulated multi-node cluster, a driver
in a subprocess) call :func:`ray.shutdown` themselves; the ``ray_session``
fixture re-initialises Ray when a later test asks for it.
"""

from __future__ import annotations

import os

import pytest

# Ray on loopback only (read when Ray is imported): no traffic to this host's network address
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

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


def make_method(**over):
    """A ``MethodConfig`` with the spec's defaults (their one home), fields in ``over`` replaced."""
    from cgc_ray.config import ExperimentSpec, method_config_kwargs
    from cgc_ray.method.cgc import MethodConfig

    return MethodConfig(**{**method_config_kwargs(ExperimentSpec()), **over})
