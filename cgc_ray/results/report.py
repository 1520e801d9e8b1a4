"""Summaries of finished trials: mean ± std (n) per configuration, paired CGC − baseline.

Trials are grouped by their resolved config minus ``seed`` and
``data.episode`` (and minus the fields that do not change what a trial
computes, ``spec.NON_IDENTITY_FIELDS``); each group gets mean, sample standard
deviation (ddof = 1) and count per metric.

Paired design: a CGC trial and a baseline trial pair up when everything but
the ``method.*`` fields agrees, seed and episode included (few-shot: the same
episode split for both methods). For each pair d = metric(CGC) − metric(baseline);
the report gives mean(d) with a 95% confidence interval
``mean(d) ± t_{0.975, n-1} · sd(d) / sqrt(n)`` (Student t). The paper reports
only per-method mean ± std; the paired interval says whether a small gain is
more than episode-to-episode noise.

Layouts (picked from the data, or forced with ``layout=``):

- ``lambda``  (Table 10): one column per λ, one row per metric.
- ``fewshot`` (Tables 7/8): rows dataset × shots; per metric the baseline, the
  CGC column and the paired difference.
- ``methods`` (Tables 1, 2, 5, 6, 9, 11): one row per method (and any other
  varying setting), one column per metric, then the paired differences.

``rich`` and ``markdown`` print those layouts; ``csv`` and ``json`` print the
same numbers in long (tidy) form for further analysis.

This module needs pyarrow, rich and ``cgc_ray.results.table``/``cgc_ray.config`` only:
importing it imports neither torch nor Ray, so ``cgc-ray report`` starts fast.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

import pyarrow as pa

from cgc_ray.config import NON_IDENTITY_FIELDS
from cgc_ray.results.table import METRIC_COLUMNS, read_rows

__all__ = ["Group", "Paired", "Stat", "describe", "paired_differences", "report", "summarize", "t_quantile_975"]

Format = Literal["rich", "markdown", "csv", "json"]
Layout = Literal["lambda", "fewshot", "methods"]
FORMATS: tuple[str, ...] = Format.__args__

_REPEAT_FIELDS = frozenset({"seed", "data.episode"})
_LABEL_ORDER = ("data.dataset", "model.arch", "method.name", "method.lam", "data.shots", "data.percent")
_LABEL_NAMES = {
    "data.dataset": "dataset",
    "model.arch": "arch",
    "method.name": "method",
    "method.lam": "λ",
    "data.shots": "shots",
    "data.percent": "% labelled",
}
_METHOD_ORDER = {"baseline": 0, "cgc": 1, "cgc_no_neg": 2}
_DECIMALS = {"top1": 2, "top5": 2, "ch": 2, "iauc": 4, "cgc_loss": 3, "zero_cam_frac": 3}

# t_{0.975, df} for df = 1..30 (Student t, two-sided 95%), to 6 decimals.
_T975 = (
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
    2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
    2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272,
)


def t_quantile_975(df: int) -> float:
    """Two-sided 95% Student-t critical value t_{0.975, df}.

    Tabulated for df <= 30; beyond, the Cornish-Fisher expansion around the
    normal quantile z = 1.959964 (error < 1e-6 for df > 30). Avoids importing
    scipy.stats, which would slow ``cgc-ray report`` start-up.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


@dataclass(frozen=True)
class Stat:
    """mean, sample std (ddof = 1; None for n = 1), n, and for differences the 95% CI."""

    mean: float
    std: float | None
    n: int
    ci: tuple[float, float] | None = None


