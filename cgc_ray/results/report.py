"""``cgc-ray report``: the paper's tables from the result rows, as text (rich, markdown), csv or json.

Every format shows the numbers of :mod:`cgc_ray.results.stats` (its docstring
states the one grouping and pairing rule): per configuration mean ± std (n),
with diverged / failed / stopped trials counted beside n, and per CGC configuration the
paired difference to its baseline, mean [95 % t-interval] (pairs).

Layouts (:func:`cgc_ray.results.labels.layout_of` picks one per experiment
from what its trials are, or ``layout=`` forces one):

- ``lambda``  (Table 10): one column per λ (λ = 0, the baseline, first), a row
  per metric; then the paired Δ per λ against λ = 0 of the same seed.
- ``fewshot`` (Tables 7/8): rows dataset × shots (× any other varying setting);
  per metric the baseline, each CGC configuration (e.g. each λ) and its Δ.
- ``methods`` (Tables 1, 2, 5, 6, 9, 11): one row per configuration, one column
  per metric; then the paired differences.

``csv`` and ``json`` print the summary rows (``results.summary``, long form).
Two steps, so that computing writes nothing: :func:`load` reads and analyses
the rows (and lists the files it had to leave out), :func:`render` turns that
into text; :func:`report` does both. The Arrow summary file is written by its
own writer, :func:`cgc_ray.results.summary.write_summary`, from the same
:class:`Results`.

pyarrow, scipy and rich only: ``cgc-ray report`` starts without torch or Ray.
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import pyarrow as pa
import pyarrow.fs as pafs

from cgc_ray.config.base import canonical
from cgc_ray.results.labels import (
    LAYOUTS,
    Layout,
    config_label,
    field_name,
    layouts,
    method_label,
    sort_key,
    value_text,
    varying,
)
from cgc_ray.results.stats import Group, Paired, Stat, analyze, cgc_settings_that_differ, is_method_setting
from cgc_ray.results.summary import records
from cgc_ray.results.table import METRIC_COLUMNS, PATH_COLUMN, read_rows
from cgc_ray.storage import Storage

__all__ = ["FORMATS", "LAYOUTS", "Cell", "Results", "Table", "load", "render", "report", "tables"]

Format = Literal["rich", "markdown", "csv", "json"]
FORMATS: tuple[str, ...] = Format.__args__

_DECIMALS = {"top1": 2, "top5": 2, "ch": 2, "iauc": 4, "cgc_loss": 3, "zero_cam_frac": 3}
# What the report reads of every row: what the statistics use. A row's config_json is read only where its group
# needs it (cgc_ray.results.stats.analyze): a sweep's 10,000 configs need not be held, nor parsed.
_COLUMNS = ["experiment", "trial_id", "schema_version", "group_key", "status", "lam", "seed", "episode",
            "finished_at", *METRIC_COLUMNS]


# --------------------------------------------------------------------------- cells


class Cell(str):
    """A cell's text, and where it shows a statistic, which: ``kind`` (group | paired), ``labels`` (the
    configuration's canonical JSON: the summary rows' ``labels_json``), ``metric``; for a paired difference
    ``sign``: +1 / −1 where its 95 % interval lies above / below 0, else 0. Text formats print the text; the
    HTML report (``results.html``) marks significant cells and ties each cell to its summary row by these."""

    kind: str | None = None
    labels: str | None = None
    metric: str | None = None
    sign: int = 0


def _cell(text: str, kind: str, labels: dict[str, Any], metric: str, sign: int = 0) -> Cell:
    cell = Cell(text)
    cell.kind, cell.labels, cell.metric, cell.sign = kind, canonical(labels), metric, sign
    return cell


def _fmt_value(metric: str, v: float) -> str:
    return f"{v:.{_DECIMALS.get(metric, 3)}f}"


def _fmt_stat(metric: str, s: Stat) -> str:
    if s.std is None:
        return f"{_fmt_value(metric, s.mean)} (1)"
    return f"{_fmt_value(metric, s.mean)}±{_fmt_value(metric, s.std)} ({s.n})"


def _diff_cell(metric: str, p: Paired | None) -> str:
    """``p``'s paired difference of ``metric``: mean [95% CI] (pairs); ``–`` where there is none."""
    if p is None or metric not in p.stats:
        return "–"
    s = p.stats[metric]
    text = f"{s.mean:+.{_DECIMALS.get(metric, 3)}f}"
    if s.ci is None:
        return _cell(f"{text} (1)", "paired", p.labels, metric)
    lo, hi = (_fmt_value(metric, c) for c in s.ci)
    sign = 1 if s.ci[0] > 0 else -1 if s.ci[1] < 0 else 0
    return _cell(f"{text} [{lo}, {hi}] ({s.n})", "paired", p.labels, metric, sign)


