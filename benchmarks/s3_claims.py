"""Claiming N pending trials on S3, on a loopback S3 server (moto's, on 127.0.0.1): the wait before a trial starts,
and the race of two drivers claiming the same trials at once.

    python benchmarks/s3_claims.py                 # 1,000 trials, median of 3, both claim protocols; 200 races
    python benchmarks/s3_claims.py --trials 200 --reps 1 --races 20 --json

Needs ``moto[server]`` and boto3 (pip install "moto[server]" boto3); nothing leaves this machine. Each
repetition uses a fresh prefix. Measured, in this process (pyarrow's S3 client, boto3's for conditional
writes), with the server in another, for each claim protocol (``conditional``: S3's ``If-None-Match: *``
through boto3, the default where boto3 is installed; ``wait``: write, wait ``leases._CONFIRM_S``, list):

- ``claim``: one driver claims N trials no one holds, as ``run_experiment`` does before any trial starts;
- ``claim_held``: a second driver asks for the same N trials, all held by the first (no writes);
- ``release``: the first driver drops its N claims;
- ``races``: rounds in which two drivers claim the same 20 fresh trials at the same instant (two threads):
  ``double``, the trials both drivers won (each would train it until the loser's next heartbeat check);
  ``claim_write_max_s``, the slowest single claim write seen, against the ``wait`` protocol's pause.

The protocol before claims were batched paused ``_CONFIRM_S`` per trial: at least N seconds for N
trials (``before_at_least_s``). The server is the tests' (``tests/fixtures_storage.py``, ``loopback_s3``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the loopback S3 server of the tests
from fixtures_storage import loopback_s3  # noqa: E402


def _leases(uri: str, conditional: bool):
    from cgc_ray.runner.leases import Leases

    leases = Leases(uri, "bench")
    leases.storage.exclusive = conditional and leases.storage.exclusive
    return leases


def measure(uri: str, trials: int, conditional: bool) -> dict[str, float]:
    ids = [uuid.uuid4().hex[:12] for _ in range(trials)]
    a, b = _leases(uri, conditional), _leases(uri, conditional)
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


def race(uri: str, rounds: int, conditional: bool, trials: int = 20) -> dict[str, float]:
    """Two drivers claim the same fresh trials at the same instant, ``rounds`` times: trials both won, slowest write."""
    drivers = [_leases(uri, conditional).start() for _ in range(2)]
    slowest = 0.0
    for d in drivers:  # time every claim write (heartbeats excluded)
        name = "create_exclusive" if d.storage.exclusive else "write_bytes"
        write = getattr(d.storage, name)

        def timed(path, data, write=write):
            nonlocal slowest
            t = time.perf_counter()
            try:
                return write(path, data)
            finally:
                if "/_drivers/" not in path:
                    slowest = max(slowest, time.perf_counter() - t)

        setattr(d.storage, name, timed)
    double = 0
    for _ in range(rounds):
        ids = [uuid.uuid4().hex[:12] for _ in range(trials)]
        start, got = threading.Barrier(2), {}

        def claim(d):
            start.wait()
            got[d.driver] = set(d.claim(ids).got)

        threads = [threading.Thread(target=claim, args=(d,)) for d in drivers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        a, b = got.values()
        double += len(a & b)
        if a | b != set(ids):
            raise RuntimeError(f"{len(set(ids) - (a | b))} trials won by neither driver")
        for d in drivers:  # hand the round's trials back
            with d._lock:
                d.mine.clear()
    for d in drivers:
        d.release()
    return {"rounds": rounds, "trials_raced": rounds * trials, "double": double, "claim_write_max_s": slowest}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=1000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--races", type=int, default=200, help="rounds of two drivers claiming 20 trials at once")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from cgc_ray.runner import leases

    result = {"trials": args.trials, "reps": args.reps, "confirm_pause_s": leases._CONFIRM_S,
              "before_at_least_s": round(args.trials * leases._CONFIRM_S, 1)}
    for protocol, conditional in (("conditional", True), ("wait", False)):
        runs = []
        for _ in range(args.reps):
            with loopback_s3() as uri:  # a fresh server and prefix each time
                runs.append(measure(uri, args.trials, conditional))
        result[protocol] = {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}
        with loopback_s3() as uri:
            result[protocol]["races"] = race(uri, args.races, conditional)
    if args.json:
        print(json.dumps(result))
        return 0
    for protocol in ("conditional", "wait"):
        r = result[protocol]
        x = r["races"]
        print(f"{protocol:>11}: {args.trials} pending trials claimed in {r['claim_s']:.1f} s, found held by a second "
              f"driver in {r['claim_held_s']:.1f} s, released in {r['release_s']:.1f} s (median of {args.reps}); "
              f"two drivers at once: {x['double']} of {x['trials_raced']} trials won by both, slowest claim write "
              f"{x['claim_write_max_s']:.2f} s (the wait protocol's pause: {leases._CONFIRM_S:.1f} s)")
    print(f"the protocol before claims were batched: at least {result['before_at_least_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
