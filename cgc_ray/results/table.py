"""Trial results as a Parquet dataset: one file (one row) per trial that ended.

Where the files live is :class:`cgc_ray.storage.Storage`'s to say: one file
per trial in the experiment's Hive partition, beside folders Parquet readers
skip (summaries, checkpoints, leases, figures, Ray's run state). So the
storage folder reads as one dataset whose ``experiment`` column comes from
the directory name: ``pandas.read_parquet("results")``,
``duckdb.sql("select * from 'results/*/*.parquet'")``; cgc-ray itself reads it
with ``pyarrow.dataset`` and Hive partitioning.

Writes are atomic (:meth:`Storage.write_atomic`): readers never see a partial
file; two writers of the same trial replace each other's file (never
duplicate rows). A file that is corrupt or truncated anyway (a full disk, a
copy gone wrong) does not count as done: :func:`trial_status` sets it aside
with a warning and its trial runs again.

Schema version 2 (:data:`SCHEMA`), columns and units:

=============== ========= ====================================================
column          type      meaning
=============== ========= ====================================================
schema_version  int32     version of this layout (2)
experiment      string    experiment name (from the directory name)
trial_id        string    content hash of what the trial computes (config.trial_id)
spec_hash       string    hash of the full resolved config (config.spec_hash)
status          string    finished | diverged (NaN loss: metrics null) | failed
error           string    the error of a failed or diverged trial (else null)
diverged_epoch  int32     the epoch (1-based) a diverged trial's loss became NaN
diverged_step   int64     the optimiser step within that epoch
dataset         string    data.dataset
arch            string    model.arch
method          string    effective method: baseline | cgc | cgc_no_neg (λ = 0 is a baseline)
lam             float64   method.lam (lambda)
tau             float64   method.tau
shots           int32     data.shots (null: not few-shot)
episode         int32     data.episode (few-shot split seed)
seed            int64     training seed
percent         float64   data.percent labelled share in % (null: fully labelled)
labelled_split  string    semi-supervised labelled set: "list:<file>" or "random:<percent>%"
eval_split      string    the split the metrics were computed on
weights         string    the initial weights (null: random init)
config_json     string    full resolved trial config, canonical JSON
top1, top5      float64   accuracy in % [0, 100]
ch              float64   content heatmap in % [0, 100]
iauc            float64   insertion AUC in [0, 1]
iauc_protocol   string    which IAUC protocol produced ``iauc`` (fast | authors)
iauc_images     int32     images the IAUC was computed on
cgc_loss        float64   held-out CGC loss (nats)
zero_cam_frac   float64   share of validation heatmaps that were all zero [0, 1]
epochs          int32     epochs trained
wall_time_s     float64   trial wall time in seconds
node            string    host that ran the trial (rank 0)
code_version    string    cgc-ray version and git commit
finished_at     timestamp UTC time the row was written
=============== ========= ====================================================

Metric columns are null when the trial did not compute that metric (or did
not finish). Files of schema version 1 read with nulls in the new columns and
status null, read as finished.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import subprocess
import warnings
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cgc_ray.storage import HIDDEN, Storage

__all__ = [
    "FILE_SCHEMA",
    "METRIC_COLUMNS",
    "PERCENT_METRICS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "code_version",
    "completed_trial_ids",
    "read_rows",
    "result_metrics",
    "row_from_config",
    "write_row",
]

SCHEMA_VERSION = 2
STATUSES: tuple[str, ...] = ("finished", "diverged", "failed")
DONE_STATUSES: frozenset[str] = frozenset({"finished", "diverged"})  # a failed trial runs again

METRIC_COLUMNS: tuple[str, ...] = ("top1", "top5", "ch", "iauc", "cgc_loss", "zero_cam_frac")
# What a trial reports beside its metrics, stored as they are.
DETAIL_COLUMNS: tuple[str, ...] = ("labelled_split", "eval_split", "iauc_protocol", "iauc_images")
# Stored in % in the table; the engine computes them as fractions.
PERCENT_METRICS: tuple[str, ...] = ("top1", "top5", "ch")

SCHEMA = pa.schema(
    [
        pa.field("schema_version", pa.int32(), nullable=False),
        pa.field("experiment", pa.string(), nullable=False),
        pa.field("trial_id", pa.string(), nullable=False),
        pa.field("spec_hash", pa.string(), nullable=False),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
        pa.field("diverged_epoch", pa.int32()),
        pa.field("diverged_step", pa.int64()),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("arch", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("lam", pa.float64(), nullable=False),
        pa.field("tau", pa.float64(), nullable=False),
        pa.field("shots", pa.int32()),
        pa.field("episode", pa.int32(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("percent", pa.float64()),
        pa.field("labelled_split", pa.string()),
        pa.field("eval_split", pa.string()),
        pa.field("weights", pa.string()),
        pa.field("config_json", pa.string(), nullable=False),
        *[pa.field(m, pa.float64()) for m in METRIC_COLUMNS],
        pa.field("iauc_protocol", pa.string()),
        pa.field("iauc_images", pa.int32()),
        pa.field("epochs", pa.int32(), nullable=False),
        pa.field("wall_time_s", pa.float64(), nullable=False),
        pa.field("node", pa.string(), nullable=False),
        pa.field("code_version", pa.string(), nullable=False),
        pa.field("finished_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
    metadata={"cgc_ray.schema_version": str(SCHEMA_VERSION)},
)
# What a file holds: everything except the partition column.
FILE_SCHEMA = SCHEMA.remove(SCHEMA.get_field_index("experiment"))
# Reading: every column nullable (older files lack the newer ones), experiment from the folder name.
_READ_SCHEMA = pa.schema([f.with_nullable(True) for f in SCHEMA])

def result_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Engine metrics (fractions) in the table's units: top1/top5/ch in %; NaN or missing left out (null)."""
    out = {}
    for m in METRIC_COLUMNS:
        v = metrics.get(m)
        if v is not None and not math.isnan(v):
            out[m] = float(v) * (100.0 if m in PERCENT_METRICS else 1.0)
    return out


