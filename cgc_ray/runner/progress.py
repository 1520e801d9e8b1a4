"""A rich live view of an experiment in the driver: trials done / running / pending, ETA, best so far."""

from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback
from rich.console import Console
from rich.live import Live
from rich.table import Table


class RichProgress(Callback):
    """Tune callback that redraws one small table as trials start, report and finish."""

    def __init__(self, *, total: int, already_done: int, experiment: str, metric: str = "top1"):
        self.total = total
        self.done = already_done
        self.skipped = already_done
        self.experiment = experiment
        self.metric = metric
        self.running: dict[str, dict[str, Any]] = {}
        self.failed = 0
        self.best: tuple[float, str] | None = None
        self.start = time.monotonic()
        self.live: Live | None = None  # started in setup(): Tune pickles its callbacks first

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "live": None}

    def setup(self, **info):
        self.start = time.monotonic()
        self.live = Live(self._render(), console=Console(stderr=True), refresh_per_second=2, transient=False)
        self.live.start()

    def _eta(self) -> str:
        """Trials left over the rate seen so far; that rate already counts the trials running side by side."""
        finished_here = self.done - self.skipped
        if finished_here == 0:
            return "?"
        left = (time.monotonic() - self.start) / finished_here * (self.total - self.done - self.failed)
        return time.strftime("%H:%M:%S", time.gmtime(max(0.0, left)))

    def _render(self) -> Table:
        t = Table(title=f"cgc-ray · {self.experiment}", show_header=True, expand=False)
        for col in ("done", "running", "pending", "failed", "elapsed", "ETA", f"best {self.metric}"):
            t.add_column(col, justify="right")
        pending = self.total - self.done - len(self.running) - self.failed
        best = f"{self.best[0]:.2f} ({self.best[1]})" if self.best else "-"
        elapsed = time.strftime("%H:%M:%S", time.gmtime(time.monotonic() - self.start))
        t.add_row(f"{self.done}/{self.total}", str(len(self.running)), str(max(0, pending)), str(self.failed),
                  elapsed, self._eta(), best)
        for tid, m in sorted(self.running.items()):
            ep = m.get("epoch", 0)
            val = m.get(self.metric)
            t.add_row(tid, f"epoch {ep}", "", "", "", "", f"{val:.2f}" if isinstance(val, float) else "")
        return t

    def _refresh(self) -> None:
        if self.live is not None:
            self.live.update(self._render())

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running[trial.config["trial_id"]] = {}
        self._refresh()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        tid = trial.config["trial_id"]
        if "row_written" in result:
            val = result.get(self.metric)
            if val is not None and (self.best is None or val > self.best[0]):
                self.best = (float(val), tid)
        else:
            self.running[tid] = result
        self._refresh()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.pop(trial.config["trial_id"], None)
        self.done += 1
        self._refresh()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.pop(trial.config["trial_id"], None)
        self.failed += 1
        self._refresh()

    def on_experiment_end(self, trials, **info):
        self._refresh()
        if self.live is not None:
            self.live.stop()
