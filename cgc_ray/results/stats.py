"""Statistics of result rows: groups of repeats (mean ± std, n) and paired CGC − baseline differences.

One grouping rule for every table, plot and format:

- A row's identity is ``config.identity`` of its trial config: the fields that
  change what it computes (a λ = 0 CGC trial is a baseline; a baseline ignores
  the CGC term's settings).
- A **group** is every identity field but the replicate axes
  (``config.REPLICATE_FIELDS``: seed, few-shot episode). Its statistics are over
  its finished rows; diverged and failed rows are counted beside n.
- A **pair** is a CGC group and the baseline group with the same identity
  apart from ``method.*`` (same dataset, architecture, shots, schedule, ...),
  matched replicate by replicate (the same seed, or the same episode split).
  The paired difference d = metric(CGC) − metric(baseline) is computed per CGC
  configuration (each λ on its own), with mean, sample std (ddof 1), n and the
  95 % Student-t interval ``mean ± t_{0.975, n−1} · std / √n``.

A row whose ``config_json`` is not a trial config (not a JSON object, no
``method.name``) is left out and named in :attr:`Analysis.skipped`: one odd
file does not stop the rest from being summarised.

pyarrow + scipy only: importing this module imports neither torch nor Ray.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import pyarrow as pa

from cgc_ray.config.base import canonical, flatten
from cgc_ray.config.identity import CGC_ONLY_FIELDS, NON_IDENTITY_FIELDS, REPLICATE_FIELDS, identity
from cgc_ray.results.table import METRIC_COLUMNS

__all__ = ["CI_LEVEL", "Analysis", "Group", "Paired", "Skipped", "Stat", "analyze", "cgc_settings_that_differ",
           "context_of", "describe", "is_method_setting", "paired_differences", "row_identity", "summarize",
           "t_quantile"]

CI_LEVEL = 0.95


def t_quantile(df: int, level: float = CI_LEVEL) -> float:
    """Two-sided Student-t critical value ``t_{(1 + level)/2, df}`` (scipy.stats.t)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    from scipy.stats import (
        t,  # imported here: scipy.stats costs a few hundred ms to import
    )

    return float(t.ppf((1 + level) / 2, df))


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
    ``n_diverged``, ``n_failed``: rows by status.
    """

    experiment: str
    labels: dict[str, Any]
    stats: dict[str, Stat]
    n_finished: int
    n_diverged: int = 0
    n_failed: int = 0

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
    """The identity of a row's trial config; a config this version cannot validate falls back to its raw fields.

    Raises ValueError when ``config_json`` is no trial config at all (not a JSON object, or no ``method.name``).
    """
    if not isinstance(config_json, str):
        raise ValueError("the row has no config_json, so no trial config")
    config = json.loads(config_json)  # json.JSONDecodeError is a ValueError
    if not isinstance(config, dict):
        raise ValueError(f"config_json is a JSON {type(config).__name__}, not the trial's config (a JSON object)")
    try:
        return identity(config)
    except ValueError:  # a row written by another version of the spec
        flat = {k: v for k, v in flatten(config).items() if k not in NON_IDENTITY_FIELDS and not k.startswith("sweep.")}
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


def _split(ident: dict[str, Any]) -> tuple[dict[str, Any], tuple[Any, ...]]:
    labels = {k: v for k, v in ident.items() if k not in REPLICATE_FIELDS}
    return labels, tuple(ident.get(k) for k in sorted(REPLICATE_FIELDS))


Buckets = dict[tuple[str, str], tuple[dict[str, Any], list[tuple[tuple[Any, ...], dict]]]]


def _bucket(table: pa.Table) -> tuple[Buckets, list[Skipped]]:
    """(experiment, group key) -> (labels, [(replicate key, row)]), and the rows that are no trial's."""
    out: Buckets = {}
    skipped = []
    for row in table.to_pylist():
        try:
            labels, rep = _split(row_identity(row["config_json"]))
            key = canonical(labels)  # raises on a NaN a hand-made config may hold
        except ValueError as e:
            skipped.append(Skipped(row["experiment"], row["trial_id"], str(e).splitlines()[0]))
            continue
        out.setdefault((row["experiment"], key), (labels, []))[1].append((rep, row))
    return out, skipped


def _is_finished(row: dict) -> bool:
    return (row.get("status") or "finished") == "finished"  # schema v1 rows have no status: finished


def _finished(rows: Iterable[dict]) -> list[dict]:
    return [r for r in rows if _is_finished(r)]


def _metrics_present(rows: Iterable[dict]) -> list[str]:
    rows = list(rows)
    return [m for m in METRIC_COLUMNS if any(r.get(m) is not None for r in rows)]


def analyze(table: pa.Table) -> Analysis:
    """The :class:`Group` of every configuration and the :class:`Paired` of every CGC one, from one pass over
    ``table``; rows that are no trial's are left out and listed."""
    buckets, skipped = _bucket(table)
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
        out.append(Group(experiment, labels, stats, status.count("finished"), status.count("diverged"),
                         status.count("failed")))
    return out


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
        out.append(Paired(experiment, labels, base_labels, stats, unpaired, common))
    return out
