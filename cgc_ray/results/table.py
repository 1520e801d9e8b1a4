"""Trial results as a Parquet dataset: one file (one row) per trial that ended.

Where the files live is :class:`cgc_ray.storage.Storage`'s to say: one file
per trial in the experiment's Hive partition, beside folders Parquet readers
skip (summaries, checkpoints, leases, figures, Ray's run state). So the
storage folder reads as one dataset whose ``experiment`` column comes from
the directory name: ``pandas.read_parquet("results")``,
``duckdb.sql("select * from 'results/*/*.parquet'")``; cgc-ray itself reads its
files' footers, and decodes with ``pyarrow.dataset`` and Hive partitioning where
it must (below).

Writes are atomic (:meth:`Storage.write_atomic`): readers never see a partial
file; two writers of the same trial replace each other's file (never
duplicate rows). A file that is corrupt or truncated anyway (a full disk, a
copy gone wrong) does not count as done: :func:`trial_status` sets it aside
with a warning and its trial runs again.

Cheap to ask of thousands of rows: a file holds one row, so its footer's
column statistics (min = max) are the row's values, and neither "is it done"
(:func:`trial_status`) nor :func:`read_rows` decodes a column where the footer
says it (a page damaged inside a file whose footer is whole goes unnoticed
there); and a row stores its group (``group_key``), so the report parses the
config of one row per group and λ (``cgc_ray.results.stats``).

Schema version 3 (:data:`SCHEMA`), columns and units:

=============== ========= ====================================================
column          type      meaning
=============== ========= ====================================================
schema_version  int32     version of this layout (3)
experiment      string    experiment name (from the directory name)
trial_id        string    content hash of what the trial computes (config.trial_id)
spec_hash       string    hash of the full resolved config (config.spec_hash)
status          string    finished | diverged (NaN loss: metrics null) | failed | stopped (ended early by a
                          search's scheduler: the metrics of its last evaluation, at ``epochs``)
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
negatives_group int32     images a query's heatmap was contrasted with, itself included (config.contrast_group:
                          the worker's batch, method.negatives_group of it, or all workers'); null: no CGC term
weights         string    the initial weights (null: random init)
config_json     string    full resolved trial config, canonical JSON
group_key       string    the trial's group: config.group_key of its identity (null before version 3)
top1, top5      float64   accuracy in % [0, 100]
ch              float64   content heatmap in % [0, 100]
iauc            float64   insertion AUC in [0, 1]
iauc_protocol   string    which IAUC protocol produced ``iauc`` (fast | authors)
iauc_images     int32     images the IAUC was computed on
ch_protocol     string    how ``ch`` was measured: fast (centre crop) | authors (whole image, short side 448);
                          null in rows written before the column: fast
ch_saliency     string    the map ``ch`` scored: gradcam | cmwp | mwp; null in older rows: gradcam
cgc_loss        float64   held-out CGC loss (nats)
zero_cam_frac   float64   share of validation heatmaps that were all zero [0, 1]
epochs          int32     epochs trained
wall_time_s     float64   trial wall time in seconds
node            string    host that ran the trial (rank 0)
code_version    string    cgc-ray version and git commit
finished_at     timestamp UTC time the row was written
=============== ========= ====================================================

Metric columns are null when the trial did not compute that metric (or did
not finish). Files of an older schema version read with nulls in the columns
they lack (version 1: status null, read as finished).
"""

from __future__ import annotations

import datetime as _dt
import functools
import importlib.metadata
import json
import math
import os
import re
import subprocess
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cgc_ray.storage import HIDDEN, Storage

__all__ = [
    "FILE_SCHEMA",
    "METRIC_COLUMNS",
    "PATH_COLUMN",
    "PERCENT_METRICS",
    "REPLICATE_COLUMNS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "code_version",
    "completed_trial_ids",
    "read_rows",
    "result_metrics",
    "row_from_config",
    "write_row",
]

