"""Leases: a trial is trained by one driver at a time, is never left unclaimable, and a lost lease is noticed.

Each test reproduces a way the claims of runner.leases used to run a live driver's trial twice or skip a
trial for good (issue 19, items 1 and 4), on real files in a temporary folder.
"""

import errno
import json
import os
import threading
import time
from pathlib import Path

import pytest
from fixtures_storage import flaky_storage, full_disk_for_claims, kill, object_store

import cgc_ray.storage as storage_module
from cgc_ray.runner import leases as L
from cgc_ray.storage import Storage


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch):
    monkeypatch.setattr(storage_module, "_RETRY_S", 0.01, raising=False)  # absent before retries


def _beat_file(driver: L.Leases) -> Path:
    return Path(driver.dir) / "_drivers" / f"{driver.driver}.json"


def _move_elsewhere(driver: L.Leases, silent_for: float = 0.0) -> None:
    """``driver`` runs on another host and last beat ``silent_for`` seconds ago (on the storage's clock)."""
    driver._stop.set()
    beat = _beat_file(driver)
    beat.write_text(json.dumps({**json.loads(beat.read_text()), "host": "another-node"}))
    then = time.time() - silent_for
    os.utime(beat, (then, then))


def _claim_files(root, tid: str) -> list[str]:
    return sorted(p.name for p in (Path(root) / "_leases" / "exp" / tid).iterdir())


# ---------------------------------------------------------------- claims, takeovers


def test_a_live_drivers_claims_are_left_to_it(tmp_path):
    a = L.Leases(str(tmp_path), "exp").start()
    b = L.Leases(str(tmp_path), "exp").start()
    try:
        assert a.claim(["t1", "t2"]) == (["t1", "t2"], {}, {})
        got_b, held_b, unknown_b = b.claim(["t1", "t2", "t3"])
        assert got_b == ["t3"] and unknown_b == {} and set(held_b) == {"t1", "t2"}
        assert held_b["t1"]["driver"] == a.driver and held_b["t1"]["pid"] == os.getpid()
        assert a.claim(["t1"]).got == ["t1"]  # its own claim stays its own
    finally:
        a.release()
        b.release()
    assert not list((tmp_path / "_leases" / "exp").rglob("*.json"))  # claims and heartbeats are gone


def test_claims_of_a_dead_driver_are_taken_over_once(tmp_path):
    dead = L.Leases(str(tmp_path), "exp").start()
    dead.claim(["t1"])
    kill(dead)
    b, c = L.Leases(str(tmp_path), "exp").start(), L.Leases(str(tmp_path), "exp").start()
    try:
        assert b.claim(["t1"]).got == ["t1"]
        got_c, held_c, _ = c.claim(["t1"])
        assert got_c == [] and held_c["t1"]["driver"] == b.driver
        assert _claim_files(tmp_path, "t1") == ["1.json"]  # generation 1; the dead driver's claim is tidied away
    finally:
        b.release()
        c.release()


def test_a_silent_driver_elsewhere_goes_stale_on_the_storages_clock(tmp_path):
    other = L.Leases(str(tmp_path), "exp").start()
    other.claim(["t1"])
    _move_elsewhere(other, silent_for=L.STALE_S - 30)
    b = L.Leases(str(tmp_path), "exp").start()
    try:
        assert b.claim(["t1"]).held["t1"]["driver"] == other.driver  # 60 s without a beat: still live
        _move_elsewhere(other, silent_for=L.STALE_S + 30)
        assert b.claim(["t1"]).got == ["t1"]  # ... 120 s: stale
    finally:
        b.release()


# ---------------------------------------------------------------- item 1: never unclaimable


def test_a_takeover_that_fails_on_a_full_disk_leaves_the_trial_claimable(tmp_path, monkeypatch):
    dead = L.Leases(str(tmp_path), "exp").start()
    dead.claim(["t1"])
    kill(dead)
    b = L.Leases(str(tmp_path), "exp").start()
    with monkeypatch.context() as m:
        full_disk_for_claims(m)
        got, held, unknown = b.claim(["t1"])
    assert got == [] and held == {} and "No space left on device" in unknown["t1"]
    kill(b)  # and the driver that failed dies too
    c = L.Leases(str(tmp_path), "exp").start()
    try:
        assert c.claim(["t1"]).got == ["t1"]
    finally:
        c.release()


