"""Result plots from the Parquet rows: λ ablation, accuracy-versus-CH trade-off, few-shot gains.

Statistics come from :mod:`cgc_ray.results.stats` (groups of repeats with mean ± std,
paired CGC − baseline differences with 95% Student-t intervals), so a plot
and the table printed beside it show the same numbers. Each plot is written
only when its data exist:

- ``lambda_ablation.png`` (paper Table 10 as a figure): top-1 and CH against
  λ, mean ± std over repeats, one line per configuration that varies λ only.
- ``accuracy_vs_ch.png``: every configuration's mean top-1 against mean CH
  (± std both ways), the Pareto front (no other configuration is better in
  both) joined and ringed: the trade-off the paper picks λ by.
- ``fewshot_gains.png`` (Tables 7/8): paired CGC − baseline difference of
  top-1 and CH per dataset and shot count, with its 95% interval.

pyarrow + matplotlib only: importing this module imports neither torch nor Ray.
Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot
state, no GUI backend).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.figure import Figure

from cgc_ray.config.base import canonical
from cgc_ray.results.labels import config_label, varying
from cgc_ray.results.stats import Group, Paired, analyze, cgc_settings_that_differ, context_of
from cgc_ray.results.table import read_rows

__all__ = ["pareto_front", "plot_accuracy_vs_ch", "plot_fewshot_gains", "plot_lambda_ablation", "plot_results"]

_METRIC_NAMES = {"top1": "top-1 (%)", "ch": "CH (%)"}
_MARKERS = {"baseline": "s", "cgc": "o", "cgc_no_neg": "^"}


def _legend(groups: Sequence[Group], *, with_lam: bool = True) -> list[str]:
    """Each group's label: its method (and λ), then the settings that tell it from the other groups."""
    keys = [k for k in varying([g.labels for g in groups]) if k not in ("method.name", "method.lam")]
    return _unique([f"{g.experiment}: {config_label(g.labels, keys, with_lam=with_lam)}" for g in groups])


def _unique(names: Sequence[str]) -> list[str]:
    """Names made distinct by a #k suffix where configurations differ only in fields not shown."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} #{seen[n]}")
    return out


def _place_legend(fig: Figure, ax, fontsize: int = 7) -> None:
    """The legend inside the axes while its names are short; below them, each name wrapped to the figure's width,
    where configurations are named by many settings (inside, the legend would hide the data)."""
    handles, labels = ax.get_legend_handles_labels()
    if max(map(len, labels), default=0) <= 40:
        ax.legend(fontsize=fontsize, loc="best")
        return
    per_line = int(fig.get_figwidth() * 72 / (0.62 * fontsize))  # characters of ~0.6 em
    fig.legend(handles, [textwrap.fill(label, per_line, subsequent_indent="  ") for label in labels],
               loc="outside lower center", fontsize=fontsize, frameon=False)


def _std(stat) -> float:
    return stat.std if stat.std is not None else 0.0


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both coordinates (both maximised), by x descending.

    A point equal to another in both coordinates is kept once (the first).
    """
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1], i))
    front, best_y = [], float("-inf")
    for i in order:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return front


# --------------------------------------------------------------------------- λ ablation


def _lambda_series(groups: Sequence[Group]) -> list[tuple[str, list[tuple[float, Group]]]]:
    """Configurations that differ only in λ, each as (λ, group) sorted by λ; the matching baseline is λ = 0.

    Kept when they span at least two values of λ > 0 (a baseline against one λ is a methods comparison).
    """
    def context(g: Group) -> str:
        return canonical(context_of(g.labels))

    baselines = {(g.experiment, context(g)): g for g in groups if g.method == "baseline"}
    series: dict[tuple[str, str, str], list[tuple[float, Group]]] = {}
    for g in groups:
        if g.method == "baseline" or g.labels.get("method.lam") is None:
            continue
        rest = {k: v for k, v in g.labels.items() if k != "method.lam"}
        series.setdefault((g.experiment, context(g), canonical(rest)), []).append((g.labels["method.lam"], g))
    kept = []
    for (exp, ctx, _), pts in sorted(series.items()):
        base = baselines.get((exp, ctx))
        pts = sorted(pts + ([(0.0, base)] if base is not None else []), key=lambda p: p[0])
        if len({lam for lam, _ in pts if lam > 0}) >= 2:
            kept.append(pts)
    # a series is named by what tells its CGC configuration from the other series' (λ is the x axis)
    return list(zip(_legend([pts[-1][1] for pts in kept], with_lam=False), kept))