def _fmt_group_cell(metric: str, g: Group | None) -> str:
    if g is None:
        return "–"
    text = _fmt_stat(metric, g.stats[metric]) if metric in g.stats else "–"
    lost = [f"{n} {what}" for n, what in ((g.n_diverged, "diverged"), (g.n_failed, "failed"),
                                          (g.n_stopped, "stopped")) if n]
    text += f" +{', '.join(lost)}" if lost else ""
    return _cell(text, "group", g.labels, metric) if metric in g.stats else text


def _fmt_trials(g: Group) -> str:
    """Finished trials, and the diverged / failed / stopped ones the means leave out."""
    lost = [f"{n} {what}" for n, what in ((g.n_diverged, "diverged"), (g.n_failed, "failed"),
                                          (g.n_stopped, "stopped")) if n]
    return f"{g.n_finished}" + (f" +{', '.join(lost)}" if lost else "")


# --------------------------------------------------------------------------- layout helpers


def _context_key(labels: dict[str, Any], keys: Sequence[str]) -> str:
    return canonical({k: labels.get(k) for k in keys})


def _title(experiment: str, label_sets: Sequence[dict[str, Any]]) -> str:
    vary = varying(label_sets)
    parts = [value_text(label_sets[0].get(k)) for k in ("data.dataset", "model.arch") if k not in vary and label_sets]
    return experiment + (f" — {', '.join(parts)}" if parts else "")


def _context(labels: dict[str, Any], keys: Sequence[str]) -> str:
    return ", ".join(f"{field_name(k)}={value_text(labels.get(k))}" for k in keys)


@dataclass
class Table:
    """A table as every format shows it: its title, header and rows of cells (:class:`Cell` where a statistic)."""

    title: str
    header: list[str]
    rows: list[list[str]]


def _metrics(items: Sequence[Group | Paired]) -> list[str]:
    return [m for m in METRIC_COLUMNS if any(m in x.stats for x in items)]


def _paired_table(title: str, paired: Sequence[Paired], keys: Sequence[str]) -> Table:
    metrics = _metrics(paired)
    header = ["difference"] + [field_name(k) for k in keys] + [f"Δ {m} [95% CI] (pairs)" for m in metrics]
    rows = []
    for p in sorted(paired, key=lambda p: sort_key(p.labels, ["method.name", "method.lam", *keys])):
        unpaired = f" ({p.unpaired} unpaired)" if p.unpaired else ""
        rows.append([f"{method_label(p.labels)} − baseline{unpaired}"] + [value_text(p.labels.get(k)) for k in keys]
                    + [_diff_cell(m, p) for m in metrics])
    return Table(title + ": paired difference CGC − baseline, mean [95% CI] (pairs)", header, rows)


# --------------------------------------------------------------------------- layouts


def _lambda_tables(experiment: str, groups: Sequence[Group], paired: Sequence[Paired]) -> list[Table]:
    """Table 10: a column per λ (the baseline, λ = 0, first), a row per metric; per other setting a table."""
    ctx_keys = [k for k in varying([g.labels for g in groups]) if not is_method_setting(k)]
    tables = []
    contexts: dict[str, list[Group]] = {}
    for g in groups:
        contexts.setdefault(_context_key(g.labels, ctx_keys), []).append(g)
    title = _title(experiment, [g.labels for g in groups])
    for ctx, members in sorted(contexts.items()):
        settings = cgc_settings_that_differ([g.labels for g in members])
        members = sorted(members, key=lambda g: sort_key(g.labels, ("method.name", "method.lam", *settings)))
        # a column is its λ (and settings); the method too where two CGC variants share the table
        one_method = len({g.method for g in members if g.method != "baseline"}) == 1
        header = ["metric"] + ["λ=0 (baseline)" if g.method == "baseline" else
                               config_label(g.labels, settings).removeprefix(f"{g.method} " if one_method else "")
                               for g in members]
        rows = [[m] + [_fmt_group_cell(m, g) if m in g.stats else "–" for g in members] for m in _metrics(members)]
        rows.append(["trials"] + [_fmt_trials(g) for g in members])
        ctx_text = _context(members[0].labels, ctx_keys)
        tables.append(Table(f"{title}{f' ({ctx_text})' if ctx_text else ''}: mean±std (n)", header, rows))
        mine = [p for p in paired if _context_key(p.labels, ctx_keys) == ctx]
        if mine:
            tables.append(_paired_table(f"{title}{f' ({ctx_text})' if ctx_text else ''}", mine, settings))
    return tables


def _method_key(labels: dict[str, Any]) -> str:
    return canonical({k: v for k, v in labels.items() if is_method_setting(k)})


