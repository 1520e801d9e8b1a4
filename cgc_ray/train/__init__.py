"""Training in plain PyTorch: the loops (``engine``), SGD and its schedule (``optim``), and one trial from a
resolved spec (``trial``). No Ray: the runner calls ``trial.run_trial``."""