def describe(values: Sequence[float], *, ci: bool = False) -> Stat:
    """Mean, sample std and n of ``values``; with ``ci`` also the 95% t interval of the mean."""
    n = len(values)
    if n == 0:
        raise ValueError("describe() needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return Stat(mean, None, 1)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return Stat(mean, std, n, (mean - half, mean + half) if ci else None)


@dataclass(frozen=True)
class Group:
    """Trials of one configuration (repeats over seed/episode) and their metric statistics."""

    experiment: str
    labels: dict[str, Any]  # flattened config keys -> value, seed/episode removed
    stats: dict[str, Stat]  # metric -> Stat


@dataclass(frozen=True)
class Paired:
    """Paired differences ``method − baseline`` of one context (config minus method, seed, episode)."""

    experiment: str
    labels: dict[str, Any]
    method: str
    stats: dict[str, Stat]  # metric -> Stat of d, with ci


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k != "grid":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _identity(row: dict[str, Any]) -> dict[str, Any]:
    """Flattened config of a row without fields that do not change results.

    A baseline ignores every ``method.*`` setting but its name, so those are
    dropped too: baselines run under different λ presets are one group.
    """
    flat = _flatten(json.loads(row["config_json"]))
    drop = NON_IDENTITY_FIELDS | {"sweep.grid"}
    if flat.get("method.name") == "baseline":
        drop |= {k for k in flat if k.startswith("method.") and k != "method.name"}
    return {k: v for k, v in flat.items() if k not in drop}


def _key(d: dict[str, Any]) -> str:
    return json.dumps(d, sort_keys=True, default=str)


def _metrics_present(rows: Iterable[dict[str, Any]]) -> list[str]:
    rows = list(rows)
    return [m for m in METRIC_COLUMNS if any(r.get(m) is not None for r in rows)]


def summarize(table: pa.Table) -> list[Group]:
    """Group rows by config minus seed/episode; mean ± std (n) per metric."""
    groups: dict[tuple[str, str], tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    for row in table.to_pylist():
        labels = {k: v for k, v in _identity(row).items() if k not in _REPEAT_FIELDS}
        groups.setdefault((row["experiment"], _key(labels)), (labels, []))[1].append(row)
    out = []
    for (experiment, _), (labels, rows) in sorted(groups.items()):
        stats = {m: describe([r[m] for r in rows if r[m] is not None]) for m in _metrics_present(rows)}
        out.append(Group(experiment, labels, stats))
    return out


def paired_differences(table: pa.Table) -> list[Paired]:
    """Paired ``method − baseline`` differences with 95% CIs, per context.

    Pairs need identical config apart from ``method.*`` (seed and episode
    included). Contexts with fewer than two pairs get no interval.
    """
    by_pair: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = {}
    contexts: dict[tuple[str, str], dict[str, Any]] = {}
    for row in table.to_pylist():
        ident = _identity(row)
        pair = {k: v for k, v in ident.items() if not k.startswith("method.")}
        by_pair.setdefault((row["experiment"], _key(pair)), {}).setdefault(ident["method.name"], []).append(row)
        contexts[(row["experiment"], _key(pair))] = {k: v for k, v in pair.items() if k not in _REPEAT_FIELDS}

    diffs: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    for (experiment, pkey), methods in by_pair.items():
        base = methods.get("baseline")
        if not base:
            continue
        ctx = contexts[(experiment, pkey)]
        for method, rows in methods.items():
            if method == "baseline":
                continue
            per_metric = diffs.setdefault((experiment, _key(ctx), method), {})
            for m in _metrics_present(rows + base):
                a = [r[m] for r in rows if r[m] is not None]
                b = [r[m] for r in base if r[m] is not None]
                if a and b:
                    per_metric.setdefault(m, []).append(math.fsum(a) / len(a) - math.fsum(b) / len(b))
    out = []
    for (experiment, ckey, method), per_metric in sorted(diffs.items()):
        stats = {m: describe(v, ci=True) for m, v in per_metric.items() if v}
        if stats:
            out.append(Paired(experiment, json.loads(ckey), method, stats))
    return out


# --------------------------------------------------------------------------- layout


def _fmt_value(metric: str, v: float) -> str:
    return f"{v:.{_DECIMALS.get(metric, 3)}f}"


def _fmt_stat(metric: str, s: Stat) -> str:
    if s.std is None:
        return f"{_fmt_value(metric, s.mean)} (1)"
    return f"{_fmt_value(metric, s.mean)}±{_fmt_value(metric, s.std)} ({s.n})"


def _fmt_diff(metric: str, s: Stat) -> str:
    text = f"{s.mean:+.{_DECIMALS.get(metric, 3)}f}"
    if s.ci is None:
        return f"{text} (1)"
    lo, hi = (_fmt_value(metric, c) for c in s.ci)
    return f"{text} [{lo}, {hi}] ({s.n})"


def _fmt_label(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _varying(label_sets: Sequence[dict[str, Any]]) -> list[str]:
    keys = sorted({k for labels in label_sets for k in labels})
    # A key absent from some groups (method settings of a baseline) varies only among the others.
    vary = [k for k in keys if len({_key({"v": labels[k]}) for labels in label_sets if k in labels}) > 1]
    return [k for k in _LABEL_ORDER if k in vary] + [k for k in vary if k not in _LABEL_ORDER]


def _constant_title(experiment: str, label_sets: Sequence[dict[str, Any]]) -> str:
    shown = [k for k in ("data.dataset", "model.arch") if k not in _varying(label_sets)]
    parts = [_fmt_label(label_sets[0].get(k)) for k in shown if label_sets]
    return f"{experiment}" + (f" — {', '.join(parts)}" if parts else "")


@dataclass
class _Table:
    title: str
    header: list[str]
    rows: list[list[str]]


def _detect_layout(groups: Sequence[Group]) -> Layout:
    if any(g.labels.get("data.shots") is not None for g in groups):
        return "fewshot"
    lams = {g.labels.get("method.lam") for g in groups if g.labels.get("method.name") != "baseline"}
    return "lambda" if len(lams) > 1 else "methods"


def _sort_key(labels: dict[str, Any], keys: Sequence[str]) -> tuple:
    out = []
    for k in keys:
        v = labels.get(k)
        if k == "method.name":
            out.append((0, _METHOD_ORDER.get(v, 9), str(v)))
        else:
            out.append((0 if v is None else 1, v if isinstance(v, (int, float)) else 0, str(v)))
    return tuple(out)


def _lambda_tables(experiment: str, groups: Sequence[Group]) -> list[_Table]:
    """Table 10: a column per λ (baseline first), a row per metric; one table per other setting."""
    ctx_keys = [k for k in _varying([g.labels for g in groups]) if k not in ("method.name", "method.lam")]
    by_ctx: dict[str, list[Group]] = {}
    for g in groups:
        by_ctx.setdefault(_key({k: g.labels.get(k) for k in ctx_keys}), []).append(g)
    tables = []
    for ctx, members in sorted(by_ctx.items()):
        members = sorted(members, key=lambda g: _sort_key(g.labels, ("method.name", "method.lam")))
        header = ["metric"] + [
            "baseline" if g.labels["method.name"] == "baseline"
            else ("" if g.labels["method.name"] == "cgc" else f"{g.labels['method.name']} ")
            + f"λ={_fmt_label(g.labels['method.lam'])}"
            for g in members
        ]
        metrics = [m for m in METRIC_COLUMNS if any(m in g.stats for g in members)]
        rows = [[m] + [_fmt_stat(m, g.stats[m]) if m in g.stats else "–" for g in members] for m in metrics]
        ctx_text = ", ".join(f"{_LABEL_NAMES.get(k, k)}={_fmt_label(v)}" for k, v in json.loads(ctx).items())
        title = _constant_title(experiment, [g.labels for g in groups]) + (f" ({ctx_text})" if ctx_text else "")
        tables.append(_Table(title + ": mean±std (n)", header, rows))
    return tables


def _fewshot_tables(experiment: str, groups: Sequence[Group], paired: Sequence[Paired]) -> list[_Table]:
    """Tables 7/8: rows dataset × shots (and other settings); per metric each method and Δ vs baseline."""
    varying = [k for k in _varying([g.labels for g in groups]) if not k.startswith("method.")]
    row_keys = ["data.dataset", "data.shots"] + [k for k in varying if k not in ("data.dataset", "data.shots")]
    methods = sorted({g.labels["method.name"] for g in groups}, key=lambda m: _METHOD_ORDER.get(m, 9))
    metrics = [m for m in METRIC_COLUMNS if any(m in g.stats for g in groups)]
    cells: dict[str, dict[str, Group]] = {}
    ctx_labels: dict[str, dict[str, Any]] = {}
    for g in groups:
        ck = _key({k: g.labels.get(k) for k in row_keys})
        ctx_labels[ck] = {k: g.labels.get(k) for k in row_keys}
        cells.setdefault(ck, {})[g.labels["method.name"]] = g
    pair_by_ctx = {
        (_key({k: p.labels.get(k) for k in row_keys}), p.method): p for p in paired
    }
    header = [_LABEL_NAMES.get(k, k) for k in row_keys]
    for m in metrics:
        header += [f"{m} {meth}" for meth in methods]
        header += [f"{m} Δ {meth}−baseline [95% CI]" for meth in methods if meth != "baseline" and "baseline" in methods]
    rows = []
    for ck in sorted(cells, key=lambda c: _sort_key(ctx_labels[c], row_keys)):
        line = [_fmt_label(ctx_labels[ck][k]) for k in row_keys]
        for m in metrics:
            for meth in methods:
                g = cells[ck].get(meth)
                line.append(_fmt_stat(m, g.stats[m]) if g is not None and m in g.stats else "–")
            for meth in methods:
                if meth == "baseline" or "baseline" not in methods:
                    continue
                p = pair_by_ctx.get((ck, meth))
                line.append(_fmt_diff(m, p.stats[m]) if p is not None and m in p.stats else "–")
        rows.append(line)
    title = _constant_title(experiment, [g.labels for g in groups]) + ": mean±std (n); Δ paired by episode"
    return [_Table(title, header, rows)]


def _methods_tables(experiment: str, groups: Sequence[Group], paired: Sequence[Paired]) -> list[_Table]:
    """Tables 1/2/5/6/9/11: a row per method (and other varying settings), a column per metric."""
    keys = _varying([g.labels for g in groups]) or ["method.name"]
    if "method.name" not in keys:
        keys = ["method.name"] + keys
    metrics = [m for m in METRIC_COLUMNS if any(m in g.stats for g in groups)]
    header = [_LABEL_NAMES.get(k, k) for k in keys] + metrics
    rows = [
        [_fmt_label(g.labels.get(k)) for k in keys] + [_fmt_stat(m, g.stats[m]) if m in g.stats else "–" for m in metrics]
        for g in sorted(groups, key=lambda g: _sort_key(g.labels, keys))
    ]
    title = _constant_title(experiment, [g.labels for g in groups])
    tables = [_Table(title + ": mean±std (n)", header, rows)]
    if paired:
        pkeys = _varying([p.labels for p in paired])
        pmetrics = [m for m in METRIC_COLUMNS if any(m in p.stats for p in paired)]
        prow = [
            [f"{p.method} − baseline"] + [_fmt_label(p.labels.get(k)) for k in pkeys]
            + [_fmt_diff(m, p.stats[m]) if m in p.stats else "–" for m in pmetrics]
            for p in sorted(paired, key=lambda p: (_METHOD_ORDER.get(p.method, 9), _sort_key(p.labels, pkeys)))
        ]
        tables.append(_Table(
            title + ": paired difference, mean [95% CI] (pairs)",
            ["difference"] + [_LABEL_NAMES.get(k, k) for k in pkeys] + pmetrics,
            prow,
        ))
    return tables


def _layout_tables(groups: Sequence[Group], paired: Sequence[Paired], layout: Layout | None) -> list[_Table]:
    tables = []
    for experiment in sorted({g.experiment for g in groups}):
        eg = [g for g in groups if g.experiment == experiment]
        ep = [p for p in paired if p.experiment == experiment]
        chosen = layout or _detect_layout(eg)
        if chosen == "lambda":
            tables += _lambda_tables(experiment, eg)
        elif chosen == "fewshot":
            tables += _fewshot_tables(experiment, eg, ep)
        else:
            tables += _methods_tables(experiment, eg, ep)
    return tables


# --------------------------------------------------------------------------- rendering


def _render_rich(tables: Sequence[_Table], width: int) -> str:
    from rich.console import Console
    from rich.table import Table

    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system=None, force_terminal=False)
    for t in tables:
        rt = Table(title=t.title, title_justify="left")
        for i, h in enumerate(t.header):
            rt.add_column(h, justify="left" if i == 0 else "right")
        for r in t.rows:
            rt.add_row(*r)
        console.print(rt)
    return buf.getvalue()


def _render_markdown(tables: Sequence[_Table]) -> str:
    out = []
    for t in tables:
        out.append(f"**{t.title}**\n")
        out.append("| " + " | ".join(t.header) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * (len(t.header) - 1)) + "|")
        out += ["| " + " | ".join(r) + " |" for r in t.rows]
        out.append("")
    return "\n".join(out)


def _records(groups: Sequence[Group], paired: Sequence[Paired]) -> list[dict[str, Any]]:
    """Long form: one record per (group or pair context, metric)."""
    recs = []
    for g in groups:
        for m, s in g.stats.items():
            recs.append({"kind": "group", "experiment": g.experiment, **g.labels, "metric": m,
                         "mean": s.mean, "std": s.std, "n": s.n, "ci_low": None, "ci_high": None})
    for p in paired:
        for m, s in p.stats.items():
            recs.append({"kind": f"{p.method}-baseline", "experiment": p.experiment, **p.labels, "metric": m,
                         "mean": s.mean, "std": s.std, "n": s.n,
                         "ci_low": s.ci[0] if s.ci else None, "ci_high": s.ci[1] if s.ci else None})
    return recs


def _render_csv(records: Sequence[dict[str, Any]]) -> str:
    fields: list[str] = []
    for r in records:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    return buf.getvalue()


def report(
    storage: str = "./results",
    experiment: str | None = None,
    fmt: Format = "rich",
    *,
    layout: Layout | None = None,
    width: int = 160,
) -> str:
    """Render the results under ``storage`` (optionally one experiment) as text.

    ``fmt``: ``rich`` / ``markdown`` (paper layouts) or ``csv`` / ``json``
    (long form with mean, std, n, ci_low, ci_high). ``layout`` forces one of
    ``lambda``/``fewshot``/``methods``; None picks it per experiment.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")
    table = read_rows(storage, experiment)
    if table.num_rows == 0:
        where = f"experiment {experiment!r} under " if experiment else ""
        message = f"no finished trials in {where}{storage!r}; run an experiment first (e.g. python experiments/lambda_ablation.py)"
        return {"json": "[]\n", "csv": ""}.get(fmt, message + "\n")
    groups, paired = summarize(table), paired_differences(table)
    if fmt == "json":
        return json.dumps(_records(groups, paired), indent=1, default=str) + "\n"
    if fmt == "csv":
        return _render_csv(_records(groups, paired))
    tables = _layout_tables(groups, paired, layout)
    return _render_markdown(tables) if fmt == "markdown" else _render_rich(tables, width)