def _fewshot_tables(experiment: str, groups: Sequence[Group], paired: Sequence[Paired]) -> list[Table]:
    """Tables 7/8: rows dataset × shots (× other settings); per metric each method configuration and Δ.

    Longer than most: the header and each row interleave, per metric, the configurations' cells and their Δs.
    """
    row_keys = ["data.dataset", "data.shots"] + [k for k in varying([g.labels for g in groups])
                                                  if not is_method_setting(k) and k not in ("data.dataset", "data.shots")]
    settings = cgc_settings_that_differ([g.labels for g in groups])
    configs = sorted({_method_key(g.labels): g.labels for g in groups}.values(),
                     key=lambda lab: sort_key(lab, ("method.name", "method.lam", *settings)))
    config_keys = [_method_key(c) for c in configs]
    # show λ in a column name only where more than one CGC configuration exists
    several = len([c for c in configs if c["method.name"] != "baseline"]) > 1
    names = [config_label(c, settings, with_lam=several) for c in configs]
    cells: dict[str, dict[str, Group]] = {}
    ctx_labels: dict[str, dict[str, Any]] = {}
    for g in groups:
        ck = _context_key(g.labels, row_keys)
        ctx_labels[ck] = {k: g.labels.get(k) for k in row_keys}
        cells.setdefault(ck, {})[_method_key(g.labels)] = g
    pairs = {(_context_key(p.labels, row_keys), _method_key(p.labels)): p for p in paired}
    has_base = any(c["method.name"] == "baseline" for c in configs)
    metrics = _metrics(groups)
    header = [field_name(k) for k in row_keys]
    for m in metrics:
        header += [f"{m} {n}" for n in names]
        header += [f"{m} Δ {n}−baseline [95% CI]" for c, n in zip(configs, names)
                   if c["method.name"] != "baseline" and has_base]
    rows = []
    for ck in sorted(cells, key=lambda c: sort_key(ctx_labels[c], row_keys)):
        line = [value_text(ctx_labels[ck][k]) for k in row_keys]
        for m in metrics:
            line += [_fmt_group_cell(m, cells[ck].get(key)) if cells[ck].get(key) is not None else "–"
                     for key in config_keys]
            for c, key in zip(configs, config_keys):
                if c["method.name"] == "baseline" or not has_base:
                    continue
                line.append(_diff_cell(m, pairs.get((ck, key))))
        rows.append(line)
    title = _title(experiment, [g.labels for g in groups]) + ": mean±std (n); Δ paired by episode"
    return [Table(title, header, rows)]


def _methods_tables(experiment: str, groups: Sequence[Group], paired: Sequence[Paired]) -> list[Table]:
    """Tables 1/2/5/6/9/11: a row per configuration, a column per metric; then the paired differences."""
    keys = varying([g.labels for g in groups])
    if "method.name" not in keys:
        keys = ["method.name"] + keys
    metrics = _metrics(groups)
    header = [field_name(k) for k in keys] + metrics + ["trials"]
    rows = [[value_text(g.labels.get(k)) for k in keys] + [_fmt_group_cell(m, g) for m in metrics] + [_fmt_trials(g)]
            for g in sorted(groups, key=lambda g: sort_key(g.labels, keys))]
    title = _title(experiment, [g.labels for g in groups])
    tables = [Table(title + ": mean±std (n)", header, rows)]
    if paired:
        tables.append(_paired_table(title, paired, [k for k in keys if k not in ("method.name", "method.lam")]))
    return tables


_LAYOUT_TABLES = {"lambda": _lambda_tables, "fewshot": _fewshot_tables, "methods": _methods_tables}


# --------------------------------------------------------------------------- rendering


def _render_rich(tables: Sequence[Table], width: int | None) -> str:
    from rich.console import Console
    from rich.table import Table as RichTable

    buf = io.StringIO()
    terminal = Console()
    for t in tables:
        rt = RichTable(title=t.title, title_justify="left")
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


def _render_markdown(tables: Sequence[Table]) -> str:
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


# --------------------------------------------------------------------------- load, render, report


@dataclass(frozen=True)
class Results:
    """What a report shows: the rows read, their groups and pairs, each experiment's layout, what was left out.

    ``table``: the rows, with the columns the statistics use, and ``config_json`` where it was read (one row
    per group and λ, and rows that predate group keys); ``stats.analyze`` takes it as it is.
    ``left_out``: one line per row file that could not be used (unreadable, or no trial's config), naming it.
    """

    storage: str
    experiment: str | None
    table: pa.Table
    groups: list[Group]
    paired: list[Paired]
    layouts: dict[str, Layout]
    left_out: list[str]

    @property
    def experiments(self) -> list[str]:
        return sorted({g.experiment for g in self.groups})


