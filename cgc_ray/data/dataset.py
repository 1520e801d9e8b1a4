"""A torch Dataset over ImageRecords whose boxes follow the image through resize, crop and flip."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .formats import ImageRecord

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_RESIZES = ("center_crop", "short_side", "squash")


def read_image(path: str) -> Image.Image:
    """Decode `path` as RGB; an unreadable file raises OSError naming the path (never skipped)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise OSError(f"cannot read image {path}: {e}") from e


def image_size(path: str) -> tuple[int, int]:
    """(width, height) of an image file, read from its header (the pixels are not decoded)."""
    with Image.open(path) as im:
        return im.size


# Decoded images of cache_in_memory datasets, kept for the life of the process: the trials a reused
# worker process runs one after another (few-shot episodes, seeds) decode their small dataset once.
_DECODED: "OrderedDict[str, Image.Image]" = OrderedDict()
_DECODED_MAX_PIXELS = 64_000_000  # ~190 MB of RGB; the least recently used images go first
_decoded_pixels = 0


def decoded_image(path: str) -> Image.Image:
    """:func:`read_image`, decoded once per process (least recently used images dropped past a budget)."""
    global _decoded_pixels
    img = _DECODED.get(path)
    if img is not None:
        _DECODED.move_to_end(path)
        return img
    img = read_image(path)
    _DECODED[path] = img
    _decoded_pixels += img.width * img.height
    while _decoded_pixels > _DECODED_MAX_PIXELS and len(_DECODED) > 1:
        _, old = _DECODED.popitem(last=False)
        _decoded_pixels -= old.width * old.height
    return img


def transform_boxes(
    boxes: torch.Tensor, crop: tuple[float, float, float, float], out_size: tuple[int, int], flip: bool
) -> torch.Tensor:
    """Move boxes through crop -> resize -> optional horizontal flip, as done to the image.

    boxes: N x 4 (x1, y1, x2, y2), continuous pixel coords of the source image.
    crop: (x0, y0, w, h) region of the source image that is resized to out_size (W, H).
    Returns M x 4 (M <= N) in output pixel coords, clipped to the output;
    boxes left with zero area (fully outside the crop) are dropped.
    """
    W, H = out_size
    x0, y0, cw, ch = crop
    b = boxes.reshape(-1, 4).to(torch.float32).clone()  # N x 4
    b[:, 0::2] = ((b[:, 0::2] - x0) * (W / cw)).clamp(0, W)
    b[:, 1::2] = ((b[:, 1::2] - y0) * (H / ch)).clamp(0, H)
    b = b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])]
    if flip:
        b = torch.stack([W - b[:, 2], b[:, 1], W - b[:, 0], b[:, 3]], dim=1)
    return b


