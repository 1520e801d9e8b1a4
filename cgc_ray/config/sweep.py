"""The ``sweep`` section of a spec: the trials of an experiment (a grid, crossed with variants, or a search)."""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cgc_ray.config.section import Section
from cgc_ray.config.selection import SelectionSpec

# Repeats of one configuration (model init / augmentation seed, few-shot episode): they pair across methods, and
# they are the only axes a search's grid may hold (each searched point runs once per combination of them).
REPLICATE_FIELDS: frozenset[str] = frozenset({"seed", "data.episode"})

Distribution = Literal["uniform", "loguniform", "choice"]


def _not_a_sweep_path(where: str, path: str) -> None:
    if path == "sweep" or path.startswith("sweep."):
        raise ValueError(f"{where}[{path!r}]: a sweep cannot sweep over itself")


class SearchSpec(Section):
    """A search of the settings in ``space`` by a Tune search algorithm, instead of a grid of them.

    ``space``: dotted field path -> ``{"uniform": [lo, hi]}``, ``{"loguniform": [lo, hi]}`` or
    ``{"choice": [v, ...]}``; every path and bound must validate in :class:`ExperimentSpec` (checked
    when the spec is built). ``algorithm``: ``optuna_tpe`` maximises ``metric``; ``optuna_multi``
    (the default) maximises validation top-1 and CH at once (Optuna's multi-objective TPE) and finds
    their Pareto front, since a CGC setting trades one against the other. ``metric``: what
    ``optuna_tpe`` maximises and ASHA compares, ``ch`` by default: CH is what λ buys, and maximising
    top-1 alone is won by λ = 0, the baseline, which needs no search.

    The metrics are the trials' ``data.eval_split``, which a search requires to be ``val`` (the runner
    checks it): choosing settings on the reported split would leak it.

    ``num_samples``: the budget, in trials (rows), replays of earlier rows included (below). ``sweep.grid``
    beside a search may hold only replicate axes (:data:`REPLICATE_FIELDS`): each sampled point runs once
    per combination of them, the searcher learning their mean, so ``num_samples`` is a multiple of that
    count. ``scheduler``: ``asha`` stops trials early by ``metric`` at epochs ``grace_period``,
    ``grace_period * reduction_factor``, ... but never at the last epoch (their row says ``stopped``).

    A run (and a re-run after the driver was killed) first replays the experiment's rows whose settings lie in
    ``space`` (their results at once, no training) so the searcher learns from them; they count towards
    ``num_samples``.
    """

    space: dict[str, dict[Distribution, list[Any]]]
    algorithm: Literal["optuna_tpe", "optuna_multi"] = "optuna_multi"
    metric: Literal["ch", "top1"] = "ch"
    num_samples: int = Field(ge=1)
    seed: int = Field(0, ge=0)
    scheduler: Literal["none", "asha"] = "none"
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(2, ge=2)
    # the rule that picks one setting from what the search found (config.selection; experiments/lambda_search.py)
    selection: SelectionSpec = Field(default_factory=SelectionSpec)

    @field_validator("space")
    @classmethod
    def _space_well_formed(cls, space: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        if not space:
            raise ValueError("sweep.search.space is empty: give at least one field to search")
        for path, dist in space.items():
            _not_a_sweep_path("sweep.search.space", path)
            if len(dist) != 1:
                raise ValueError(f"sweep.search.space[{path!r}] = {dist}: give exactly one of uniform, loguniform, "
                                 "choice")
            (kind, values), = dist.items()
            if kind == "choice":
                canon = [json.dumps(v, sort_keys=True) for v in values]
                if not values or len(set(canon)) != len(canon):
                    raise ValueError(f"sweep.search.space[{path!r}].choice = {values}: give distinct values")
                continue
            if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                           and math.isfinite(v) for v in values) or not values[0] < values[1]:
                raise ValueError(f"sweep.search.space[{path!r}].{kind} = {values}: give [lo, hi] with lo < hi")
            if kind == "loguniform" and values[0] <= 0:
                raise ValueError(f"sweep.search.space[{path!r}].loguniform = {values}: the bounds must be > 0")
        return space

    def values_to_check(self) -> dict[str, list[Any]]:
        """Per searched path, the values that must validate in a spec: the choices, or both bounds."""
        return {path: next(iter(dist.values())) for path, dist in self.space.items()}


class SweepSpec(Section):
    """Grid axes: dotted field path -> values; trials are the Cartesian product.

    Example: ``{"method.lam": [0, 0.1], "seed": [0, 1, 2]}`` gives 6 trials.
    ``variants``: settings changed one set at a time (an ablation, one factor
    at a time), each crossed with the grid; ``{}`` is the unchanged spec.
    ``grid: {seed: [0, 1]}, variants: [{}, {method.forward: separate}]`` gives
    4 trials. Every path must exist in :class:`ExperimentSpec` and every value
    must validate there (checked when the spec is built).

    ``search`` (:class:`SearchSpec`): sample the settings instead, the grid holding only replicate axes;
    None (the default) runs the grid. It is no part of any trial's id.
    """

    grid: dict[str, list[Any]] = Field(default_factory=dict)
    variants: list[dict[str, Any]] = Field(default_factory=list)
    search: SearchSpec | None = None

    @field_validator("variants")
    @classmethod
    def _variants_well_formed(cls, variants: list[dict[str, Any]]) -> list[dict[str, Any]]:
        canon = [json.dumps(v, sort_keys=True) for v in variants]
        if len(set(canon)) != len(canon):
            raise ValueError("sweep.variants has repeated entries: each trial would run twice")
        for v in variants:
            bad = [p for p in v if p == "sweep" or p.startswith("sweep.")]
            if bad:
                raise ValueError(f"sweep.variants: {bad} cannot be swept")
        return variants

    @field_validator("grid")
    @classmethod
    def _axes_well_formed(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for path, values in grid.items():
            _not_a_sweep_path("sweep.grid", path)
            if not values:
                raise ValueError(f"sweep.grid[{path!r}] is empty: give at least one value or remove the axis")
            canon = [json.dumps(v, sort_keys=True) for v in values]
            if len(set(canon)) != len(canon):
                raise ValueError(f"sweep.grid[{path!r}] has repeated values {values}: each trial would run twice")
        return grid

    @model_validator(mode="after")
    def _search_has_replicates_only(self) -> "SweepSpec":
        if self.search is None:
            return self
        if self.variants:
            raise ValueError("sweep.variants beside sweep.search: a search samples its settings; run the variants "
                             "as a grid, or search each in its own experiment")
        others = [p for p in self.grid if p not in REPLICATE_FIELDS]
        if others:
            raise ValueError(f"sweep.grid{others} beside sweep.search: a search's grid holds only replicate axes "
                             f"{sorted(REPLICATE_FIELDS)}; search those fields (sweep.search.space) instead")
        replicates = math.prod(len(v) for v in self.grid.values())
        if self.search.num_samples % replicates:
            raise ValueError(f"sweep.search.num_samples={self.search.num_samples} is not a multiple of the "
                             f"{replicates} replicates of sweep.grid (each sampled point runs for each of them)")
        return self
