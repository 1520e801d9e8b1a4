"""Claiming N pending trials on S3, on a loopback S3 server (moto's, on 127.0.0.1): the wait before a trial starts.

    python benchmarks/s3_claims.py                 # 1,000 trials, median of 3
    python benchmarks/s3_claims.py --trials 200 --reps 1 --json

Needs ``moto[server]`` (pip install "moto[server]"); nothing leaves this machine. Each repetition
uses a fresh prefix. Measured, in this process (pyarrow's S3 client), with the server in another:

- ``claim``: one driver claims N trials no one holds (its heartbeat, one listing, N claim writes, one
  pause of ``leases._CONFIRM_S``, one listing), as ``run_experiment`` does before any trial starts;
- ``claim_held``: a second driver asks for the same N trials, all held by the first (no writes, no pause);
- ``release``: the first driver drops its N claims.

The protocol before claims were batched paused ``_CONFIRM_S`` per trial: at least N seconds for N
trials (``before_at_least_s``), about 17 min for 1,000. The server is the tests' (``tests/fixtures_storage.py``,
``loopback_s3``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the loopback S3 server of the tests
from fixtures_storage import loopback_s3  # noqa: E402


def measure(uri: str, trials: int) -> dict[str, float]:
    from cgc_ray.runner.leases import Leases
    from cgc_ray.storage import Storage

    storage = Storage(uri)
    ids = [uuid.uuid4().hex[:12] for _ in range(trials)]
    a, b = Leases(storage, "bench"), Leases(storage, "bench")
    out = {}
    t = time.perf_counter()
    a.start()
    got = a.claim(ids).got
    out["claim_s"] = time.perf_counter() - t
    if sorted(got) != sorted(ids):
        raise RuntimeError(f"claimed {len(got)} of {trials} trials")
    t = time.perf_counter()
    b.start()
    held = b.claim(ids).held
    out["claim_held_s"] = time.perf_counter() - t
    if len(held) != trials:
        raise RuntimeError(f"the second driver found {len(held)} of {trials} trials held")
    b.release()
    t = time.perf_counter()
    a.release()
    out["release_s"] = time.perf_counter() - t
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=1000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from cgc_ray.runner import leases

    runs = []
    for _ in range(args.reps):
        with loopback_s3() as uri:  # a fresh server and prefix each time
            runs.append(measure(uri, args.trials))
    result = {"trials": args.trials, "reps": args.reps, "confirm_pause_s": leases._CONFIRM_S,
              **{k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]},
              "before_at_least_s": round(args.trials * leases._CONFIRM_S, 1)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.trials} pending trials on a loopback S3: claimed in {result['claim_s']:.1f} s "
              f"(the protocol before: at least {result['before_at_least_s']:.0f} s); found held by a second driver "
              f"in {result['claim_held_s']:.1f} s; released in {result['release_s']:.1f} s "
              f"(median of {args.reps})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
