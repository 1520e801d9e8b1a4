"""Table 10: the lambda ablation (ResNet18 on ImageNet; lambda 0 / 0.01 / 0.1 / 0.5 / 1.0 / 2.0).

    python experiments/lambda_ablation.py                               # demo scale, embedded synthetic data, this machine
    python experiments/lambda_ablation.py --data-root DIR
    ray submit cluster/gpu.yaml experiments/lambda_ablation.py -- --address auto --data-root DIR --storage s3://BUCKET/cgc-ray
    python experiments/lambda_ablation.py --dry-run                     # the resolved spec and its trials; runs nothing

It prints the result table when its trials are done (`cgc-ray report --experiment lambda_ablation` prints it again).
Flags shared by every experiment script: --data-root --dataset --arch --preset --spec --set --storage --address
--dry-run --no-report (see cgc_ray/cli/experiment.py). Re-running the same command skips finished trials and
resumes interrupted ones.
"""

import sys

from cgc_ray.cli.experiment import main

if __name__ == "__main__":
    sys.exit(main("lambda_ablation", description=__doc__))