SCHEMA_VERSION = 3
STATUSES: tuple[str, ...] = ("finished", "diverged", "failed", "stopped")
DONE_STATUSES: frozenset[str] = frozenset({"finished", "diverged"})  # a failed trial runs again
# A search that stopped a trial early does not run it again (runner.search); a grid naming it trains it to its
# end (from its checkpoint). No table averages a stopped row (results.stats counts it beside n).
SEARCH_DONE_STATUSES: frozenset[str] = DONE_STATUSES | {"stopped"}
# trial_status of a row file that could not be read (retried): not done, yet neither run again nor overwritten
UNREADABLE = "unreadable"

METRIC_COLUMNS: tuple[str, ...] = ("top1", "top5", "ch", "iauc", "cgc_loss", "zero_cam_frac")
# What a trial reports beside its metrics, stored as they are.
DETAIL_COLUMNS: tuple[str, ...] = ("labelled_split", "eval_split", "negatives_group", "iauc_protocol",
                                   "iauc_images", "ch_protocol", "ch_saliency")
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
        pa.field("negatives_group", pa.int32()),
        pa.field("weights", pa.string()),
        pa.field("config_json", pa.string(), nullable=False),
        pa.field("group_key", pa.string()),
        *[pa.field(m, pa.float64()) for m in METRIC_COLUMNS],
        pa.field("iauc_protocol", pa.string()),
        pa.field("iauc_images", pa.int32()),
        pa.field("ch_protocol", pa.string()),
        pa.field("ch_saliency", pa.string()),
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
# read_rows(columns=[..., PATH_COLUMN]): the path of each row's file.
PATH_COLUMN = "path"
# config.REPLICATE_FIELDS -> the column holding each, so the report pairs rows without their config.
REPLICATE_COLUMNS: dict[str, str] = {"seed": "seed", "data.episode": "episode"}
# Files per pyarrow dataset where read_rows decodes columns: a dataset keeps state for every file it has read
# (10,000 one-row files at once held 1 GB), which each chunk frees.
_CHUNK_FILES = 256
# Footers read at once from an object store, where each is a request; a local disk reads one at a time.
_REMOTE_READS = 16

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
    """Build a row from a resolved trial config (``spec.model_dump(mode="json")``), its group key included.

    ``metrics`` may hold any subset of :data:`METRIC_COLUMNS` (others are
    null); unknown metric names raise, so a typo cannot silently drop a number.
    ``details``: what the trial reports beside its metrics (``labelled_split``,
    ``eval_split``, ``negatives_group``, ``iauc_protocol``, ``iauc_images``, ``ch_protocol``,
    ``ch_saliency``). The ``method`` column is the effective method (``config.effective_method``:
    λ = 0 trains a baseline).
    """
    from cgc_ray.config.identity import effective_method, group_key, stored_identity

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
        "group_key": group_key(stored_identity(config)),
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


class _NotARow(ValueError):
    """A row file read in full that is not the one trial row its name says; ``data``: the bytes read."""

    def __init__(self, why: str, data: bytes):
        super().__init__(why)
        self.data = data


def _validate(storage: Storage, info: pafs.FileInfo) -> str:
    """The status of a row file that was read in full and holds the trial its name says.

    Raises OSError when the file cannot be read (after :meth:`Storage.read_bytes`' retries: an S3
    timeout says nothing about the file), FileNotFoundError when it is gone, and :class:`_NotARow`
    only when its bytes were all read and are not that trial's row.
    """
    tid = info.base_name.removesuffix(".parquet")
    data = storage.read_bytes(info.path)
    try:  # parsed from memory: any error here is the file's content, not the storage
        rows, found, status = _trial_and_status(data)
    except (pa.ArrowException, OSError) as e:
        raise _NotARow(f"unreadable Parquet ({e})", data) from None
    if rows != 1 or found is None:
        raise _NotARow(f"{rows} rows{'' if found else ' and no trial_id'}, expected one trial row", data)
    if found != tid:
        raise _NotARow(f"holds trial {found!r}, not {tid!r}", data)
    return status or "finished"  # schema v1 rows are finished trials


