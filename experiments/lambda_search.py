"""λ chosen by a search on the validation split, then checked on the test split.

    python experiments/lambda_search.py                    # demo scale, embedded data: search, pick, test
    python experiments/lambda_search.py --compare-grid     # also the grid λ ∈ {0.1, 0.25, 0.5, 1} × the same 3 seeds
    python experiments/lambda_search.py --dry-run          # the specs and their trials; runs nothing
    python experiments/lambda_search.py --spec my_search.yaml --data-root DIR   # your data: a spec with sweep.search

The demo (preset lambda_search_demo) fine-tunes the demos' pretrained backbone on the 5 novel shapes for 10
epochs, as the fine-grained demo does (its first run pretrains the backbone once), scored on the validation split
(150 images per class). It searches λ ∈ [0.02, 2] (log-uniform, Optuna's multi-objective TPE over top-1 and CH)
with a budget of 12 trials (4 points × seeds 0-2), ASHA stopping trials by validation CH at epochs 2 and 6. It
then prints the accuracy-versus-CH front the search found, paired with the baseline (λ = 0, same seeds and
split), picks by sweep.search.selection (the largest Δ CH whose paired validation top-1 is within `tolerance`
points of the baseline's; default 1), re-runs the pick and the baseline on the test split with the same seeds
(experiment lambda_search_test) and reports them as every table does, and says how many trial-epochs the search
spent beside what the grid would cost. Re-running the command skips finished trials; the search continues where it
was (the searcher re-learns the finished rows, they count towards the budget). Flags as every experiment script
(cgc_ray/cli/experiment.py), and --compare-grid.

Wall time: see the README, "Choosing λ by a search".
"""

import sys

from cgc_ray.cli.lambda_search import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
