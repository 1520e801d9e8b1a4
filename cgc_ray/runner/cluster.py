"""Which Ray a driver uses, and what that cluster can hold now and after autoscaling.

Attach the way Ray's own scripts do: ``--address``, else ``$RAY_ADDRESS`` (set
by ``ray job submit``), else a Ray started with ``ray start`` on this node
(``ray submit`` runs the driver on a cluster's head). Only when none of those
exists does the driver start its own Ray, on loopback. So a driver on a
cluster's head never starts a second Ray there and trains on the head's CPUs.

The node types an autoscaler can add come from the cluster itself: the
autoscaler's cluster config in the GCS (autoscaler v2, KubeRay) or the
launcher's config file on the head (``~/ray_bootstrap_config.yaml``, written
by ``ray up``; ``$CGC_RAY_AUTOSCALING_CONFIG`` overrides the path). GPU
detection and the resource checks count those types, not only the nodes alive
when the sweep starts (GPU workers usually start at zero).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

ENV_AUTOSCALING_CONFIG = "CGC_RAY_AUTOSCALING_CONFIG"
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


class ClusterError(RuntimeError):
    """The Ray cluster asked for cannot be used as asked (unreachable, or unfit for the spec)."""


@dataclass(frozen=True)
class NodeType:
    """A node type the autoscaler can launch: its resources and how many of it."""

    resources: dict[str, float]
    min_workers: int
    max_workers: int


@dataclass
class ClusterView:
    """What the driver knows of its cluster.

    ``own``: the driver started this Ray itself (one node: this machine).
    ``nodes``: total resources of every alive node. ``node_types``: types the
    autoscaler can add (empty: a fixed cluster), ``types_source`` where they
    were read. ``driver_node``: the resources of the node the driver runs on.
    """

    own: bool
    nodes: list[dict[str, float]]
    node_types: dict[str, NodeType] = field(default_factory=dict)
    types_source: str | None = None

    @property
    def autoscaling(self) -> bool:
        return any(t.max_workers > 0 for t in self.node_types.values())

    @property
    def multi_node(self) -> bool:
        """More than one node can run trials (now, or once the autoscaler adds one)."""
        return len(self.nodes) > 1 or self.autoscaling

    def has_gpus(self) -> bool:
        alive = any(n.get("GPU", 0) > 0 for n in self.nodes)
        return alive or any(t.resources.get("GPU", 0) > 0 and t.max_workers > 0 for t in self.node_types.values())

    def placement_nodes(self, limit: int = 64) -> list[dict[str, float]]:
        """Alive nodes plus, per node type, as many nodes as the autoscaler may add (at most ``limit``)."""
        out = [dict(n) for n in self.nodes]
        for t in self.node_types.values():
            out += [dict(t.resources) for _ in range(min(t.max_workers, limit))]
        return out


def find_cluster(address: str | None) -> str | None:
    """The address of the Ray to attach to, or None when the driver should start its own.

    ``address``: the ``--address`` flag; "local" always starts our own Ray,
    "auto" requires a running one. None looks at ``$RAY_ADDRESS`` and then at
    a Ray started with ``ray start`` on this node, as ``ray.init()`` does.
    """
    if address == "local":
        return None
    if address and address.startswith("ray://"):
        return address
    # Private: Ray has no public call that says which cluster ray.init() would attach to without attaching
    # (RAY_ADDRESS, then the `ray start` record under the temp dir); copying its rules would drift from Ray's.
    from ray._private.services import canonicalize_bootstrap_address

    try:
        return canonicalize_bootstrap_address(address)
    except ConnectionError as e:
        raise ClusterError(f"--address {address}: {e}") from None


def connect(address: str | None, *, dashboard: bool = False) -> bool:
    """Attach to ``address`` (see :func:`find_cluster`) or start a quiet loopback Ray; True if we started it.

    ``dashboard``: a Ray this call starts serves Ray's dashboard on 127.0.0.1 only (its URL is printed);
    an attached cluster's dashboard is that cluster's own, and its URL is printed where Ray gives one.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    target = find_cluster(address)
    if target is None and dashboard:
        _check_dashboard_installed()
    if target is None:
        # loopback only: Ray rewrites 127.0.0.1 to the host's network address unless this (read when ray is
        # imported, so also set on the already imported module) says the Ray is a single machine's
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        if os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
            # Private: no public switch; the env var alone is read only at import, and it must stay unset for
            # drivers that attach to a multi-node cluster (their node address must not become 127.0.0.1)
            from ray._private import ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = False
        # the dashboard on loopback, never on the host's network address: it can submit jobs, and has no login
        context = ray.init(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1",
                           log_to_driver=False, _node_ip_address="127.0.0.1")
        if dashboard:
            print(f"cgc-ray: Ray dashboard at http://{context.dashboard_url}", file=sys.stderr)
        return True
    try:
        # the address as the user gave it: Ray's auto-detection ("auto") also picks up the cluster's auth token
        context = ray.init(address=address or "auto", log_to_driver=False)
    except ConnectionError as e:
        raise ClusterError(
            f"could not attach to the Ray cluster at {target} ({e}); if that cluster is gone, run `ray stop` "
            "or pass --address local to start a Ray of this run's own"
        ) from None
    if dashboard:
        where = f"at http://{context.dashboard_url}" if context.dashboard_url else "not served by this cluster"
        print(f"cgc-ray: attached to the Ray at {target}: its own dashboard is {where}", file=sys.stderr)
    return False