def _trial_and_status(data: bytes) -> tuple[int, str | None, str | None]:
    """(rows, trial id, status) of a row file's bytes, from its footer (:func:`_footer_values`), else from the
    two columns. A file cut short has no footer: it is no row."""
    file = pq.ParquetFile(pa.BufferReader(data))
    found = _footer_values(file.metadata, ["trial_id", "status"])
    if found is None:
        table = file.read(columns=[c for c in ("trial_id", "status") if c in file.schema_arrow.names])
        found = {c: table[c][0].as_py() if table.num_rows else None for c in table.column_names}
    return file.metadata.num_rows, found.get("trial_id"), found.get("status")


def _footer_values(meta: pq.FileMetaData, names: Sequence[str]) -> dict[str, Any] | None:
    """The values of the columns ``names`` of a one-row file, read off its footer: the statistics of a column
    chunk holding one value are that value (min = max), and a null counts one null. A column the file lacks
    (an older schema) is null.

    None where the footer cannot tell, and the file must be read: not one row, a nested column or a type other
    than :data:`SCHEMA`'s, no statistics (another writer's, a NaN, a string over the writer's 4 kB limit).
    """
    if meta.num_rows != 1 or meta.num_row_groups != 1:
        return None
    fields = meta.schema.to_arrow_schema()
    if len(fields) != meta.num_columns:  # a nested column: column chunks do not line up with fields
        return None
    chunks = meta.row_group(0)
    out: dict[str, Any] = {}
    for name in names:
        i = fields.get_field_index(name)
        if i < 0:
            out[name] = None
            continue
        stats = chunks.column(i).statistics
        if fields.field(i).type != _READ_SCHEMA.field(name).type or stats is None:
            return None
        if stats.has_min_max:
            out[name] = stats.min
        elif stats.has_null_count and stats.null_count == 1:
            out[name] = None
        else:
            return None
    return out


def _set_aside(storage: Storage, experiment: str, path: str, bad: bytes, now: _dt.datetime) -> str | None:
    """Move the bad row file ``path`` aside; where it went, or None when it is not ours to move.

    None when another driver moved it first, or when a writer replaced it with a new row between our
    read and the move (what was moved is not the ``bad`` bytes): that row goes back under its name.
    """
    aside = storage.set_aside(path, experiment, now)
    if aside is None:
        return None
    try:
        moved = storage.read_bytes(aside)
    except OSError:  # cannot tell: the move stands, and the trial runs again
        return aside
    if moved != bad:
        storage.fs.move(aside, path)
        return None
    return aside


def row_status(storage: Storage | str, experiment: str, trial_id: str) -> str | None:
    """The status in ``trial_id``'s row file (None: no file, or one that is not its row); :data:`UNREADABLE`
    when it cannot be read. Reads one file, and sets nothing aside (:func:`trial_status` does)."""
    storage = Storage.of(storage)
    path = storage.row_path(experiment, trial_id)
    try:
        return _validate(storage, pafs.FileInfo(path, pafs.FileType.File))
    except (FileNotFoundError, _NotARow):
        return None
    except OSError:
        return UNREADABLE


def trial_status(storage: Storage | str, experiment: str) -> dict[str, str]:
    """trial id -> status of every valid row file of ``experiment``; bad files are set aside.

    A file read in full that is not a Parquet row of the trial its name says
    is set aside (:meth:`Storage.set_aside`) with a warning (its trial then
    runs again); when two drivers do so at once, one moves it. A file that
    cannot be read (after retries) is no evidence against its row: its status
    is :data:`UNREADABLE`. Temporary files of writers that died are deleted.
    """
    storage = Storage.of(storage)
    infos = storage.files(storage.experiment_dir(experiment))
    storage.remove_stale_temps(infos)
    now = _dt.datetime.now(_dt.timezone.utc)
    out: dict[str, str] = {}
    for info in infos:
        if not info.base_name.endswith(".parquet") or info.base_name.startswith(HIDDEN):
            continue
        tid = info.base_name.removesuffix(".parquet")
        try:
            out[tid] = _validate(storage, info)
        except FileNotFoundError:  # set aside by another driver since the listing
            continue
        except _NotARow as e:
            aside = _set_aside(storage, experiment, info.path, e.data, now)
            if aside is not None:
                warnings.warn(f"result file {info.path} is not a valid trial row ({e}); moved to {aside}, "
                              "its trial will run again", stacklevel=2)
        except OSError as e:  # not known to be bad: neither set aside, nor run again, nor overwritten
            out[tid] = UNREADABLE
            warnings.warn(f"result file {info.path} could not be read ({e}); its trial is left as it is "
                          "(neither run again nor overwritten) until a read succeeds", stacklevel=2)
    return out