def row_from_config(
    config: Mapping[str, Any],
    metrics: Mapping[str, float | None],
    *,
    trial_id: str,
    spec_hash: str,
    epochs: int,
    wall_time_s: float,
    node: str,
    code_version: str,
    status: str = "finished",
    error: str | None = None,
    diverged_epoch: int | None = None,
    diverged_step: int | None = None,
    details: Mapping[str, Any] | None = None,
    finished_at: _dt.datetime | None = None,
) -> dict[str, Any]:
    """Build a row from a resolved trial config (``spec.model_dump(mode="json")``).

    ``metrics`` may hold any subset of :data:`METRIC_COLUMNS` (others are
    null); unknown metric names raise, so a typo cannot silently drop a number.
    ``details``: what the trial reports beside its metrics (``labelled_split``,
    ``eval_split``, ``iauc_protocol``, ``iauc_images``). The ``method`` column
    is the effective method (``config.effective_method``: λ = 0 trains a baseline).
    """
    from cgc_ray.config.identity import effective_method

    unknown = set(metrics) - set(METRIC_COLUMNS)
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}; result columns are {list(METRIC_COLUMNS)}")
    if status not in STATUSES:
        raise ValueError(f"status={status!r}; choose one of {STATUSES}")
    details = dict(details or {})
    unknown = set(details) - set(DETAIL_COLUMNS)
    if unknown:
        raise ValueError(f"unknown detail column(s) {sorted(unknown)}; choose from {list(DETAIL_COLUMNS)}")
    data, method = config["data"], config["method"]
    return {
        "trial_id": trial_id,
        "spec_hash": spec_hash,
        "status": status,
        "error": error,
        "diverged_epoch": diverged_epoch,
        "diverged_step": diverged_step,
        "dataset": data["dataset"],
        "arch": config["model"]["arch"],
        "method": effective_method(config),
        "lam": method["lam"],
        "tau": method["tau"],
        "shots": data["shots"],
        "episode": data["episode"],
        "seed": config["seed"],
        "percent": data["percent"],
        "weights": config["model"].get("weights"),
        **{k: details.get(k) for k in DETAIL_COLUMNS},
        "config_json": json.dumps(config, sort_keys=True, separators=(",", ":")),
        **{m: (None if metrics.get(m) is None else float(metrics[m])) for m in METRIC_COLUMNS},
        "epochs": epochs,
        "wall_time_s": wall_time_s,
        "node": node,
        "code_version": code_version,
        "finished_at": finished_at or _dt.datetime.now(_dt.timezone.utc),
    }


def write_row(storage: Storage | str, experiment: str, row: Mapping[str, Any]) -> str:
    """Write one trial's row atomically to its file (:meth:`Storage.row_path`).

    ``row`` has the columns of :data:`FILE_SCHEMA` (``schema_version`` is
    filled in; ``finished_at`` defaults to now). Re-writing a trial id replaces
    its file. Returns the written path.
    """
    row = dict(row)
    row.setdefault("schema_version", SCHEMA_VERSION)
    row.setdefault("finished_at", _dt.datetime.now(_dt.timezone.utc))
    row.pop("experiment", None)
    names = set(FILE_SCHEMA.names)
    extra, missing = set(row) - names, {f.name for f in FILE_SCHEMA if not f.nullable} - set(row)
    if extra or missing:
        raise ValueError(
            f"result row does not match schema v{SCHEMA_VERSION}: "
            f"unknown columns {sorted(extra)}, missing columns {sorted(missing)}"
        )
    storage = Storage.of(storage)
    path = storage.row_path(experiment, row["trial_id"])  # validates both names
    table = pa.Table.from_pylist([row], schema=FILE_SCHEMA)
    return storage.write_atomic(path, lambda target: pq.write_table(table, target, filesystem=storage.fs))


