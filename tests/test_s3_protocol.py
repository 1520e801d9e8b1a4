"""Storage on S3 over S3's own HTTP protocol: one moto server on 127.0.0.1 for the module (tests/fixtures_storage.py).

What a user of MinIO, Ceph or R2 writes is what these tests write: the endpoint in the URI,
``s3://bucket/prefix?endpoint_override=host:port&scheme=http``, no region (pyarrow's default, us-east-1,
is MinIO's), or the endpoint in ``AWS_ENDPOINT_URL``. Listings that prove what was written are made
with boto3, not with the pyarrow under test.
"""

import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("moto.server")
pytest.importorskip("boto3")

import pyarrow.parquet as pq  # noqa: E402
from conftest import TINY, result_row  # noqa: E402
from fixtures_storage import CREDENTIALS, loopback_s3_server  # noqa: E402

from cgc_ray.cli import experiment  # noqa: E402
from cgc_ray.cli.main import main as cli_main  # noqa: E402
from cgc_ray.config import PRESETS, apply_overrides, expand_trials, load_spec, trial_id  # noqa: E402
from cgc_ray.results.table import write_row  # noqa: E402
from cgc_ray.runner import driver, leases as L  # noqa: E402
from cgc_ray.runner.driver import check_storage  # noqa: E402
from cgc_ray.storage import Storage  # noqa: E402

# The session's Ray may start before this module's first test, and its workers keep the environment it started with.
os.environ.update(CREDENTIALS)

REPO = Path(__file__).resolve().parent.parent
EXPERIMENT = "lambda_ablation"
SWEEP = [*TINY, "sweep.grid.method.lam=[0.0, 1.0]", "sweep.grid.seed=[0]"]


@pytest.fixture(scope="module")
def s3():
    with loopback_s3_server() as server:
        yield server


@pytest.fixture(autouse=True)
def _no_region_or_endpoint_in_the_environment(monkeypatch):
    for name in ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)


def _prefix(uri: str) -> str:
    return uri.split("?")[0].split("/", 3)[3]


def _flags(uri: str, *overrides: str) -> list[str]:
    return ["--storage", uri, "--no-progress", *[a for o in (*SWEEP, *overrides) for a in ("--set", o)]]


def _rows(s3, prefix: str) -> dict[str, dict]:
    """trial id -> its row, each row file fetched with boto3 and decoded on its own."""
    client, rows = s3.client(), {}
    for key in s3.keys(f"{prefix}/experiment={EXPERIMENT}"):
        body = client.get_object(Bucket=s3.bucket, Key=f"{prefix}/experiment={EXPERIMENT}/{key}")["Body"].read()
        (row,) = pq.read_table(io.BytesIO(body)).to_pylist()
        rows[row["trial_id"]] = row
    return rows


def _reported(uri: str, capsys) -> dict[tuple[float, str], float]:
    """(λ, metric) -> the mean ``cgc-ray report --format json`` shows for that group."""
    capsys.readouterr()
    assert cli_main(["report", "--storage", uri, "--format", "json"]) == 0
    return {(r["lam"], r["metric"]): r["mean"] for r in json.loads(capsys.readouterr().out) if r["kind"] == "group"}


# ---------------------------------------------------------------- a sweep, end to end through Ray