def test_what_a_killed_claimant_leaves_never_blocks_a_trial(tmp_path):
    """A claimant killed mid-claim leaves a temporary file, or a whole claim naming it; an unparseable claim
    (written by no cgc-ray) names no one. Each is taken over, again and again."""
    lease_dir = tmp_path / "_leases" / "exp" / "t1"
    lease_dir.mkdir(parents=True)
    (lease_dir / ".0.json.killed.tmp").write_bytes(b'{"dri')
    two_hours_ago = time.time() - 7200
    os.utime(lease_dir / ".0.json.killed.tmp", (two_hours_ago, two_hours_ago))
    (lease_dir / "0.json").write_bytes(b"")
    for gen in (1, 2, 3):
        d = L.Leases(str(tmp_path), "exp").start()
        assert d.claim(["t1"]).got == ["t1"]
        assert _claim_files(tmp_path, "t1") == [f"{gen}.json"]  # older claims and the stale temporary are gone
        kill(d)


# ---------------------------------------------------------------- item 4: a live owner is never taken for dead


def test_a_heartbeat_is_never_read_half_written(tmp_path):
    a = L.Leases(str(tmp_path), "exp").start()
    a.claim(["t1"])
    b = L.Leases(str(tmp_path), "exp").start()
    stop = threading.Event()

    def beat_fast():
        while not stop.is_set():
            a._beat()

    beater = threading.Thread(target=beat_fast)
    beater.start()
    try:
        seen = [b.claim(["t1"]) for _ in range(150)]
    finally:
        stop.set()
        beater.join()
        a.release()
        b.release()
    assert all(s.got == [] and s.held["t1"]["driver"] == a.driver for s in seen)


def test_a_heartbeat_read_that_fails_is_retried_not_taken_for_a_dead_driver(tmp_path):
    a = L.Leases(str(tmp_path), "exp").start()
    a.claim(["t1"])
    flaky, handler = flaky_storage(tmp_path, f"_drivers/{a.driver}", fails=2)
    b = L.Leases(flaky, "exp").start()
    try:
        assert b.claim(["t1"]).held["t1"]["driver"] == a.driver and handler.fails == 0  # two timeouts, then read
        handler.fails = 100  # the storage keeps failing: the trial is neither taken nor held, and says why
        got, held, unknown = b.claim(["t1"])
        assert got == [] and held == {} and "simulated read timeout" in unknown["t1"]
    finally:
        a.release()
        b.release()


def test_a_claim_being_written_is_never_read_as_stale(tmp_path, monkeypatch):
    """Two drivers claim the same trials while each claim file takes 0.3 s to write: one holds each trial."""
    def slowly(real):
        def slow(*args, **kwargs):
            time.sleep(0.3)
            return real(*args, **kwargs)
        return slow

    monkeypatch.setattr(Storage, "create_exclusive", slowly(Storage.create_exclusive))
    monkeypatch.setattr(os, "fdopen", slowly(os.fdopen))  # a claim written through an O_EXCL descriptor, too
    a, b = L.Leases(str(tmp_path), "exp").start(), L.Leases(str(tmp_path), "exp").start()
    results = {}
    threads = [threading.Thread(target=lambda d=d: results.__setitem__(d.driver, d.claim(["t1", "t2"])))
               for d in (a, b)]
    try:
        threads[0].start()
        time.sleep(0.1)  # b lists while a's claims are being written
        threads[1].start()
        for t in threads:
            t.join(30)
    finally:
        a.release()
        b.release()
    got = results[a.driver].got + results[b.driver].got
    assert sorted(got) == ["t1", "t2"]  # each trial won once
    for winner, loser in ((a, b), (b, a)):
        assert set(results[loser.driver].held) == set(results[winner.driver].got)


