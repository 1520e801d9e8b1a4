"""Trial results as a Parquet dataset: one file (one row) per finished trial.

Layout under a storage URI (a local path, ``file://``, ``s3://bucket/prefix``
or any URI ``pyarrow.fs.FileSystem.from_uri`` accepts)::

    <storage>/experiment=<name>/<trial_id>.parquet

The ``experiment`` column comes from the Hive-style directory name (it is not
stored inside the files, so pandas/polars/duckdb read the whole tree without a
type clash), e.g. ``pandas.read_parquet("results")`` or
``duckdb.sql("select * from 'results/*/*.parquet'")``.

Writes are atomic: the row is written to a hidden temporary name in the same
directory and renamed over ``<trial_id>.parquet``. Readers skip names starting
with ``.``, so they never see a partial file; two writers of the same trial
replace each other's file (never duplicate rows). Object stores (S3, GCS)
publish an object only when its upload completes and have no rename, so there
the file is written to its final name directly.

Schema version 1 (:data:`SCHEMA`), columns and units:

============== ========= =====================================================
column         type      meaning
============== ========= =====================================================
schema_version int32     version of this layout (1)
experiment     string    experiment name (from the directory name)
trial_id       string    content hash of what the trial computes (spec.trial_id)
spec_hash      string    hash of the full resolved config (spec.spec_hash)
dataset        string    data.dataset
arch           string    model.arch
method         string    method.name: baseline | cgc | cgc_no_neg
lam            float64   method.lam (lambda)
tau            float64   method.tau
shots          int32     data.shots (null: not few-shot)
episode        int32     data.episode (few-shot split seed)
seed           int64     training seed
percent        float64   data.percent labelled share in % (null: fully labelled)
config_json    string    full resolved trial config, canonical JSON
top1, top5     float64   accuracy in % [0, 100]
ch             float64   content heatmap in % [0, 100]
iauc           float64   insertion AUC in [0, 1]
cgc_loss       float64   held-out CGC loss (nats)
zero_cam_frac  float64   share of validation heatmaps that were all zero [0, 1]
epochs         int32     epochs trained
wall_time_s    float64   trial wall time in seconds
node           string    host that ran the trial (rank 0)
code_version   string    cgc-ray version and git commit
finished_at    timestamp UTC time the row was written
============== ========= =====================================================

Metric columns are null when the trial did not compute that metric.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

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

SCHEMA_VERSION = 1

METRIC_COLUMNS: tuple[str, ...] = ("top1", "top5", "ch", "iauc", "cgc_loss", "zero_cam_frac")
# Stored in % in the table; the engine computes them as fractions.
PERCENT_METRICS: tuple[str, ...] = ("top1", "top5", "ch")

SCHEMA = pa.schema(
    [
        pa.field("schema_version", pa.int32(), nullable=False),
        pa.field("experiment", pa.string(), nullable=False),
        pa.field("trial_id", pa.string(), nullable=False),
        pa.field("spec_hash", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("arch", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("lam", pa.float64(), nullable=False),
        pa.field("tau", pa.float64(), nullable=False),
        pa.field("shots", pa.int32()),
        pa.field("episode", pa.int32(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("percent", pa.float64()),
        pa.field("config_json", pa.string(), nullable=False),
        *[pa.field(m, pa.float64()) for m in METRIC_COLUMNS],
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

_PARTITION = "experiment="
_ATOMIC_PUT_FILESYSTEMS = {"s3", "gcs"}


def filesystem(storage_uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, base path) for a local path or a pyarrow filesystem URI."""
    if "://" not in storage_uri:
        return pafs.LocalFileSystem(), str(Path(storage_uri).expanduser().resolve())
    try:
        fs, path = pafs.FileSystem.from_uri(storage_uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise ValueError(f"storage URI {storage_uri!r} is not usable by pyarrow: {e}") from None
    return fs, path.rstrip("/")


def checkpoint_path(storage_uri: str, experiment: str, trial_id: str) -> str:
    """Where a trial's checkpoint lives in the storage's filesystem: ``_checkpoints/<experiment>/<trial_id>/checkpoint.pt``."""
    return f"{filesystem(storage_uri)[1]}/_checkpoints/{experiment}/{trial_id}/checkpoint.pt"


def figures_dir(storage_uri: str, experiment: str) -> str:
    """Where an experiment's figures live: ``_figures/<experiment>`` (``_`` folders are skipped by Parquet readers)."""
    return f"{filesystem(storage_uri)[1]}/_figures/{experiment}"


def _experiment_dir(base: str, experiment: str) -> str:
    if not experiment or "/" in experiment or experiment.startswith((".", "_")):
        raise ValueError(f"experiment name {experiment!r} cannot be a results directory; use letters, digits, _ . -")
    return f"{base}/{_PARTITION}{experiment}"


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
    finished_at: _dt.datetime | None = None,
) -> dict[str, Any]:
    """Build a row from a resolved trial config (``spec.model_dump(mode="json")``).

    ``metrics`` may hold any subset of :data:`METRIC_COLUMNS` (others are null);
    unknown metric names raise, so a typo cannot silently drop a number.
    """
    unknown = set(metrics) - set(METRIC_COLUMNS)
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}; result columns are {list(METRIC_COLUMNS)}")
    data, method = config["data"], config["method"]
    return {
        "trial_id": trial_id,
        "spec_hash": spec_hash,
        "dataset": data["dataset"],
        "arch": config["model"]["arch"],
        "method": method["name"],
        "lam": method["lam"],
        "tau": method["tau"],
        "shots": data["shots"],
        "episode": data["episode"],
        "seed": config["seed"],
        "percent": data["percent"],
        "config_json": json.dumps(config, sort_keys=True, separators=(",", ":")),
        **{m: (None if metrics.get(m) is None else float(metrics[m])) for m in METRIC_COLUMNS},
        "epochs": epochs,
        "wall_time_s": wall_time_s,
        "node": node,
        "code_version": code_version,
        "finished_at": finished_at or _dt.datetime.now(_dt.timezone.utc),
    }


