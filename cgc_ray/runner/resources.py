"""What one trial asks of the cluster, and whether the cluster can give it (before Tune waits for ever).

Ray waits silently for resources no node has; these checks fail at once and
say what was asked and what exists. GPU use is decided from the spec and the
cluster's node types (:mod:`cgc_ray.runner.cluster`), never by falling back to
CPUs on GPU nodes.
"""

from __future__ import annotations

from typing import Mapping

from cgc_ray.config import ExperimentSpec
from cgc_ray.runner.cluster import BOOTSTRAP_CONFIG, ENV_AUTOSCALING_CONFIG, ClusterView

# What the Tune function of a DDP trial reserves: 1 MiB of memory and no CPU.
WAITER_BUNDLE = {"memory": float(2**20)}


class ResourceError(RuntimeError):
    """One trial needs more than any node (or the cluster) has: it would wait forever."""


def use_gpu(spec: ExperimentSpec, view: ClusterView, *, autoscale: bool = False) -> bool:
    """Whether the trials of ``spec`` request GPUs on this cluster.

    ``scaling.use_gpu`` true/false decides; "auto" asks the cluster: a GPU on
    an alive node or on a node type its autoscaler can add. With
    ``--autoscale`` and no node types to read, "auto" cannot be answered and
    is refused rather than guessed (it would train on CPUs on GPU nodes).
    """
    s = spec.scaling
    if s.use_gpu is False or (s.use_gpu == "auto" and s.gpus_per_worker == 0):
        return False
    if s.use_gpu is True:
        if not view.has_gpus() and not (autoscale and not view.node_types):
            raise ResourceError(
                "scaling.use_gpu=true but no node of this cluster has a GPU, alive or among the node types its "
                "autoscaler can add; set scaling.use_gpu=auto (or false), or attach to a GPU cluster (--address)"
            )
        return True
    if autoscale and not view.node_types and not view.has_gpus():
        raise ResourceError(
            "--autoscale: the autoscaler's node types are unknown (no cluster config in the GCS and no "
            f"{BOOTSTRAP_CONFIG}; set ${ENV_AUTOSCALING_CONFIG} to the cluster's YAML), so whether trials need "
            "GPUs cannot be told; add --set scaling.use_gpu=true (or false)"
        )
    return view.has_gpus()


def trial_bundles(spec: ExperimentSpec, gpu: bool) -> list[dict[str, float]]:
    """Resource bundles of one trial: [tune function] (+ one per Train worker under DDP).

    A single-worker trial trains inside the Tune function. Under DDP the Tune
    function only waits on the TorchTrainer (its controller takes no CPU) and
    the trainer reserves its workers itself, so the function holds no CPU,
    only :data:`WAITER_BUNDLE` (Tune needs a non-empty bundle): two 1-CPU
    workers then fit a 2-CPU node.
    """
    s = spec.scaling
    worker = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if gpu and s.gpus_per_worker else {})}
    if s.num_workers == 1:
        return [worker]
    return [dict(WAITER_BUNDLE)] + [dict(worker) for _ in range(s.num_workers)]


def check_fits(bundles: list[dict[str, float]], nodes: list[Mapping[str, float]], *, what: str = "one trial") -> None:
    """Fail at once when ``bundles`` cannot be placed on ``nodes`` (first-fit, largest first).

    nodes: the total resources of each alive node. Raises ResourceError saying
    what was asked and what exists, instead of letting Ray wait forever.
    """
    free = [dict(n) for n in nodes]
    for b in sorted(bundles, key=lambda b: (-b.get("GPU", 0), -b.get("CPU", 0))):
        for n in free:
            if all(n.get(k, 0) + 1e-9 >= v for k, v in b.items()):
                for k, v in b.items():
                    n[k] = n.get(k, 0) - v
                break
        else:
            asked = " + ".join(_fmt(b) for b in bundles if b != WAITER_BUNDLE)
            have = "; ".join(_fmt({k: v for k, v in n.items() if k in ("CPU", "GPU")}) for n in nodes) or "no nodes"
            raise ResourceError(
                f"{what} needs {asked} but the cluster's nodes have: {have}. "
                "Lower scaling.num_workers / scaling.cpus_per_worker / scaling.gpus_per_worker "
                "(e.g. --set scaling.cpus_per_worker=1), or add nodes."
            )


def _fmt(res: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())) + "}"



def concurrent_room(worker_bundles: list[dict[str, float]], nodes: list[Mapping[str, float]]) -> int:
    """How many trials' Train workers fit on ``nodes`` at once (at least 1)."""
    total = {k: sum(n.get(k, 0) for n in nodes) for k in ("CPU", "GPU")}
    need = {k: sum(b.get(k, 0) for b in worker_bundles) for k in ("CPU", "GPU")}
    return max(1, int(min(total[k] // need[k] for k in need if need[k] > 0)))
