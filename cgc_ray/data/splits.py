"""Few-shot episodes and labelled/unlabelled splits over ImageRecords."""
from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from .formats import ImageRecord


def _by_class(records: Sequence[ImageRecord]) -> dict[int, list[int]]:
    """label -> indices into `records`, each list sorted by path so the result ignores input order."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[r.label].append(i)
    return {lab: sorted(idx, key=lambda i: records[i].path) for lab, idx in sorted(groups.items())}


def episode(records: Sequence[ImageRecord], shots: int, seed: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Few-shot episode: `shots` images per class for training, the rest of each class for validation.

    Deterministic in (the set of records, shots, seed), so baseline and CGC
    trained with the same seed see the same episode. Both lists keep the input order.
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    chosen: set[int] = set()
    rng = random.Random(seed)
    for label, idx in _by_class(records).items():
        if len(idx) <= shots:
            raise ValueError(
                f"class {label} has {len(idx)} images but a {shots}-shot episode needs at least {shots + 1} "
                "(shots for training plus one for validation)"
            )
        chosen.update(rng.sample(idx, shots))
    train = [r for i, r in enumerate(records) if i in chosen]
    val = [r for i, r in enumerate(records) if i not in chosen]
    return train, val


def _listed_indices(records: Sequence[ImageRecord], list_file: str | Path) -> set[int]:
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"split list {list_file} does not exist (one image file name or relative path a line)")
    wanted = [line.strip().strip("/") for line in open(list_file, encoding="utf-8") if line.strip()]
    tails: dict[int, dict[str, int]] = {}  # number of path parts -> {last parts joined: record index}
    found: set[int] = set()
    missing, ambiguous = [], []
    for w in wanted:
        k = w.count("/") + 1
        if k not in tails:
            tails[k] = {}
            for i, r in enumerate(records):
                tail = "/".join(Path(r.path).parts[-k:])
                tails[k][tail] = -1 if tail in tails[k] else i  # -1: several records end this way
        i = tails[k].get(w)
        if i is None:
            missing.append(w)
        elif i < 0:
            ambiguous.append(w)
        else:
            found.add(i)
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(wanted)} images listed in {list_file} are not in the dataset, e.g. {missing[:5]}"
        )
    if ambiguous:
        raise ValueError(
            f"{len(ambiguous)} lines of {list_file} match several images, e.g. {ambiguous[:5]}; "
            "write them as paths with their parent folder (class/file)"
        )
    return found


def select_listed(records: Sequence[ImageRecord], list_file: str | Path) -> list[ImageRecord]:
    """The records named in `list_file` (one image a line, e.g. SimCLR's 1percent.txt), in input order.

    A line is matched against the last path components of each record
    ("n01440764_10026.JPEG" or "n01440764/n01440764_10026.JPEG").
    Every line must match a record.
    """
    found = _listed_indices(records, list_file)
    return [r for i, r in enumerate(records) if i in found]


def percent_split(
    records: Sequence[ImageRecord], percent: float, seed: int, list_file: str | Path | None = None
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(labelled, unlabelled): a disjoint partition of `records`.

    With `list_file` (the standard ImageNet 1% list, 12,811 images) the
    labelled part is exactly the listed images; otherwise round(percent% of
    each class), at least one per class, drawn with `seed`. The paper's
    semi-supervised run uses all of train as unlabelled data: pass `records`
    itself for that, not the second element.
    """
    if list_file is not None:
        chosen = _listed_indices(records, list_file)
    elif not 0 < percent <= 100:
        raise ValueError(f"percent must be in (0, 100], got {percent}")
    else:
        rng = random.Random(seed)
        chosen = set()
        for idx in _by_class(records).values():
            chosen.update(rng.sample(idx, max(1, round(len(idx) * percent / 100))))
    return (
        [r for i, r in enumerate(records) if i in chosen],
        [r for i, r in enumerate(records) if i not in chosen],
    )
