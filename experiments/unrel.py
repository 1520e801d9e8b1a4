"""Table 3: the ImageNet models of an `imagenet` sweep scored on UnRel (top-1 and CH, baseline vs CGC by seed).

    python experiments/imagenet.py --data-root IMAGENET                 # first: train the sweep (Tables 1, 2, 5)
    python experiments/unrel.py --data-root UNREL                       # then: score its checkpoints on UnRel
    python experiments/unrel.py --data-root UNREL --set evaluation.ch_protocol=authors

Every finished trial of experiment `imagenet` (--source) in --storage is scored with its own 1000-class head (UnRel's
28 categories are ImageNet classes) and the evaluation settings it was trained with, unless --set changes them
(evaluation.* only). One row per trial goes into experiment `unrel` (--experiment); a row keeps its trial's
settings, so `cgc-ray report --experiment unrel` pairs baseline and CGC by seed, as Table 3. Re-running scores only
the trials not scored yet. Trials of another dataset (the demo's 5 classes) are left out, each with a line.
"""

import argparse
import sys
from pathlib import Path

import yaml

from cgc_ray.cli.errors import ArgumentParser, fail
from cgc_ray.config.paths import storage_location


def main(argv=None) -> int:
    p = ArgumentParser(prog="experiments/unrel.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="the UnRel folder (annotations.csv, images/)")
    p.add_argument("--storage", default=None,
                   help="results and checkpoints (default: $CGC_RAY_STORAGE, else ./results)")
    p.add_argument("--source", default="imagenet",
                   help="the experiment whose checkpoints are scored (default: %(default)s)")
    p.add_argument("--experiment", default="unrel", help="the experiment the rows go to (default: %(default)s)")
    p.add_argument("--metrics", default="top1,ch", help="comma-separated metrics (default: %(default)s, Table 3's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="evaluation.FIELD=VALUE",
                   help="score with another evaluation setting, e.g. --set evaluation.ch_protocol=authors")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = p.parse_args(argv)
    try:
        import torch

        from cgc_ray.explain.evaluation import evaluate_experiment
        from cgc_ray.results.report import report

        storage = storage_location(args.storage)  # resolved here, against the caller's folder
        settings = {"data.dataset": "unrel", "data.root": str(Path(args.data_root).expanduser().resolve()),
                    "data.eval_split": None, "metrics": [m.strip() for m in args.metrics.split(",") if m.strip()]}
        for item in args.overrides:
            path, sep, raw = item.partition("=")
            if not sep:
                raise ValueError(f"--set {item!r} must look like 'evaluation.field=value'")
            settings[path.strip()] = yaml.safe_load(raw)
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        evaluate_experiment(storage, args.source, args.experiment, settings, device=device, log=print)
        print(report(storage, args.experiment))
    except (ValueError, OSError, yaml.YAMLError) as e:  # SpecError, a missing dataset (its layout), no trials
        return fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
