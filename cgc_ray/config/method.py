"""The ``method`` section of a spec: the one home of the training objective's settings.

The core maths (``cgc_ray.method.cgc``) reads a :class:`MethodSpec` as it is
(it imports no pydantic: the object is passed in), so a new CGC option is a
field here plus the code that reads it. A checkpoint records the section as
``model_dump(mode="json")`` (``cgc_ray.models.checkpoint`` reads it back).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, field_validator

from cgc_ray.config.section import Section

if TYPE_CHECKING:
    from cgc_ray.config.spec import ExperimentSpec


class MethodSpec(Section):
    """Training objective ``L = L_CE + lam * L_CGC``.

    ``name``: ``baseline`` (L_CE only), ``cgc`` (contrastive Grad-CAM
    consistency), ``cgc_no_neg`` (Tables 5/11 ablation: l2 between the
    positive pair only). ``resolution``: compare heatmaps at image size
    (authors) or at the h x w feature size. ``anchor``: ``paper`` compares the
    query T_i(g(x_i)) with every g(T_j(x_j)); ``authors`` reproduces the
    released code (augmented vs augmented negatives). ``negatives``: from this
    worker's batch (``local``) or gathered across DDP workers (``global``).
    ``crop_scale``: area range of the random resized crop T.

    How the term is computed, where the paper and the authors' code differ
    (docs/PAPER.md §5; docs/DESIGN.md has the measurements behind the defaults):

    ``forward``: ``joint`` runs the views through the network as one batch
    (BatchNorm normalises them together); ``separate`` runs each view on its
    own, as the authors do (BatchNorm statistics per view).
    ``view``: the image T is applied to: ``train`` the random-crop training
    view (the paper's reading: x is the training image); ``center`` a centre
    view of it (Resize + CenterCrop, the authors' code). Cross-entropy is on
    the training view either way.
    ``no_neg_scale``: the ``cgc_no_neg`` l2 term summed over pixels (``sum``)
    or averaged (``mean``, the authors' ``F.mse_loss``: ``sum`` / pixels).
    ``cam_class``: the class both heatmaps explain: ``pred`` the top-1
    prediction on x (the paper), ``label`` the ground truth (a diagnostic).
    ``lam_normalization``: ``none`` uses ``lam`` as given; ``imagenet``
    rescales it by the ratio of the two terms' starting values here to their
    ratio on ImageNet, ``(ln K / ln B) / (ln 1000 / ln 256)`` (K classes, B
    images a batch), so one λ means the same weight of CGC against CE on
    datasets of any size.

    Every field but those in ``BASELINE_FIELDS`` is read by the CGC term only:
    a baseline computes the same whatever they are, so its trial id leaves
    them out (``cgc_ray.config.identity.CGC_ONLY_FIELDS``). A new field that a
    baseline reads too (a cross-entropy setting) is added to ``BASELINE_FIELDS``.
    """

    BASELINE_FIELDS: ClassVar[frozenset[str]] = frozenset({"name"})

    name: Literal["baseline", "cgc", "cgc_no_neg"] = "cgc"
    lam: float = Field(1.0, ge=0)
    tau: float = Field(0.5, gt=0)
    resolution: Literal["image", "feature"] = "image"
    anchor: Literal["paper", "authors"] = "paper"
    negatives: Literal["local", "global"] = "local"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    forward: Literal["joint", "separate"] = "joint"
    view: Literal["train", "center"] = "train"
    no_neg_scale: Literal["sum", "mean"] = "mean"
    cam_class: Literal["pred", "label"] = "pred"
    lam_normalization: Literal["none", "imagenet"] = "none"

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"method.crop_scale must satisfy 0 < low <= high <= 1, got ({lo}, {hi})")
        return v

    @property
    def uses_cgc(self) -> bool:
        """Whether the CGC term is trained: a CGC variant at λ = 0 trains cross-entropy only."""
        return self.name != "baseline" and self.lam > 0


# The held-out CGC-loss metric: the paper's term at the spec's defaults (τ, T, image resolution, the paper's
# anchor), on this worker's batch, the predicted class and the image itself. One yardstick for every trial,
# so baselines and every λ, τ or anchor are scored alike; it needs no labels, centre views or DDP.
HELDOUT_METRIC = MethodSpec(name="cgc", negatives="local", view="train", cam_class="pred")

IMAGENET_LOSS_RATIO = math.log(1000) / math.log(256)  # CE / L_CGC at the start, ImageNet at batch 256


def effective_lam(spec: ExperimentSpec, num_classes: int) -> float:
    """``method.lam``, rescaled per ``method.lam_normalization`` for a dataset of ``num_classes`` classes.

    ``imagenet``: λ · (ln K / ln B) / (ln 1000 / ln 256), B the images a query
    is contrasted with (this worker's batch, or every worker's with global
    negatives): the two loss terms start near ln K and ln B.
    """
    m = spec.method
    if m.lam_normalization == "none":
        return m.lam
    batch = spec.data.batch_size if m.negatives == "global" else spec.data.batch_size // spec.scaling.num_workers
    return m.lam * (math.log(num_classes) / math.log(batch)) / IMAGENET_LOSS_RATIO
