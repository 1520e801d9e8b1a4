"""The Contrastive Grad-CAM Consistency loss (Pillai et al., CVPR 2022, eq. 2).

For query i of a batch of n, with q_i = T_i(g(x_i)) (the transformed heatmap of
the original image) and k_j = g(T_j(x_j)) (the heatmap of the transformed
image):

    L_i = -log( exp(sim(q_i, k_i) / tau) / sum_j exp(sim(q_i, k_j) / tau) )

sim is the cosine similarity of the flattened maps; the loss is the mean over
queries. ``anchor="authors"`` reproduces UCDvision/CGC instead: the query is
k_i, its positive q_i and its negatives the other k_j (j != i).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Anchor = Literal["paper", "authors"]


def _validate(q: Tensor, k: Tensor, tau: float, negatives: bool) -> None:
    if not tau > 0 or not math.isfinite(tau):
        raise ValueError(f"tau must be a positive finite temperature, got tau={tau}")
    if q.shape != k.shape:
        raise ValueError(f"cam_aug {tuple(k.shape)} and cam_orig_transformed {tuple(q.shape)} must have one shape")
    if q.dim() < 2:
        raise ValueError(f"expected a batch of heatmaps B x h x w, got shape {tuple(q.shape)}")
    if negatives and q.shape[0] < 2:
        raise ValueError(
            f"the contrastive CGC loss needs a batch of at least 2 (negatives), got {q.shape[0]}; "
            "raise the batch size or use negatives=False"
        )


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient of each part and returns this rank's.

    Equal per-rank batch sizes (the DistributedSampler's drop_last). Written
    out because ``torch.distributed.nn.functional.all_gather`` is deprecated
    and aborted gloo processes at exit here (SIGABRT, about one run in three).
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, ...]:
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> Tensor:
        import torch.distributed as dist

        g = torch.stack(grads)  # world x B x D
        dist.all_reduce(g)
        return g[dist.get_rank()]


def _gather_with_grad(k: Tensor) -> tuple[Tensor, int]:
    """All ranks' keys (N_total x D), differentiable, and this rank's offset."""
    import torch.distributed as dist

    parts = _GatherWithGrad.apply(k)
    rank = dist.get_rank()
    offset = sum(p.shape[0] for p in parts[:rank])
    return torch.cat(parts, dim=0), offset


def cgc_loss(
    cam_aug: Tensor,
    cam_orig_transformed: Tensor,
    *,
    tau: float = 0.5,
    negatives: bool = True,
    anchor: Anchor = "paper",
    global_negatives: bool = False,
    l2_reduction: Literal["sum", "mean"] = "sum",
) -> Tensor:
    """Scalar CGC loss.

    cam_aug:              B x h x w, k_j = g(T_j(x_j)), heatmaps of the transformed images.
    cam_orig_transformed: B x h x w, q_i = T_i(g(x_i)), transformed heatmaps of the originals.
    negatives=False:      the paper's ablation: the squared l2 distance between the
                          l2-normalised positive maps, summed over pixels (= 2 - 2 cos,
                          ``l2_reduction="sum"``) or averaged over them (``"mean"``: the
                          authors' ``F.mse_loss``, smaller by the number of pixels);
                          mean over the batch.
    global_negatives:     with torch.distributed initialised, the keys of every rank
                          are negatives too (the authors use each GPU's chunk only).
    An all-zero map has similarity 0 with everything (it contributes log(n)).
    """
    _validate(cam_orig_transformed, cam_aug, tau, negatives)
    if anchor not in ("paper", "authors"):
        raise ValueError(f"anchor must be 'paper' or 'authors', got {anchor!r}")
    q = F.normalize(cam_orig_transformed.flatten(1).float(), dim=1)  # B x D
    k = F.normalize(cam_aug.flatten(1).float(), dim=1)  # B x D
    if not negatives:
        if l2_reduction not in ("sum", "mean"):
            raise ValueError(f"l2_reduction must be 'sum' or 'mean', got {l2_reduction!r}")
        sq = (q - k).pow(2)  # B x D
        return (sq.sum(dim=1) if l2_reduction == "sum" else sq.mean(dim=1)).mean()
    B = q.shape[0]
    keys, offset = _gather_with_grad(k) if global_negatives else (k, 0)  # N x D
    if anchor == "paper":
        logits = q @ keys.T / tau  # B x N
    else:
        logits = k @ keys.T  # B x N, row i: sim(k_i, k_j)
        pos = (k * q).sum(dim=1)  # B
        cols = torch.arange(B, device=k.device) + offset
        logits = logits.scatter(1, cols[:, None], pos[:, None]) / tau
    labels = torch.arange(B, device=q.device) + offset
    return F.cross_entropy(logits, labels)