def _check_dashboard_installed() -> None:
    """``--dashboard`` needs Ray's dashboard packages (``ray[default]``): say so before Ray starts."""
    # Private: Ray's own check; it raises a bare Exception from inside ray.init, after its GCS has started
    from ray._private.utils import get_dashboard_dependency_error

    missing = get_dashboard_dependency_error()
    if missing:
        raise ClusterError(f"--dashboard needs Ray's dashboard packages ({missing}): "
                           "pip install 'cgc-ray[dashboard]' (that is ray[default])")


def _types_from_gcs() -> dict[str, NodeType]:
    # Private: the autoscaler's cluster config has no public reader (Ray Data reads it through this call too)
    from ray._private.state import state

    try:
        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older GCS without the call: fall back to the config file
        return {}
    if config is None:
        return {}
    return {
        g.name: NodeType({k: float(v) for k, v in g.resources.items()}, int(g.min_count), int(g.max_count))
        for g in config.node_group_configs
    }


def types_from_config(config: Mapping[str, Any]) -> dict[str, NodeType]:
    """Worker node types of a cluster-launcher config (``available_node_types`` minus the head's)."""
    head = config.get("head_node_type")
    out = {}
    for name, t in (config.get("available_node_types") or {}).items():
        if name == head:
            continue
        resources = {k: float(v) for k, v in (t.get("resources") or {}).items()}
        out[name] = NodeType(resources, int(t.get("min_workers", 0)), int(t.get("max_workers", config.get("max_workers", 0))))
    return out


def _types_from_file() -> tuple[dict[str, NodeType], str | None]:
    import yaml

    path = Path(os.environ.get(ENV_AUTOSCALING_CONFIG) or BOOTSTRAP_CONFIG).expanduser()
    if not path.is_file():
        return {}, None
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ClusterError(f"could not read the autoscaler config {path}: {e}") from None
    return types_from_config(config), str(path)


def cluster_view(own: bool) -> ClusterView:
    """The alive nodes and the autoscaler's node types of the Ray this process is attached to."""
    import ray

    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    if own:
        return ClusterView(True, nodes)
    types = _types_from_gcs()
    source = "the GCS cluster config" if types else None
    if not types:
        types, source = _types_from_file()
    return ClusterView(False, nodes, types, source)
