"""Table 6: fine-grained classification with full data, 3 trials per dataset, ImageNet-pretrained ResNet50.

    python experiments/finegrained.py                               # demo scale, embedded synthetic data, this machine
    python experiments/finegrained.py --data-root DIR --dataset cub200
    ray submit cluster/gpu.yaml experiments/finegrained.py -- --address auto --data-root DIR --storage s3://BUCKET/cgc-ray --dataset cub200
    python experiments/finegrained.py --dry-run                     # the resolved spec and its trials; runs nothing

It prints the result table when its trials are done (`cgc-ray report --experiment finegrained` prints it again).
Flags shared by every experiment script: --data-root --dataset --arch --preset --spec --set --storage --address
--dry-run --no-report (see cgc_ray/cli/experiment.py). Re-running the same command skips finished trials and
resumes interrupted ones.
"""

import sys

from cgc_ray.cli.experiment import main

if __name__ == "__main__":
    sys.exit(main("finegrained", description=__doc__))
