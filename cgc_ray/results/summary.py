"""The aggregated table in Arrow: every group and paired difference of an experiment, one row per metric.

Written after each sweep and by ``cgc-ray report --format parquet`` (which
prints the path) to :meth:`cgc_ray.storage.Storage.summary_path`, a folder that
Parquet readers of the per-trial rows skip. Its numbers are the ones the
printed report shows (both come from :mod:`cgc_ray.results.stats`). pandas and
duckdb read it: ``pandas.read_parquet(path)``.

Schema version 1 (:data:`SUMMARY_SCHEMA`), one row per (group or pair, metric):

============== ======= ==========================================================
column         type    meaning
============== ======= ==========================================================
schema_version int32   version of this layout (1)
experiment     string  experiment name
kind           string  ``group`` (mean ± std of one configuration) or ``paired``
                       (CGC − baseline differences, paired by seed / episode)
method         string  effective method of the group (for ``paired``: the CGC side)
dataset        string  data.dataset
arch           string  model.arch
lam            float64 method.lam (null for a baseline group)
tau            float64 method.tau (null for a baseline group)
shots          int32   data.shots (null: not few-shot)
percent        float64 data.percent (null: fully labelled)
labels_json    string  every identity field of the group but seed / episode (canonical JSON)
baseline_json  string  ``paired``: the baseline group's labels_json (else null)
metric         string  top1 | top5 | ch | iauc | cgc_loss | zero_cam_frac (units of the trial rows)
n              int32   values averaged (``group``: finished trials; ``paired``: pairs)
n_diverged     int32   ``group``: trials whose loss went NaN (no metrics); ``paired``: null
n_failed       int32   ``group``: trials that failed; ``paired``: null
n_unpaired     int32   ``paired``: replicates without a finished partner (else null)
mean           float64 mean
std            float64 sample standard deviation, ddof 1 (null for n = 1)
ci_low         float64 lower end of the 95 % Student-t interval of the mean (null for n = 1)
ci_high        float64 upper end
ci_level       float64 0.95
============== ======= ==========================================================
"""

from __future__ import annotations

from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from cgc_ray.config.base import canonical
from cgc_ray.results.stats import CI_LEVEL, Group, Paired
from cgc_ray.storage import Storage

SUMMARY_SCHEMA_VERSION = 1
SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("schema_version", pa.int32(), nullable=False),
        pa.field("experiment", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("dataset", pa.string()),
        pa.field("arch", pa.string()),
        pa.field("lam", pa.float64()),
        pa.field("tau", pa.float64()),
        pa.field("shots", pa.int32()),
        pa.field("percent", pa.float64()),
        pa.field("labels_json", pa.string(), nullable=False),
        pa.field("baseline_json", pa.string()),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("n", pa.int32(), nullable=False),
        pa.field("n_diverged", pa.int32()),
        pa.field("n_failed", pa.int32()),
        pa.field("n_unpaired", pa.int32()),
        pa.field("mean", pa.float64(), nullable=False),
        pa.field("std", pa.float64()),
        pa.field("ci_low", pa.float64()),
        pa.field("ci_high", pa.float64()),
        pa.field("ci_level", pa.float64(), nullable=False),
    ],
    metadata={"cgc_ray.summary_schema_version": str(SUMMARY_SCHEMA_VERSION)},
)


def _label_columns(labels: dict[str, Any]) -> dict[str, Any]:
    return {"method": labels["method.name"], "dataset": labels.get("data.dataset"), "arch": labels.get("model.arch"),
            "lam": labels.get("method.lam"), "tau": labels.get("method.tau"), "shots": labels.get("data.shots"),
            "percent": labels.get("data.percent")}


def records(groups: Sequence[Group], paired: Sequence[Paired]) -> list[dict[str, Any]]:
    """The summary rows (:data:`SUMMARY_SCHEMA`) of these groups and pairs."""
    out = []
    for g in groups:
        for m, s in g.stats.items():
            out.append({"schema_version": SUMMARY_SCHEMA_VERSION, "experiment": g.experiment, "kind": "group",
                        **_label_columns(g.labels), "labels_json": canonical(g.labels), "baseline_json": None,
                        "metric": m, "n": s.n, "n_diverged": g.n_diverged, "n_failed": g.n_failed,
                        "n_unpaired": None, "mean": s.mean, "std": s.std,
                        "ci_low": s.ci[0] if s.ci else None, "ci_high": s.ci[1] if s.ci else None,
                        "ci_level": CI_LEVEL})
        if not g.stats and (g.n_diverged or g.n_failed):  # a configuration with no finished trial is still shown
            out.append({"schema_version": SUMMARY_SCHEMA_VERSION, "experiment": g.experiment, "kind": "group",
                        **_label_columns(g.labels), "labels_json": canonical(g.labels), "baseline_json": None,
                        "metric": "top1", "n": 0, "n_diverged": g.n_diverged, "n_failed": g.n_failed,
                        "n_unpaired": None, "mean": float("nan"), "std": None, "ci_low": None, "ci_high": None,
                        "ci_level": CI_LEVEL})
    for p in paired:
        for m, s in p.stats.items():
            out.append({"schema_version": SUMMARY_SCHEMA_VERSION, "experiment": p.experiment, "kind": "paired",
                        **_label_columns(p.labels), "labels_json": canonical(p.labels),
                        "baseline_json": canonical(p.baseline_labels), "metric": m, "n": s.n, "n_diverged": None,
                        "n_failed": None, "n_unpaired": p.unpaired, "mean": s.mean, "std": s.std,
                        "ci_low": s.ci[0] if s.ci else None, "ci_high": s.ci[1] if s.ci else None,
                        "ci_level": CI_LEVEL})
    return out


def summary_table(groups: Sequence[Group], paired: Sequence[Paired]) -> pa.Table:
    return pa.Table.from_pylist(records(groups, paired), schema=SUMMARY_SCHEMA)


def write_summary(storage: Storage | str, experiment: str, groups: Sequence[Group], paired: Sequence[Paired]) -> str:
    """Write the experiment's summary atomically (:meth:`Storage.write_atomic`); returns its path."""
    storage = Storage.of(storage)
    table = summary_table([g for g in groups if g.experiment == experiment],
                          [p for p in paired if p.experiment == experiment])
    return storage.write_atomic(storage.summary_path(experiment),
                                lambda target: pq.write_table(table, target, filesystem=storage.fs))
