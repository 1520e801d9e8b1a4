"""``cgc-ray`` command line: one subcommand per task.

    cgc-ray presets
    cgc-ray run --spec FILE | --preset NAME [--set a.b=value ...] [--storage URI] [--address auto] [--dry-run]
                [--callback mlflow|wandb|tensorboard] [--dashboard]
    cgc-ray report [--storage URI] [--experiment NAME] [--format rich|markdown|csv|json] [--plot DIR]
    cgc-ray report --format html --out report.html
    cgc-ray explain CHECKPOINT [CHECKPOINT ...] --dataset NAME [--consistency] --out FIGURE.png
    cgc-ray evaluate CHECKPOINT --dataset NAME --data-root DIR [--metrics top1,ch,iauc,cgc_loss]
                     [--protocol fast|authors] [--saliency gradcam|cmwp|mwp] [--iauc-input center_crop|squash]
    cgc-ray --version

Each subcommand is registered by an ``_add_<name>(subparsers)`` function listed
in :data:`SUBCOMMANDS`; it declares its arguments and sets ``handler``, a
function that imports what it needs when it runs. Subcommands that train or
explain (``run``, ``evaluate``, ``explain``) import torch/Ray inside their
handlers, so ``cgc-ray report``, ``presets`` and ``--help`` start without them.
Every error is printed by :func:`cgc_ray.cli.errors.fail`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, get_args, get_origin

from cgc_ray.cli.errors import ArgumentParser, fail

__all__ = ["SUBCOMMANDS", "build_parser", "main"]


def _spec_field(path: str):
    """The pydantic field at dotted ``path`` of ExperimentSpec: the one home of its default and its choices."""
    from cgc_ray.config import ExperimentSpec

    model: Any = ExperimentSpec
    *sections, leaf = path.split(".")
    for section in sections:
        model = model.model_fields[section].annotation
    return model.model_fields[leaf]


def _choices(path: str) -> tuple[str, ...]:
    """The values of the spec field's Literal (of ``tuple[Literal[...], ...]`` for a list field such as metrics)."""
    annotation = _spec_field(path).annotation
    while get_origin(annotation) is not Literal:
        annotation = get_args(annotation)[0]
    return get_args(annotation)


def _presets(args: argparse.Namespace) -> int:
    from cgc_ray.config import PRESETS, expand_trials, load_spec
    from cgc_ray.config.presets import PRESET_TABLES

    header = ("preset", "paper", "dataset", "experiment", "trials")
    rows = [header]
    for name, tree in PRESETS.items():
        spec = load_spec(tree)
        search = spec.sweep.search  # a search's trials are its budget, not its base at each replicate
        count = f"≤{search.num_samples}" if search is not None else str(len(expand_trials(spec)))
        rows.append((name, PRESET_TABLES[name], spec.data.dataset, spec.name, count))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  ".join(c.rjust(w) if i == len(header) - 1 else c.ljust(w)
                        for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    print("\nrun one: cgc-ray run --preset NAME (--dry-run: its spec and trials, nothing run); "
          "the *_demo presets need no data", file=sys.stderr)
    return 0


def _add_presets(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "presets",
        help="list the presets: the paper table each reproduces, its dataset, experiment and number of trials",
        description="Every preset of cgc_ray.config.PRESETS (cgc_ray/config/presets.py); the trial count is that of "
                    "its sweep, before any --set. Run one with `cgc-ray run --preset NAME`.",
    )
    p.set_defaults(handler=_presets)


