"""``cgc-ray`` command line: one subcommand per task.

    cgc-ray report [--storage URI] [--experiment NAME] [--format rich|markdown|csv|json]

Each subcommand is registered by an ``_add_<name>(subparsers)`` function listed
in :data:`SUBCOMMANDS`; it declares its arguments and sets ``handler``, a
function that imports what it needs when it runs. Subcommands that train or
explain (``run``, ``evaluate``, ``explain``) import torch/Ray inside their
handlers, so ``cgc-ray report`` and ``cgc-ray --help`` start without them.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

__all__ = ["SUBCOMMANDS", "build_parser", "main"]


def _report(args: argparse.Namespace) -> int:
    from cgc_ray.report import report

    sys.stdout.write(report(args.storage, args.experiment, args.format, layout=args.layout, width=args.width))
    return 0


def _add_report(subparsers: argparse._SubParsersAction) -> None:
    from cgc_ray.report import FORMATS
    from cgc_ray.spec import ExperimentSpec

    p = subparsers.add_parser(
        "report",
        help="summarise finished trials: mean±std (n) per config, paired CGC − baseline with 95%% CI",
        description="Read the Parquet results under --storage and print the paper-style tables.",
    )
    p.add_argument("--storage", default=ExperimentSpec.model_fields["storage"].default,
                   help="results location: a path or a pyarrow URI such as s3://bucket/prefix (default: %(default)s)")
    p.add_argument("--experiment", default=None, help="only this experiment (default: all)")
    p.add_argument("--format", choices=FORMATS, default="rich", help="output format (default: %(default)s)")
    p.add_argument("--layout", choices=("lambda", "fewshot", "methods"), default=None,
                   help="force a table layout (default: chosen from the results)")
    p.add_argument("--width", type=int, default=160, help="width of rich tables in characters")
    p.set_defaults(handler=_report)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_report]


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
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as e:  # SpecError and bad storage URIs: a message, not a traceback
        print(f"cgc-ray {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
