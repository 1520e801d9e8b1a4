"""``cgc-ray`` command line: one subcommand per task.

    cgc-ray run --spec FILE | --preset NAME [--set a.b=value ...] [--storage URI] [--address auto]
    cgc-ray report [--storage URI] [--experiment NAME] [--format rich|markdown|csv|json] [--plot DIR]
    cgc-ray explain CHECKPOINT [CHECKPOINT ...] --dataset NAME [--consistency] --out FIGURE.png
    cgc-ray evaluate CHECKPOINT --dataset NAME --data-root DIR [--metrics top1,ch,iauc,cgc_loss]
                     [--protocol fast|authors]

Each subcommand is registered by an ``_add_<name>(subparsers)`` function listed
in :data:`SUBCOMMANDS`; it declares its arguments and sets ``handler``, a
function that imports what it needs when it runs. Subcommands that train or
explain (``run``, ``evaluate``, ``explain``) import torch/Ray inside their
handlers, so ``cgc-ray report`` and ``cgc-ray --help`` start without them.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

__all__ = ["SUBCOMMANDS", "build_parser", "main"]


def _report(args: argparse.Namespace) -> int:
    from cgc_ray.results.report import report

    sys.stdout.write(report(args.storage, args.experiment, args.format, layout=args.layout, width=args.width))
    if args.plot is not None:
        from cgc_ray.results.plots import plot_results

        for path in plot_results(args.storage, args.plot, experiment=args.experiment):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _add_report(subparsers: argparse._SubParsersAction) -> None:
    from cgc_ray.config import ExperimentSpec
    from cgc_ray.results.report import FORMATS, LAYOUTS

    p = subparsers.add_parser(
        "report",
        help="summarise finished trials: mean±std (n) per config, paired CGC − baseline with 95%% CI",
        description="Read the Parquet results under --storage and print the paper-style tables.",
    )
    p.add_argument("--storage", default=os.environ.get("CGC_RAY_STORAGE") or ExperimentSpec.model_fields["storage"].default,
                   help="results location: a path or a pyarrow URI such as s3://bucket/prefix "
                        "(default: $CGC_RAY_STORAGE, else %(default)s)")
    p.add_argument("--experiment", default=None, help="only this experiment (default: all)")
    p.add_argument("--format", choices=FORMATS, default="rich", help="output format (default: %(default)s)")
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
        from cgc_ray.data import synthetic_root

        root = root or str(synthetic_root())
        options = {"variant": "spurious" if args.where == "conflict" else args.variant}
        if args.image_size is not None:
            options["image_size"] = args.image_size
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
    p.add_argument("--variant", choices=("clutter", "spurious"), default="clutter",
                   help="synthetic dataset variant (default: %(default)s)")
    p.add_argument("--where", choices=("conflict",), default=None,
                   help="conflict: the synthetic spurious variant's conflict images (background cue of a wrong class)")
    p.add_argument("--consistency", action="store_true", help="draw the consistency figure (paper Figure 1)")
    p.add_argument("--dpi", type=int, default=100, help="resolution of the PNG (default: %(default)s)")
    p.add_argument("--out", required=True, help="output PNG path")
    p.set_defaults(handler=_explain)


def _evaluate(args: argparse.Namespace) -> int:
    import json

    import torch

    from cgc_ray.explain.evaluation import evaluate_checkpoint, result_row
    from cgc_ray.results.table import write_row

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    result = evaluate_checkpoint(
        args.checkpoint, args.dataset, args.data_root, args.split, arch=args.arch,
        metrics=[m.strip() for m in args.metrics.split(",") if m.strip()], protocol=args.protocol,
        image_size=args.image_size, short_side=args.short_side, batch_size=args.batch_size, device=device,
        iauc_images=args.iauc_images, iauc_protocol=args.iauc_protocol, num_workers=args.num_workers,
        layer=args.layer, limit=args.limit,
        synthetic_variant=args.synthetic_variant,
    )
    row = result_row(result)
    path = write_row(args.storage, args.experiment, row)
    shown = {k: row[k] for k in ("trial_id", "dataset", "arch", "method", "top1", "top5", "ch", "iauc", "cgc_loss")}
    shown.update(ch_protocol=result["ch_protocol"], n_eval=int(result["n_eval"]), split=args.split, written=path)
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


def _add_evaluate(subparsers: argparse._SubParsersAction) -> None:
    from cgc_ray.config import ExperimentSpec
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
    p.add_argument("--synthetic-variant", choices=("clutter", "spurious"), default="clutter",
                   help="for --dataset synthetic: the generated variant, at --image-size (default: %(default)s)")
    p.add_argument("--split", default="test", help="split to evaluate (default: %(default)s)")
    p.add_argument("--arch", choices=ARCHS, default=None,
                   help="architecture (default: the one recorded in the checkpoint, else resnet18)")
    p.add_argument("--metrics", default="top1,top5,ch,iauc,cgc_loss",
                   help="comma-separated subset of top1,top5,ch,iauc,cgc_loss (default: %(default)s)")
    p.add_argument("--protocol", choices=("fast", "authors"), default="fast",
                   help="CH protocol: 'fast' batched centre crops at --image-size, or 'authors' "
                   "(batch 1, --short-side without crop, heatmap at the original size) (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=None,
                   help="evaluation crop size (default: the size the checkpoint was trained at, else the spec's)")
    p.add_argument("--short-side", type=int, default=448, help="authors' protocol resize (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--iauc-images", type=int, default=None,
                   help="images scored for IAUC, a seeded sample spread over every class (default: all, as Table 2)")
    p.add_argument("--iauc-protocol", choices=("authors", "fast"), default="authors",
                   help="IAUC protocol: 'authors' (their script: GT-class saliency, their blur kernel, their pixel "
                        "order) or 'fast' (batched, predicted class) (default: %(default)s)")
    p.add_argument("--layer", default=None, help="Grad-CAM layer (default: the checkpoint's, else layer4)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only N images spread over the split")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--storage", default=ExperimentSpec.model_fields["storage"].default,
                   help="results location: a path or a pyarrow URI (default: %(default)s)")
    p.add_argument("--experiment", default="evaluate", help="experiment name of the row (default: %(default)s)")
    p.add_argument("--format", choices=("rich", "json"), default="rich")
    p.set_defaults(handler=_evaluate)


def _add_run(subparsers: argparse._SubParsersAction) -> None:
    # listed for --help only: main() hands `run ...` to cgc_ray.cli.experiment before parsing
    subparsers.add_parser(
        "run",
        help="run every trial of a spec (YAML/JSON file or preset) on Ray; same flags as experiments/*.py",
    )


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_run, _add_report, _add_evaluate, _add_explain]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cgc-ray",
        description="Contrastive Grad-CAM Consistency (CVPR 2022) experiments on Ray.",
    )
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
    except (ValueError, OSError) as e:  # SpecError, bad storage URIs, unreachable storage: one line, no traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"cgc-ray {args.command}: error: {first}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
