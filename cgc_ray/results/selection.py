"""Choosing a setting from a search's results: the candidates, their Pareto front, the stated rule, the cost.

A candidate is one CGC configuration paired with its baseline, replicate by replicate, on the split the
search scored (``results.stats``: Δ = CGC − baseline of the same seed). The rule (``sweep.search.selection``,
:class:`cgc_ray.config.selection.SelectionSpec`): the largest mean Δ CH among the candidates with at least
``min_pairs`` pairs whose mean Δ top-1 is at least ``-tolerance`` points; ties go to the larger Δ top-1,
then to the smaller λ. None qualifies: the baseline stays.

pyarrow + scipy only (through ``results.stats``): importing this module imports neither torch nor Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from cgc_ray.config.base import canonical
from cgc_ray.results.stats import Paired, Stat

__all__ = ["Candidate", "candidates", "pareto", "select", "trial_epochs"]

# a row that trained counts its epochs; a failed row trained none that count (its row says 0)
_SPENT_STATUSES = ("finished", "stopped", "diverged")


@dataclass(frozen=True)
class Candidate:
    """One CGC configuration against its baseline: its labels and the paired Δ top-1 and Δ CH (points)."""

    labels: dict[str, Any]
    d_top1: Stat
    d_ch: Stat

    @property
    def lam(self) -> float | None:
        return self.labels.get("method.lam")

    @property
    def n(self) -> int:
        return min(self.d_top1.n, self.d_ch.n)


def candidates(paired: Iterable[Paired]) -> list[Candidate]:
    """The pairs that have both Δ top-1 and Δ CH, by λ then labels."""
    out = [Candidate(p.labels, p.stats["top1"], p.stats["ch"]) for p in paired if {"top1", "ch"} <= set(p.stats)]
    return sorted(out, key=lambda c: (c.lam is None, c.lam or 0.0, canonical(c.labels)))


def pareto(cands: Sequence[Candidate]) -> list[Candidate]:
    """The candidates no other beats in both mean Δ top-1 and mean Δ CH (ties in both: the first), by Δ CH."""
    order = sorted(range(len(cands)), key=lambda i: (-cands[i].d_ch.mean, -cands[i].d_top1.mean, i))
    front, best_top1 = [], float("-inf")
    for i in order:
        if cands[i].d_top1.mean > best_top1:
            front.append(cands[i])
            best_top1 = cands[i].d_top1.mean
    return front


def select(cands: Sequence[Candidate], *, rule: str, tolerance: float, min_pairs: int) -> Candidate | None:
    """The candidate ``rule`` picks (module docstring), or None: no candidate keeps top-1 within ``tolerance``.
    The arguments are ``SelectionSpec``'s fields, where their defaults live."""
    if rule != "max_ch_within_top1":
        raise ValueError(f"selection rule {rule!r}: the one rule is 'max_ch_within_top1'")
    eligible = [c for c in cands if c.n >= min_pairs and c.d_top1.mean >= -tolerance]
    if not eligible:
        return None
    return min(eligible, key=lambda c: (-c.d_ch.mean, -c.d_top1.mean, c.lam if c.lam is not None else 0.0))


def trial_epochs(rows: Iterable[dict[str, Any]]) -> int:
    """Epochs trained by the ``rows`` (``status``, ``epochs``): finished, stopped early or diverged."""
    return sum(int(r.get("epochs") or 0) for r in rows if (r.get("status") or "finished") in _SPENT_STATUSES)
