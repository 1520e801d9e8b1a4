"""Tracking tools beside Tune's own files: ``--callback mlflow|wandb|tensorboard``, as Tune's own logger callbacks.

Each tracker is one of Tune's logger callbacks, run by the driver: it sees each trial's config (the swept
hyperparameters under their spec names, e.g. ``method.lam``, ``seed``, and ``trial_id``) and every result a
trial reports (one per epoch: loss, top-1, CH, ... at that epoch; the row's metrics at the end).

- ``mlflow``: ``MLflowLoggerCallback`` (``pip install 'cgc-ray[mlflow]'``), one MLflow run per trial in the
  MLflow experiment named after the spec's experiment. Where it writes is MLflow's own setting:
  ``$MLFLOW_TRACKING_URI`` (a server, ``databricks``, ``sqlite:///mlflow.db`` with the full ``mlflow``
  package, or ``file:///path`` with ``MLFLOW_ALLOW_FILE_STORE=true``, which MLflow 3 requires for a file store).
  The driver logs, so a file or sqlite store is on the driver's machine, whichever node trains.
- ``wandb``: ``WandbLoggerCallback`` (``pip install 'cgc-ray[wandb]'``), project ``$WANDB_PROJECT`` else
  ``cgc-ray``, grouped by experiment; ``wandb login`` or ``$WANDB_API_KEY`` first (``WANDB_MODE=offline``
  keeps it on disk).
- ``tensorboard``: ``TBXLoggerCallback``. Tune adds it by default already (with its CSV and JSON loggers,
  unless ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1``); naming it makes a missing ``tensorboardX`` an error.

Tune's own files, per trial, under ``<storage>/_ray/<experiment>/<trial id>/`` (:func:`tune_trial_dir`):
``progress.csv`` and ``result.json`` (every report), ``params.json`` (the config), TensorBoard's
``events.out.tfevents.*`` (``tensorboard --logdir <storage>/_ray/<experiment>``) and, for a failed trial,
``error.txt`` (the full traceback; the command's one-line failure message points to it).
"""

from __future__ import annotations

import os
from typing import Any, Sequence
from urllib.parse import urlsplit, urlunsplit

from cgc_ray.storage import Storage, resolve

TRACKERS = ("mlflow", "wandb", "tensorboard")
# the package each tracker imports, and the extra that installs it
_NEEDS = {"mlflow": ("mlflow", "cgc-ray[mlflow]"), "wandb": ("wandb", "cgc-ray[wandb]"),
          "tensorboard": ("tensorboardX", "tensorboardX")}
DEFAULT_WANDB_PROJECT = "cgc-ray"


class TrackingError(ValueError):
    """A tracker that is not known, or whose package is not installed."""


def check_trackers(names: Sequence[str]) -> None:
    """Fail before Ray starts: every name is a tracker and its package imports (one line naming what to install)."""
    import importlib.util

    for name in names:
        if name not in _NEEDS:
            raise TrackingError(f"--callback {name}: not a tracker; choose from {', '.join(TRACKERS)}")
        module, install = _NEEDS[name]
        if importlib.util.find_spec(module) is None:
            raise TrackingError(f"--callback {name} needs the {module!r} package: pip install '{install}'")


def tracking_callbacks(names: Sequence[str], experiment: str) -> list[Any]:
    """Tune logger callbacks for ``names`` (each at most once), new for each ``Tuner``: they hold its runs."""
    check_trackers(names)
    out = []
    for name in dict.fromkeys(names):
        if name == "mlflow":
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            # tracking_uri None: MLflow's own rule ($MLFLOW_TRACKING_URI, else its default)
            out.append(MLflowLoggerCallback(experiment_name=experiment))
        elif name == "wandb":
            from ray.air.integrations.wandb import WandbLoggerCallback

            out.append(WandbLoggerCallback(project=os.environ.get("WANDB_PROJECT") or DEFAULT_WANDB_PROJECT,
                                           group=experiment))
        else:
            from ray.tune.logger import TBXLoggerCallback

            out.append(TBXLoggerCallback())
    return out


def tune_trial_dir(storage: Storage | str, experiment: str, trial_id: str, *names: str) -> str:
    """Tune's folder of one trial (or ``names`` inside it), as a path or URI: the driver names Tune's run after
    the experiment and each trial's folder after its id (``runner.driver``), under ``Storage.ray_path``."""
    base = Storage.of(storage).ray_path
    rest = "/".join((experiment, trial_id, *names))
    parts = urlsplit(base)
    if not parts.scheme:
        return f"{base}/{rest}"
    return urlunsplit(parts._replace(path=f"{parts.path}/{rest}"))  # a URI's query stays last


def write_error_txt(storage: Storage, experiment: str, trial_id: str, text: str) -> None:
    """The traceback of a trial that ends without raising (out of retries, it reports its error for the failed
    row), written where Tune writes a raised one: ``error.txt`` in the trial's folder."""
    _, path = resolve(tune_trial_dir(storage, experiment, trial_id, "error.txt"))
    storage.write_bytes(path, text.encode())
