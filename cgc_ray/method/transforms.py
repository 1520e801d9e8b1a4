"""The CGC transform T: per-image random-resized-crop + horizontal flip, batched.

Parameters are sampled once per image and applied, with one ``grid_sample``
and no Python loop over the batch, to images (B x C x H x W) and to heatmaps
(B x h x w) at any resolution: a crop box is stored in normalised [0, 1]
coordinates of the image, so the same box selects the same content of a map
of any size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class CropFlip:
    """Per-image parameters of T.

    boxes: B x 4 float (x1, y1, x2, y2), normalised to [0, 1] of the source.
    flip:  B bool, True where the crop is mirrored left-right.
    """

    boxes: Tensor
    flip: Tensor

    def __len__(self) -> int:
        return self.boxes.shape[0]


def sample_params(
    batch: int,
    size: tuple[int, int],
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    attempts: int = 10,
) -> CropFlip:
    """Sample torchvision-style RandomResizedCrop boxes (integer pixels) and flips.

    As torchvision: up to ``attempts`` draws of (area scale, log-uniform aspect
    ratio) per image; the first that fits is used, else the centre crop at the
    closest admissible aspect ratio. Sampling happens on the generator's device
    (CPU by default) and the result moves to ``device`` without a sync.
    """
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
    H, W = size
    gdev = generator.device if generator is not None else torch.device("cpu")
    area = float(H * W)
    u = torch.rand(batch, attempts, 4, generator=generator, device=gdev, dtype=torch.float64)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1]
    aspect = torch.exp(log_r)
    w = torch.sqrt(target_area * aspect).round()
    h = torch.sqrt(target_area / aspect).round()
    ok = (w > 0) & (h > 0) & (w <= W) & (h <= H)  # B x attempts
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((batch,), -1, device=gdev))
    idx = first.clamp(min=0)[:, None]
    w_sel = w.gather(1, idx)[:, 0]
    h_sel = h.gather(1, idx)[:, 0]
    x1 = torch.floor(u[..., 2].gather(1, idx)[:, 0] * (W - w_sel + 1))
    y1 = torch.floor(u[..., 3].gather(1, idx)[:, 0] * (H - h_sel + 1))
    # torchvision's fallback: centre crop clamped to the ratio range
    in_ratio = W / H
    if in_ratio < ratio[0]:
        fw, fh = W, round(W / ratio[0])
    elif in_ratio > ratio[1]:
        fh, fw = H, round(H * ratio[1])
    else:
        fw, fh = W, H
    fb = first < 0
    w_sel = torch.where(fb, torch.full_like(w_sel, fw), w_sel)
    h_sel = torch.where(fb, torch.full_like(h_sel, fh), h_sel)
    x1 = torch.where(fb, torch.full_like(x1, (W - fw) // 2), x1)
    y1 = torch.where(fb, torch.full_like(y1, (H - fh) // 2), y1)
    boxes = torch.stack([x1 / W, y1 / H, (x1 + w_sel) / W, (y1 + h_sel) / H], dim=1).float()
    flip = torch.rand(batch, generator=generator, device=gdev) < flip_p
    return CropFlip(boxes.to(device, non_blocking=True), flip.to(device, non_blocking=True))


def _grid(params: CropFlip, out_size: tuple[int, int], dtype: torch.dtype,
          src_size: tuple[int, int] | None = None) -> Tensor:
    """Sampling grid B x H' x W' x 2 for ``F.grid_sample(align_corners=False)``.

    Output pixel centre u in (0, 1) of the crop maps to x1 + u (x2 - x1) of the
    source; a flip mirrors u. With ``src_size`` (H, W) the points are clamped to
    the centres of the box's own edge pixels, so an enlarged crop repeats its
    border as a slice-then-resize does, instead of reading the pixels beyond it.
    """
    Ho, Wo = out_size
    dev = params.boxes.device
    b = params.boxes.to(dtype)
    u = (torch.arange(Wo, device=dev, dtype=dtype) + 0.5) / Wo  # W'
    v = (torch.arange(Ho, device=dev, dtype=dtype) + 0.5) / Ho  # H'
    u = torch.where(params.flip[:, None], 1 - u[None], u[None])  # B x W'
    x = b[:, 0:1] + u * (b[:, 2:3] - b[:, 0:1])  # B x W'
    y = b[:, 1:2] + v[None] * (b[:, 3:4] - b[:, 1:2])  # B x H'
    if src_size is not None:
        Hs, Ws = src_size
        x = torch.minimum(torch.maximum(x, b[:, 0:1] + 0.5 / Ws), b[:, 2:3] - 0.5 / Ws)
        y = torch.minimum(torch.maximum(y, b[:, 1:2] + 0.5 / Hs), b[:, 3:4] - 0.5 / Hs)
    gx = (2 * x - 1)[:, None, :].expand(-1, Ho, -1)
    gy = (2 * y - 1)[:, :, None].expand(-1, -1, Wo)
    return torch.stack([gx, gy], dim=-1)


def apply(x: Tensor, params: CropFlip, out_size: tuple[int, int] | None = None, *,
          within_box: bool = False) -> Tensor:
    """T(x): crop each item's box, resize it to ``out_size`` (bilinear), flip.

    x: B x C x H x W images or B x H x W heatmaps (any resolution); returns the
    same layout at ``out_size`` (default: x's own size). ``within_box``: read
    nothing outside the box (its edge pixels repeat), as the authors' slice of
    the map then ``F.interpolate`` does; for boxes on x's pixel grid this is
    that computation exactly. Default: bilinear over the whole source.
    """
    if x.shape[0] != len(params):
        raise ValueError(f"batch of {x.shape[0]} but {len(params)} transform parameters")
    maps = x.dim() == 3
    src = x[:, None] if maps else x
    out_size = tuple(out_size or src.shape[-2:])
    grid = _grid(params, out_size, src.dtype if src.is_floating_point() else torch.float32,
                 tuple(src.shape[-2:]) if within_box else None)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[:, 0] if maps else out