class _Version(argparse.Action):
    """``--version``: cgc-ray's version and git commit (the results rows' ``code_version``), computed when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any):
        super().__init__(option_strings, dest, nargs=0, help="print the version (and git commit) and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from cgc_ray.results.table import code_version

        print(code_version())
        parser.exit()


def _report(args: argparse.Namespace) -> int:
    from cgc_ray.config.paths import storage_location
    from cgc_ray.results.report import load, render

    if (args.format == "html") != (args.out is not None):
        raise ValueError("--format html writes a page to --out FILE (e.g. --format html --out report.html); "
                         "--out is for --format html only")
    storage = storage_location(args.storage)
    results = load(storage, args.experiment)  # a missing storage, or a file, raises: one line, exit 2
    for line in results.left_out:  # an odd row file is named, the rest is reported
        print(f"warning: {line}", file=sys.stderr)
    if args.format == "html":
        print(_write_html(results, args.out, args.layout))
    elif args.format == "parquet" and results.groups:
        from cgc_ray.results.summary import write_summary

        for name in results.experiments:
            print(write_summary(storage, name, results.groups, results.paired))
    else:
        sys.stdout.write(render(results, "rich" if args.format == "parquet" else args.format, layout=args.layout,
                                width=args.width))
    if args.plot is not None:
        from cgc_ray.results.plots import plot_results

        for path in plot_results(results.table, args.plot):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _write_html(results, out: str, layout: str | None) -> Path:
    """The page of ``results`` at ``out``, with each experiment's heatmaps where its checkpoints were kept."""
    from cgc_ray.results.html import render_html

    panels = {}
    if results.groups:  # drawing them imports torch: only where there is something to draw
        from cgc_ray.explain.figures import report_heatmaps

        panels = {name: report_heatmaps(results.storage, name) for name in results.experiments}
    path = Path(out).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(results, heatmaps=panels, layout=layout), encoding="utf-8")
    return path


def _add_report(subparsers: argparse._SubParsersAction) -> None:
    from cgc_ray.results.report import FORMATS, LAYOUTS

    p = subparsers.add_parser(
        "report",
        help="summarise finished trials: mean±std (n) per config, paired CGC − baseline with 95%% CI",
        description="Read the Parquet results under --storage and print the paper-style tables.",
    )
    p.add_argument("--storage", default=None,
                   help="results location: a path or a pyarrow URI such as s3://bucket/prefix "
                        "(default: $CGC_RAY_STORAGE, else ./results)")
    p.add_argument("--experiment", default=None, help="only this experiment (default: all)")
    p.add_argument("--format", choices=(*FORMATS, "parquet", "html"), default="rich",
                   help="output format; parquet writes each experiment's summary table into the storage and prints "
                        "its path; html writes one self-contained page (tables, plots, heatmaps, provenance) to "
                        "--out and prints its path (default: %(default)s)")
    p.add_argument("--out", metavar="FILE", default=None, help="--format html: the page to write, e.g. report.html")
    p.add_argument("--layout", choices=LAYOUTS, default=None,
                   help="force a table layout (default: chosen from the results)")
    p.add_argument("--width", type=int, default=None, help="width of rich tables in characters (default: the terminal's)")
    p.add_argument("--plot", metavar="DIR", default=None,
                   help="also write the λ ablation, accuracy-vs-CH and few-shot gain plots (PNG) into DIR "
                        "(matplotlib, installed with cgc-ray)")
    p.set_defaults(handler=_report)