@pytest.mark.slow
def test_a_sweep_with_the_endpoint_in_the_uri_writes_everything_to_s3_and_report_reads_it_back(
        s3, ray_session, monkeypatch, capsys):
    uri = s3.uri()  # no region anywhere: neither in the URI nor in the environment
    prefix = _prefix(uri)
    during: list[str] = []
    release = L.Leases.release

    def release_after_listing(self):  # what the lease folder held while the trials ran
        during.extend(s3.keys(prefix))
        release(self)

    monkeypatch.setattr(L.Leases, "release", release_after_listing)
    assert experiment.main(EXPERIMENT, [*_flags(uri), "--no-report"]) == 0
    ids = [trial_id(t) for t in expand_trials(apply_overrides(load_spec(PRESETS["lambda_ablation_demo"]), SWEEP))]

    keys = s3.keys(prefix)
    assert {f"experiment={EXPERIMENT}/{t}.parquet" for t in ids} <= set(keys)
    assert {f"_checkpoints/{EXPERIMENT}/{t}/checkpoint.pt" for t in ids} <= set(keys)
    assert f"_summary/{EXPERIMENT}.parquet" in keys
    assert any(k.startswith(f"_ray/{EXPERIMENT}/") for k in keys)  # Ray's run state under <root>/_ray
    # claims are conditional writes, <gen>.json naming the driver; released at the end
    claims = [k for k in during if k.startswith(f"_leases/{EXPERIMENT}/") and "_drivers" not in k]
    assert sorted(claims) == sorted(f"_leases/{EXPERIMENT}/{t}/0.json" for t in ids)
    assert not [k for k in keys if k.startswith("_leases/") and not k.endswith("/")]  # pyarrow leaves folder markers

    rows = _rows(s3, prefix)
    assert sorted(rows) == sorted(ids) and {r["status"] for r in rows.values()} == {"finished"}
    reported = _reported(uri, capsys)  # a baseline's λ shows as None
    assert {(lam or 0.0, m) for lam, m in reported} >= {(lam, m) for lam in (0.0, 1.0) for m in ("top1", "ch")}
    by_lam = {r["lam"]: r for r in rows.values()}
    assert all(mean == pytest.approx(by_lam[lam or 0.0][m]) for (lam, m), mean in reported.items())

    # pretrained weights from this storage (what experiment: weights become): a trial fetches the checkpoint from S3
    from cgc_ray.train.trial import local_weights

    tuned = apply_overrides(load_spec(PRESETS["lambda_ablation_demo"]),
                            [f"storage={uri}", *SWEEP, f"model.weights=trial:{EXPERIMENT}/{ids[0]}"])
    stored = s3.client().get_object(Bucket=s3.bucket, Key=f"{prefix}/_checkpoints/{EXPERIMENT}/{ids[0]}/checkpoint.pt")
    assert Path(local_weights(tuned)).read_bytes() == stored["Body"].read()


def test_the_endpoint_from_the_environment(s3, monkeypatch, capsys):
    """``AWS_ENDPOINT_URL`` and a plain ``s3://bucket/prefix``: checked, written, claimed (conditionally), reported."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    prefix = _prefix(s3.uri())
    uri = f"s3://{s3.bucket}/{prefix}"
    storage = check_storage(uri)
    assert storage.exclusive  # the probe's conditional write was refused, as it must be
    (trial,) = expand_trials(apply_overrides(load_spec(PRESETS["lambda_ablation_demo"]),
                                             [*SWEEP[:-2], "sweep.grid.method.lam=[0.5]", "sweep.grid.seed=[0]"]))
    write_row(uri, trial.name, result_row(trial, {"top1": 37.5, "ch": 12.25}))
    leases = L.Leases(uri, EXPERIMENT).start()
    try:
        assert leases.claim(["t1"]).got == ["t1"]
        assert s3.keys(f"{prefix}/_leases/{EXPERIMENT}/t1") == ["0.json"]
    finally:
        leases.release()
    assert _reported(uri, capsys) == {(0.5, "top1"): 37.5, (0.5, "ch"): 12.25}


# ---------------------------------------------------------------- storage that cannot be used: one line, before Ray


@pytest.mark.parametrize("fault", ["bad credentials", "missing bucket"])
def test_bad_credentials_and_a_missing_bucket_fail_before_ray_in_one_line(s3, fault, monkeypatch, capsys):
    monkeypatch.setattr(driver, "connect", lambda *a, **k: pytest.fail("Ray must not start"))
    uri = s3.uri().replace(f"s3://{s3.bucket}/", "s3://no-such-bucket/") if fault == "missing bucket" else s3.uri()
    s3.auth(fault == "bad credentials")
    try:
        code = experiment.main(EXPERIMENT, _flags(uri))
    finally:
        s3.auth(False)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: storage {uri!r} cannot be written: ")
    assert ("check the credentials" if fault == "bad credentials" else "create the bucket") in err


# ---------------------------------------------------------------- leases: conditional writes, and the race without them


def test_conditional_writes_reach_s3_from_our_stack(s3):
    storage = Storage(s3.uri())
    assert storage.exclusive
    path = f"{storage.root}/once.json"
    assert storage.create_exclusive(path, b"first") and not storage.create_exclusive(path, b"second")
    assert storage.read_bytes(path) == b"first"


def _stalled_claims(leases: L.Leases) -> tuple[threading.Event, threading.Event]:
    """Make ``leases``' claim writes wait: (an event set when one is waiting, the event that lets it go on)."""
    waiting, go = threading.Event(), threading.Event()
    name = "create_exclusive" if leases.storage.exclusive else "write_bytes"
    write = getattr(leases.storage, name)

    def stalled(path, data):
        if "/_drivers/" not in path:  # heartbeats go through
            waiting.set()
            go.wait(30)
        return write(path, data)

    setattr(leases.storage, name, stalled)
    return waiting, go