def _check_root(storage: Storage, given: str) -> None:
    """A typo in --storage is an error, not an empty report; so is a file where the results folder should be."""
    kind = storage.fs.get_file_info(storage.root).type
    if kind == pafs.FileType.NotFound:
        resolved = f" ({storage.root})" if storage.root != given else ""
        raise FileNotFoundError(f"storage {given!r} does not exist{resolved}; give the folder or URI your "
                                "experiments wrote to (--storage, or $CGC_RAY_STORAGE), or run an experiment first")
    if kind != pafs.FileType.Directory:
        raise NotADirectoryError(f"storage {given!r} is a file, not a results folder; give the folder or URI "
                                 "your experiments wrote to (--storage, or $CGC_RAY_STORAGE)")


def _where(storage: Storage, experiment: str, trial_id: str) -> str:
    try:
        return storage.row_path(experiment, trial_id)
    except ValueError:  # a hand-made row whose trial id is no file name
        return f"the row of trial {trial_id!r} in experiment {experiment!r} under {storage.root}"


def load(storage: str, experiment: str | None = None) -> Results:
    """Read and analyse the rows under ``storage`` (optionally one experiment); writes nothing.

    Raises FileNotFoundError / NotADirectoryError when ``storage`` is missing or a file. An odd row file
    does not stop the rest: it is left out and named in :attr:`Results.left_out`.
    """
    root = Storage.of(storage)
    _check_root(root, storage)
    unreadable: list[str] = []
    table = read_rows(root, experiment, columns=[*_COLUMNS, PATH_COLUMN], left_out=unreadable)
    paths = table[PATH_COLUMN].to_pylist()
    configs: dict[int, Any] = {}

    def read_configs(rows: Sequence[int]) -> list[Any]:
        got = read_rows(root, columns=[PATH_COLUMN, "config_json"], files=[paths[i] for i in rows],
                        left_out=unreadable)
        by_path = dict(zip(got[PATH_COLUMN].to_pylist(), got["config_json"].to_pylist()))
        configs.update((i, by_path.get(paths[i])) for i in rows)
        return [configs[i] for i in rows]

    analysis = analyze(table, read_configs)
    table = table.drop_columns([PATH_COLUMN]).append_column(
        "config_json", pa.array([configs.get(i) for i in range(table.num_rows)], pa.string()))
    left_out = [f"left out {line}" for line in unreadable]
    left_out += [f"left out {_where(root, s.experiment, s.trial_id)}: {s.reason}" for s in analysis.skipped]
    return Results(storage, experiment, table, analysis.groups, analysis.paired, layouts(table), left_out)


def render(results: Results, fmt: Format = "rich", *, layout: Layout | None = None, width: int | None = None) -> str:
    """``results`` as text: ``rich`` / ``markdown`` (paper layouts), ``csv`` / ``json`` (the summary rows).

    ``layout`` forces one of :data:`LAYOUTS` for every experiment; None takes each experiment's own.
    ``width``: of rich tables, None for the terminal's.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)} (the Arrow summary "
                         "file: cgc_ray.results.summary.write_summary, or cgc-ray report --format parquet)")
    if not results.groups:
        where = f"experiment {results.experiment!r} under " if results.experiment else ""
        message = f"no finished trials in {where}{results.storage!r}; run an experiment first " \
                  "(e.g. python experiments/lambda_ablation.py)"
        return {"json": "[]\n", "csv": ""}.get(fmt, message + "\n")
    if fmt == "json":
        return json.dumps(_json_safe(records(results.groups, results.paired)), indent=1) + "\n"
    if fmt == "csv":
        return _render_csv(records(results.groups, results.paired))
    shown = [t for name in results.experiments for t in tables(results, name, layout=layout)]
    return _render_markdown(shown) if fmt == "markdown" else _render_rich(shown, width)


def tables(results: Results, experiment: str, *, layout: Layout | None = None) -> list[Table]:
    """The tables every text format and the HTML report show of ``experiment``, in its layout (or ``layout``)."""
    build = _LAYOUT_TABLES[layout or results.layouts.get(experiment, "methods")]
    return build(experiment, [g for g in results.groups if g.experiment == experiment],
                 [p for p in results.paired if p.experiment == experiment])


def report(
    storage: str,
    experiment: str | None = None,
    fmt: Format = "rich",
    *,
    layout: Layout | None = None,
    width: int | None = None,
) -> str:
    """:func:`render` of :func:`load`: the results under ``storage`` as text; each left-out file is a warning."""
    results = load(storage, experiment)
    for line in results.left_out:
        warnings.warn(line, stacklevel=2)
    return render(results, fmt, layout=layout, width=width)
