"""Tables 1, 2, 5 and 11: ImageNet baseline, CGC and CGC without negatives (top-1, top-5, CH, IAUC, CGC loss).

    python experiments/imagenet.py                               # demo scale, embedded synthetic data, this machine
    python experiments/imagenet.py --data-root DIR --arch resnet50
    ray submit cluster/gpu.yaml experiments/imagenet.py -- --address auto --data-root DIR --storage s3://BUCKET/cgc-ray --arch resnet50
    python experiments/imagenet.py --dry-run                     # the resolved spec and its trials; runs nothing

It prints the result table when its trials are done (`cgc-ray report --experiment imagenet` prints it again).
Flags shared by every experiment script: --data-root --dataset --arch --preset --spec --set --storage --address
--dry-run --no-report (see cgc_ray/cli/experiment.py). Re-running the same command skips finished trials and
resumes interrupted ones.
"""

import sys

from cgc_ray.cli.experiment import main

if __name__ == "__main__":
    sys.exit(main("imagenet", description=__doc__))