def sample_crop(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """RandomResizedCrop region (x0, y0, w, h): torchvision's algorithm, drawn from the global RNG."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y0 = int(torch.randint(0, height - h + 1, (1,)))
            x0 = int(torch.randint(0, width - w + 1, (1,)))
            return x0, y0, w, h
    in_ratio = width / height  # fallback: the largest centred crop within the ratio range
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _short_side_size(width: int, height: int, short: int) -> tuple[int, int]:
    """torchvision Resize(int) output (W, H): the short side becomes `short`."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


class BoxDataset(Dataset):
    """(image, label, boxes) samples with the boxes transformed like the image.

    __getitem__ -> (image FloatTensor 3 x S x S ImageNet-normalised, label int,
    boxes FloatTensor N x 4 in output pixel coords (x1, y1, x2, y2)).

    train=True: RandomResizedCrop(S, scale, ratio) + horizontal flip (p=flip_p).
    train=False, eval_resize="center_crop": short side -> round-down(S * resize_ratio)
    (256 for S=224), centre crop S. eval_resize="short_side": short side -> S and
    no crop, so the image is S on its short side only (the authors' CH protocol at
    S=448; use batch size 1 or a collate that handles sizes). eval_resize="squash":
    the whole image resized to S x S, aspect ratio lost (the authors' IAUC input).

    Training augmentations draw from the torch global RNG (in DataLoader
    workers, seeded per worker by the loader's generator), which the trial's
    checkpoints save, so a resumed run sees the same crops.
    cache_in_memory: decode every image at construction and keep the RGB
    images (for small datasets); decoded once per process (:func:`decoded_image`),
    so the next trial in a reused worker process skips the decoding.
    center_view: training samples also return the evaluation view of the same
    image (resize + centre crop), the image the authors apply CGC's T to
    (``method.view="center"``): (image, label, boxes, centre view).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        *,
        train: bool,
        image_size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        eval_resize: str = "center_crop",
        resize_ratio: float = 256 / 224,
        cache_in_memory: bool = False,
        center_view: bool = False,
    ):
        if eval_resize not in EVAL_RESIZES:
            raise ValueError(f"eval_resize must be one of {EVAL_RESIZES}, got {eval_resize!r}")
        if resize_ratio < 1:
            raise ValueError(f"resize_ratio must be >= 1 so the centre crop fits, got {resize_ratio}")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.records = list(records)
        self.train = train
        self.image_size = image_size
        self.scale, self.ratio, self.flip_p = scale, ratio, flip_p
        self.eval_resize, self.resize_ratio = eval_resize, resize_ratio
        self.center_view = center_view and train
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        self._cache = [decoded_image(r.path) for r in self.records] if cache_in_memory else None

    def __len__(self) -> int:
        return len(self.records)

    def _to_tensor(self, img: Image.Image) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255  # 3 x H x W
        return (x - self._mean) / self._std

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        rec = self.records[index]
        img = self._cache[index] if self._cache is not None else read_image(rec.path)
        W, H = img.size
        boxes = torch.tensor(rec.boxes, dtype=torch.float32).reshape(-1, 4)  # N x 4, original pixels
        S = self.image_size
        if self.train:
            x0, y0, cw, ch = sample_crop(W, H, self.scale, self.ratio)
            flip = bool(torch.rand(1).item() < self.flip_p)
            out = img.resize((S, S), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
            if flip:
                out = out.transpose(Image.FLIP_LEFT_RIGHT)
            sample = (self._to_tensor(out), rec.label, transform_boxes(boxes, (x0, y0, cw, ch), (S, S), flip))
            return sample + (self._center(img, boxes)[0],) if self.center_view else sample
        if self.eval_resize == "short_side":
            nw, nh = _short_side_size(W, H, S)
            out = img.resize((nw, nh), Image.BILINEAR)
            return self._to_tensor(out), rec.label, transform_boxes(boxes, (0, 0, W, H), (nw, nh), False)
        if self.eval_resize == "squash":
            out = img.resize((S, S), Image.BILINEAR)
            return self._to_tensor(out), rec.label, transform_boxes(boxes, (0, 0, W, H), (S, S), False)
        x, b = self._center(img, boxes)
        return x, rec.label, b

    def _center(self, img: Image.Image, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Short side to S * resize_ratio (256 for S = 224), centre crop S: (image, boxes in its pixels)."""
        W, H = img.size
        S = self.image_size
        nw, nh = _short_side_size(W, H, int(S * self.resize_ratio))
        left, top = int(round((nw - S) / 2.0)), int(round((nh - S) / 2.0))
        out = img.resize((nw, nh), Image.BILINEAR).crop((left, top, left + S, top + S))
        # the crop in source pixels that maps onto the S x S output
        crop = (left * W / nw, top * H / nh, S * W / nw, S * H / nh)
        return self._to_tensor(out), transform_boxes(boxes, crop, (S, S), False)


def collate(batch: Sequence[tuple]) -> tuple:
    """-> (images B x 3 x S x S, labels LongTensor B, list of B boxes tensors N_i x 4[, centre views B x 3 x S x S])."""
    sizes = {tuple(s[0].shape) for s in batch}
    if len(sizes) > 1:
        raise ValueError(
            f"images in one batch have different sizes {sorted(sizes)}; with eval_resize='short_side' "
            "use batch_size=1"
        )
    images = torch.stack([s[0] for s in batch])
    labels = torch.tensor([s[1] for s in batch], dtype=torch.long)
    out = (images, labels, [s[2] for s in batch])
    return out + (torch.stack([s[3] for s in batch]),) if len(batch[0]) > 3 else out
