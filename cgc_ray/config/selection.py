"""``sweep.search.selection``: the stated rule that picks one setting from what a search found.

The rule reads the paired CGC − baseline differences on the validation split (``results.stats``: the same
seeds, one baseline) and is applied by :func:`cgc_ray.results.selection.select`, after the search, outside
the driver. Like the rest of ``sweep.search``, it is no part of any trial's id.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cgc_ray.config.section import Section


class SelectionSpec(Section):
    """``max_ch_within_top1``: the largest paired Δ CH among the settings whose paired Δ top-1 is at least
    ``-tolerance`` points (top-1 within ``tolerance`` points of the baseline's, or above it), counting only
    settings with at least ``min_pairs`` replicates finished in both (an ASHA-stopped replicate is no pair).
    None qualifies: keep the baseline."""

    rule: Literal["max_ch_within_top1"] = "max_ch_within_top1"
    tolerance: float = Field(1.0, ge=0)  # points of top-1; one point: a cost a paper would call none
    min_pairs: int = Field(2, ge=1)
