"""Command lines: ``main`` (``cgc-ray run | report | evaluate | explain``) and ``experiment`` (the flags every
script in ``experiments/`` shares). Heavy imports happen inside the handlers."""