def _validate(fs: pafs.FileSystem, info: pafs.FileInfo) -> str:
    """The status of a row file whose footer and trial id check out; raises ValueError otherwise."""
    tid = info.base_name.removesuffix(".parquet")
    try:
        table = pq.read_table(info.path, filesystem=fs, columns=None)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"unreadable Parquet ({e})") from None
    if table.num_rows != 1 or "trial_id" not in table.column_names:
        raise ValueError(f"{table.num_rows} rows / columns {table.column_names[:5]}, expected one trial row")
    if table["trial_id"][0].as_py() != tid:
        raise ValueError(f"holds trial {table['trial_id'][0].as_py()!r}, not {tid!r}")
    status = table["status"][0].as_py() if "status" in table.column_names else None
    return status or "finished"  # schema v1 rows are finished trials


def trial_status(storage: Storage | str, experiment: str) -> dict[str, str]:
    """trial id -> status of every valid row file of ``experiment``; bad files are set aside.

    A file that cannot be read, or whose row is not the trial its name says,
    is set aside (:meth:`Storage.set_aside`) with a warning (its trial
    then runs again). Temporary files of writers that died are deleted.
    """
    storage = Storage.of(storage)
    infos = storage.files(storage.experiment_dir(experiment))
    storage.remove_stale_temps(infos)
    now = _dt.datetime.now(_dt.timezone.utc)
    out: dict[str, str] = {}
    for info in infos:
        if not info.base_name.endswith(".parquet") or info.base_name.startswith(HIDDEN):
            continue
        try:
            out[info.base_name.removesuffix(".parquet")] = _validate(storage.fs, info)
        except ValueError as e:
            aside = storage.set_aside(info.path, experiment, now)
            warnings.warn(f"result file {info.path} is not a valid trial row ({e}); moved to {aside}, "
                          "its trial will run again", stacklevel=2)
    return out


def completed_trial_ids(storage: Storage | str, experiment: str) -> set[str]:
    """Trial ids whose row says they are done (finished or diverged); failed trials run again."""
    return {t for t, status in trial_status(storage, experiment).items() if status in DONE_STATUSES}


def read_rows(storage: Storage | str, experiment: str | None = None, *,
              left_out: list[str] | None = None) -> pa.Table:
    """All result rows (of one experiment, or of all) as a table with :data:`SCHEMA`.

    Read with ``pyarrow.dataset`` and Hive partitioning (:meth:`Storage.experiment_dir`).
    Files written by an older schema version read with nulls in the columns
    they lack. A file that cannot be read, or whose columns do not cast to
    the schema (a list where a number belongs), is left out: one line naming
    it is appended to ``left_out``, or warned when that is None. A missing
    storage location reads as an empty table.
    """
    storage = Storage.of(storage)
    if experiment is not None:
        storage.experiment_dir(experiment)  # validates the name
    if not storage.exists(storage.root):
        return SCHEMA.empty_table()
    partitioning = pads.partitioning(pa.schema([SCHEMA.field("experiment")]), flavor="hive")
    kw = dict(format="parquet", filesystem=storage.fs, partitioning=partitioning, schema=_READ_SCHEMA,
              ignore_prefixes=list(HIDDEN))
    dataset = pads.dataset(storage.root, exclude_invalid_files=True, **kw)
    bad = [f"{path}: not a readable Parquet file (the next run of its experiment moves it aside and runs its "
           "trial again)" for path in
           sorted(set(pads.dataset(storage.root, **kw).files) - set(dataset.files))]
    where = None if experiment is None else pc.field("experiment") == experiment
    try:
        table = dataset.to_table(filter=where)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        table = _read_each(dataset, where, bad)  # the slow path, only when some file does not fit the schema
    if left_out is not None:
        left_out += bad
    elif bad:
        warnings.warn(f"left out {len(bad)} unreadable result file(s): {'; '.join(bad)}", stacklevel=2)
    return table.select(SCHEMA.names).cast(SCHEMA)


def _read_each(dataset: pads.Dataset, where: pc.Expression | None, bad: list[str]) -> pa.Table:
    """The files of ``dataset`` one by one, leaving out (and listing in ``bad``) those that do not fit its schema."""
    parts = []
    for fragment in dataset.get_fragments(filter=where):
        try:
            parts.append(pads.Scanner.from_fragment(fragment, schema=dataset.schema, filter=where).to_table())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            bad.append(f"{fragment.path}: {str(e).splitlines()[0]}")
    return pa.concat_tables(parts) if parts else dataset.schema.empty_table()


def code_version() -> str:
    """``cgc-ray <version>+g<commit>[.dirty]`` where git is available, else the package version.

    On a cluster the file mount has no ``.git``; ``cluster/gpu.yaml`` mounts it
    separately and names it in ``$CGC_RAY_GIT_DIR``.
    """
    try:
        ver = importlib.metadata.version("cgc-ray")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        ver = "unknown"
    repo = Path(__file__).resolve().parent.parent
    git = ["git", "-C", str(repo)]
    if os.environ.get("CGC_RAY_GIT_DIR"):
        git += ["--git-dir", os.path.expanduser(os.environ["CGC_RAY_GIT_DIR"]), "--work-tree", str(repo)]
    try:
        sha = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"cgc-ray {ver}"
    return f"cgc-ray {ver}+g{sha}{'.dirty' if dirty else ''}"
