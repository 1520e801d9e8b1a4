"""Statistics of result rows: groups of repeats (mean ± std, n) and paired CGC − baseline differences.

One grouping rule for every table, plot and format:

- A row's identity is ``config.identity`` of its trial config: the fields that
  change what it computes (a λ = 0 CGC trial is a baseline; a baseline ignores
  the CGC term's settings).
- A **group** is every identity field but the replicate axes
  (``config.REPLICATE_FIELDS``: seed, few-shot episode). Its statistics are over
  its finished rows; diverged, failed and (early-)stopped rows are counted beside n.
- A **pair** is a CGC group and the baseline group with the same identity
  apart from ``method.*`` (same dataset, architecture, shots, schedule, ...),
  matched replicate by replicate (the same seed, or the same episode split).
  The paired difference d = metric(CGC) − metric(baseline) is computed per CGC
  configuration (each λ on its own), with mean, sample std (ddof 1), n and the
  95 % Student-t interval ``mean ± t_{0.975, n−1} · std / √n``.

A replicate counts once: where two rows of a group share every replicate
field (a row written before an upgrade changed its trial id, and its rerun),
the newest (``finished_at``) stands for it, in the group and in the pair.

A row's group is read off its ``group_key`` column (written with the row), so
only one ``config_json`` per group and λ is parsed: it gives the group's labels
and checks the key, which rules of an older version may have computed
differently (then each of the key's rows is grouped from its own config, as
are rows written before the column). A row whose ``config_json`` is needed
and is not a trial config (not a JSON object, no ``method.name``) is left out
and named in :attr:`Analysis.skipped`: one odd file does not stop the rest
from being summarised.

pyarrow + scipy only: importing this module imports neither torch nor Ray.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import pyarrow as pa

from cgc_ray.config.base import canonical
from cgc_ray.config import ExperimentSpec
from cgc_ray.config.identity import (CGC_ONLY_FIELDS, REPLICATE_FIELDS, group_key, legacy_values, stored_identity,
                                     unread_fields)
from cgc_ray.results.table import METRIC_COLUMNS, REPLICATE_COLUMNS

__all__ = ["CI_LEVEL", "Analysis", "Group", "Paired", "Skipped", "Stat", "analyze", "cgc_settings_that_differ",
           "context_of", "describe", "is_method_setting", "paired_differences", "row_identity", "summarize",
           "t_quantile"]

CI_LEVEL = 0.95


def t_quantile(df: int, level: float = CI_LEVEL) -> float:
    """Two-sided Student-t critical value ``t_{(1 + level)/2, df}`` (scipy's ``stdtrit``, which
    ``scipy.stats.t.ppf`` calls)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    from scipy.special import stdtrit  # imported here, and not scipy.stats: a third of its import time

    return float(stdtrit(df, (1 + level) / 2))


@dataclass(frozen=True)
class Stat:
    """mean, sample std (ddof = 1; None for n = 1), n, and the 95 % t interval of the mean (None for n = 1)."""

    mean: float
    std: float | None
    n: int
    ci: tuple[float, float] | None = None


