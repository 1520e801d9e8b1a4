"""``cgc-ray report``: the paper's tables from the result rows, as text (rich, markdown), csv, json or Parquet.

Every format shows the numbers of :mod:`cgc_ray.results.stats` (its docstring
states the one grouping and pairing rule): per configuration mean ± std (n),
with diverged / failed trials counted beside n, and per CGC configuration the
paired difference to its baseline, mean [95 % t-interval] (pairs).

Layouts (picked from the data, or forced with ``layout=``):

- ``lambda``  (Table 10): one column per λ (λ = 0, the baseline, first), a row
  per metric; then the paired Δ per λ against λ = 0 of the same seed.
- ``fewshot`` (Tables 7/8): rows dataset × shots (× any other varying setting);
  per metric the baseline, each CGC configuration (e.g. each λ) and its Δ.
- ``methods`` (Tables 1, 2, 5, 6, 9, 11): one row per configuration, one column
  per metric; then the paired differences.

``csv`` and ``json`` print the summary rows (``results.summary``, long form);
``parquet`` writes them to ``<storage>/_summary/<experiment>.parquet``.

pyarrow, scipy and rich only: ``cgc-ray report`` starts without torch or Ray.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from cgc_ray.results.stats import Group, Paired, Stat, cgc_settings_that_differ, paired_differences, summarize
from cgc_ray.results.summary import records, write_summary
from cgc_ray.results.table import METRIC_COLUMNS, read_rows

__all__ = ["FORMATS", "LAYOUTS", "report"]

Format = Literal["rich", "markdown", "csv", "json", "parquet"]
Layout = Literal["lambda", "fewshot", "methods"]
FORMATS: tuple[str, ...] = Format.__args__
LAYOUTS: tuple[str, ...] = Layout.__args__

_LABEL_ORDER = ("data.dataset", "model.arch", "method.name", "method.lam", "data.shots", "data.percent")
_LABEL_NAMES = {
    "data.dataset": "dataset",
    "model.arch": "arch",
    "method.name": "method",
    "method.lam": "λ",
    "data.shots": "shots",
    "data.percent": "% labelled",
    "data.synthetic.classes": "classes",
    "method.forward": "forward",
    "method.view": "view",
    "method.crop_scale": "T crop",
    "method.resolution": "CAM res",
    "method.tau": "τ",
    "method.cam_class": "CAM class",
    "method.lam_normalization": "λ norm",
    "method.anchor": "anchor",
    "method.no_neg_scale": "l2 scale",
    "optim.epochs": "epochs",
}
_METHOD_ORDER = {"baseline": 0, "cgc": 1, "cgc_no_neg": 2}
_DECIMALS = {"top1": 2, "top5": 2, "ch": 2, "iauc": 4, "cgc_loss": 3, "zero_cam_frac": 3}


# --------------------------------------------------------------------------- cells


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


def _fmt_group_cell(metric: str, g: Group | None) -> str:
    if g is None:
        return "–"
    text = _fmt_stat(metric, g.stats[metric]) if metric in g.stats else "–"
    lost = [f"{n} {what}" for n, what in ((g.n_diverged, "diverged"), (g.n_failed, "failed")) if n]
    return text + (f" +{', '.join(lost)}" if lost else "")


def _fmt_trials(g: Group) -> str:
    """Finished trials, and the diverged / failed ones the means leave out."""
    lost = [f"{n} {what}" for n, what in ((g.n_diverged, "diverged"), (g.n_failed, "failed")) if n]
    return f"{g.n_finished}" + (f" +{', '.join(lost)}" if lost else "")


def _fmt_label(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _method_label(labels: dict[str, Any], *, with_lam: bool = True) -> str:
    name = labels["method.name"]
    if name == "baseline":
        return "baseline"
    return name + (f" λ={_fmt_label(labels.get('method.lam'))}" if with_lam else "")


def _config_label(labels: dict[str, Any], setting_keys: Sequence[str], *, with_lam: bool = True) -> str:
    """The method (and λ), then every CGC setting that tells this configuration from the others."""
    if labels["method.name"] == "baseline":
        return "baseline"
    return " ".join([_method_label(labels, with_lam=with_lam)]
                    + [f"{_LABEL_NAMES.get(k, k)}={_fmt_label(labels.get(k))}" for k in setting_keys])


# --------------------------------------------------------------------------- layout helpers


def _canon(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def _varying(label_sets: Sequence[dict[str, Any]]) -> list[str]:
    """Keys whose value differs among the label sets that have them (a baseline lacks the CGC-only ones)."""
    keys = sorted({k for labels in label_sets for k in labels})
    vary = [k for k in keys if len({_canon(labels[k]) for labels in label_sets if k in labels}) > 1
            or (any(k not in labels for labels in label_sets) and not k.startswith("method."))]
    return [k for k in _LABEL_ORDER if k in vary] + [k for k in vary if k not in _LABEL_ORDER]


def _sort_key(labels: dict[str, Any], keys: Sequence[str]) -> tuple:
    out = []
    for k in keys:
        v = labels.get(k)
        if k == "method.name":
            out.append((0, _METHOD_ORDER.get(v, 9), str(v)))
        else:
            out.append((0 if v is None else 1, v if isinstance(v, (int, float)) else 0, str(v)))
    return tuple(out)


def _title(experiment: str, label_sets: Sequence[dict[str, Any]]) -> str:
    vary = _varying(label_sets)
    parts = [_fmt_label(label_sets[0].get(k)) for k in ("data.dataset", "model.arch") if k not in vary and label_sets]
    return experiment + (f" — {', '.join(parts)}" if parts else "")


def _context(labels: dict[str, Any], keys: Sequence[str]) -> str:
    return ", ".join(f"{_LABEL_NAMES.get(k, k)}={_fmt_label(labels.get(k))}" for k in keys)


@dataclass
class _Table:
    title: str
    header: list[str]
    rows: list[list[str]]


def _detect_layout(experiment: str, groups: Sequence[Group]) -> Layout:
    """few-shot rows -> fewshot; the λ ablation (by name), or λ the only method setting that varies -> lambda;
    else methods (one row per configuration, every varying setting a column)."""
    if any(g.labels.get("data.shots") is not None for g in groups):
        return "fewshot"
    if experiment.startswith("lambda"):
        return "lambda"
    cgc = [g.labels for g in groups if g.method != "baseline"]
    varying = [k for k in _varying(cgc) if k.startswith("method.")] if len(cgc) > 1 else []
    return "lambda" if varying == ["method.lam"] else "methods"


def _metrics(items: Sequence[Group | Paired]) -> list[str]:
    return [m for m in METRIC_COLUMNS if any(m in x.stats for x in items)]


def _paired_table(title: str, paired: Sequence[Paired], keys: Sequence[str]) -> _Table:
    metrics = _metrics(paired)
    header = ["difference"] + [_LABEL_NAMES.get(k, k) for k in keys] + [f"Δ {m} [95% CI] (pairs)" for m in metrics]
    rows = []
    for p in sorted(paired, key=lambda p: _sort_key(p.labels, ["method.name", "method.lam", *keys])):
        unpaired = f" ({p.unpaired} unpaired)" if p.unpaired else ""
        rows.append([f"{_method_label(p.labels)} − baseline{unpaired}"] + [_fmt_label(p.labels.get(k)) for k in keys]
                    + [_fmt_diff(m, p.stats[m]) if m in p.stats else "–" for m in metrics])
    return _Table(title + ": paired difference CGC − baseline, mean [95% CI] (pairs)", header, rows)


# --------------------------------------------------------------------------- layouts


def _lambda_tables(experiment: str, groups: Sequence[Group], paired: Sequence[Paired]) -> list[_Table]:
    """Table 10: a column per λ (the baseline, λ = 0, first), a row per metric; per other setting a table."""
    ctx_keys = [k for k in _varying([g.labels for g in groups]) if not k.startswith("method.")]
    tables = []
    contexts: dict[str, list[Group]] = {}
    for g in groups:
        contexts.setdefault(_canon({k: g.labels.get(k) for k in ctx_keys}), []).append(g)
    title = _title(experiment, [g.labels for g in groups])
    for ctx, members in sorted(contexts.items()):
        settings = cgc_settings_that_differ([g.labels for g in members])
        members = sorted(members, key=lambda g: _sort_key(g.labels, ("method.name", "method.lam", *settings)))
        header = ["metric"] + ["λ=0 (baseline)" if g.method == "baseline" else
                               _config_label(g.labels, settings).removeprefix("cgc ") for g in members]
        rows = [[m] + [_fmt_group_cell(m, g) if m in g.stats else "–" for g in members] for m in _metrics(members)]
        rows.append(["trials"] + [_fmt_trials(g) for g in members])
        ctx_text = _context(members[0].labels, ctx_keys)
        tables.append(_Table(f"{title}{f' ({ctx_text})' if ctx_text else ''}: mean±std (n)", header, rows))
        mine = [p for p in paired if _canon({k: p.labels.get(k) for k in ctx_keys}) == ctx]
        if mine:
            tables.append(_paired_table(f"{title}{f' ({ctx_text})' if ctx_text else ''}", mine, settings))
    return tables


def _fewshot_tables(experiment: str, groups: Sequence[Group], paired: Sequence[Paired]) -> list[_Table]:
    """Tables 7/8: rows dataset × shots (× other settings); per metric each method configuration and Δ."""
    row_keys = ["data.dataset", "data.shots"] + [k for k in _varying([g.labels for g in groups])
                                                  if not k.startswith("method.") and k not in ("data.dataset",
                                                                                                 "data.shots")]
    settings = cgc_settings_that_differ([g.labels for g in groups])
    configs = sorted({_canon({k: v for k, v in g.labels.items() if k.startswith("method.")}): g.labels
                      for g in groups}.values(), key=lambda lab: _sort_key(lab, ("method.name", "method.lam", *settings)))
    config_keys = [_canon({k: v for k, v in c.items() if k.startswith("method.")}) for c in configs]
    # show λ in a column name only where more than one CGC configuration exists
    several = len([c for c in configs if c["method.name"] != "baseline"]) > 1
    names = [_config_label(c, settings, with_lam=several) for c in configs]
    cells: dict[str, dict[str, Group]] = {}
    ctx_labels: dict[str, dict[str, Any]] = {}
    for g in groups:
        ck = _canon({k: g.labels.get(k) for k in row_keys})
        ctx_labels[ck] = {k: g.labels.get(k) for k in row_keys}
        cells.setdefault(ck, {})[_canon({k: v for k, v in g.labels.items() if k.startswith("method.")})] = g
    pairs = {(_canon({k: p.labels.get(k) for k in row_keys}),
              _canon({k: v for k, v in p.labels.items() if k.startswith("method.")})): p for p in paired}
    has_base = any(c["method.name"] == "baseline" for c in configs)
    metrics = _metrics(groups)
    header = [_LABEL_NAMES.get(k, k) for k in row_keys]
    for m in metrics:
        header += [f"{m} {n}" for n in names]
        header += [f"{m} Δ {n}−baseline [95% CI]" for c, n in zip(configs, names)
                   if c["method.name"] != "baseline" and has_base]
    rows = []
    for ck in sorted(cells, key=lambda c: _sort_key(ctx_labels[c], row_keys)):
        line = [_fmt_label(ctx_labels[ck][k]) for k in row_keys]
        for m in metrics:
            line += [_fmt_group_cell(m, cells[ck].get(key)) if cells[ck].get(key) is not None else "–"
                     for key in config_keys]
            for c, key in zip(configs, config_keys):
                if c["method.name"] == "baseline" or not has_base:
                    continue
                p = pairs.get((ck, key))
                line.append(_fmt_diff(m, p.stats[m]) if p is not None and m in p.stats else "–")
        rows.append(line)
    title = _title(experiment, [g.labels for g in groups]) + ": mean±std (n); Δ paired by episode"
    return [_Table(title, header, rows)]


def _methods_tables(experiment: str, groups: Sequence[Group], paired: Sequence[Paired]) -> list[_Table]:
    """Tables 1/2/5/6/9/11: a row per configuration, a column per metric; then the paired differences."""
    keys = _varying([g.labels for g in groups])
    if "method.name" not in keys:
        keys = ["method.name"] + keys
    metrics = _metrics(groups)
    header = [_LABEL_NAMES.get(k, k) for k in keys] + metrics + ["trials"]
    rows = [[_fmt_label(g.labels.get(k)) for k in keys] + [_fmt_group_cell(m, g) for m in metrics] + [_fmt_trials(g)]
            for g in sorted(groups, key=lambda g: _sort_key(g.labels, keys))]
    title = _title(experiment, [g.labels for g in groups])
    tables = [_Table(title + ": mean±std (n)", header, rows)]
    if paired:
        tables.append(_paired_table(title, paired, [k for k in keys if k not in ("method.name", "method.lam")]))
    return tables


def _layout_tables(groups: Sequence[Group], paired: Sequence[Paired], layout: Layout | None) -> list[_Table]:
    tables = []
    for experiment in sorted({g.experiment for g in groups}):
        eg = [g for g in groups if g.experiment == experiment]
        ep = [p for p in paired if p.experiment == experiment]
        chosen = layout or _detect_layout(experiment, eg)
        build = {"lambda": _lambda_tables, "fewshot": _fewshot_tables, "methods": _methods_tables}[chosen]
        tables += build(experiment, eg, ep)
    return tables


# --------------------------------------------------------------------------- rendering


def _render_rich(tables: Sequence[_Table], width: int | None) -> str:
    from rich.console import Console
    from rich.table import Table

    buf = io.StringIO()
    terminal = Console()
    for t in tables:
        rt = Table(title=t.title, title_justify="left")
        for i, h in enumerate(t.header):
            # a cell too wide for the terminal folds onto a second line; it is never cut to "…"
            rt.add_column(h, justify="left" if i == 0 else "right", overflow="fold")
        for r in t.rows:
            rt.add_row(*r)
        natural = Console(file=io.StringIO(), width=100_000).measure(rt).maximum
        # --width, else the terminal's; written to a file or a pipe, the table's own width
        w = width or (terminal.width if terminal.is_terminal else natural)
        Console(file=buf, width=w, color_system=None, force_terminal=False).print(rt)
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


def _render_csv(recs: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if recs:
        writer = csv.DictWriter(buf, fieldnames=list(recs[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(recs)
    return buf.getvalue()


def _json_safe(recs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in recs]


def report(
    storage: str = "./results",
    experiment: str | None = None,
    fmt: Format = "rich",
    *,
    layout: Layout | None = None,
    width: int | None = None,
) -> str:
    """Render the results under ``storage`` (optionally one experiment) as text.

    ``fmt``: ``rich`` / ``markdown`` (paper layouts), ``csv`` / ``json`` (the
    summary rows), ``parquet`` (writes ``<storage>/_summary/<experiment>.parquet``
    per experiment and returns the paths written). ``layout`` forces one of
    ``lambda``/``fewshot``/``methods``; None picks it per experiment. ``width``:
    of rich tables, None for the terminal's.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")
    table = read_rows(storage, experiment)
    if table.num_rows == 0:
        where = f"experiment {experiment!r} under " if experiment else ""
        message = f"no finished trials in {where}{storage!r}; run an experiment first " \
                  "(e.g. python experiments/lambda_ablation.py)"
        return {"json": "[]\n", "csv": ""}.get(fmt, message + "\n")
    groups, paired = summarize(table), paired_differences(table)
    if fmt == "parquet":
        names = sorted({g.experiment for g in groups})
        return "".join(f"{write_summary(storage, name, groups, paired)}\n" for name in names)
    if fmt == "json":
        return json.dumps(_json_safe(records(groups, paired)), indent=1) + "\n"
    if fmt == "csv":
        return _render_csv(records(groups, paired))
    tables = _layout_tables(groups, paired, layout)
    return _render_markdown(tables) if fmt == "markdown" else _render_rich(tables, width)
