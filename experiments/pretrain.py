"""Pretraining: the backbone the fine-tuning demos start from (the paper fine-tunes ImageNet-pretrained nets).

    python experiments/pretrain.py                                   # cross-entropy on the 10 base shapes (demo)
    python experiments/pretrain.py --data-root DIR --dataset imagenet100    # ResNet50 on ImageNet-100
    python experiments/fewshot.py --set model.weights=experiment:pretrain_demo   # what the demos do

You rarely run it yourself: a spec whose model.weights is experiment:<preset or spec file> runs that
pretraining first if it has not run in the same storage yet, and fine-tunes from its checkpoint (on a cluster
too: the checkpoint is read from the storage, e.g. s3://). Flags as every experiment script
(cgc_ray/cli/experiment.py).
"""

import sys

from cgc_ray.cli.experiment import main

if __name__ == "__main__":
    sys.exit(main("pretrain", description=__doc__))
