"""The HTML report in a real browser: headless Chromium, driven over the Chrome DevTools Protocol.

The protocol runs over ``--remote-debugging-pipe`` (JSON messages ending in a NUL byte on file descriptors 3
and 4), so the test needs no websocket library and opens no port. It checks that the page loads with no console
error and no network request, that every number a table shows is the JSON report's, and that every image
decodes; it saves a screenshot. Debian's ``chromium`` (``.ci/run`` installs it) is the browser.
"""

from __future__ import annotations

import base64
import json
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import TINY, result_row
from test_html import keep_random_checkpoint

from cgc_ray.cli.main import main as cli_main
from cgc_ray.config import PRESETS, apply_overrides, expand_trials, load_spec
from cgc_ray.results.table import write_row

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                                reason="needs Debian's chromium (apt-get install -y chromium; .ci/run installs it)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Chromium:
    """A headless Chromium with a fresh profile, and one page of it to send protocol commands to."""

    def __init__(self, profile: Path):
        to_chrome, self._out = os.pipe()
        self._in, from_chrome = os.pipe()

        def pipes_on_3_and_4():  # in the child: where --remote-debugging-pipe reads and writes
            a, b = os.dup(to_chrome), os.dup(from_chrome)  # off 3 and 4 first, so that neither overwrites the other
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     preexec_fn=pipes_on_3_and_4, close_fds=False,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        self._buf, self._id, self.events, self.session = b"", 0, [], None
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 900, "deviceScaleFactor": 1,
                                                         "mobile": False})

    def call(self, method: str, params: dict | None = None, timeout: float = 60.0) -> dict:
        """Send one command (to the page, once attached) and wait for its answer; events are kept in order."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                got = json.loads(raw)
                if got.get("id") == self._id:
                    if "error" in got:
                        raise RuntimeError(f"{method}: {got['error']}")
                    return got["result"]
                self.events.append(got)
            if select.select([self._in], [], [], 0.5)[0]:
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium closed the protocol pipe during {method}")
                self._buf += chunk
        raise TimeoutError(f"no answer to {method} in {timeout} s")

    def open(self, path: Path) -> None:
        self.call("Page.navigate", {"url": path.as_uri()})
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.call("Runtime.evaluate", {"expression": "1"})  # reads the events that came meanwhile

    def evaluate(self, expression: str):
        got = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        assert "exceptionDetails" not in got, got["exceptionDetails"]
        return got["result"]["value"]

    def screenshot(self, path: Path) -> bytes:
        size = self.call("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        png = base64.b64decode(self.call("Page.captureScreenshot", {"format": "png", "clip": clip,
                                                                  "captureBeyondViewport": True})["data"])
        path.write_bytes(png)
        return png

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and the browser's own error log entries."""
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                out.append(str(p["args"]))
            elif e.get("method") == "Runtime.exceptionThrown":
                out.append(str(p["exceptionDetails"]))
            elif e.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(str(p["entry"]))
        return out

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        os.close(self._out)
        os.close(self._in)


@pytest.fixture
def browser(tmp_path_factory):
    chromium = Chromium(tmp_path_factory.mktemp("chromium-profile"))  # a fresh profile, outside any storage
    yield chromium
    chromium.close()


CELLS_JS = """Array.from(document.querySelectorAll("td[data-kind]")).map(td => ({
  kind: td.dataset.kind, labels: td.dataset.labels, metric: td.dataset.metric, text: td.textContent,
  sig: td.className}))"""
IMAGES_JS = """Array.from(document.images).map(im => ({alt: im.alt, width: im.naturalWidth, done: im.complete,
  src: im.src.slice(0, 22)}))"""
_GROUP = re.compile(r"^(-?\d+\.\d+)(?:±(\d+\.\d+))? \((\d+)\)")
_PAIRED = re.compile(r"^([+-]\d+\.\d+) (?:\[(-?\d+\.\d+), (-?\d+\.\d+)\] )?\((\d+)\)")


def _close(text: str | None, value: float | None) -> bool:
    """A number printed with d decimals is ``value`` rounded to d decimals."""
    if text is None or value is None:
        return text is None and value is None
    decimals = len(text.partition(".")[2])
    return abs(float(text) - value) <= 0.5 * 10 ** -decimals + 1e-9


