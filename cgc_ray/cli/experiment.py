"""The shared command line of the scripts in ``experiments/`` and of ``cgc-ray run``.

Every script takes the same flags::

    --data-root DIR   the dataset (none: demo scale on the embedded synthetic dataset)
    --dataset NAME    which paper preset when several exist (few-shot, fine-grained, ImageNet)
    --preset NAME     any preset of cgc_ray.config.PRESETS (`cgc-ray presets` lists them)
    --spec FILE       a YAML/JSON spec instead of a preset
                      (--dataset, --preset and --spec each choose the spec: give at most one)
    --set a.b=value   overrides, repeatable (values parsed as YAML)
    --dry-run         print the resolved spec (YAML) and its trials, with those that already have a row; no Ray
    --storage URI     results and checkpoints (default ./results; s3://bucket/prefix on clusters)
    --address ADDR    attach to a Ray cluster (default: $RAY_ADDRESS, else a `ray start` Ray on this
                      node, else a loopback Ray of its own; "local" forces the latter)
    --callback NAME   also log every trial's hyperparameters and per-epoch metrics to mlflow, wandb or
                      tensorboard (repeatable; Tune's own callbacks, see cgc_ray/runner/tracking.py)
    --dashboard       a Ray this command starts serves Ray's dashboard on 127.0.0.1 (needs ray[default])

Local paths (storage, data root, split file, weights) are made absolute here,
against the folder the command runs in, before the spec reaches Ray.

The spec is validated (and the data root checked) before Ray starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from cgc_ray.config import (
    PRESETS,
    ExperimentSpec,
    SpecError,
    apply_overrides,
    load_spec,
    resolve_paths,
)
from cgc_ray.cli.errors import ArgumentParser, fail
from cgc_ray.config.paths import storage_location
from cgc_ray.config.model import TV_WEIGHTS_RE
from cgc_ray.models.archs import ARCHS, TORCHVISION_ARCHS
from cgc_ray.runner.tracking import TRACKERS, check_trackers, tune_trial_dir

# A default a cluster sets in its nodes' environment (cluster/gpu.yaml), used when the flag is absent;
# --storage follows config.paths.storage_location ($CGC_RAY_STORAGE).
ENV_DATA_ROOT = "CGC_RAY_DATA_ROOT"

# experiment -> (demo preset, paper preset chooser from (dataset, arch))
Chooser = Callable[[str | None, str | None], str]
EXPERIMENTS: dict[str, tuple[str, Chooser]] = {
    "lambda_ablation": ("lambda_ablation_demo", lambda ds, arch: "lambda_ablation"),
    # no paper preset: the paper states no search; at scale give --spec FILE with a sweep.search
    "lambda_search": ("lambda_search_demo", lambda ds, arch: f"lambda_search_{ds or 'imagenet'}"),
    "fewshot": ("fewshot_demo", lambda ds, arch: f"fewshot_{ds or 'cub200'}"),
    "finegrained": ("finegrained_demo", lambda ds, arch: f"finegrained_{ds or 'cub200'}"),
    "semisup": ("semisup_demo", lambda ds, arch: "semisup"),
    "pretrain": ("pretrain_demo", lambda ds, arch: "pretrain_imagenet100"),
    "imagenet": (
        "imagenet_demo",
        lambda ds, arch: "imagenet100_r50" if ds == "imagenet100" else f"imagenet_{'r50' if arch == 'resnet50' else 'r18'}",
    ),
}


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=None,
                   help="dataset folder (default: $CGC_RAY_DATA_ROOT); omit both for the embedded demo dataset")
    p.add_argument("--dataset", default=None, help="dataset of the paper preset (e.g. cub200, cars196, imagenet100)")
    p.add_argument("--arch", default=None, choices=ARCHS,
                   help="the architecture (model.arch); ImageNet-pretrained presets take that arch's torchvision "
                        "weights; refused where the preset's weights exist for one arch only (SwAV ResNet50)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), metavar="NAME",
                   help="a preset from cgc_ray.config.PRESETS (`cgc-ray presets` lists them)")
    p.add_argument("--spec", default=None, help="a YAML or JSON spec file (instead of a preset)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="override a spec field, e.g. --set method.lam=0.5 (repeatable)")
    p.add_argument("--storage", default=None, help="results/checkpoints path or URI (default: the spec's; for a preset $CGC_RAY_STORAGE, else ./results)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to attach to (default: $RAY_ADDRESS, else a Ray started with `ray start` on "
                        "this node, else a new loopback Ray of this run's own; 'local' forces the latter)")
    p.add_argument("--autoscale", action="store_true",
                   help="an autoscaler adds nodes: check trials against its node types (read from the cluster), "
                        "or, when those cannot be read, do not require a current node to fit a trial")
    p.add_argument("--max-concurrent", type=int, default=None, help="at most this many trials at once")
    p.add_argument("--callback", dest="trackers", action="append", default=[], choices=TRACKERS, metavar="NAME",
                   help="also send every trial's hyperparameters and per-epoch metrics to a tracker, Tune's own "
                        f"callback for it ({', '.join(TRACKERS)}; repeatable): MLflow writes where "
                        "$MLFLOW_TRACKING_URI says, W&B to $WANDB_PROJECT (default cgc-ray)")
    p.add_argument("--dashboard", action="store_true",
                   help="a Ray this command starts serves Ray's dashboard on 127.0.0.1 and prints its URL "
                        "(pip install 'cgc-ray[dashboard]'); attached to a cluster, prints that cluster's")
    p.add_argument("--no-progress", action="store_true", help="no live progress view")
    p.add_argument("--no-report", action="store_true", help="do not print the result table at the end")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved spec as YAML and the trials it would run (those with a row in the "
                        "storage are skipped by a run); start nothing, import no Ray")
    return p


def resolve_spec(args: argparse.Namespace, experiment: str | None):
    """The experiment spec the flags describe: validated, every local path absolute.

    Paths are resolved here, against the directory the command runs in, before
    the spec reaches Ray. ``--storage`` and ``--data-root`` default to
    ``$CGC_RAY_STORAGE`` and ``$CGC_RAY_DATA_ROOT`` (set by a cluster's config).
    """
    data_root = args.data_root if args.data_root is not None else os.environ.get(ENV_DATA_ROOT) or None
    _check_one_spec_source(args)
    if args.spec:
        spec = load_spec(_spec_file(args.spec))
    else:
        if args.preset:
            name = args.preset
        elif experiment is None:
            raise SpecError("give --spec FILE or --preset NAME")
        elif args.dataset == "synthetic" or (data_root is None and args.dataset is None):
            name = EXPERIMENTS[experiment][0]
        else:
            name = EXPERIMENTS[experiment][1](args.dataset, args.arch)
        if name not in PRESETS:
            raise SpecError(f"no preset {name!r} (from --dataset {args.dataset!r}); presets: {sorted(PRESETS)}")
        spec = load_spec(PRESETS[name])
    overrides = list(args.overrides)
    if args.arch is not None:
        overrides = _arch_overrides(spec, args.arch) + overrides
    storage = storage_location(args.storage, spec.storage)
    if data_root is not None:
        overrides.insert(0, f"data.root={data_root}")
    overrides.insert(0, f"storage={storage}")
    spec = apply_overrides(spec, overrides) if overrides else spec
    return resolve_paths(spec)


def _check_one_spec_source(args: argparse.Namespace) -> None:
    """--spec, --preset and --dataset each choose the spec: two of them would silently override each other."""
    given = [flag for flag, value in (("--spec", args.spec), ("--preset", args.preset), ("--dataset", args.dataset))
             if value is not None]
    if len(given) > 1:
        raise SpecError(f"{' and '.join(given)} each choose the spec; give one of them "
                        "(change a field of it with --set PATH=VALUE)")


def _spec_file(value: str) -> str:
    """``--spec``'s file, checked here so that a preset name given by mistake is pointed to ``--preset``."""
    if Path(value).is_file():
        return value
    if value in PRESETS:
        raise SpecError(f"--spec {value}: no such file; {value!r} is a preset: give --preset {value}")
    raise SpecError(f"--spec {value}: no such file; give the path of a .yaml/.json spec, or --preset NAME "
                    "(`cgc-ray presets` lists them)")


def _arch_overrides(spec, arch: str) -> list[str]:
    """``--arch``: model.arch, and for torchvision-pretrained presets the same weights of that arch."""
    weights = spec.model.weights
    if weights is None or spec.model.arch == arch:
        return [f"model.arch={arch}"]
    if TV_WEIGHTS_RE.match(weights) and arch in TORCHVISION_ARCHS:
        return [f"model.arch={arch}", f"model.weights=ResNet{arch.removeprefix('resnet')}_Weights.IMAGENET1K_V1"]
    raise SpecError(
        f"--arch {arch}: this preset starts from model.weights={weights!r}, which exist for "
        f"model.arch={spec.model.arch!r} only; drop --arch, or give weights for {arch} with --set model.weights=..."
    )


def main(experiment: str | None, argv: Sequence[str] | None = None, *, description: str = "") -> int:
    args = build_parser(f"{experiment or 'cgc-ray run'}", description).parse_args(argv)
    try:
        spec = resolve_spec(args, experiment)
        check_trackers(args.trackers)  # a tracker's missing package, before Ray starts
        if args.dry_run:
            sys.stdout.write(plan(spec))
            return 0
    except (ValueError, OSError) as e:  # SpecError; OSError: a storage the dry run cannot read
        return fail(e)

    code, _ = run_spec(spec, args)
    if code == 2:
        return code
    if not args.no_report:
        from cgc_ray.results.report import report

        sys.stdout.write(report(spec.storage, spec.name, "rich"))
    return code


def run_spec(spec: ExperimentSpec, args: argparse.Namespace):
    """Run ``spec`` with the flags' run options, then its sample figure, summary and page; print what happened.

    Returns (exit status, the driver's ExperimentResult): 2 and None when the run could not start (the
    error printed), 1 when a trial failed or was left unsettled, else 0.
    """
    from cgc_ray.runner.cluster import ClusterError, connect
    from cgc_ray.runner.driver import ResourceError, StorageError, run_experiment

    try:
        if args.dashboard:  # Ray started here, with its dashboard; the driver uses the Ray this process has
            connect(args.address, dashboard=True)
        res = run_experiment(spec, address=args.address, progress=not args.no_progress,
                             max_concurrent=args.max_concurrent, autoscale=args.autoscale, tracking=args.trackers)
    except (ResourceError, ClusterError, StorageError, SpecError) as e:  # SpecError: checks that read the data
        return fail(e), None
    if res.ran:  # after the sweep, outside the orchestrator: the sample figure, the Arrow summary and the page
        from cgc_ray.explain.figures import report_heatmaps, write_sample_figure
        from cgc_ray.results.html import write_page
        from cgc_ray.results.report import load
        from cgc_ray.results.summary import write_summary

        write_sample_figure(spec)
        results = load(spec.storage, spec.name)
        write_summary(spec.storage, spec.name, results.groups, results.paired)
        print(f"report page: {write_page(results, spec.name, report_heatmaps(spec.storage, spec.name))}",
              file=sys.stderr)
    print(f"{spec.name}: {len(res.trial_ids)} trials, {len(res.skipped)} already done, {len(res.ran)} ran now "
          f"({len(res.diverged)} diverged), {len(res.failed)} failed, {len(res.held)} held by another driver, "
          f"{len(res.unsettled)} not run", file=sys.stderr)
    for tid, err in res.failed.items():
        print(f"  failed {tid}: {err} (traceback: {tune_trial_dir(spec.storage, spec.name, tid, 'error.txt')})",
              file=sys.stderr)
    for tid, where in sorted(res.held.items()):
        print(f"  {tid} is run by the driver at {where}", file=sys.stderr)
    for tid, why in sorted(res.unsettled.items()):
        print(f"  not run {tid}: {why}", file=sys.stderr)
    return (1 if res.failed or res.unsettled else 0), res  # a trial neither done, failed nor held is never hidden


def plan(spec: ExperimentSpec) -> str:
    """``--dry-run``: the spec as YAML, then (a second YAML document) every trial a run would consider.

    Each trial is one line: its id, its values of the swept fields, ``row`` (the status of its row in
    the storage, or null) and ``runs`` (false where a run skips it: a finished, diverged or unreadable row). The
    pretrainings that ``experiment:`` weights name come first, as the driver runs them first. Starts
    no Ray; reads the storage as a run does (so, as a run would, it moves a corrupt row file aside).
    """
    import yaml

    from cgc_ray.config.pretrained import pin_pretrained

    pinned, pretrainings = pin_pretrained(spec)  # trial ids of fine-tuning trials name the pretraining's trial
    swept = list(dict.fromkeys([*(k for v in spec.sweep.variants for k in v), *spec.sweep.grid]))
    before = [entry for pre in pretrainings for entry in _plan_entries(pre, [], experiment=pre.name)]
    trials = _plan_entries(pinned, swept)
    pending = sum(e["runs"] for e in trials)

    def listing(key: str, entries: list[dict]) -> str:
        return f"{key}:\n" + "".join(
            f"- {yaml.safe_dump(e, default_flow_style=True, sort_keys=False, width=1 << 16)}" for e in entries)

    summary = (f"# dry run of {spec.name!r} in {spec.storage}: {len(trials)} trials, {len(trials) - pending} "
               f"done already (skipped), {pending} to run; nothing was started\n")
    return (yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False, allow_unicode=True) + "---\n" + summary
            + (listing("pretrainings", before) if before else "") + listing("trials", trials))


def _plan_entries(spec: ExperimentSpec, swept: list[str], **label: str) -> list[dict]:
    """One dict per trial of ``spec``: its id, its value of each ``swept`` path, its row's status, whether it runs."""
    from cgc_ray.config import expand_trials, trial_id
    from cgc_ray.config.base import get_path
    from cgc_ray.results.table import DONE_STATUSES, UNREADABLE, trial_status

    rows = trial_status(spec.storage, spec.name)
    out = []
    for trial in expand_trials(spec):
        tid, tree = trial_id(trial), trial.model_dump(mode="json")
        out.append({**label, "trial_id": tid, **{path: get_path(tree, path) for path in swept},
                    "row": rows.get(tid), "runs": rows.get(tid) not in (*DONE_STATUSES, UNREADABLE)})
    return out
