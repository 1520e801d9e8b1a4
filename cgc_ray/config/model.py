"""The ``model`` section of a spec: the classifier and the layer Grad-CAM explains."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from cgc_ray.config.base import WeightsRef
from cgc_ray.config.section import Section
from cgc_ray.models.archs import ARCHS

ArchName = Literal[ARCHS]
TV_WEIGHTS_RE = re.compile(r"^ResNet(\d+)_Weights\.\w+\Z")  # \Z: "$" also matches before a final newline


class ModelSpec(Section):
    """The classifier f and the layer whose activation A Grad-CAM explains.

    ``weights``: None (random init), a torchvision enum name such as
    ``"ResNet50_Weights.IMAGENET1K_V1"``, a local state_dict path,
    ``"swav:/path/to/swav_800ep_pretrain.pth.tar"`` or a cgc-ray checkpoint.
    """

    arch: ArchName = "resnet18"
    weights: WeightsRef | None = None
    layer: str = Field("layer4", pattern=r"^[A-Za-z_][\w.]*$")

    @model_validator(mode="after")
    def _weights_match_arch(self) -> "ModelSpec":
        m = TV_WEIGHTS_RE.match(self.weights or "")
        if m and f"resnet{m.group(1)}" != self.arch:
            raise ValueError(
                f"model.weights={self.weights!r} are for resnet{m.group(1)} but model.arch={self.arch!r}; "
                f"use ResNet{self.arch.removeprefix('resnet')}_Weights.* or change model.arch"
            )
        return self
