"""The ``sweep`` section of a spec: the trials of an experiment (a grid, crossed with variants)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field, field_validator

from cgc_ray.config.section import Section


class SweepSpec(Section):
    """Grid axes: dotted field path -> values; trials are the Cartesian product.

    Example: ``{"method.lam": [0, 0.1], "seed": [0, 1, 2]}`` gives 6 trials.
    ``variants``: settings changed one set at a time (an ablation, one factor
    at a time), each crossed with the grid; ``{}`` is the unchanged spec.
    ``grid: {seed: [0, 1]}, variants: [{}, {method.forward: separate}]`` gives
    4 trials. Every path must exist in :class:`ExperimentSpec` and every value
    must validate there (checked when the spec is built).
    """

    grid: dict[str, list[Any]] = Field(default_factory=dict)
    variants: list[dict[str, Any]] = Field(default_factory=list)

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
            if path == "sweep" or path.startswith("sweep."):
                raise ValueError(f"sweep.grid[{path!r}]: a sweep cannot sweep over itself")
            if not values:
                raise ValueError(f"sweep.grid[{path!r}] is empty: give at least one value or remove the axis")
            canon = [json.dumps(v, sort_keys=True) for v in values]
            if len(set(canon)) != len(canon):
                raise ValueError(f"sweep.grid[{path!r}] has repeated values {values}: each trial would run twice")
        return grid
