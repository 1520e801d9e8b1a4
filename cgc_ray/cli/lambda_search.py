"""``experiments/lambda_search.py``: λ chosen by a search on the validation split, then reported on the test split.

The steps, each an ordinary run of the driver (re-running the command skips what is done, and the search
continues where it was: ``runner.search``):

1. the spec's ``sweep.search`` (λ, with the grid's seeds as replicates) on the validation split, and the
   baseline (λ = 0) on the same seeds and split, both in the spec's experiment;
2. the accuracy-versus-CH Pareto front of what the search found, paired with that baseline (a table, and
   ``accuracy_vs_ch.png`` under the storage's figures);
3. the pick, by ``sweep.search.selection`` (``results.selection``);
4. the pick and the baseline re-run on the test split with the same seeds, in ``<experiment>_test``, reported as
   every experiment is (paired Δ with its 95 % interval).

It prints the trial-epochs the search spent beside those of the grid λ ∈ {0.1, 0.25, 0.5, 1} at the same seeds
and training length. ``--compare-grid`` runs that grid too (validation split, experiment ``<experiment>_grid``,
its own baseline) and applies the same rule to it.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from typing import Any, Sequence

from cgc_ray.cli.errors import fail
from cgc_ray.cli.experiment import build_parser, plan, resolve_spec, run_spec
from cgc_ray.config import ExperimentSpec, SpecError, validate_spec
from cgc_ray.config.base import set_path
from cgc_ray.runner.tracking import check_trackers

GRID_LAMS = (0.1, 0.25, 0.5, 1.0)  # issue 21: the grid a search is measured against
_GRID = "{" + ", ".join(f"{v:g}" for v in GRID_LAMS) + "}"


def derived(spec: ExperimentSpec, **settings: Any) -> ExperimentSpec:
    """``spec`` without its search, with ``settings`` (dotted path, ``__`` for ``.``) set: a grid of its seeds."""
    tree = spec.model_dump(mode="json")
    tree["sweep"]["search"] = None
    for key, value in settings.items():
        set_path(tree, key.replace("__", "."), value)
    return validate_spec(tree)


def baseline_spec(spec: ExperimentSpec) -> ExperimentSpec:
    """The search's baseline: λ = 0 (cross-entropy only) at each of its seeds, same split and experiment."""
    return derived(spec, method__lam=0.0)


def on_test_split(spec: ExperimentSpec, pick: dict[str, Any]) -> ExperimentSpec:
    """The picked settings (searched path -> value) and the baseline on the test split, the same seeds, in
    ``<experiment>_test``."""
    return derived(spec, name=f"{spec.name}_test", data__eval_split="test",
                   sweep__variants=[{"method.lam": 0.0}, dict(pick)])


def picked_settings(spec: ExperimentSpec, labels: dict[str, Any]) -> dict[str, Any]:
    """A candidate's value of each searched path (its labels name every method setting)."""
    return {path: labels[path] for path in spec.sweep.search.space}


def _check_method_only(spec: ExperimentSpec) -> None:
    """Every searched setting pairs with the one baseline: only the method's settings may be searched."""
    others = [p for p in spec.sweep.search.space if not p.startswith("method.")]
    if others:
        raise SpecError(f"sweep.search.space {others}: experiments/lambda_search.py pairs every searched setting "
                        "with one baseline (λ = 0), so it searches method.* settings only; search the others with "
                        "cgc-ray run")


def grid_spec(spec: ExperimentSpec) -> ExperimentSpec:
    """The grid λ ∈ :data:`GRID_LAMS` and its baseline on the search's split and seeds, in ``<experiment>_grid``."""
    return derived(spec, name=f"{spec.name}_grid", sweep__grid={**spec.sweep.grid, "method.lam": [0.0, *GRID_LAMS]})


def grid_trial_epochs(spec: ExperimentSpec) -> int:
    """What the grid λ ∈ :data:`GRID_LAMS` at the search's replicates and training length costs, without its
    baseline (a search's grid holds its replicate axes only)."""
    return len(GRID_LAMS) * math.prod(len(v) for v in spec.sweep.grid.values()) * spec.optim.epochs