def _explain(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from cgc_ray.explain.figures import write_explain

    options: dict = {}
    root = args.data_root
    split = args.split
    if args.dataset == "synthetic":
        from cgc_ray.config import DataSpec
        from cgc_ray.data import synthetic_root

        root = root or str(synthetic_root())
        variant = "spurious" if args.where == "conflict" else args.variant
        options = DataSpec(synthetic={"variant": variant}).synthetic.model_dump()  # the spec's generator options
    elif root is None:
        raise ValueError(f"--data-root is required for --dataset {args.dataset}")
    if args.where == "conflict":
        if args.dataset != "synthetic":
            raise ValueError("--where conflict selects the conflict split of --dataset synthetic (variant spurious)")
        split = "conflict"
    out = write_explain(
        args.checkpoints, args.out, dataset=args.dataset, root=root, split=split, n=args.n, indices=args.indices,
        seed=args.seed, classes=args.classes, alpha=args.alpha, cmap=args.cmap, arch=args.arch, layer=args.layer,
        image_size=args.image_size, consistency=args.consistency, dataset_options=options, dpi=args.dpi,
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _add_explain(subparsers: argparse._SubParsersAction) -> None:
    from cgc_ray.data import DATASETS
    from cgc_ray.models import ARCHS

    p = subparsers.add_parser(
        "explain",
        help="Grad-CAM figure of checkpoints on dataset images (or the CGC consistency figure)",
        description="One column per image, one row per checkpoint: the image with its Grad-CAM overlay, the "
                    "ground-truth boxes, the class and the per-image content heatmap (CH). With --consistency: "
                    "the paper's Figure 1 (x, T(x), T(g(x)), g(T(x)) and their cosine similarity).",
    )
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="cgc-ray checkpoints or plain torchvision-layout state_dicts, one row each")
    p.add_argument("--dataset", choices=DATASETS, required=True)
    p.add_argument("--data-root", default=None,
                   help="dataset folder (default for synthetic: the cache trials generate it into)")
    p.add_argument("--split", default="test", help="split to draw images from (default: %(default)s)")
    p.add_argument("--n", type=int, default=8, help="number of images (default: %(default)s)")
    p.add_argument("--indices", type=int, nargs="+", default=None, help="explicit image indices within the split")
    p.add_argument("--seed", type=int, default=0, help="seed of the image choice and of T (default: %(default)s)")
    p.add_argument("--classes", choices=("gt", "pred"), default="gt",
                   help="explain the ground-truth class or each model's prediction (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity in [0, 1] (default: %(default)s)")
    p.add_argument("--cmap", default="inferno", help="matplotlib colormap of the heatmap (default: %(default)s)")
    p.add_argument("--arch", choices=ARCHS, default=None, help="architecture (default: read off the checkpoint)")
    p.add_argument("--layer", default=None, help="Grad-CAM layer (default: the checkpoint's, else layer4)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input size S (default: the size the first checkpoint was trained at, else the spec's)")
    p.add_argument("--variant", choices=_choices("data.synthetic.variant"),
                   default=_spec_field("data.synthetic.variant").default,
                   help="synthetic dataset variant, generated at the size the figure is drawn at (default: %(default)s)")
    p.add_argument("--where", choices=("conflict",), default=None,
                   help="conflict: the synthetic spurious variant's conflict images (background cue of a wrong class)")
    p.add_argument("--consistency", action="store_true", help="draw the consistency figure (paper Figure 1)")
    p.add_argument("--dpi", type=int, default=100, help="resolution of the PNG (default: %(default)s)")
    p.add_argument("--out", required=True, help="output PNG path")
    p.set_defaults(handler=_explain)


def _evaluate(args: argparse.Namespace) -> int:
    import json

    import torch

    from cgc_ray.config.paths import storage_location
    from cgc_ray.explain.evaluation import checkpoint_spec, evaluate_checkpoint, result_row
    from cgc_ray.results.table import write_row

    storage = storage_location(args.storage)  # resolved here, against the caller's folder, before the work
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    # the spec it is scored under: the checkpoint's recorded settings and the spec's defaults where a flag is unset
    flags = {"model.arch": args.arch, "model.layer": args.layer, "data.image_size": args.image_size,
             "data.batch_size": args.batch_size, "evaluation.ch_protocol": args.protocol,
             "evaluation.ch_short_side": args.short_side, "evaluation.saliency": args.saliency,
             "evaluation.saliency_window": args.saliency_window, "evaluation.iauc_input": args.iauc_input}
    spec = checkpoint_spec(args.checkpoint, {
        "data.dataset": args.dataset, "data.root": args.data_root, "data.eval_split": args.split,
        "data.synthetic.variant": args.synthetic_variant, "evaluation.iauc_images": args.iauc_images,
        "evaluation.iauc_protocol": args.iauc_protocol,
        "metrics": [m.strip() for m in args.metrics.split(",") if m.strip()],
        "data.num_workers": args.num_workers, "scaling.cpus_per_worker": args.num_workers + 1,
        **{path: value for path, value in flags.items() if value is not None}})
    result = evaluate_checkpoint(spec, device=device, limit=args.limit)
    row = result_row(result)
    path = write_row(storage, args.experiment, row)
    shown = {k: row[k] for k in ("trial_id", "dataset", "arch", "method", "top1", "top5", "ch", "iauc", "cgc_loss",
                                 "ch_protocol", "ch_saliency")}
    shown.update(n_eval=int(result["n_eval"]), split=args.split, written=path)
    if args.format == "json":
        print(json.dumps(shown, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table("field", "value", title=f"cgc-ray evaluate {args.checkpoint}")
        for k, v in shown.items():
            table.add_row(k, "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
        Console().print(table)
    return 0


def _experiment_name(value: str) -> str:
    """``--experiment``: a folder name under the storage (the spec's rule), checked before any work is done."""
    from cgc_ray.config.base import check_name

    try:
        return check_name("experiment name", value)
    except ValueError as e:  # argparse shows an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_evaluate(subparsers: argparse._SubParsersAction) -> None:
    from cgc_ray.data import DATASETS
    from cgc_ray.models import ARCHS

    p = subparsers.add_parser(
        "evaluate",
        help="top-1/5, CH, IAUC and held-out CGC loss of a checkpoint; writes one results row",
        description="Evaluate a cgc-ray checkpoint or a torchvision state_dict on one split of a dataset, "
        "print the row and write it to the Parquet results under --storage.",
    )
    p.add_argument("checkpoint", help="cgc-ray checkpoint, state_dict path or torchvision weights enum name")
    p.add_argument("--dataset", choices=DATASETS, required=True)
    p.add_argument("--data-root", default=None, help="dataset folder (optional for 'synthetic')")
    p.add_argument("--synthetic-variant", choices=_choices("data.synthetic.variant"),
                   default=_spec_field("data.synthetic.variant").default,
                   help="for --dataset synthetic: the generated variant, at --image-size (default: %(default)s)")
    p.add_argument("--split", default="test", help="split to evaluate (default: %(default)s)")
    p.add_argument("--arch", choices=ARCHS, default=None,
                   help="architecture (default: the one recorded in the checkpoint, else resnet18)")
    p.add_argument("--metrics", default=",".join(_choices("metrics")),
                   help="comma-separated subset of the spec's metrics (default: all, %(default)s)")
    p.add_argument("--protocol", choices=_choices("evaluation.ch_protocol"), default=None,
                   help="CH protocol (evaluation.ch_protocol): 'fast' (the default) batched centre crops at "
                   "--image-size, or 'authors' (batch 1, --short-side without crop, heatmap at the original size)")
    p.add_argument("--saliency", choices=_choices("evaluation.saliency"), default=None,
                   help="the map CH scores (evaluation.saliency): gradcam (the default, the paper's CH), or "
                   "contrastive excitation backprop 'cmwp' (Table 4) / 'mwp', at layer3")
    p.add_argument("--saliency-window", type=int, default=None,
                   help="cmwp/mwp: TorchRay's k x k stride-1 pooled head (the authors' Table 4: 7; default: the "
                   "model's own head)")
    p.add_argument("--image-size", type=int, default=None,
                   help="evaluation crop size (default: the size the checkpoint was trained at, else the spec's)")
    p.add_argument("--short-side", type=int, default=None,
                   help="--protocol authors: the short side images are resized to (default: the authors' 448)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--iauc-images", type=int, default=_spec_field("evaluation.iauc_images").default,
                   help="images scored for IAUC, a seeded sample spread over every class (default: all, as Table 2)")
    p.add_argument("--iauc-protocol", choices=_choices("evaluation.iauc_protocol"),
                   default=_spec_field("evaluation.iauc_protocol").default,
                   help="IAUC protocol: 'authors' (their script: GT-class saliency, their blur kernel, their pixel "
                        "order) or 'fast' (batched, predicted class) (default: %(default)s)")
    p.add_argument("--iauc-input", choices=_choices("evaluation.iauc_input"), default=None,
                   help="IAUC images: 'center_crop' (the default, Resize 256 + CenterCrop 224 at 224 px) or "
                        "'squash' (the whole image resized square, the authors' RISE script)")
    p.add_argument("--layer", default=None, help="Grad-CAM layer (default: the checkpoint's, else layer4)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only N images spread over the split")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--storage", default=None,
                   help="where the row is written: a path or a pyarrow URI such as s3://bucket/prefix "
                        "(default: $CGC_RAY_STORAGE, else ./results)")
    p.add_argument("--experiment", default="evaluate", type=_experiment_name,
                   help="experiment name of the row: letters, digits, _ . - (default: %(default)s)")
    p.add_argument("--format", choices=("rich", "json"), default="rich")
    p.set_defaults(handler=_evaluate)


def _add_run(subparsers: argparse._SubParsersAction) -> None:
    # listed for --help only: main() hands `run ...` to cgc_ray.cli.experiment before parsing
    subparsers.add_parser(
        "run",
        help="run every trial of a spec (YAML/JSON file or preset) on Ray; same flags as experiments/*.py",
    )


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_presets, _add_run, _add_report, _add_evaluate, _add_explain]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="cgc-ray",
        description="Contrastive Grad-CAM Consistency (CVPR 2022) experiments on Ray.",
    )
    parser.add_argument("--version", action=_Version)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cgc-ray`` script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:  # the experiment scripts' own parser takes every flag after `run`
        from cgc_ray.cli.experiment import main as run_main

        return run_main(None, argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, OSError) as e:  # SpecError, a missing dataset (with its layout), bad or unreachable storage
        return fail(e)


if __name__ == "__main__":
    sys.exit(main())
