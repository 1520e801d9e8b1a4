"""The ``method`` section of a spec: the one home of the training objective's settings.

The core maths (``cgc_ray.method.cgc``) reads a :class:`MethodSpec` as it is
(it imports no pydantic: the object is passed in), so a new CGC option is a
field here plus the code that reads it. A checkpoint records the section as
``model_dump(mode="json")`` (``cgc_ray.models.checkpoint`` reads it back).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

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

    The authors' step (``config.presets.AUTHORS_STEP`` sets these with
    ``forward="separate"``, ``view="center"``, ``anchor="authors"``;
    tests/test_authors_step.py checks it gives their loss and gradients):
    ``ce_views``: cross-entropy of the training view alone (1), or the sum over
    the training, centre and T views (3, the authors: their λ weighs CGC
    against three CE terms; needs ``view="center"``).
    ``negatives_group``: None contrasts a query with this worker's whole batch
    (with ``negatives="global"``, every worker's); N cuts each worker's batch
    into groups of N consecutive images, as the authors' DataParallel cuts it
    into GPU chunks (64 a GPU on their 4-GPU ImageNet command): each group
    runs its forwards (BatchNorm statistics), negatives and loss means alone,
    and the step's loss is the mean over groups.
    ``zero_cam``: an all-zero heatmap stays zero (similarity 0 with every
    map, ``zero``) or becomes uniform (``uniform``, the authors: every map
    m becomes m / (sum m + 1e-8) + 1e-8 before T).
    ``cam_transform``: T crops the h x w Grad-CAM straight to the compared
    size (``direct``), or the map is first upsampled bilinearly to the image
    size and T slices its box of that map (``upsampled``, the authors'; needs
    ``resolution="image"``).

    Every field but those in ``BASELINE_FIELDS`` is read by the CGC term only:
    a baseline computes the same whatever they are, so its trial id leaves
    them out (``cgc_ray.config.identity.CGC_ONLY_FIELDS``). A new field that a
    baseline reads too (a cross-entropy setting) is added to ``BASELINE_FIELDS``.
    """

    BASELINE_FIELDS: ClassVar[frozenset[str]] = frozenset({"name"})
    # Read by the ablation without negatives (cgc_no_neg) alone: the contrastive term never looks at them, so a
    # report does not name them beside a cgc configuration.
    NO_NEG_FIELDS: ClassVar[frozenset[str]] = frozenset({"no_neg_scale"})

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
    # added after trial ids existed: "legacy" is the value that computes what the code did before, which
    # identity() leaves out so earlier ids stay valid (cgc_ray.config.identity)
    ce_views: Literal[1, 3] = Field(1, json_schema_extra={"legacy": 1})
    negatives_group: int | None = Field(None, ge=2, json_schema_extra={"legacy": None})
    zero_cam: Literal["zero", "uniform"] = Field("zero", json_schema_extra={"legacy": "zero"})
    cam_transform: Literal["direct", "upsampled"] = Field("direct", json_schema_extra={"legacy": "direct"})

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"method.crop_scale must satisfy 0 < low <= high <= 1, got ({lo}, {hi})")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> MethodSpec:
        if self.ce_views == 3 and self.view != "center":
            raise ValueError("method.ce_views=3 sums cross-entropy over the training, centre and T views; "
                             f"it needs method.view='center' (got {self.view!r}), or set method.ce_views=1")
        if self.negatives_group is not None and self.negatives == "global":
            raise ValueError(f"method.negatives_group={self.negatives_group} contrasts within groups of one "
                             "worker's batch, method.negatives='global' across all workers; choose one "
                             "(negatives_group=null or negatives='local')")
        if self.cam_transform == "upsampled" and self.resolution != "image":
            raise ValueError("method.cam_transform='upsampled' upsamples heatmaps to the image size; it needs "
                             f"method.resolution='image' (got {self.resolution!r}), or set cam_transform='direct'")
        return self

    @property
    def uses_cgc(self) -> bool:
        """Whether the CGC term is trained: a CGC variant at λ = 0 trains cross-entropy only."""
        return self.name != "baseline" and self.lam > 0


# The held-out CGC-loss metric: the paper's term at the spec's defaults (τ, T, image resolution, the paper's
# anchor), on this worker's batch, the predicted class and the image itself. One yardstick for every trial,
# so baselines and every λ, τ or anchor are scored alike; it needs no labels, centre views or DDP.
HELDOUT_METRIC = MethodSpec(name="cgc", negatives="local", view="train", cam_class="pred")

IMAGENET_LOSS_RATIO = math.log(1000) / math.log(256)  # CE / L_CGC at the start, ImageNet at batch 256


def contrast_group(spec: ExperimentSpec) -> int:
    """Images a query's heatmap is contrasted with, itself included: every worker's batch with global
    negatives, else this worker's batch, or ``method.negatives_group`` of it (a full batch's groups)."""
    m = spec.method
    if m.negatives == "global":
        return spec.data.batch_size
    per_worker = spec.data.batch_size // spec.scaling.num_workers
    return per_worker if m.negatives_group is None else min(m.negatives_group, per_worker)


def effective_lam(spec: ExperimentSpec, num_classes: int) -> float:
    """``method.lam``, rescaled per ``method.lam_normalization`` for a dataset of ``num_classes`` classes.

    ``imagenet``: λ · (ln K / ln B) / (ln 1000 / ln 256), B the images a query
    is contrasted with (:func:`contrast_group`): the two loss terms start near
    ln K and ln B.
    """
    m = spec.method
    if m.lam_normalization == "none":
        return m.lam
    return m.lam * (math.log(num_classes) / math.log(contrast_group(spec))) / IMAGENET_LOSS_RATIO