def check_page(chromium: Chromium, page: Path, records: list[dict], shot: Path) -> dict:
    """Open ``page``; hold it to ``records`` (the JSON report); screenshot it. Returns what was seen."""
    chromium.open(page)
    cells = chromium.evaluate(CELLS_JS)
    images = chromium.evaluate(IMAGES_JS)
    assert chromium.errors() == []
    assert [u for u in chromium.requests() if not u.startswith(("data:", "file:"))] == []
    assert images and all(im["done"] and im["width"] > 0 and im["alt"].strip() for im in images), images
    assert all(im["src"].startswith("data:image/png") for im in images)
    by_key = {(r["kind"], r["labels_json"], r["metric"]): r for r in records if r["n"] > 0}
    shown = set()
    for cell in cells:
        key = (cell["kind"], cell["labels"], cell["metric"])
        r = by_key[key]
        shown.add(key)
        if cell["kind"] == "group":
            mean, std, n = _GROUP.match(cell["text"]).groups()
            assert _close(mean, r["mean"]) and _close(std, r["std"]) and int(n) == r["n"], (cell, r)
        else:
            mean, lo, hi, n = _PAIRED.match(cell["text"]).groups()
            assert _close(mean, r["mean"]) and _close(lo, r["ci_low"]) and _close(hi, r["ci_high"]), (cell, r)
            assert int(n) == r["n"]
            significant = r["ci_low"] is not None and (r["ci_low"] > 0 or r["ci_high"] < 0)
            assert cell["sig"] == ("" if not significant else "sig-up" if r["ci_low"] > 0 else "sig-down"), cell
    assert shown == set(by_key)  # every number of the JSON report is on the page
    png = chromium.screenshot(shot)
    assert png[:8] == PNG_SIGNATURE and len(png) > 20_000
    return {"cells": cells, "images": images}


def _json_report(storage: Path, capsys) -> list[dict]:
    capsys.readouterr()
    assert cli_main(["report", "--storage", str(storage), "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def _made_up_rows(storage: Path) -> None:
    """A λ ablation on the tiny demo set (λ 0, 0.1, 1 x seeds 0..2; one CGC trial diverged, one failed), with
    the checkpoints a sweep keeps, of untrained models; and a few-shot sweep without checkpoints."""
    lam = apply_overrides(load_spec(PRESETS["lambda_ablation_demo"]),
                          [*TINY, "sweep.grid.method.lam=[0.0, 0.1, 1.0]", "sweep.grid.seed=[0, 1, 2]"])
    for t in expand_trials(lam):
        metrics = {"top1": 60 + 4 * t.method.lam + 1.5 * t.seed, "ch": 40 + 9 * t.method.lam + t.seed % 2,
                   "cgc_loss": 1.0 - 0.2 * t.method.lam}
        status = {(0.1, 2): "diverged", (1.0, 2): "failed"}.get((t.method.lam, t.seed), "finished")
        write_row(str(storage), t.name, result_row(t, metrics if status == "finished" else {}, status=status,
                                                   details={"eval_split": "test"}))
        if status == "finished":
            keep_random_checkpoint(storage, t)
    few = apply_overrides(load_spec(PRESETS["fewshot_demo"]),
                          ["sweep.grid.data.shots=[1, 5]", "sweep.grid.data.episode=[0, 1, 2]"])
    for t in expand_trials(few):
        gain = (t.method.name == "cgc") * (2.0 + t.data.episode)
        write_row(str(storage), t.name, result_row(t, {"top1": 30 + 3 * t.data.shots + gain - t.data.episode,
                                                       "ch": 35 + gain}))


def test_report_page_in_chromium(tmp_path, capsys, browser):
    storage = tmp_path / "results"
    _made_up_rows(storage)
    out = tmp_path / "page" / "report.html"
    capsys.readouterr()
    assert cli_main(["report", "--storage", str(storage), "--format", "html", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    seen = check_page(browser, out, _json_report(storage, capsys), tmp_path / "report.png")
    # the λ table's trials row counts the diverged and failed trials beside n; a significant Δ is marked
    trials = browser.evaluate("""Array.from(document.querySelectorAll("tr")).filter(tr => tr.cells[0]
        && tr.cells[0].textContent === "trials").map(tr => Array.from(tr.cells).map(c => c.textContent))""")
    assert trials == [["trials", "3", "2 +1 diverged", "2 +1 failed"]]
    assert any(c["sig"] == "sig-up" for c in seen["cells"])
    assert [im["alt"].split(" ", 2)[:2] for im in seen["images"]] == [
        ["fewshot:", "accuracy"], ["fewshot:", "few-shot"],
        ["lambda_ablation:", "λ"], ["lambda_ablation:", "accuracy"], ["lambda_ablation:", "Grad-CAM"]]
    # the λ = 1 trial of the highest CH (seed 1) under its pair, the baseline of seed 1; few-shot kept no checkpoint
    heatmaps = seen["images"][-1]
    assert "baseline (trial" in heatmaps["alt"] and "seed 1) above cgc λ=1 (trial" in heatmaps["alt"]
    assert heatmaps["width"] > 300
    text = browser.evaluate("document.body.innerText")
    assert text.count("No heatmaps: no checkpoint of trial") == 1
    # a click on a header sorts by that column (Δ top-1: +0.40 for λ = 0.1, +4.00 for λ = 1), a second reverses
    order = """(() => { const t = Array.from(document.querySelectorAll("#exp-lambda_ablation table"))[1];
        t.tHead.rows[0].cells[1].click(); const up = Array.from(t.tBodies[0].rows, r => r.cells[0].textContent);
        t.tHead.rows[0].cells[1].click(); const down = Array.from(t.tBodies[0].rows, r => r.cells[0].textContent);
        return [up, down]; })()"""
    up = ["cgc λ=0.1 − baseline (1 unpaired)", "cgc λ=1 − baseline (1 unpaired)"]
    assert browser.evaluate(order) == [up, up[::-1]]
    assert browser.errors() == []