def completed_trial_ids(storage: Storage | str, experiment: str) -> set[str]:
    """Trial ids whose row says they are done (finished or diverged); failed trials run again."""
    return {t for t, status in trial_status(storage, experiment).items() if status in DONE_STATUSES}


def read_rows(storage: Storage | str, experiment: str | None = None, *, columns: Sequence[str] | None = None,
              files: Sequence[str] | None = None, left_out: list[str] | None = None) -> pa.Table:
    """All result rows (of one experiment, or of all) as a table with :data:`SCHEMA`.

    ``columns``: only these columns of :data:`SCHEMA` (and :data:`PATH_COLUMN`, each row's file), in
    this order. ``files``: only these row files (paths as :data:`PATH_COLUMN` gives them), else every
    row file (Hive partitioning, :meth:`Storage.experiment_dir`). A row is read off its file's footer
    (:func:`_footer_values`: 10,000 files decoded with ``pyarrow.dataset`` took four times as long);
    files whose footer cannot tell are decoded with ``pyarrow.dataset``, a few hundred at a time.
    Files written by an older schema version read with nulls in the columns
    they lack. A file that cannot be read, or whose columns do not cast to
    the schema (a list where a number belongs), is left out: one line naming
    it is appended to ``left_out``, or warned when that is None. A missing
    storage location reads as an empty table.
    """
    storage = Storage.of(storage)
    if experiment is not None:
        storage.experiment_dir(experiment)  # validates the name
    names = list(SCHEMA.names if columns is None else columns)
    unknown = [c for c in names if c not in SCHEMA.names and c != PATH_COLUMN]
    if unknown:
        raise ValueError(f"unknown result column(s) {unknown}; choose from {SCHEMA.names} or {PATH_COLUMN!r}")
    fields = [pa.field(PATH_COLUMN, pa.string()) if c == PATH_COLUMN else SCHEMA.field(c) for c in names]
    schema = pa.schema(fields, metadata=SCHEMA.metadata)
    if not storage.exists(storage.root):
        return schema.empty_table()
    partitioning = pads.partitioning(pa.schema([SCHEMA.field("experiment")]), flavor="hive")
    kw = dict(format="parquet", filesystem=storage.fs, partitioning=partitioning, schema=_READ_SCHEMA)
    if files is None:  # a listing: no file is opened
        source = pads.dataset(storage.root, ignore_prefixes=list(HIDDEN), **kw)
        where = None if experiment is None else pc.field("experiment") == experiment
    else:
        source, where = pads.dataset(list(files), partition_base_dir=storage.root, **kw), None
    found = [(f.path, pads.get_partition_keys(f.partition_expression).get("experiment"))
             for f in source.get_fragments(filter=where)]
    in_file = [c for c in names if c not in (PATH_COLUMN, "experiment")]
    footers = [path for path, _ in found]
    if storage.posix:
        rows = [_footer_row(storage, in_file, path) for path in footers]
    else:
        with ThreadPoolExecutor(_REMOTE_READS) as pool:
            rows = list(pool.map(functools.partial(_footer_row, storage, in_file), footers))
    bad: list[str] = []
    slow = [path for (path, _), row in zip(found, rows) if row is None]
    decoded = {row["__filename"]: row for row in _decode(storage, slow, in_file, kw, bad)}
    out = []
    for (path, experiment_of), row in zip(found, rows):
        row = decoded.get(path) if row is None else {**row, "experiment": experiment_of}
        if row is not None:
            out.append({**row, PATH_COLUMN: path})
    if left_out is not None:
        left_out += bad
    elif bad:
        warnings.warn(f"left out {len(bad)} unreadable result file(s): {'; '.join(bad)}", stacklevel=2)
    return pa.Table.from_pylist(out, schema=pa.schema([f.with_nullable(True) for f in fields])).cast(schema)


