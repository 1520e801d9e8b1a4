"""Table 9: semi-supervised, 1% of ImageNet labelled, all of it unlabelled for the CGC term, SwAV ResNet50 init.

    python experiments/semisup.py                               # demo scale, embedded synthetic data, this machine
    python experiments/semisup.py --data-root DIR --set model.weights=swav:/path/swav_800ep_pretrain.pth.tar
    ray submit cluster/gpu.yaml experiments/semisup.py -- --address auto --data-root DIR --storage s3://BUCKET/cgc-ray --set model.weights=swav:/path/swav_800ep_pretrain.pth.tar
    python experiments/semisup.py --dry-run                     # the resolved spec and its trials; runs nothing

It prints the result table when its trials are done (`cgc-ray report --experiment semisup` prints it again).
Flags shared by every experiment script: --data-root --dataset --arch --preset --spec --set --storage --address
--dry-run --no-report (see cgc_ray/cli/experiment.py). Re-running the same command skips finished trials and
resumes interrupted ones.
"""

import sys

from cgc_ray.cli.experiment import main

if __name__ == "__main__":
    sys.exit(main("semisup", description=__doc__))
