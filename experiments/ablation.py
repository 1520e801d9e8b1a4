"""Where CGC's accuracy goes at demo scale: one factor at a time against the demo's CGC, paired by seed.

    python experiments/ablation.py                       # the three demo sweeps below, ~1.7 h on 2 CPU cores
    python experiments/ablation.py --preset ablation_demo --set "sweep.grid.seed=[0, 1]"
    python experiments/ablation.py --dry-run             # the three specs and their trials; runs nothing

Scored on the synthetic set's validation split (data.eval_split=val), so the demo's defaults are chosen
without looking at the test split the README's tables report. The presets (cgc_ray/config/presets.py):
ablation_demo (5 seeds: the BatchNorm treatment, the view T is applied to, λ, training length, a λ
normalised to ImageNet's loss ratio, the authors' three CE views alone and their whole step, each at
λ 0.5 and 1), ablation_more_demo (2 seeds: T's crop scale, CAM resolution, τ, the CAM's class) and ablation_base_demo (2 seeds: raw and normalised λ on the 10 base classes). Every sweep
writes to the experiment "ablation", whose table is printed at the end (`cgc-ray report --experiment ablation`
prints it again); flags as every experiment script (cgc_ray/cli/experiment.py).
"""

import sys

from cgc_ray.cli.experiment import main

PRESETS = ("ablation_demo", "ablation_more_demo", "ablation_base_demo")

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--preset" in argv or "--spec" in argv:
        sys.exit(main("ablation", argv, description=__doc__))
    codes = [main("ablation", ["--preset", p, *argv, *(["--no-report"] if p != PRESETS[-1] else [])],
                  description=__doc__) for p in PRESETS]
    sys.exit(max(codes))