def write_row(storage_uri: str, experiment: str, row: Mapping[str, Any]) -> str:
    """Write one trial's row atomically to ``experiment=<experiment>/<trial_id>.parquet``.

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
    tid = row["trial_id"]
    if not tid or "/" in tid or tid.startswith((".", "_")):
        raise ValueError(f"trial_id {tid!r} cannot be a file name")
    table = pa.Table.from_pylist([row], schema=FILE_SCHEMA)

    fs, base = filesystem(storage_uri)
    directory = _experiment_dir(base, experiment)
    fs.create_dir(directory, recursive=True)
    final = f"{directory}/{tid}.parquet"
    if fs.type_name in _ATOMIC_PUT_FILESYSTEMS:
        pq.write_table(table, final, filesystem=fs)
        return final
    tmp = f"{directory}/.{tid}.{uuid.uuid4().hex}.tmp"
    try:
        pq.write_table(table, tmp, filesystem=fs)
        fs.move(tmp, final)
    except BaseException:
        _delete_quietly(fs, tmp)
        raise
    return final


def _delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except (FileNotFoundError, OSError):
        pass


def _trial_files(fs: pafs.FileSystem, directory: str) -> list[pafs.FileInfo]:
    infos = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    return [i for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
            and not i.base_name.startswith((".", "_"))]


def completed_trial_ids(storage_uri: str, experiment: str) -> set[str]:
    """Trial ids with a result row in ``experiment`` (from file names; no file is read)."""
    fs, base = filesystem(storage_uri)
    return {i.base_name.removesuffix(".parquet") for i in _trial_files(fs, _experiment_dir(base, experiment))}


def read_rows(storage_uri: str, experiment: str | None = None) -> pa.Table:
    """All result rows (of one experiment, or of all) as a table with :data:`SCHEMA`.

    Files written by an older schema version read with nulls in the columns
    they lack. A missing storage location reads as an empty table.
    """
    fs, base = filesystem(storage_uri)
    if experiment is None:
        experiments = [
            i.base_name.removeprefix(_PARTITION)
            for i in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
            if i.type == pafs.FileType.Directory and i.base_name.startswith(_PARTITION)
        ]
    else:
        experiments = [experiment]
    tables = []
    for name in sorted(experiments):
        files = sorted(i.path for i in _trial_files(fs, _experiment_dir(base, name)))
        if not files:
            continue
        table = pads.dataset(files, schema=FILE_SCHEMA, format="parquet", filesystem=fs).to_table()
        column = pa.array([name] * table.num_rows, pa.string())
        tables.append(table.add_column(SCHEMA.get_field_index("experiment"), SCHEMA.field("experiment"), column))
    if not tables:
        return SCHEMA.empty_table()
    return pa.concat_tables(tables).cast(SCHEMA)


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