def main(argv: Sequence[str] | None = None, *, description: str = "") -> int:
    p = build_parser("experiments/lambda_search.py", description)
    p.add_argument("--compare-grid", action="store_true",
                   help=f"also run the grid λ ∈ {_GRID} at the same seeds on the "
                        "validation split (experiment <name>_grid) and apply the same rule to it")
    args = p.parse_args(argv)
    try:
        spec = resolve_spec(args, "lambda_search")
        check_trackers(args.trackers)
        if spec.sweep.search is None:
            raise SpecError(f"{spec.name}: experiments/lambda_search.py needs a spec with sweep.search (e.g. --preset "
                            "lambda_search_demo); a grid runs with experiments/lambda_ablation.py")
        _check_method_only(spec)
        first = [spec, baseline_spec(spec), *([grid_spec(spec)] if args.compare_grid else [])]
        if args.dry_run:
            search = spec.sweep.search
            print(f"# {spec.name}: sweep.search samples {search.num_samples} trials of {sorted(search.space)}; the "
                  "first plan lists its base at each replicate", file=sys.stderr)
            for s in first:
                sys.stdout.write(plan(s) + "...\n")
            print("# then: the pick (chosen from these rows) and the baseline on the test split, in "
                  f"{spec.name}_test", file=sys.stderr)
            return 0
    except (ValueError, OSError) as e:
        return fail(e)
    codes = [run_spec(s, args)[0] for s in first]
    if 2 in codes:
        return 2
    return max([*codes, _choose_and_test(spec, args)])


def _choose_and_test(spec: ExperimentSpec, args: argparse.Namespace) -> int:
    """Steps 2-4 and the cost line (module docstring); the exit status of the test run (0 when none ran)."""
    from cgc_ray.results.report import load, report
    from cgc_ray.results.selection import candidates, select, trial_epochs
    from cgc_ray.results.table import read_rows

    rule = spec.sweep.search.selection
    found = _candidates_of(load(spec.storage, spec.name), baseline_spec(spec))
    pick = select(found, tolerance=rule.tolerance, min_pairs=rule.min_pairs, rule=rule.rule)
    print(front_table(found, pick, rule.tolerance, rule.min_pairs))
    _write_front_figure(spec)
    rows = read_rows(spec.storage, spec.name, columns=["trial_id", "status", "epochs", "method"]).to_pylist()
    searched = [r for r in rows if r["method"] != "baseline"]
    spent, grid = trial_epochs(searched), grid_trial_epochs(spec)
    print(f"search: {len(searched)} trials ({sum(r['status'] == 'stopped' for r in searched)} stopped early by "
          f"ASHA), {spent} trial-epochs; the grid λ ∈ {_GRID} at the same seeds "
          f"and {spec.optim.epochs} epochs: {grid} ({spent / grid:.0%}); the validation baseline, which both need: "
          f"{trial_epochs(r for r in rows if r['method'] == 'baseline')}")
    if args.compare_grid:
        grid_found = candidates(load(spec.storage, f"{spec.name}_grid").paired)
        _print_grid_comparison(pick, grid_found, rule)
    if pick is None:
        paired = [c for c in found if c.n >= rule.min_pairs]
        why = (f"no searched λ has {rule.min_pairs} seeds finished beside the baseline's (ASHA stopped the others)"
               if not paired else f"no searched λ keeps validation top-1 within {rule.tolerance:g} points of the "
               "baseline's")
        print(f"{why}: the baseline stays; nothing to test")
        return 0
    chosen = picked_settings(spec, pick.labels)
    named = ", ".join(f"{p} = {v:.4g}" if isinstance(v, float) else f"{p} = {v}" for p, v in chosen.items())
    print(f"pick: {named} (rule {rule.rule}, tolerance {rule.tolerance:g} points); on the test split:")
    test = on_test_split(spec, chosen)
    code, _ = run_spec(test, args)
    if code == 2:
        return code
    if not args.no_report:
        sys.stdout.write(report(test.storage, test.name, "rich"))
    tested = candidates(load(test.storage, test.name).paired)
    for c in [c for c in tested if picked_settings(spec, c.labels) == chosen]:
        inside = "within" if c.d_top1.mean >= -rule.tolerance else "outside"
        print(f"test: {named}: Δ top-1 {_diff(c.d_top1)} ({inside} the tolerance of {rule.tolerance:g}), "
              f"Δ CH {_diff(c.d_ch)}, {c.n} seeds")
    return code


