"""An independent re-implementation of ONE training step of the authors' code (UCDvision/CGC, a66d872).

Test-only. It imports torch and nothing of cgc_ray, so it shares no code with
the product; the product's "authors" profile is checked against it. Written
from reading the authors' files, not copied from them.

What one step of ``train_eval_cgc.py`` computes (batch B, ``nn.DataParallel``
over G GPUs). File references are to the authors' repository.

 1. Data (``datasets/imagefolder_cgc_ssl.py``, ``DatasetFolder.__getitem__``), per image:
    a. ``xe_sample``: RandomResizedCrop(224) + RandomHorizontalFlip of the raw image
       (the ordinary ImageNet training view; call it the RRC view, ``x_rrc``).
    b. ``sample``: Resize(256) + CenterCrop(224) (the centre view, ``x_center``).
    c. ``i, j, h, w`` = ``RandomResizedCrop.get_params(sample, scale=(0.08, 1), ratio=(3/4, 4/3))``:
       top row, left column, height, width in pixels of the 224 x 224 centre view.
    d. ``aug_sample`` = ``resized_crop(sample, i, j, h, w, size=(224, 224))`` with PIL
       (bilinear, antialiased when shrinking): rows i..i+h-1, columns j..j+w-1.
    e. with probability 0.5 ``hor_flip = True`` and a ``RandomHorizontalFlip()`` is applied,
       which itself flips only with p 0.5 (their defect: the image is flipped in 1/4 of the
       cases, the heatmap in 1/2). Here the caller passes ``x_aug`` to reproduce any of that;
       by default ``x_aug`` is made with the same crop/resize/flip as the heatmaps (step 6).
    f. all three views: ToTensor + ImageNet Normalize. The loader returns
       (xe, centre, aug, i, j, h, w, hor_flip, label); no ``drop_last``.
 2. ``train_eval_cgc.py``, ``train``: ``model.train()``; ``model(...)`` is a
    DataParallel call, so the batch is cut by ``tensor.chunk(G)`` into consecutive chunks
    of ceil(B / G) images (the last one smaller, fewer chunks if B is small). Each chunk
    runs steps 3-8 on its own GPU, alone: BatchNorm statistics and negatives are per chunk.
    Only the replica on GPU 0 writes its BatchNorm running statistics back to the model.
 3. ``models/resnet_multigpu_cgc.py``, ``ResNet.forward``, three train-mode forwards
    (``forward_vanilla``: conv1, bn1, relu, maxpool, layer1-4 -> A, avgpool, flatten, fc), in
    this order: the RRC view (logits only), the centre view (logits and A = layer4 output),
    the augmented view (logits and A). Each uses its own chunk's batch statistics.
 4. The class t = argmax of the CENTRE view's logits (numpy argmax through a CPU copy, first
    index on ties). It is used for both heatmaps; no gradient flows through it.
 5. ``models/utils.py``, ``compute_gradcam``: ``autograd.grad(sum_b y_b[t_b], A,
    create_graph=True, retain_graph=True)`` then ``ReLU(sum_k dA_k * A_k)`` (B x h x w): the
    gradient times the activation, summed over channels, NOT the spatially-averaged alpha_k.
    For a GAP + linear head dy_t/dA_k,ij = W[t,k] / (h w), so both equal ReLU(W[t].A) / (h w).
    ``compute_gradcam_mask``: ``F.interpolate(size=224, mode='bilinear')`` (align_corners
    unset = False, no antialias), ``.squeeze()`` (a chunk of one image crashes here), then
    m / (m.sum() + 1e-8) + 1e-8 per map: an all-zero map becomes the uniform 1e-8.
 6. ``models/utils.py``, ``perform_gradcam_aug``, a Python loop over the chunk on the
    normalised 224 x 224 centre map: slice rows i:i+h, columns j:j+w; ``F.interpolate`` the
    slice to 224 (bilinear, align_corners False: so edge pixels of an enlarged crop repeat the
    crop's own border, never read outside it); ``flip(-1)`` if ``hor_flip``. No renormalisation.
 7. Both maps are flattened (B x 224^2) and divided by their l2 norm (no epsilon).
    CGC loss (``ResNet.forward`` + ``NCESoftmaxLoss`` in ``train_eval_cgc.py``), a = aug map,
    o = transformed centre map: row b = [a_b.o_b, a_b.a_j for j != b in order] / tau, cross
    entropy with label 0, mean over the chunk. The negatives are the OTHER AUGMENTED maps
    (not the paper's eq. 2, whose query o_b meets every a_j).
    ``--disable_contrast`` path (``train_eval_gc_l2_no_contrast_baseline.py``):
    ``F.mse_loss(a, o)`` of the l2-normalised maps, a mean over chunk x 224^2 entries,
    i.e. (2 - 2 cos) / 224^2 averaged over the chunk.
 8. xe = CE(rrc) + CE(centre) + CE(aug), each ``nn.CrossEntropyLoss`` (mean over the
    chunk) with the true labels.
 9. DataParallel gathers one xe and one CGC value per chunk; ``.mean()`` over chunks (an
    unweighted mean of chunk means); loss = xe + lambda * cgc; one ``backward``. Their
    argparse defaults are ``-t 0.01`` and ``--lambda 1000`` in both scripts; the README's
    ImageNet ResNet50 command passes ``--lambda 0.5 -t 0.5``.

Choices where their code leaves room (each a parameter or stated here):
 - group_size: consecutive groups of ``group_size`` images, the last one the remainder;
   ``dataparallel_group_size(B, G)`` gives their chunk size. A group of one raises
   ValueError (their code crashes). ``None`` = one group.
 - map size: they hard-code 224, their input size; here the centre view's own H x W.
 - x_aug: theirs comes from PIL; without ``x_aug`` this module crops/resizes/flips the
   centre tensor exactly as it does the heatmap (bilinear, align_corners False, no antialias).
 - BatchNorm running statistics end as after group 0's three forwards (GPU 0's replica).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-8  # models/utils.py, compute_gradcam_mask


class AuthorsLoss(NamedTuple):
    total: Tensor  # xent + lam * cgc
    xent: Tensor  # mean over groups of CE(rrc) + CE(centre) + CE(aug)
    cgc: Tensor  # mean over groups of the contrastive (or mse) term


def dataparallel_group_size(batch: int, n_gpus: int) -> int:
    """Chunk size of ``tensor.chunk(n_gpus)``, which DataParallel uses to scatter a batch."""
    return math.ceil(batch / n_gpus)


def pixel_boxes(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """(x1, y1, x2, y2) boxes normalised to [0, 1] (B x 4) -> the authors' (i, j, h, w) pixels (B x 4, long).

    i = top row, j = left column, h = height, w = width of an H x W image.
    """
    H, W = size
    x1, y1, x2, y2 = (boxes.double() * boxes.new_tensor([W, H, W, H], dtype=torch.float64)).round().long().unbind(1)
    return torch.stack([y1, x1, y2 - y1, x2 - x1], dim=1)


def forward_with_features(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(logits B x K, layer4 activation B x C x h x w) of a torchvision-shaped ResNet (forward_vanilla)."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    A = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    return model.fc(torch.flatten(model.avgpool(A), 1)), A


def authors_cam(logits: Tensor, A: Tensor, t: Tensor) -> Tensor:
    """ReLU(sum_k dy_t/dA_k * A_k), B x h x w, differentiable (create_graph)."""
    score = logits.gather(1, t[:, None]).sum()
    (dA,) = torch.autograd.grad(score, A, create_graph=True, retain_graph=True)  # B x C x h x w
    return F.relu((dA * A).sum(dim=1))


def upsample_normalise(cam: Tensor, size: tuple[int, int]) -> Tensor:
    """B x h x w -> B x H x W: bilinear upsampling, then m / (sum m + 1e-8) + 1e-8."""
    m = F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return m / (m.sum(dim=(1, 2), keepdim=True) + EPS) + EPS


def crop_resize_flip(x: Tensor, crop_boxes: Tensor, flips: Tensor, size: tuple[int, int]) -> Tensor:
    """Per item: slice rows i:i+h, cols j:j+w, bilinear resize to ``size``, mirror if flipped.

    x: B x H x W maps or B x C x H x W images; crop_boxes B x 4 (i, j, h, w); flips B bool.
    """
    out = []
    for b in range(x.shape[0]):  # one item at a time, as their perform_gradcam_aug
        i, j, h, w = (int(v) for v in crop_boxes[b])
        if h < 1 or w < 1 or i < 0 or j < 0 or i + h > x.shape[-2] or j + w > x.shape[-1]:
            raise ValueError(f"crop box (i, j, h, w)={(i, j, h, w)} of item {b} is empty or leaves the "
                             f"{tuple(x.shape[-2:])} map; pass pixel boxes inside it (see pixel_boxes)")
        patch = x[b, ..., i:i + h, j:j + w]
        patch = patch[None, None] if x.dim() == 3 else patch[None]
        patch = F.interpolate(patch, size=size, mode="bilinear", align_corners=False)[0]
        patch = patch[0] if x.dim() == 3 else patch
        out.append(patch.flip(-1) if bool(flips[b]) else patch)
    return torch.stack(out)


def cgc_authors(aug_maps: Tensor, orig_aug_maps: Tensor, tau: float, negatives: bool = True) -> Tensor:
    """Their CGC term of one group from the aug maps a and transformed centre maps o (B x H x W each).

    negatives: CE over [a_b.o_b | a_b.a_j, j != b] / tau, label 0, mean over b.
    Else F.mse_loss of the l2-normalised maps (mean over B x H*W entries).
    """
    a = aug_maps.flatten(1)
    a = a / a.norm(dim=1, keepdim=True)  # B x D
    o = orig_aug_maps.flatten(1)
    o = o / o.norm(dim=1, keepdim=True)  # B x D
    if not negatives:
        return F.mse_loss(a, o)
    B = a.shape[0]
    pos = (a * o).sum(dim=1, keepdim=True)  # B x 1
    off_diag = ~torch.eye(B, dtype=torch.bool, device=a.device)
    neg = (a @ a.T)[off_diag].view(B, B - 1)  # B x (B-1), row b: a_b.a_j for j != b
    logits = torch.cat([pos, neg], dim=1) / tau  # B x B
    return F.cross_entropy(logits, torch.zeros(B, dtype=torch.long, device=a.device))


def group_step(model: nn.Module, x_rrc: Tensor, x_center: Tensor, x_aug: Tensor, crop_boxes: Tensor,
               flips: Tensor, labels: Tensor, *, tau: float, negatives: bool) -> tuple[Tensor, Tensor]:
    """(xent, cgc) of one DataParallel chunk: steps 3-8 of the module docstring."""
    if x_center.shape[0] < 2:
        raise ValueError(f"a group of {x_center.shape[0]} image: the authors' step needs >= 2 per GPU chunk "
                         "(their .squeeze() breaks on one); choose a group_size that leaves no group of one")
    size = tuple(x_center.shape[-2:])
    logits_rrc, _ = forward_with_features(model, x_rrc)
    logits_c, A_c = forward_with_features(model, x_center)
    t = logits_c.detach().argmax(dim=1)  # B, the centre view's top-1
    g_c = upsample_normalise(authors_cam(logits_c, A_c, t), size)  # B x H x W
    logits_a, A_a = forward_with_features(model, x_aug)
    g_a = upsample_normalise(authors_cam(logits_a, A_a, t), size)  # B x H x W
    g_c_t = crop_resize_flip(g_c, crop_boxes, flips, size)  # T(g(centre)), B x H x W
    xent = sum(F.cross_entropy(z, labels) for z in (logits_rrc, logits_c, logits_a))
    return xent, cgc_authors(g_a, g_c_t, tau, negatives)


def authors_step(model: nn.Module, x_rrc: Tensor, x_center: Tensor, crop_boxes: Tensor, flips: Tensor,
                 labels: Tensor, *, lam: float, tau: float, group_size: int | None = None,
                 negatives: bool = True, x_aug: Tensor | None = None) -> AuthorsLoss:
    """The authors' loss for one batch; call ``.total.backward()`` for their parameter gradients.

    x_rrc, x_center: B x 3 x H x W; crop_boxes: B x 4 long (i, j, h, w) pixels of x_center;
    flips: B bool; labels: B long. x_aug: the augmented view (default: T of x_center as in
    ``crop_resize_flip``). The model must be a torchvision-shaped ResNet in train mode.
    """
    if not model.training:
        raise ValueError("the authors' step runs in train mode (BatchNorm batch statistics); call model.train()")
    B = x_center.shape[0]
    if group_size is not None and group_size < 1:
        raise ValueError(f"group_size={group_size} must be >= 1 (images per DataParallel chunk) or None")
    if x_aug is None:
        x_aug = crop_resize_flip(x_center, crop_boxes, flips, tuple(x_center.shape[-2:]))
    g = group_size or B
    groups = [slice(s, min(s + g, B)) for s in range(0, B, g)]
    bn = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    parts, kept = [], None
    for n, s in enumerate(groups):
        parts.append(group_step(model, x_rrc[s], x_center[s], x_aug[s], crop_boxes[s], flips[s], labels[s],
                                tau=tau, negatives=negatives))
        if n == 0:  # DataParallel keeps the running statistics of GPU 0's replica only
            kept = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                    for m in bn if m.track_running_stats]
    # rebound, not copied in place: the graphs saved the buffers, and an in-place write would void their backward
    for m, (mean, var, count) in zip([m for m in bn if m.track_running_stats], kept):
        m.running_mean, m.running_var, m.num_batches_tracked = mean, var, count
    xent = torch.stack([p[0] for p in parts]).mean()
    cgc = torch.stack([p[1] for p in parts]).mean()
    return AuthorsLoss(xent + lam * cgc, xent, cgc)
