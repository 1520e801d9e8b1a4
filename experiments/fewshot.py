"""Tables 7 and 8: few-shot fine-tuning, 1/5/10 shots x 20 seeded episodes, baseline vs CGC on the same episodes.

    python experiments/fewshot.py                               # demo scale, embedded synthetic data, this machine
    python experiments/fewshot.py --data-root DIR --dataset cub200
    ray submit cluster/gpu.yaml experiments/fewshot.py -- --address auto --data-root DIR --storage s3://BUCKET/cgc-ray --dataset cub200
    python experiments/fewshot.py --dry-run                     # the resolved spec and its trials; runs nothing

It prints the result table when its trials are done (`cgc-ray report --experiment fewshot` prints it again).
Flags shared by every experiment script: --data-root --dataset --arch --preset --spec --set --storage --address
--dry-run --no-report (see cgc_ray/cli/experiment.py). Re-running the same command skips finished trials and
resumes interrupted ones.
"""

import sys

from cgc_ray.cli.experiment import main

if __name__ == "__main__":
    sys.exit(main("fewshot", description=__doc__))
