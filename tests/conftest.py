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
