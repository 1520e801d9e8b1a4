"""Start-up cost of a large sweep: a driver facing N finished rows, and ``cgc-ray report`` over them.

    python benchmarks/startup.py                        # 10,000 rows, this checkout
    python benchmarks/startup.py --rows 1000 --json
    git worktree add /tmp/cgc-before <commit>           # the code before a change, measured in the same run:
    python benchmarks/startup.py --before /tmp/cgc-before

Rows: a λ-ablation sweep (10 λ, the baseline λ = 0 among them, × N / 10 seeds)
of the ``lambda_ablation_demo`` preset, written with the product's own row
writer (``row_from_config`` / ``write_row``, one file per trial) and made-up
metrics: nothing trains. Each version of the code writes its own rows (a row
carries what its writer knows); with ``--before`` (a checkout whose ``cgc_ray``
is imported ahead of the installed one) the new code is also timed on the rows
the old code wrote, which is what an upgrade meets.

Measured, each in a fresh Python process (so its peak RSS is its own, from
``resource.getrusage``):

- ``driver``: ``run_experiment`` on the sweep, every trial done, until it
  knows there is nothing to schedule (``address="local"``: no Ray is started
  or attached; imports are timed apart);
- ``report``: ``cgc-ray report`` (the CLI's ``main``), its text thrown away.

Wall and CPU times (``time.process_time``: what a busy machine inflates least)
are medians of ``--reps`` runs; peak RSS is the largest.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAMS = [0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0]
EXPERIMENT = "lambda_ablation"  # the preset's experiment name


def _spec(storage: str, rows: int):
    from cgc_ray.config import PRESETS, apply_overrides, load_spec

    seeds = list(range(max(1, rows // len(LAMS))))
    return apply_overrides(load_spec(PRESETS["lambda_ablation_demo"]),
                           [f"storage={storage}", f"sweep.grid.method.lam={LAMS}", f"sweep.grid.seed={seeds}"])


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --------------------------------------------------------------------------- children (one per measurement)


def write_rows(storage: str, rows: int) -> dict:
    """Write one finished row per trial of the sweep, as the worker would (made-up metrics)."""
    from cgc_ray.config import expand_trials, spec_hash, trial_id
    from cgc_ray.results.table import row_from_config, write_row

    rng = random.Random(0)
    t0 = time.perf_counter()
    trials = expand_trials(_spec(storage, rows))
    for t in trials:
        lam = t.method.lam
        metrics = {"top1": 60.0 - lam + rng.gauss(0, 1), "ch": 40.0 + 2 * lam ** 0.5 + rng.gauss(0, 1),
                   "cgc_loss": 3.0 - 0.1 * lam}
        row = row_from_config(t.model_dump(mode="json"), metrics, trial_id=trial_id(t), spec_hash=spec_hash(t),
                              epochs=1, wall_time_s=1.0, node="bench", code_version="bench")
        write_row(storage, t.name, row)
    return {"rows": len(trials), "wall_s": time.perf_counter() - t0}


def driver(storage: str, rows: int) -> dict:
    t0 = time.perf_counter()
    from cgc_ray.runner.driver import run_experiment

    imports = time.perf_counter() - t0
    spec = _spec(storage, rows)
    t0, c0 = time.perf_counter(), time.process_time()
    res = run_experiment(spec, progress=False, address="local")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert len(res.skipped) == len(res.trial_ids) == rows and not res.ran, (len(res.skipped), rows, res.ran)
    return {"wall_s": wall, "cpu_s": cpu, "imports_s": imports, "peak_mib": _peak_mib()}


def report(storage: str, rows: int) -> dict:
    from contextlib import redirect_stdout

    t0, c0 = time.perf_counter(), time.process_time()
    from cgc_ray.cli.main import main

    with open(os.devnull, "w") as null, redirect_stdout(null):
        code = main(["report", "--storage", storage])
    assert code == 0, code
    return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "peak_mib": _peak_mib()}


CHILDREN = {"write": write_rows, "driver": driver, "report": report}


# --------------------------------------------------------------------------- parent


def _child(kind: str, storage: str, rows: int, code: str | None) -> dict:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    if code is not None:  # another copy of the package, ahead of the installed one
        env["PYTHONPATH"] = os.pathsep.join([code, *filter(None, [env.get("PYTHONPATH")])])
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--storage", storage, "--rows", str(rows)],
                         env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if out.returncode != 0:
        raise SystemExit(f"{kind} ({code or 'this checkout'}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure(kind: str, storage: str, rows: int, code: str | None, reps: int) -> dict:
    runs = [_child(kind, storage, rows, code) for _ in range(reps)]
    return {"wall_s": statistics.median(r["wall_s"] for r in runs),
            "cpu_s": statistics.median(r["cpu_s"] for r in runs), "peak_mib": max(r["peak_mib"] for r in runs),
            **({"imports_s": statistics.median(r["imports_s"] for r in runs)} if "imports_s" in runs[0] else {})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10_000, help="finished rows (a multiple of 10; default %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="runs per measurement (median wall, max RSS)")
    p.add_argument("--before", default=None, help="a checkout of the code before a change, measured alongside")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.add_argument("--child", choices=CHILDREN, help=argparse.SUPPRESS)
    p.add_argument("--storage", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args.storage, args.rows)))
        return
    codes = {"now": None} if args.before is None else {"before": args.before, "now": None}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="cgc-startup-") as tmp:
        for label, code in codes.items():
            storage = str(Path(tmp) / label)
            written = _child("write", storage, args.rows, code)
            results[label] = {"write_s": written["wall_s"],
                              **{kind: _measure(kind, storage, args.rows, code, args.reps)
                                 for kind in ("driver", "report")}}
        if args.before is not None:  # the new code on rows the old code wrote
            old = str(Path(tmp) / "before")
            results["now, old rows"] = {kind: _measure(kind, old, args.rows, None, args.reps)
                                        for kind in ("driver", "report")}
    if args.json:
        print(json.dumps({"rows": args.rows, **results}, indent=1))
        return
    load = os.getloadavg()[0]
    print(f"{args.rows} finished rows, {os.cpu_count()} CPUs (load {load:.1f} at the end), median of {args.reps}; "
          "wall (CPU) seconds, peak RSS the largest")
    for label, r in results.items():
        d, rep = r["driver"], r["report"]
        print(f"{label:>14}: driver ready {d['wall_s']:6.2f} s ({d['cpu_s']:5.2f} s CPU, {d['peak_mib']:5.0f} MiB; "
              f"imports {d['imports_s']:.2f} s apart)   report {rep['wall_s']:6.2f} s ({rep['cpu_s']:5.2f} s CPU, "
              f"{rep['peak_mib']:5.0f} MiB)")


if __name__ == "__main__":
    main()
