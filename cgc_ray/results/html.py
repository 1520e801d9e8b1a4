"""``cgc-ray report --format html``: one self-contained HTML page of a storage's results, to share.

The page needs no network and no cgc-ray: styles are inline, every image is a
base64 ``data:`` URI, and the one script (sorting a table by a clicked column)
is inline too. Per experiment it shows

- where the rows came from: the code versions, the dataset, the swept settings,
  when and where the trials ran, one trial's full config (``cgc-ray run --spec``
  reruns it), and the trials by status;
- the tables of every text format (:func:`cgc_ray.results.report.tables`, so the
  same cells), as real ``<table>`` elements; a paired difference whose 95 %
  interval excludes 0 is marked;
- the plots of :mod:`cgc_ray.results.plots` (λ ablation, accuracy vs CH with
  the Pareto front, few-shot gains) where their data exist;
- a panel of Grad-CAM heatmaps, given as PNG bytes by the caller (the explain
  layer draws it: torch lives there), or the reason there is none.

Each statistic's cell carries ``data-kind``, ``data-labels`` and ``data-metric``:
the summary row (``cgc-ray report --format json``) it shows, which the browser
test holds the visible numbers to.

pyarrow and matplotlib only: importing this module imports neither torch nor Ray.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
from collections import Counter
from typing import Any, Mapping, Sequence

import pyarrow.compute as pc
from matplotlib.figure import Figure

from cgc_ray.config.base import flatten
from cgc_ray.results.labels import field_name, value_text
from cgc_ray.results.plots import plot_accuracy_vs_ch, plot_fewshot_gains, plot_lambda_ablation
from cgc_ray.results.labels import Layout
from cgc_ray.results.report import Cell, Results, Table, tables
from cgc_ray.results.table import code_version, read_rows
from cgc_ray.storage import Storage

__all__ = ["HeatmapPanel", "render_html", "write_page"]

# An experiment's heatmap figure as PNG bytes and its caption; or None and why there is none.
HeatmapPanel = tuple[bytes | None, str]

_LAYOUT_TEXT = {
    "lambda": "λ ablation (as the paper's Table 10): one column per λ, λ = 0 being the baseline (cross-entropy "
              "only); then the paired difference of each λ to the baseline.",
    "fewshot": "Few-shot fine-tuning (as the paper's Tables 7 and 8): one row per dataset and shot count; per "
               "metric the baseline, each CGC configuration, and its paired difference to the baseline.",
    "methods": "One row per configuration, one column per metric; then the paired differences CGC − baseline.",
}
_METRIC_TEXT = {
    "top1": "top-1 accuracy (%)",
    "top5": "top-5 accuracy (%)",
    "ch": "Content Heatmap (%): the share of the Grad-CAM heatmap inside the object's box; higher is a better "
          "explanation",
    "iauc": "insertion AUC (0 to 1): accuracy as the most salient pixels are revealed first",
    "cgc_loss": "held-out CGC loss (nats): how far the heatmaps are from consistent under crops and flips",
    "zero_cam_frac": "the share of validation heatmaps that were all zero",
}
# What of each row the provenance block reads, beside what the report's table holds already.
_PROVENANCE_COLUMNS = ["experiment", "code_version", "node", "dataset", "arch", "eval_split", "ch_protocol",
                       "iauc_protocol", "wall_time_s", "finished_at"]
_FIGURE_DPI = 110

_CSS = """
:root { --ink: #1d2430; --muted: #5b6575; --rule: #d9dee6; --band: #f5f7fa; --up: #1f6fb4; --down: #b4531f; }
* { box-sizing: border-box; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--ink); margin: 0; background: #fff; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 21px; margin: 40px 0 6px; padding-top: 12px; border-top: 2px solid var(--ink); }
h3 { font-size: 16px; margin: 26px 0 6px; }
p, li { max-width: 78ch; }
.muted { color: var(--muted); }
code, pre { font: 13px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
pre { background: var(--band); padding: 10px 12px; overflow: auto; max-height: 360px; border-radius: 4px; }
nav ul { margin: 6px 0; padding-left: 20px; }
dl.prov { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 8px 0;
          background: var(--band); padding: 10px 14px; border-radius: 4px; }
dl.prov dt { color: var(--muted); }
dl.prov dd { margin: 0; }
.warn { background: #fff4e0; border-left: 4px solid #e0a030; padding: 8px 12px; }
.scroll { overflow-x: auto; margin: 6px 0 18px; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; font-size: 13px; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: 4px 0 6px; }
th, td { padding: 4px 7px; border-bottom: 1px solid var(--rule); text-align: right; white-space: nowrap; }
th { background: var(--band); border-bottom: 2px solid var(--rule); cursor: pointer; user-select: text;
     white-space: normal; vertical-align: bottom; min-width: 8ch; }
th:first-child, td:first-child { text-align: left; }
tbody tr:hover { background: #fafbfd; }
td.sig-up { color: var(--up); font-weight: 600; background: #eaf2fb; }
td.sig-down { color: var(--down); font-weight: 600; background: #fbefe8; }
td.sig-up::after { content: " ▲"; font-size: 10px; }
td.sig-down::after { content: " ▼"; font-size: 10px; }
.legend span { display: inline-block; padding: 0 6px; margin-right: 6px; font-weight: 600; }
.plots { display: flex; flex-wrap: wrap; gap: 0 28px; align-items: flex-start; }
figure { margin: 12px 0 22px; max-width: 100%; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--rule); }
figcaption { color: var(--muted); font-size: 13px; max-width: 68ch; margin-top: 4px; }
details summary { cursor: pointer; color: var(--muted); }
"""

# Sorting a table by a clicked header: numbers by value (a cell's first number), other text alphabetically.
_JS = """
document.querySelectorAll("table.sortable th").forEach(function (th, column) {
  th.title = "sort by this column";
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0];
    var up = th.dataset.order !== "up";
    th.dataset.order = up ? "up" : "down";
    var key = function (row) {
      var text = row.cells[th.cellIndex].textContent.trim();
      var n = parseFloat(text.replace("\\u2212", "-"));
      return isNaN(n) ? text : n;
    };
    Array.from(body.rows).sort(function (a, b) {
      var x = key(a), y = key(b);
      var c = (typeof x === "number" && typeof y === "number") ? x - y : String(x).localeCompare(String(y));
      return up ? c : -c;
    }).forEach(function (row) { body.appendChild(row); });
  });
});
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_FIGURE_DPI)
    return buf.getvalue()


def _img(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


# --------------------------------------------------------------------------- tables


def _cell_html(cell: str) -> str:
    if not isinstance(cell, Cell) or cell.kind is None:
        return f"<td>{_e(cell)}</td>"
    sig = {1: ' class="sig-up"', -1: ' class="sig-down"'}.get(cell.sign, "")
    title = ' title="95 % interval excludes 0"' if cell.sign else ""
    return (f'<td{sig}{title} data-kind="{cell.kind}" data-metric="{_e(cell.metric)}" '
            f'data-labels="{_e(cell.labels)}">{_e(cell)}</td>')


def _table_html(t: Table) -> str:
    head = "".join(f'<th scope="col">{_e(h)}</th>' for h in t.header)
    body = "".join("<tr>" + "".join(_cell_html(c) for c in row) + "</tr>" for row in t.rows)
    return (f'<div class="scroll"><table class="sortable"><caption>{_e(t.title)}</caption>'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")


def _columns_text(metrics: Sequence[str]) -> str:
    items = "".join(f"<li><code>{_e(m)}</code>: {_e(_METRIC_TEXT[m])}</li>" for m in metrics if m in _METRIC_TEXT)
    return (
        "<details open><summary>How to read these tables</summary><ul>"
        "<li><b>mean±std (n)</b>: the mean over repeats (seeds, or few-shot episodes), their sample standard "
        "deviation and the number of finished trials. <b>+k diverged / failed / stopped</b>: trials that ended "
        "otherwise, left out of the mean.</li>"
        "<li><b>Δ … [95% CI] (pairs)</b>: CGC minus its baseline, paired replicate by replicate (the same seed or "
        "episode), with the 95 % Student-t interval of the mean difference and the number of pairs. "
        '<span class="legend"><span class="sig-up" style="color:var(--up)">▲ blue</span>'
        '<span class="sig-down" style="color:var(--down)">▼ orange</span></span>'
        "mark an interval above or below 0. One pair has no interval.</li>"
        f"{items}<li>Click a column's header to sort by it.</li></ul></details>")


# --------------------------------------------------------------------------- provenance


def _order(value: Any) -> tuple:
    """Numbers by value, then everything else by its text (None first)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return (value is not None, not number, value if number else 0, str(value))


def _provenance(results: Results, experiment: str) -> str:
    """What produced the rows: code, data, the swept settings, when and where, one trial's config."""
    prov = read_rows(results.storage, experiment, columns=_PROVENANCE_COLUMNS, left_out=[]).to_pylist()
    mine = results.table.filter(pc.equal(results.table["experiment"], experiment))
    status = Counter(s or "finished" for s in mine["status"].to_pylist())
    configs = [json.loads(c) for c in mine["config_json"].to_pylist() if c]
    flat = [flatten(c) for c in configs]
    swept = {k: {json.dumps(f.get(k), sort_keys=True) for f in flat} for k in sorted({k for f in flat for k in f})}
    swept = {k: sorted(map(json.loads, v), key=_order) for k, v in swept.items() if len(v) > 1 and k != "storage"}
    for column, name in (("seed", "seed"), ("episode", "data.episode")):  # one config per group was read: not these
        values = sorted({v for v in mine[column].to_pylist() if v is not None})
        if len(values) > 1:
            swept[name] = values

    def counted(key: str) -> str:
        c = Counter(str(r[key]) for r in prov if r.get(key) is not None)
        return ", ".join(f"{v} ({n} rows)" if len(c) > 1 else v for v, n in c.most_common())

    times = sorted(r["finished_at"] for r in prov if r.get("finished_at") is not None)
    when = "–" if not times else f"{times[0]:%Y-%m-%d %H:%M} – {times[-1]:%Y-%m-%d %H:%M} UTC"
    hours = sum(r["wall_time_s"] or 0.0 for r in prov) / 3600
    split = counted("eval_split")
    protocols = [f"{what} {counted(key)}" for what, key in (("CH", "ch_protocol"), ("IAUC", "iauc_protocol"))
                 if counted(key)]
    items = [
        ("trials", ", ".join(f"{status[s]} {s}" for s in sorted(status, key=lambda s: (s != "finished", s)))),
        ("dataset", counted("dataset") + (f"; metrics on its {split} split" if split else "")),
        ("architecture", counted("arch")),
        ("swept", "; ".join(f"{field_name(k)} ∈ {{{', '.join(map(value_text, vs))}}}" for k, vs in swept.items())
         or "nothing"),
        ("protocols", ", ".join(protocols)),
        ("code", counted("code_version")),
        ("ran", f"{when}, on {counted('node')}; {hours:.2f} trial-hours in all"),
        ("storage", results.storage),
    ]
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items if v)
    config = ""
    if configs:
        config = ("<details><summary>One trial's full config (save as trial.json; "
                  "<code>cgc-ray run --spec trial.json --storage DIR</code> runs it again)</summary>"
                  f"<pre>{_e(json.dumps(configs[0], indent=1, sort_keys=True))}</pre></details>")
    return f'<dl class="prov">{dl}</dl>{config}'


# --------------------------------------------------------------------------- plots and heatmaps


def _plots(results: Results, experiment: str) -> str:
    groups = [g for g in results.groups if g.experiment == experiment]
    paired = [p for p in results.paired if p.experiment == experiment]
    figures = [
        (plot_lambda_ablation(groups), "λ ablation: top-1 accuracy and CH against λ, mean ± std over repeats",
         "Top-1 and CH against λ (λ = 0 is the baseline); error bars: std over repeats."),
        (plot_accuracy_vs_ch(groups), "accuracy against CH per configuration, with the Pareto front",
         "Mean top-1 against mean CH per configuration (± std both ways); the dashed line joins the Pareto front, "
         "the configurations no other beats in both."),
        (plot_fewshot_gains(paired), "few-shot gain of CGC over the baseline per shot count, with 95 % intervals",
         "Paired CGC − baseline difference per dataset and shot count, with its 95 % interval; above 0 CGC gains."),
    ]
    shown = [_img(_png(fig), f"{experiment}: {alt}", caption) for fig, alt, caption in figures if fig is not None]
    return f'<h3>Plots</h3><div class="plots">{"".join(shown)}</div>' if shown else ""


def _heatmaps(experiment: str, panel: HeatmapPanel | None) -> str:
    head = "<h3>Heatmaps: baseline next to CGC</h3>"
    if panel is None:
        return head + ('<p class="muted">Not drawn for this page: <code>cgc-ray report --format html</code> draws '
                       "them where the sweep kept its checkpoints.</p>")
    png, caption = panel
    if png is None:
        return head + f'<p class="muted">No heatmaps: {_e(caption)}</p>'
    return head + _img(png, f"{experiment}: Grad-CAM heatmaps, {caption}", caption)


# --------------------------------------------------------------------------- the page


def _experiment(results: Results, experiment: str, panel: HeatmapPanel | None, layout: Layout | None) -> str:
    shown = tables(results, experiment, layout=layout)
    metrics = [m for m in _METRIC_TEXT if any(m in g.stats for g in results.groups if g.experiment == experiment)]
    layout = layout or results.layouts.get(experiment, "methods")
    return (f'<section id="exp-{_e(experiment)}"><h2>{_e(experiment)}</h2>'
            f"<p>{_e(_LAYOUT_TEXT[layout])}</p><h3>Where these rows come from</h3>"
            f"{_provenance(results, experiment)}<h3>Results</h3>{_columns_text(metrics)}"
            + "".join(_table_html(t) for t in shown) + _plots(results, experiment)
            + _heatmaps(experiment, panel) + "</section>")


def render_html(results: Results, *, heatmaps: Mapping[str, HeatmapPanel] | None = None,
                layout: Layout | None = None, title: str | None = None) -> str:
    """``results`` (:func:`cgc_ray.results.report.load`) as one self-contained HTML page.

    ``heatmaps``: experiment -> its :data:`HeatmapPanel` (PNG bytes and caption, or None and why); an
    experiment without an entry says the page was rendered without heatmaps. ``layout``: as
    :func:`cgc_ray.results.report.render`'s. Writes nothing.
    """
    heatmaps = heatmaps or {}
    title = title or f"cgc-ray results: {results.experiment or results.storage}"
    now = _dt.datetime.now(_dt.timezone.utc)
    parts = [f"<h1>{_e(title)}</h1>",
             f'<p class="muted">Storage <code>{_e(results.storage)}</code>; page written {now:%Y-%m-%d %H:%M} UTC '
             f"by {_e(code_version())}. Contrastive Grad-CAM Consistency (CGC, Pillai et al., CVPR 2022) against "
             "its cross-entropy baseline.</p>"]
    if results.left_out:
        parts.append('<div class="warn"><b>Rows left out</b> (unreadable, or no trial config):<ul>'
                     + "".join(f"<li>{_e(line)}</li>" for line in results.left_out) + "</ul></div>")
    if not results.groups:
        parts.append("<p>No finished trials in this storage yet; run an experiment first "
                     "(e.g. <code>python experiments/lambda_ablation.py</code>).</p>")
    elif len(results.experiments) > 1:
        parts.append("<nav><b>Experiments</b><ul>" + "".join(
            f'<li><a href="#exp-{_e(e)}">{_e(e)}</a></li>' for e in results.experiments) + "</ul></nav>")
    parts += [_experiment(results, e, heatmaps.get(e), layout) for e in results.experiments]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{_e(title)}</title>'
            f"<style>{_CSS}</style></head><body><main>{''.join(parts)}</main><script>{_JS}</script></body></html>\n")


def write_page(results: Results, experiment: str, panel: HeatmapPanel | None = None) -> str:
    """The page of ``experiment`` alone, written atomically beside its summary
    (:meth:`cgc_ray.storage.Storage.summary_html_path`); returns its path."""
    storage = Storage.of(results.storage)
    one = Results(results.storage, experiment, results.table, [g for g in results.groups if g.experiment == experiment],
                  [p for p in results.paired if p.experiment == experiment], results.layouts, results.left_out)
    page = render_html(one, heatmaps={experiment: panel} if panel is not None else None)
    return storage.write_bytes(storage.summary_html_path(experiment), page.encode("utf-8"))
