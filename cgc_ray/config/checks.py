"""The spec against the data on disk: is the dataset where the spec says, and can the sweep run on it.

Called on the driver before any trial starts (where the data is visible there)
and by every trial on the node that reads the data. Dataset facts come from
the registry (``cgc_ray.data.registry``), their one home. A data root given as
a URI is checked in its staged copy, on the node that staged it
(``cgc_ray.data.staging``); the driver checks only that the URI exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from cgc_ray.config.base import SpecError
from cgc_ray.config.paths import is_uri
from cgc_ray.config.spec import ExperimentSpec
from cgc_ray.data import registry


def splits_read(dataset: str, shots: int | None, eval_split: str | None = None) -> tuple[str, ...]:
    """The splits a trial reads: the few-shot pool, or the training and evaluation splits."""
    d = registry.info(dataset)
    if shots is not None:
        return d.fewshot_pool
    if eval_split is not None and eval_split not in d.splits:
        raise SpecError(f"data.eval_split={eval_split!r} is not a split of {dataset}; choose one of {d.splits}")
    return tuple(s for s in (d.train_split, eval_split or d.eval_split) if s is not None)


def check_data_root(spec: ExperimentSpec, staged: Mapping[str, str] | None = None) -> None:
    """Fail before any trial starts if ``data.root`` cannot hold the dataset.

    Raises SpecError with the expected layout when a real dataset has no root,
    when the root is missing, or when entries the trial's splits read are
    absent. Checks every dataset, root and shot setting a sweep reaches.
    ``staged``: URI root -> the local folder it was staged into on this node;
    a URI root not in it is left to the node that stages it.
    """
    for dataset in _swept_values(spec, "data.dataset", spec.data.dataset):
        layout = registry.info(dataset).layout
        splits_read(dataset, None, spec.data.eval_split)  # a split the dataset has
        for root in _swept_values(spec, "data.root", spec.data.root):
            if dataset == "synthetic":
                continue
            if root is None:
                raise SpecError(
                    f"data.root is required for data.dataset={dataset!r} (only 'synthetic' is embedded); "
                    f"pass --data-root or --set data.root=PATH. Expected layout:\n{layout}"
                )
            local = (staged or {}).get(root) if is_uri(root) else root
            if local is None:
                continue
            shown = f"{root!r} (staged at {local})" if local != root else repr(root)
            if not Path(local).expanduser().is_dir():
                raise SpecError(f"data.root={shown} does not exist; expected layout for {dataset}:\n{layout}")
            for shots in _swept_values(spec, "data.shots", spec.data.shots):
                folder, missing = registry.missing_entries(dataset, local,
                                                           splits_read(dataset, shots, spec.data.eval_split))
                if missing:
                    raise SpecError(
                        f"data.root={shown} lacks {', '.join(missing)} for data.dataset={dataset!r} "
                        f"(looked in {folder}); expected layout:\n{layout}"
                    )


def data_root_uris(spec: ExperimentSpec) -> list[str]:
    """The data roots the sweep names as URIs (staged by each node that reads them)."""
    return [root for dataset in _swept_values(spec, "data.dataset", spec.data.dataset) if dataset != "synthetic"
            for root in _swept_values(spec, "data.root", spec.data.root) if root is not None and is_uri(root)]


def data_root_missing_here(spec: ExperimentSpec) -> list[str]:
    """The dataset folders the sweep names that are not on this machine (embedded data needs none).

    A URI root counts: it is on a node only once a trial there has staged it.
    """
    missing = []
    for dataset in _swept_values(spec, "data.dataset", spec.data.dataset):
        for root in _swept_values(spec, "data.root", spec.data.root):
            if dataset != "synthetic" and root is not None and (is_uri(root) or not Path(root).expanduser().is_dir()):
                missing.append(root)
    return missing


def _swept_values(spec: ExperimentSpec, path: str, current: Any) -> list[Any]:
    return list(spec.sweep.grid.get(path, [current]))


def validate_against_data(spec: ExperimentSpec, class_counts: Mapping[int, int]) -> None:
    """Check the spec against the real dataset: few-shot needs shots < images per class.

    ``class_counts``: label -> number of training images of that class. Every
    swept value of ``data.shots`` is checked.
    """
    if not class_counts:
        raise SpecError(f"data.dataset={spec.data.dataset!r} has no images: check data.root")
    smallest = min(class_counts.values())
    for shots in _swept_values(spec, "data.shots", spec.data.shots):
        if shots is None or shots < smallest:
            continue
        short = sorted(c for c, n in class_counts.items() if n <= shots)
        shown = ", ".join(f"class {c}: {class_counts[c]}" for c in short[:5])
        more = f" and {len(short) - 5} more" if len(short) > 5 else ""
        raise SpecError(
            f"data.shots={shots} leaves no validation image for {len(short)} class(es) ({shown}{more}); "
            f"few-shot takes shots images per class for training and the rest for validation, "
            f"so data.shots must be at most {smallest - 1} here"
        )