def _footer_row(storage: Storage, names: list[str], path: str) -> dict[str, Any] | None:
    """The columns ``names`` of the row file ``path``, from its footer; None where it must be decoded."""
    try:
        return _footer_values(pq.read_metadata(path, filesystem=storage.fs), names)
    except (pa.ArrowException, OSError):  # decoding it names the problem
        return None


def _decode(storage: Storage, files: list[str], names: list[str], kw: dict[str, Any],
            bad: list[str]) -> list[dict[str, Any]]:
    """The rows of ``files`` (the columns ``names``, ``experiment`` and ``__filename``, pyarrow's name for a
    file's path), decoded with ``pyarrow.dataset`` a chunk at a time; a file that cannot be read, or does not
    fit, is named in ``bad`` and left out."""
    scan = [*names, "experiment", "__filename"]
    rows = []
    for i in range(0, len(files), _CHUNK_FILES):
        chunk = pads.dataset(files[i:i + _CHUNK_FILES], partition_base_dir=storage.root, **kw)
        try:
            rows += chunk.to_table(columns=scan).to_pylist()
        except (pa.ArrowException, OSError):  # the slow path, only for a chunk holding a file that does not fit
            rows += _read_each(storage, chunk, scan, bad)
    return rows


def _read_each(storage: Storage, dataset: pads.Dataset, columns: list[str], bad: list[str]) -> list[dict[str, Any]]:
    """The rows of the files of ``dataset`` one by one, leaving out (and listing in ``bad``) those that cannot be
    read or do not fit its schema."""
    rows = []
    for fragment in dataset.get_fragments():
        try:
            rows += pads.Scanner.from_fragment(fragment, schema=dataset.schema, columns=columns).to_table().to_pylist()
        except (pa.ArrowException, OSError) as e:
            bad.append(f"{fragment.path}: {_why_unread(storage, fragment.path, e)}")
    return rows


def _why_unread(storage: Storage, path: str, error: Exception) -> str:
    """Why the row file ``path`` could not be read: no Parquet footer (what trial_status sets aside), or the error."""
    try:
        pq.read_metadata(path, filesystem=storage.fs)
    except OSError as e:
        return f"could not be read ({str(e).splitlines()[0]})"
    except pa.ArrowException:
        return "not a readable Parquet file (the next run of its experiment moves it aside and runs its trial again)"
    return str(error).splitlines()[0]


COMMIT_ENV = "CGC_RAY_COMMIT"  # the commit of a source tree copied without its .git folder (a cluster node)


def code_version() -> str:
    """``cgc-ray <version>+g<commit>[.dirty]``: the commit ``$CGC_RAY_COMMIT`` names, else git's where
    the source is a clone, else the package version alone.

    Cluster nodes get the source without its ``.git`` folder (its ``config`` may hold credential helpers,
    its hooks run code), so the commit travels as ``CGC_RAY_COMMIT``, set from ``git rev-parse HEAD`` on
    the machine that submits the run (docs/CLUSTER.md).
    """
    try:
        ver = importlib.metadata.version("cgc-ray")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        ver = "unknown"
    commit = os.environ.get(COMMIT_ENV)
    if commit:
        if not re.fullmatch(r"[0-9a-f]{7,40}", commit):
            raise ValueError(f"{COMMIT_ENV}={commit!r} is not a commit id; set it from `git rev-parse HEAD` "
                             "in the clone the run's code came from, or unset it")
        return f"cgc-ray {ver}+g{commit[:12]}"
    git = ["git", "-C", str(Path(__file__).resolve().parent.parent)]
    try:
        sha = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"cgc-ray {ver}"
    return f"cgc-ray {ver}+g{sha}{'.dirty' if dirty else ''}"