def test_a_store_that_ignores_conditional_writes_gets_claims_that_need_none(s3, monkeypatch, capsys):
    """An older S3-compatible server answers a conditional PUT as a plain one: found at the storage check, said once,
    and the leases there write one claim per driver (``<gen>.<driver>.json``) and wait before reading back."""
    monkeypatch.setattr(Storage, "_put_if_absent", lambda self, path, data: True)  # "created", whatever exists
    uri = s3.uri()
    storage = check_storage(uri)
    assert not storage.exclusive and "does not honour S3 conditional writes" in capsys.readouterr().err
    leases = L.Leases(storage, EXPERIMENT).start()
    try:
        assert leases.claim(["t1"]).got == ["t1"]
        assert s3.keys(f"{_prefix(uri)}/_leases/{EXPERIMENT}/t1") == [f"0.{leases.driver}.json"]
    finally:
        leases.release()


@pytest.mark.parametrize("conditional", [True, False])
def test_a_claim_that_lands_after_the_pause_wins_twice_only_without_conditional_writes(s3, conditional, monkeypatch):
    """The race window of write-wait-read: B lists (no claims) and its claim upload stalls; A claims (write, pause,
    list) and wins; B's claim lands after A's listing, in the same second (S3 dates objects to the second) and with
    the smaller id, so B wins too, until A's next heartbeat check. S3's conditional write refuses B's claim."""
    monkeypatch.setattr(L, "_CONFIRM_S", 0.05)  # the pause, shrunk so that both claims land in one second
    uri = s3.uri()
    a, b = (L.Leases(uri, EXPERIMENT, driver=d) for d in ("b" * 12, "a" * 12))
    for d in (a, b):
        d.storage.exclusive = conditional
        d.start()
    waiting, go = _stalled_claims(b)
    try:
        for tid in ("t1", "t2", "t3"):  # a second boundary between the two claims spoils an attempt
            waiting.clear()
            go.clear()
            got_b: list[str] = []
            stalled = threading.Thread(target=lambda: got_b.extend(b.claim([tid]).got))
            time.sleep(1.0 - time.time() % 1.0 + 0.01)
            stalled.start()
            assert waiting.wait(30)
            got_a = a.claim([tid]).got
            go.set()
            stalled.join(30)
            listed = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=f"{_prefix(uri)}/_leases/{EXPERIMENT}/{tid}/")
            if len({o["LastModified"] for o in listed.get("Contents", [])}) <= 1:
                break
        assert got_a == [tid]
        if conditional:
            assert got_b == [] and b.claim([tid]).held  # refused by the store: A alone holds it
        else:
            assert got_b == [tid]  # both train it ...
            assert a.check() == {tid: b.driver} and b.check() == {}  # ... until A's next check: one holder again
            with pytest.raises(L.LeaseLost):
                L.check_lease(uri, EXPERIMENT, tid, a.driver)  # A's trial stops without writing its row
    finally:
        go.set()
        a.release()
        b.release()


# ---------------------------------------------------------------- two drivers on one prefix


@pytest.mark.slow
def test_two_drivers_on_one_s3_prefix_run_every_trial_once(s3, tmp_path):
    uri = s3.uri()
    overrides = ["sweep.grid.method.lam=[0.0, 0.5, 1.0]", "sweep.grid.seed=[0]"]
    cmd = [sys.executable, str(REPO / "experiments/lambda_ablation.py"), *_flags(uri, *overrides), "--no-report",
           "--max-concurrent", "1"]
    # each driver starts a Ray of its own (conftest's RAY_ADDRESS=local, inherited): they share only the bucket
    drivers = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    outs = [d.communicate(timeout=400)[1] for d in drivers]
    assert [d.returncode for d in drivers] == [0, 0], outs
    ran = [int(o.split(" ran now")[0].rsplit(" ", 1)[1]) for o in outs]
    assert sum(ran) == 3, outs  # every trial trained by one driver
    rows = _rows(s3, _prefix(uri))
    assert len(rows) == 3 and {r["status"] for r in rows.values()} == {"finished"}