def plot_lambda_ablation(groups: Sequence[Group], *, dpi: int = 120) -> Figure | None:
    """Top-1 and CH against λ (mean ± std over repeats, λ = 0 the baseline); None when nothing varies λ."""
    series = _lambda_series(groups)
    metrics = [m for m in ("top1", "ch") if any(m in g.stats for _, pts in series for _, g in pts)]
    if not series or not metrics:
        return None
    fig = Figure(figsize=(4.2 * len(metrics), 3.4), dpi=dpi, layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    lams = sorted({lam for _, pts in series for lam, _ in pts})
    positive = [lam for lam in lams if lam > 0]
    for ax, metric in zip(axes, metrics):
        for name, pts in series:
            xy = [(lam, g.stats[metric]) for lam, g in pts if metric in g.stats]
            ax.errorbar([p[0] for p in xy], [p[1].mean for p in xy], yerr=[_std(p[1]) for p in xy],
                        marker="o", capsize=3, label=name)
        if positive and min(positive) < max(lams) / 20:  # a 0.01 .. 2 grid needs a log-like axis
            ax.set_xscale("symlog", linthresh=min(positive))
        ax.set_xticks(lams, [f"{lam:g}" for lam in lams])
        ax.set_xlabel("λ (0: baseline)")
        ax.set_ylabel(_METRIC_NAMES[metric])
        ax.grid(alpha=0.3)
    _place_legend(fig, axes[0])
    fig.suptitle("λ ablation (mean ± std over repeats)", fontsize=10)
    return fig


# --------------------------------------------------------------------------- accuracy vs CH


def plot_accuracy_vs_ch(groups: Sequence[Group], *, dpi: int = 120) -> Figure | None:
    """Mean top-1 against mean CH per configuration, Pareto front marked; None with < 2 configurations."""
    pts = [g for g in groups if "top1" in g.stats and "ch" in g.stats]
    if len(pts) < 2:
        return None
    names = _legend(pts)
    xy = [(g.stats["ch"].mean, g.stats["top1"].mean) for g in pts]
    front = pareto_front(xy)
    fig = Figure(figsize=(6.4, 4.6), dpi=dpi, layout="constrained")
    ax = fig.subplots()
    for g, name, (x, y) in zip(pts, names, xy):
        ax.errorbar(x, y, xerr=_std(g.stats["ch"]), yerr=_std(g.stats["top1"]), capsize=2,
                    marker=_MARKERS.get(g.labels.get("method.name"), "D"), linestyle="none", label=name)
    fx = [xy[i][0] for i in front]
    fy = [xy[i][1] for i in front]
    ax.plot(fx, fy, color="black", linestyle="--", linewidth=1, zorder=0, label="Pareto front")
    ax.scatter(fx, fy, s=160, facecolors="none", edgecolors="black", linewidths=1.2, zorder=3)
    ax.set_xlabel(_METRIC_NAMES["ch"])
    ax.set_ylabel(_METRIC_NAMES["top1"])
    ax.grid(alpha=0.3)
    _place_legend(fig, ax, fontsize=6)
    ax.set_title("accuracy vs content heatmap (mean ± std)", fontsize=10)
    return fig


# --------------------------------------------------------------------------- few-shot gains


def plot_fewshot_gains(paired: Sequence[Paired], *, dpi: int = 120) -> Figure | None:
    """Paired method − baseline per dataset and shot count with 95% CIs; None without few-shot pairs."""
    rows = [p for p in paired if p.labels.get("data.shots") is not None]
    metrics = [m for m in ("top1", "ch") if any(m in p.stats for p in rows)]
    if not rows or not metrics:
        return None
    shots = sorted({p.labels["data.shots"] for p in rows})
    settings = cgc_settings_that_differ([p.labels for p in rows], with_lam=True)
    series: dict[str, list[Paired]] = {}
    for p in rows:
        named = config_label(p.labels, settings, with_lam=False)  # λ is named among the settings where it differs
        series.setdefault(f"{p.labels.get('data.dataset', '')} {named}−baseline", []).append(p)
    width = 0.8 / len(series)
    fig = Figure(figsize=(max(4.0, 1.2 * len(shots) + 2.4) * len(metrics), 3.6), dpi=dpi, layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        for j, (name, ps) in enumerate(sorted(series.items())):
            pts = sorted((p.labels["data.shots"], p.stats[metric]) for p in ps if metric in p.stats)
            x = [shots.index(s) + (j - (len(series) - 1) / 2) * width for s, _ in pts]
            y = [s.mean for _, s in pts]
            lo = [s.mean - s.ci[0] if s.ci else 0.0 for _, s in pts]
            hi = [s.ci[1] - s.mean if s.ci else 0.0 for _, s in pts]
            ax.errorbar(x, y, yerr=[lo, hi], marker="o", linestyle="none", capsize=3, label=name)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(shots)), [f"{s}-shot" for s in shots])
        ax.set_ylabel(f"Δ {_METRIC_NAMES[metric]}")
        ax.grid(alpha=0.3, axis="y")
    _place_legend(fig, axes[0])
    fig.suptitle("few-shot gain over the baseline (paired mean, 95% CI)", fontsize=10)
    return fig


# --------------------------------------------------------------------------- all


def plot_results(
    source: pa.Table | str, out_dir: str | Path, *, experiment: str | None = None, dpi: int = 120
) -> list[Path]:
    """Write every plot whose data exist into ``out_dir``; returns the written paths.

    source: a table with :data:`cgc_ray.results.table.SCHEMA` columns, or a storage
    URI read with :func:`cgc_ray.results.table.read_rows` (only ``experiment`` if given).
    """
    table = read_rows(source, experiment) if isinstance(source, str) else source
    if experiment is not None and not isinstance(source, str):
        table = table.filter(pc.equal(table["experiment"], experiment))
    if table.num_rows == 0:
        return []
    analysis = analyze(table)
    figures = {
        "lambda_ablation.png": plot_lambda_ablation(analysis.groups, dpi=dpi),
        "accuracy_vs_ch.png": plot_accuracy_vs_ch(analysis.groups, dpi=dpi),
        "fewshot_gains.png": plot_fewshot_gains(analysis.paired, dpi=dpi),
    }
    out = Path(out_dir)
    written = []
    for name, fig in figures.items():
        if fig is not None:
            out.mkdir(parents=True, exist_ok=True)
            fig.savefig(out / name)
            written.append(out / name)
    return written