def test_clock_skew_between_drivers_neither_kills_a_live_one_nor_keeps_a_dead_one(tmp_path, monkeypatch):
    real_time = time.time
    behind = L.Leases(str(tmp_path), "exp")
    monkeypatch.setattr(L.time, "time", lambda: real_time() - 200)  # its clock is 200 s behind
    behind.start()
    behind.claim(["t1"])
    monkeypatch.setattr(L.time, "time", lambda: real_time() + 3600)  # this one's is an hour ahead
    ahead = L.Leases(str(tmp_path), "exp").start()
    ahead.claim(["t2"])
    monkeypatch.setattr(L.time, "time", real_time)
    _move_elsewhere(behind)  # beat just now (storage clock), its own clock says 200 s ago
    _move_elsewhere(ahead, silent_for=L.STALE_S + 30)  # silent for 120 s, its clock says the future
    b = L.Leases(str(tmp_path), "exp").start()
    try:
        got, held, _ = b.claim(["t1", "t2"])
        assert got == ["t2"] and held["t1"]["driver"] == behind.driver
    finally:
        b.release()


def test_a_driver_whose_heartbeats_fail_notices_the_takeover_and_writes_no_row(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(L, "HEARTBEAT_S", 0.05)
    a = L.Leases(str(tmp_path), "exp").start()
    a.claim(["t1"])
    real_write_bytes = Storage.write_bytes

    def beats_fail(self, path, data):
        if f"_drivers/{a.driver}" in path:
            raise OSError(errno.EIO, "simulated write error", path)
        return real_write_bytes(self, path, data)

    monkeypatch.setattr(Storage, "write_bytes", beats_fail)
    time.sleep(0.2)  # some beats fail
    _move_elsewhere(a, silent_for=L.STALE_S + 1)  # ... for longer than STALE_S, as others see it
    a._stop.clear()
    a._thread = threading.Thread(target=a._loop, daemon=True)
    a._thread.start()
    b = L.Leases(str(tmp_path), "exp").start()
    try:
        assert b.claim(["t1"]).got == ["t1"]
        deadline = time.time() + 5
        while "t1" not in a.lost and time.time() < deadline:
            time.sleep(0.05)
        assert a.lost == {"t1": b.driver} and not a.holds("t1")
        with pytest.raises(L.LeaseLost, match=f"driver {b.driver} holds it now"):
            L.check_lease(str(tmp_path), "exp", "t1", a.driver)
        L.check_lease(str(tmp_path), "exp", "t1", b.driver)  # the new holder passes
    finally:
        a.release()
        b.release()
    assert "cannot reach its lease folder" in capsys.readouterr().err


def test_a_trial_that_lost_its_lease_while_training_writes_no_row(tmp_path, monkeypatch):
    from conftest import TINY

    import cgc_ray.runner.worker as W
    from cgc_ray.config import PRESETS, apply_overrides, expand_trials, load_spec, spec_hash, trial_id
    from cgc_ray.results.table import trial_status

    (trial,) = expand_trials(apply_overrides(load_spec(PRESETS["lambda_ablation_demo"]),
                                             [f"storage={tmp_path}", *TINY, "sweep.grid={}"]))
    tid = trial_id(trial)
    a = L.Leases(str(tmp_path), trial.name).start()
    a.claim([tid])
    b = L.Leases(str(tmp_path), trial.name)

    def train_while_taken_over(spec, storage, t, gpu):
        _move_elsewhere(a, silent_for=L.STALE_S + 30)
        assert b.start().claim([tid]).got == [tid]
        return {"epoch": 1, "top1": 0.5, "node": "n", "node_id": "x", "resumed_from_epoch": 0}

    monkeypatch.setattr(W, "_run_single", train_while_taken_over)
    config = {"spec": trial.model_dump(mode="json"), "trial_id": tid, "spec_hash": spec_hash(trial),
              "use_gpu": False, "code_version": "test", "driver": a.driver}
    try:
        with pytest.raises(L.LeaseLost, match="writing its row"):
            W._trial_fn(config)
    finally:
        a.release()
        b.release()
    assert trial_status(str(tmp_path), trial.name) == {}


# ---------------------------------------------------------------- object stores


def test_object_store_claims_all_pending_trials_after_one_pause(tmp_path, monkeypatch):
    pauses = []
    monkeypatch.setattr(L.time, "sleep", pauses.append)
    a = L.Leases(object_store(tmp_path), "exp").start()
    try:
        ids = [f"t{i:04d}" for i in range(300)]
        assert a.claim(ids) == (ids, {}, {})
        assert pauses == [L._CONFIRM_S]  # one pause for the batch, not one per trial
        assert _claim_files(tmp_path, "t0000") == [f"0.{a.driver}.json"]
    finally:
        a.release()


def test_object_store_two_drivers_at_once_win_each_trial_once(tmp_path):
    ids = [f"t{i:03d}" for i in range(100)]
    drivers = [L.Leases(object_store(tmp_path), "exp").start() for _ in range(2)]
    results = {}
    threads = [threading.Thread(target=lambda d=d: results.__setitem__(d.driver, d.claim(ids))) for d in drivers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        got = [results[d.driver].got for d in drivers]
        assert sorted(got[0] + got[1]) == ids  # every trial won by exactly one
        for d, other in ((0, 1), (1, 0)):
            assert set(results[drivers[d].driver].held) == set(got[other])
        for d in drivers:
            assert d.check() == {}  # and each still agrees after the dust settles
    finally:
        for d in drivers:
            d.release()


def test_object_store_a_claim_that_lands_late_is_noticed_at_the_next_check(tmp_path):
    """The race window: b's claim, dated before a's, appears only after a decided. Both won; the next check
    (after a heartbeat) gives the trial to one of them, the same one in every driver's eyes."""
    store = object_store(tmp_path)
    a, b = L.Leases(store, "exp").start(), L.Leases(store, "exp").start()
    try:
        assert a.claim(["t1"]).got == ["t1"]
        late = tmp_path / "_leases" / "exp" / "t1" / f"0.{b.driver}.json"
        late.write_text(json.dumps({"driver": b.driver}))
        earlier = (tmp_path / "_leases" / "exp" / "t1" / f"0.{a.driver}.json").stat().st_mtime - 1
        os.utime(late, (earlier, earlier))
        b.mine["t1"] = 0
        assert a.check() == {"t1": b.driver} and b.check() == {}
        with pytest.raises(L.LeaseLost):
            L.check_lease(store, "exp", "t1", a.driver)
    finally:
        a.release()
        b.release()


def test_object_store_ties_within_one_second_go_to_the_same_driver_everywhere(tmp_path):
    store = object_store(tmp_path)
    folder = tmp_path / "_leases" / "exp" / "t1"
    folder.mkdir(parents=True)
    second = int(time.time())
    drivers = [L.Leases(store, "exp").start() for _ in range(3)]
    try:
        for d in drivers:  # S3 dates objects to the second: three claims of one second
            (folder / f"0.{d.driver}.json").write_text(json.dumps({"driver": d.driver}))
            os.utime(folder / f"0.{d.driver}.json", (second, second))
        winner = min(d.driver for d in drivers)
        views = {d.driver: d.holders(["t1"])["t1"][0] for d in drivers}
        assert set(views.values()) == {winner}
    finally:
        for d in drivers:
            d.release()


def test_s3_two_drivers_at_once_win_each_trial_once():
    """The same, over S3's own protocol (a loopback server): keys, LastModified to the second, listings."""
    pytest.importorskip("moto.server")
    from fixtures_storage import loopback_s3

    ids = [f"t{i:02d}" for i in range(40)]
    with loopback_s3() as uri:
        drivers = [L.Leases(uri, "exp").start() for _ in range(2)]
        results = {}
        threads = [threading.Thread(target=lambda d=d: results.__setitem__(d.driver, d.claim(ids))) for d in drivers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        try:
            for d in drivers:
                d.check()  # a claim slower than the pause to land makes a tie (the race window): settled here
            assert sorted([*drivers[0].mine, *drivers[1].mine]) == ids  # each trial held by exactly one
        finally:
            for d in drivers:
                d.release()
        assert Storage(uri).files(Storage(uri).leases_dir("exp"), recursive=True) == []  # nothing left behind