def describe(values: Sequence[float]) -> Stat:
    """Mean, sample std, n and the 95 % Student-t interval of the mean of ``values``."""
    n = len(values)
    if n == 0:
        raise ValueError("describe() needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return Stat(mean, None, 1)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(n - 1) * std / math.sqrt(n)
    return Stat(mean, std, n, (mean - half, mean + half))


@dataclass(frozen=True)
class Group:
    """The rows of one configuration (repeats over seed / episode) and their statistics.

    ``labels``: the group's identity fields (flattened, replicate axes removed).
    ``stats``: metric -> Stat over finished rows. ``n_finished``,
    ``n_diverged``, ``n_failed``, ``n_stopped``: rows by status.
    """

    experiment: str
    labels: dict[str, Any]
    stats: dict[str, Stat]
    n_finished: int
    n_diverged: int = 0
    n_failed: int = 0
    n_stopped: int = 0

    @property
    def method(self) -> str:
        return self.labels["method.name"]


@dataclass(frozen=True)
class Paired:
    """Paired differences ``CGC − baseline`` of one CGC group against its matching baseline group.

    ``labels``: the CGC group's labels; ``baseline_labels``: its baseline's.
    ``stats``: metric -> Stat of the per-replicate differences (with the 95 % interval).
    ``unpaired``: replicates present in only one of the two groups (or not finished in both).
    """

    experiment: str
    labels: dict[str, Any]
    baseline_labels: dict[str, Any]
    stats: dict[str, Stat]
    unpaired: int = 0
    replicates: list[tuple[Any, ...]] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.labels["method.name"]


@dataclass(frozen=True)
class Skipped:
    """A row left out of the statistics: its experiment, trial id and why."""

    experiment: str
    trial_id: str
    reason: str


@dataclass(frozen=True)
class Analysis:
    """The groups and pairs of a table of rows (see the module docstring), and the rows it had to leave out."""

    groups: list[Group]
    paired: list[Paired]
    skipped: list[Skipped] = field(default_factory=list)


def row_identity(config_json: str) -> dict[str, Any]:
    """The identity of a row's trial config (``config.stored_identity``: a config this version cannot validate
    falls back to its raw fields).

    Raises ValueError when ``config_json`` is no trial config at all (not a JSON object, or no ``method.name``).
    """
    return _identity(_config(config_json))


def _config(config_json: Any) -> dict[str, Any]:
    if not isinstance(config_json, str):
        raise ValueError("the row has no config_json, so no trial config")
    config = json.loads(config_json)  # json.JSONDecodeError is a ValueError
    if not isinstance(config, dict):
        raise ValueError(f"config_json is a JSON {type(config).__name__}, not the trial's config (a JSON object)")
    return config


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    flat = stored_identity(config)
    if not isinstance(flat.get("method.name"), str):
        raise ValueError(f"config_json has no method.name (a string), so the row belongs to no method: "
                         f"method.name={flat.get('method.name')!r}")
    return flat


def is_method_setting(key: str) -> bool:
    """A setting of the method (``method.*``): what a CGC configuration may differ in from its baseline."""
    return key.startswith("method.")


def context_of(labels: dict[str, Any]) -> dict[str, Any]:
    """The labels a CGC configuration shares with the baseline it is paired with: all but the method's."""
    return {k: v for k, v in labels.items() if not is_method_setting(k)}


def cgc_settings_that_differ(label_sets: Iterable[dict[str, Any]], *, with_lam: bool = False) -> list[str]:
    """The CGC-only settings (λ first, then forward, view, τ, ...; ``config.identity``'s list) whose values differ
    between the CGC configurations among ``label_sets``: what a table or a legend must name to tell them apart."""
    cgc = [labels for labels in label_sets if labels.get("method.name") != "baseline"]
    keys = sorted({k for labels in cgc for k in labels
                   if k in CGC_ONLY_FIELDS and (with_lam or k != "method.lam")},
                  key=lambda k: (k != "method.lam", k))
    return [k for k in keys if len({canonical(labels[k]) for labels in cgc if k in labels}) > 1]


Buckets = dict[tuple[str, str], tuple[dict[str, Any], list[tuple[tuple[Any, ...], dict]]]]
# row positions in the table -> their config_json (None where it was not read)
ConfigReader = Callable[[Sequence[int]], Sequence[Any]]
# the group_key column is the group's only from this schema version on (results.table.SCHEMA_VERSION 3)
_KEYED_SINCE = 3


class _Labels:
    """A row config's group: its labels, their ``group_key`` and their canonical text (the order of groups),
    computed once per config that differs only in its replicate fields."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[dict[str, Any], str, str]] = {}

    def __call__(self, config_json: Any) -> tuple[dict[str, Any], str, str]:
        config = _config(config_json)
        # the labels leave the replicate fields out, and a sweep's rows differ in those alone: the config
        # without them is the memo's key (they are put back before the config is validated)
        taken = []
        for path in REPLICATE_FIELDS:
            *sections, name = path.split(".")
            node = config
            for part in sections:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and name in node:
                taken.append((node, name, node.pop(name)))
        memo = canonical(config)  # raises on a NaN a hand-made config may hold
        for node, name, value in taken:
            node[name] = value
        if memo not in self._seen:
            labels = {k: v for k, v in _identity(config).items() if k not in REPLICATE_FIELDS}
            self._seen[memo] = labels, group_key(labels), canonical(labels)
        return self._seen[memo]


def _table_configs(table: pa.Table) -> ConfigReader:
    column = table["config_json"] if "config_json" in table.column_names else None
    return lambda rows: [None if column is None else column[i].as_py() for i in rows]


def _bucket(table: pa.Table, read_configs: ConfigReader) -> tuple[Buckets, list[Skipped]]:
    """(experiment, canonical labels) -> (labels, [(replicate key, row)]), one row per replicate, and the rows
    that are no trial's. See the module docstring for which rows' configs are read."""
    rows = table.select([c for c in table.column_names if c != "config_json"]).to_pylist()
    labels_of = _Labels()
    keyed: dict[tuple[str, str], list[int]] = {}
    own: list[int] = []  # rows grouped by their own config
    for i, row in enumerate(rows):
        if row.get("group_key") and (row.get("schema_version") or 0) >= _KEYED_SINCE:
            keyed.setdefault((row["experiment"], row["group_key"]), []).append(i)
        else:
            own.append(i)
    # one row per key and λ: the configs layouts are read from (results.labels.layout_of), and the key's check
    firsts = {key: list({rows[i].get("lam"): i for i in reversed(at)}.values()) for key, at in keyed.items()}
    texts = dict(zip([i for at in firsts.values() for i in at],
                     read_configs([i for at in firsts.values() for i in at])))
    found: dict[int, tuple[dict[str, Any], str, str]] = {}
    for key, at in keyed.items():
        try:
            checked = [labels_of(texts[i]) for i in firsts[key]]
        except ValueError:
            checked = []
        if checked and all(k == key[1] for _, k, _ in checked):
            found.update((i, checked[0]) for i in at)
        else:  # a key other rules wrote (an older version's): each row's own config decides
            own += at
    missing = [i for i in own if i not in texts]
    texts.update(zip(missing, read_configs(missing)))
    skipped = []
    for i in own:
        try:
            found[i] = labels_of(texts[i])
        except ValueError as e:
            skipped.append(Skipped(rows[i]["experiment"], rows[i]["trial_id"], str(e).splitlines()[0]))
    out: Buckets = {}
    for i in sorted(found):
        labels, _, text = found[i]
        row = rows[i]
        rep = tuple(row.get(REPLICATE_COLUMNS[f]) for f in sorted(REPLICATE_FIELDS))
        out.setdefault((row["experiment"], text), (labels, []))[1].append((rep, row))
    return {k: (labels, _newest_per_replicate(items)) for k, (labels, items) in out.items()}, skipped


_NEVER = _dt.datetime.min.replace(tzinfo=_dt.timezone.utc)


def _newest_per_replicate(items: list[tuple[tuple[Any, ...], dict]]) -> list[tuple[tuple[Any, ...], dict]]:
    """One row per replicate key: the newest by ``finished_at`` (then trial id), in the order first seen."""
    best: dict[tuple[Any, ...], tuple[tuple[Any, ...], dict]] = {}
    for rep, row in items:  # rep: the values of int columns, so hashable
        if rep not in best or (row.get("finished_at") or _NEVER, row.get("trial_id") or "") > \
                (best[rep][1].get("finished_at") or _NEVER, best[rep][1].get("trial_id") or ""):
            best[rep] = (rep, row)
    return list(best.values())


def _is_finished(row: dict) -> bool:
    return (row.get("status") or "finished") == "finished"  # schema v1 rows have no status: finished


def _finished(rows: Iterable[dict]) -> list[dict]:
    return [r for r in rows if _is_finished(r)]


def _metrics_present(rows: Iterable[dict]) -> list[str]:
    rows = list(rows)
    return [m for m in METRIC_COLUMNS if any(r.get(m) is not None for r in rows)]


def analyze(table: pa.Table, read_configs: ConfigReader | None = None) -> Analysis:
    """The :class:`Group` of every configuration and the :class:`Paired` of every CGC one, from one pass over
    ``table``; rows that are no trial's are left out and listed.

    ``table``: rows with the columns of ``results.table.SCHEMA`` that the statistics use (experiment, trial_id,
    schema_version, group_key, status, seed, episode, lam, finished_at, the metrics) and ``config_json`` where
    it was read. ``read_configs``: the ``config_json`` of the given row positions, for the rows whose group
    needs it (the module docstring says which); by default the table's own column.
    """
    buckets, skipped = _bucket(table, read_configs or _table_configs(table))
    return Analysis(_groups(buckets), _pairs(buckets), skipped)


def summarize(table: pa.Table) -> list[Group]:
    """One :class:`Group` per configuration, sorted by experiment and labels."""
    return analyze(table).groups


def paired_differences(table: pa.Table) -> list[Paired]:
    """One :class:`Paired` per CGC group that has a matching baseline group (see the module docstring)."""
    return analyze(table).paired


def _groups(buckets: Buckets) -> list[Group]:
    out = []
    for (experiment, _), (labels, items) in sorted(buckets.items()):
        rows = [r for _, r in items]
        done = _finished(rows)
        stats = {m: describe([r[m] for r in done if r[m] is not None]) for m in _metrics_present(done)}
        status = [r.get("status") or "finished" for r in rows]
        out.append(Group(experiment, shown(labels), stats, status.count("finished"), status.count("diverged"),
                         status.count("failed"), status.count("stopped")))
    return out


def shown(labels: dict[str, Any]) -> dict[str, Any]:
    """What tables and legends show of a configuration: its labels with every field an id leaves out at its legacy
    value put back (a cgc trial with ``ce_views`` 1 beside one with 3 must say so), less the settings its method
    never reads (a cgc row has no no_neg_scale to name). Grouping and pairing use the labels as they are."""
    unread = unread_fields(labels.get("method.name", ""))
    full = {**dict(legacy_values(ExperimentSpec)), **labels}
    return {k: v for k, v in full.items() if k not in unread}


def _pairs(buckets: Buckets) -> list[Paired]:
    baselines = {
        (experiment, canonical(context_of(labels))): (labels, items)
        for (experiment, _), (labels, items) in buckets.items() if labels["method.name"] == "baseline"
    }
    out = []
    for (experiment, _), (labels, items) in sorted(buckets.items()):
        if labels["method.name"] == "baseline":
            continue
        match = baselines.get((experiment, canonical(context_of(labels))))
        if match is None:
            continue
        base_labels, base_items = match
        mine = {rep: r for rep, r in items if _is_finished(r)}
        theirs = {rep: r for rep, r in base_items if _is_finished(r)}
        common = sorted(set(mine) & set(theirs), key=canonical)
        unpaired = len({rep for rep, _ in items} ^ {rep for rep, _ in base_items}) + \
            len(({rep for rep, _ in items} & {rep for rep, _ in base_items}) - set(common))
        stats = {}
        for m in _metrics_present([mine[c] for c in common] + [theirs[c] for c in common]):
            d = [mine[c][m] - theirs[c][m] for c in common if mine[c][m] is not None and theirs[c][m] is not None]
            if d:
                stats[m] = describe(d)
        out.append(Paired(experiment, shown(labels), base_labels, stats, unpaired, common))
    return out
