"""Per-trial overhead of a sweep: the time a trial costs beyond its own training, and where it goes.

    python benchmarks/trial_overhead.py              # median of 3, a tiny embedded set, one trial at a time
    python benchmarks/trial_overhead.py --reps 1 --json

Marginal overhead: a sweep of 2N one-epoch trials and a sweep of N, each run
one trial at a time on a fresh storage, on the same Ray; (T(2N) - T(N)) / N is
the cost of one more trial, and subtracting the trials' own ``wall_time_s``
(measured inside ``run_trial``: data, model, training, evaluation) leaves what
the sweep spends around them. Reported as the median over ``--reps``.

Breakdown: the pieces of a trial timed one by one in this process (imports in
a fresh interpreter, a fresh Ray actor, dataset indexing and decoding, model
build, a checkpoint write, evaluation, the Parquet row) and the rest: Tune's
own bookkeeping per trial, from the marginal overhead minus the per-trial pieces
that happen outside ``run_trial``. A fresh actor (process start + imports) is a
per-trial cost only where trial actors are not reused; cgc-ray reuses them
(``reuse_actors``), so a sweep pays it once per concurrent trial slot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = ["optim.epochs=1", "data.synthetic.n_train_per_class=8", "data.synthetic.n_test_per_class=4",
        "data.batch_size=8", "data.image_size=32", "eval_every=1"]


def _spec(storage: str, n: int):
    from cgc_ray.config import PRESETS, apply_overrides, load_spec

    # n trials that differ only in their seed: the same data, model and step, n times
    return apply_overrides(load_spec(PRESETS["lambda_ablation_demo"]),
                           [f"storage={storage}", *TINY, "sweep.grid.method.lam=[0.5]",
                            f"sweep.grid.seed={list(range(n))}"])


def sweep_time(n: int) -> tuple[float, float]:
    """(wall seconds of a sweep of n trials run one at a time, mean wall_time_s of its trials)."""
    from cgc_ray.results.table import read_rows
    from cgc_ray.runner.driver import run_experiment

    with tempfile.TemporaryDirectory() as storage:
        t0 = time.perf_counter()
        res = run_experiment(_spec(storage, n), progress=False, max_concurrent=1)
        wall = time.perf_counter() - t0
        assert not res.failed and len(res.ran) == n, res.failed
        rows = read_rows(storage).to_pylist()
        return wall, statistics.fmean(r["wall_time_s"] for r in rows)


def _fresh_interpreter(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - t0


def breakdown() -> dict[str, float]:
    """Seconds of each piece of a trial, timed one by one (see the module docstring)."""
    import ray
    import torch

    from cgc_ray.models.checkpoint import save_checkpoint
    from cgc_ray.models.resnet import build_model
    from cgc_ray.results.table import row_from_config, write_row
    from cgc_ray.train.trial import build_loaders, evaluator, trial_data, worker_batch

    out: dict[str, float] = {}
    base = _fresh_interpreter("pass")
    out["python start"] = base
    out["import torch + cgc_ray.train.trial"] = _fresh_interpreter("import cgc_ray.train.trial") - base
    out["import ray.tune"] = _fresh_interpreter("import ray.tune") - base

    @ray.remote(num_cpus=1)
    class Probe:
        def ping(self):
            import cgc_ray.train.trial  # noqa: F401 - what a fresh trial process imports first

            return 0

    t0 = time.perf_counter()
    a = Probe.remote()
    ray.get(a.ping.remote())
    out["fresh Ray actor incl. imports"] = time.perf_counter() - t0
    ray.kill(a)
    with tempfile.TemporaryDirectory() as tmp:
        spec = _spec(tmp, 1)
        from cgc_ray.config import expand_trials

        (trial,) = expand_trials(spec)
        t0 = time.perf_counter()
        td = trial_data(trial)
        train, _ = build_loaders(trial, td)
        ev = evaluator(trial, td.val, batch=worker_batch(trial, False))
        out["dataset index + decode"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = build_model(trial.model.arch, td.num_classes)
        out["model build"] = time.perf_counter() - t0
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        t0 = time.perf_counter()
        save_checkpoint(Path(tmp) / "c.pt", model, opt, None, 0)
        out["checkpoint write"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ev(model, "cpu")
        out["evaluation"] = time.perf_counter() - t0
        row = row_from_config(trial.model_dump(mode="json"), {"top1": 1.0}, trial_id="0" * 12, spec_hash="0" * 12,
                              epochs=1, wall_time_s=1.0, node="n", code_version="bench")
        t0 = time.perf_counter()
        write_row(tmp, trial.name, row)
        out["Parquet row write"] = time.perf_counter() - t0
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=6, help="trials of the smaller sweep (the larger has 2n)")
    p.add_argument("--reps", type=int, default=3, help="repetitions; the median is reported")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    import os

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    sweep_time(1)  # warm: the synthetic set is generated and cached once
    marginal, own, sweeps = [], [], []
    for _ in range(args.reps):
        t_small, own_small = sweep_time(args.n)
        t_large, own_large = sweep_time(2 * args.n)
        per_trial = (t_large - t_small) / args.n
        marginal.append(per_trial - own_large)
        own.append(own_large)
        sweeps.append((t_small, t_large))
    pieces = breakdown()
    result = {
        "marginal_overhead_s": statistics.median(marginal),
        "trial_own_wall_time_s": statistics.median(own),
        "marginal_overhead_each_rep_s": marginal,
        "sweep_seconds": sweeps,
        "breakdown_s": pieces,
    }
    # inside run_trial (in wall_time_s already), or paid once per trial *process*: with Tune's reuse_actors a
    # sweep starts its trial actors once, so a fresh actor is not a per-trial cost; without reuse it is
    not_per_trial = ("dataset index + decode", "model build", "evaluation", "fresh Ray actor incl. imports")
    outside = sum(v for k, v in pieces.items() if k not in not_per_trial and not k.startswith(("python", "import")))
    result["tune_bookkeeping_and_rest_s"] = result["marginal_overhead_s"] - outside
    ray.shutdown()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"sweeps of {args.n} and {2 * args.n} one-epoch trials, one at a time, median of {args.reps}:")
    print(f"  marginal overhead per trial: {result['marginal_overhead_s']:.2f} s "
          f"(each rep: {', '.join(f'{m:.2f}' for m in marginal)}); a trial's own wall time: "
          f"{result['trial_own_wall_time_s']:.2f} s")
    print("breakdown (one of each, this process; a fresh actor is paid per trial only where actors are not reused):")
    for k, v in pieces.items():
        print(f"  {k:38s} {v:6.2f} s")
    print(f"  {'Tune bookkeeping and the rest':38s} {result['tune_bookkeeping_and_rest_s']:6.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