def _candidates_of(results, baseline: ExperimentSpec) -> list:
    """The search's candidates: the pairs of the experiment whose baseline is ``baseline``'s group."""
    from cgc_ray.config import REPLICATE_FIELDS, expand_trials
    from cgc_ray.config.pretrained import pin_pretrained
    from cgc_ray.results.selection import candidates
    from cgc_ray.results.stats import row_identity

    # as its rows were written: `experiment:` weights pinned to the pretraining's trial (runner.driver)
    trial = expand_trials(pin_pretrained(baseline)[0])[0]
    labels = {k: v for k, v in row_identity(json.dumps(trial.model_dump(mode="json"))).items()
              if k not in REPLICATE_FIELDS}
    return candidates(p for p in results.paired if p.baseline_labels == labels)


def _diff(stat) -> str:
    ci = f" [{stat.ci[0]:+.2f}, {stat.ci[1]:+.2f}]" if stat.ci else ""
    return f"{stat.mean:+.2f}{ci}"


def front_table(found: list, pick, tolerance: float, min_pairs: int) -> str:
    """The candidates as a markdown table: paired Δ top-1 and Δ CH with their 95 % intervals, the Pareto front
    and the pick marked."""
    from cgc_ray.results.selection import pareto

    front = {id(c) for c in pareto(found)}
    out = io.StringIO()
    out.write(f"\nsearched λ against the baseline, validation split, paired by seed (rule: largest Δ CH with Δ "
              f"top-1 ≥ −{tolerance:g} and ≥ {min_pairs} pairs; * on the Pareto front, ← the pick)\n\n")
    out.write("| λ | pairs | Δ top-1 [95 % CI] | Δ CH [95 % CI] | front | |\n|---:|---:|---:|---:|:---:|---|\n")
    for c in found:
        out.write(f"| {c.lam:.4g} | {c.n} | {_diff(c.d_top1)} | {_diff(c.d_ch)} | {'*' if id(c) in front else ''} "
                  f"| {'← pick' if c is pick else ''} |\n")
    if not found:
        out.write("| (no searched λ has a finished pair with the baseline yet) | | | | | |\n")
    return out.getvalue()


def _print_grid_comparison(pick, grid_found: list, rule) -> None:
    from cgc_ray.results.selection import select

    if not grid_found:
        print("grid: no λ has a finished pair with its baseline")
        return
    best = max(grid_found, key=lambda c: c.d_ch.mean)
    grid_pick = select(grid_found, tolerance=rule.tolerance, min_pairs=rule.min_pairs, rule=rule.rule)
    print(front_table(grid_found, grid_pick, rule.tolerance, rule.min_pairs).replace("searched λ", "grid λ", 1))
    print(f"grid: best Δ CH {best.d_ch.mean:+.2f} (λ = {best.lam:g}); the rule's pick on the grid: "
          + (f"λ = {grid_pick.lam:g}, Δ CH {grid_pick.d_ch.mean:+.2f}" if grid_pick else "none (the baseline)"))
    if pick is None:
        print("search: no pick (the baseline)")
        return

    def ratio(of: float) -> str:
        return f"{pick.d_ch.mean / of:.0%}" if of else "n/a"  # a Δ CH of 0 has no ratio

    print(f"search: pick λ = {pick.lam:.4g}, Δ CH {pick.d_ch.mean:+.2f} = {ratio(best.d_ch.mean)} of the grid's "
          f"best" + (f", {ratio(grid_pick.d_ch.mean)} of the grid's pick" if grid_pick else ""))


def _write_front_figure(spec: ExperimentSpec) -> None:
    """``accuracy_vs_ch.png`` of the experiment (mean top-1 against mean CH, the front marked), into its figures."""
    from cgc_ray.results.plots import plot_accuracy_vs_ch
    from cgc_ray.results.report import load
    from cgc_ray.storage import Storage

    fig = plot_accuracy_vs_ch(load(spec.storage, spec.name).groups)
    if fig is None:
        return
    storage = Storage(spec.storage)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path = f"{storage.figures_dir(spec.name)}/accuracy_vs_ch.png"
    storage.write_bytes(path, buf.getvalue())
    print(f"wrote {path}", file=sys.stderr)
