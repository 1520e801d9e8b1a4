"""The base of every section of a spec: frozen, and unknown keys are an error that lists the valid ones."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
