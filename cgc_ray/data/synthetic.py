"""The embedded default dataset: procedurally generated shapes with exact boxes and masks.

Every image holds one *class object* (its shape is the label) among a few
*distractor* objects whose shapes never belong to a class, on a smooth random
colour background. The box is the bounding box of the class object's mask, so
the uniform-map Content Heatmap (CH) equals box area / image area. Distractors
never cover a pixel inside the class box (their bounding squares are kept out
of it), so CH counts only evidence from the class object.

Class sets
----------
``"novel"`` (default): disk, square, triangle, plus, star: the demos' classes.
``"base"``: ten other shapes (semicircle, ell, tee, arrow, bowtie, chevron,
trapezoid, heart, pentagon, U), with the same clutter, distractors and
backgrounds: the disjoint, larger set the demos pretrain on, as a user without
ImageNet would pretrain on other classes before fine-tuning on theirs. No
shape is in both sets, nor among the distractors.

Variants
--------
``"clutter"`` (default)
    Nothing but the class object's shape predicts the label: colours, sizes,
    positions, distractors and background are drawn independently of it.
    This is the design on which CPU pilots saw CGC raise CH (docs/DESIGN.md);
    a label-correlated background invites the contrastive term to settle on
    "background with an object-shaped hole".
``"spurious"``
    The same scenes plus a background cue (stripe orientation and tint) of a
    *cue class* equal to the label with probability ``p_cue`` in training.
    Test images are *aligned* (cue = label) except those listed in
    ``conflict.txt``, where the cue is always a wrong class (an analogue of
    the paper's UnRel evaluation).

On disk the dataset is a CUB-200-2011 folder, so the real loader path reads it::

    <root>/<cache name>/CUB_200_2011/
        images.txt               "<id> <relpath>"
        image_class_labels.txt   "<id> <class, 1-based>"
        train_test_split.txt     "<id> <is_train>"
        bounding_boxes.txt       "<id> <x> <y> <w> <h>"  (0-based top-left, floats)
        classes.txt              "<id> <NNN.name>"
        images/<NNN.name>/<name>_<NNNNN>.png
        masks/<NNN.name>/<name>_<NNNNN>.png   (class-object mask, 0 or 255)
        distractor_boxes.txt     "<id> <x> <y> <w> <h>", one line per distractor
        conflict.txt             (spurious only: ids of the conflict test images)
        cues.txt                 (spurious only: "<id> <cue class, 1-based>")
        synthetic.json           (the generation parameters)

The cache name encodes class set, variant, seed, sizes and ``GENERATOR_VERSION``;
bump the version whenever the pixels a given seed produces change. Generation
uses numpy, PIL (the background's resize) and matplotlib's colour conversion
(no torch) and writes into a temporary folder that is renamed into place, so
concurrent callers never see a partial dataset.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

GENERATOR_VERSION = 2

CLASS_SETS = {
    "novel": ("disk", "square", "triangle", "plus", "star"),
    "base": ("semicircle", "ell", "tee", "arrow", "bowtie", "chevron", "trapezoid", "heart", "pentagon", "ushape"),
}
CLASS_SHAPES = CLASS_SETS["novel"]
DISTRACTOR_SHAPES = ("ring", "bar", "crescent")
VARIANTS = ("clutter", "spurious")

# Geometry at the 64 px reference size; everything scales with image_size.
# Tuned so the CPU demo's small ResNet trained with cross-entropy reaches
# ~70 % test accuracy after ~13 epochs and ~90 % after 20 (300 images/class):
# class and distractor objects share one size range (the largest object is
# not the class object), colours overlap the background's, and the background
# is a mid-frequency colour field rather than per-pixel noise (which would
# triple the PNG size).
_CLASS_RADIUS = (7.0, 14.0)  # circumradius of the class object, px
_DISTRACTOR_RADIUS = (6.0, 13.0)
_N_DISTRACTORS = (2, 4)  # inclusive range per image
_PLACEMENT_TRIES = 24  # candidate positions per distractor before it is dropped
_OBJECT_SATURATION = (0.35, 1.0)
_OBJECT_VALUE = (0.5, 1.0)
_BACKGROUND_GRID = 8  # grid cells per side of the smooth background field
_BACKGROUND_SATURATION = (0.1, 0.6)
_BACKGROUND_VALUE = (0.2, 0.65)
_CHUNK = 256  # images rendered at once (bounds memory; fixed for determinism)

_SPLIT_CODES = {"train": 0, "test": 1, "conflict": 2, "val": 3}


def ensure(
    root: str | os.PathLike,
    *,
    classes: str,
    variant: str,
    seed: int,
    n_train_per_class: int,
    n_test_per_class: int,
    n_val_per_class: int,
    image_size: int,
    p_cue: float,
) -> Path:
    """Generate the dataset under ``root`` once and return its ``CUB_200_2011`` folder.

    The options are a spec's ``data.synthetic`` (``SyntheticSpec``, where their
    defaults and checks live) plus its ``data.image_size``; callers pass them
    all, already validated: ``ensure(root, **spec.data.synthetic.model_dump(),
    image_size=spec.data.image_size)``.

    Args:
        root: cache directory; created if missing.
        classes: a key of :data:`CLASS_SETS` (see the module docstring).
        variant: one of :data:`VARIANTS`.
        seed: every pixel, label order and box follows from it.
        n_train_per_class: training images per class.
        n_test_per_class: test images per class (for ``"spurious"``: aligned
            test images per class, plus as many conflict images per class).
        n_val_per_class: validation images per class (``val.txt``): model
            selection on them keeps the test split for the reported numbers.
        image_size: side S of the square S x S RGB images.
        p_cue: ``"spurious"`` only: probability that a training image's
            background cue names its own class.

    Returns:
        Path to ``<root>/<cache name>/CUB_200_2011``. A second call with the
        same arguments returns the cached folder without rewriting it.
    """
    root = Path(root)
    name = (
        f"synthetic-{classes}-{variant}-seed{seed}-train{n_train_per_class}-test{n_test_per_class}"
        + (f"-val{n_val_per_class}" if n_val_per_class else "")
        + f"-{image_size}px" + (f"-pcue{p_cue:g}" if variant == "spurious" else "") + f"-v{GENERATOR_VERSION}"
    )
    final = root / name
    cub = final / "CUB_200_2011"
    if cub.is_dir():
        return cub

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        _write_dataset(
            tmp / "CUB_200_2011",
            shapes=CLASS_SETS[classes],
            variant=variant,
            seed=seed,
            n_train=n_train_per_class,
            n_test=n_test_per_class,
            n_val=n_val_per_class,
            size=image_size,
            p_cue=p_cue,
        )
        try:
            os.rename(tmp, final)
        except OSError:
            if not cub.is_dir():  # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return cub


def mask_path(cub_folder: str | os.PathLike, image_relpath: str) -> Path:
    """Path of the class-object mask of the image ``images/<image_relpath>``.

    The mask is an S x S 8-bit PNG: 255 on the class object, 0 elsewhere.
    """
    return Path(cub_folder) / "masks" / image_relpath


def _write_dataset(cub: Path, *, shapes, variant, seed, n_train, n_test, n_val, size, p_cue) -> None:
    """Render every image and write the CUB-200-2011 files into ``cub``."""
    K = len(shapes)
    class_dirs = [f"{k + 1:03d}.{shape}" for k, shape in enumerate(shapes)]
    splits = [("train", n_train), ("test", n_test)]
    if variant == "spurious":
        splits.append(("conflict", n_test))
    if n_val:
        splits.append(("val", n_val))

    images, labels, is_train, boxes, conflict, val, cues, distractors = [], [], [], [], [], [], [], []
    for k in range(K):
        (cub / "images" / class_dirs[k]).mkdir(parents=True)
        (cub / "masks" / class_dirs[k]).mkdir(parents=True)
        index = 0
        for split, n in splits:
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_SPLIT_CODES[split], k)))
            for start in range(0, n, _CHUNK):
                m = min(_CHUNK, n - start)
                cue = _sample_cue(rng, k, m, K, split, variant, p_cue)
                rgb, mask, box, d_boxes = _render(rng, np.full(m, k), cue, size, shapes)
                for i in range(m):
                    index += 1
                    relpath = f"{class_dirs[k]}/{shapes[k]}_{index:05d}.png"
                    Image.fromarray(rgb[i]).save(cub / "images" / relpath)
                    Image.fromarray(mask[i].astype(np.uint8) * 255).save(cub / "masks" / relpath)
                    images.append(relpath)
                    labels.append(k + 1)
                    is_train.append(int(split == "train"))
                    boxes.append(box[i])
                    distractors += [(len(images), b) for b in d_boxes[i]]
                    if cue is not None:
                        cues.append(int(cue[i]) + 1)
                    if split == "conflict":
                        conflict.append(len(images))
                    if split == "val":
                        val.append(len(images))

    ids = range(1, len(images) + 1)
    _write_lines(cub / "images.txt", (f"{i} {p}" for i, p in zip(ids, images)))
    _write_lines(cub / "image_class_labels.txt", (f"{i} {c}" for i, c in zip(ids, labels)))
    _write_lines(cub / "train_test_split.txt", (f"{i} {t}" for i, t in zip(ids, is_train)))
    _write_lines(cub / "bounding_boxes.txt", (f"{i} {_xywh(b)}" for i, b in zip(ids, boxes)))
    _write_lines(cub / "classes.txt", (f"{k + 1} {d}" for k, d in enumerate(class_dirs)))
    _write_lines(cub / "distractor_boxes.txt", (f"{i} {_xywh(b)}" for i, b in distractors))
    if n_val:
        _write_lines(cub / "val.txt", (str(i) for i in val))
    if variant == "spurious":
        _write_lines(cub / "conflict.txt", (str(i) for i in conflict))
        _write_lines(cub / "cues.txt", (f"{i} {c}" for i, c in zip(ids, cues)))
    params = dict(
        generator_version=GENERATOR_VERSION,
        variant=variant,
        seed=seed,
        n_train_per_class=n_train,
        n_test_per_class=n_test,
        n_val_per_class=n_val,
        image_size=size,
        p_cue=p_cue if variant == "spurious" else None,
        class_shapes=list(shapes),
        distractor_shapes=list(DISTRACTOR_SHAPES),
    )
    (cub / "synthetic.json").write_text(json.dumps(params, indent=2) + "\n")


def _write_lines(path: Path, lines) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def _xywh(box) -> str:
    """CUB "x y w h" text of a continuous (x1, y1, x2, y2) box."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return f"{x1:.1f} {y1:.1f} {x2 - x1:.1f} {y2 - y1:.1f}"


def _mask_boxes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tight boxes of n x S x S masks.

    Returns:
        (boxes n x 4 int, continuous (x1, y1, x2, y2) covering exactly the True
        pixels, i.e. columns x1..x2-1 and rows y1..y2-1; nonempty n bool)
    """
    S = mask.shape[-1]
    rows, cols = mask.any(axis=2), mask.any(axis=1)  # n x S each
    boxes = np.stack(
        [cols.argmax(1), rows.argmax(1), S - cols[:, ::-1].argmax(1), S - rows[:, ::-1].argmax(1)], axis=1
    )
    return boxes, rows.any(1)


def _sample_cue(rng, k: int, m: int, K: int, split: str, variant: str, p_cue: float) -> np.ndarray | None:
    """Cue class per image (int array of m), or None for the clutter variant.

    Train: the label with probability p_cue, otherwise a uniformly drawn other
    class. Test: always the label (aligned). Conflict: always another class.
    """
    if variant != "spurious":
        return None
    wrong = (k + rng.integers(1, K, size=m)) % K  # uniform over the K - 1 other classes
    if split == "test":
        return np.full(m, k)
    if split == "conflict":
        return wrong
    return np.where(rng.random(m) < p_cue, k, wrong)


def _render(rng, labels: np.ndarray, cue: np.ndarray | None, S: int, shapes=CLASS_SHAPES):
    """Render n scenes.

    Args:
        labels: n class indices into ``shapes``.
        cue: n cue classes (spurious backgrounds) or None.
        S: image side.

    Returns:
        images: n x S x S x 3 uint8.
        masks: n x S x S bool, the class object's pixels.
        boxes: n x 4 int, tight (x1, y1, x2, y2) box of each mask.
        distractor_boxes: n lists of (x1, y1, x2, y2) tight boxes of each
            distractor's own pixels inside the image (later distractors may
            occlude part of an earlier one).
    """
    n = len(labels)
    scale = S / 64.0
    y, x = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5  # pixel centres, S x S
    img = _background(rng, n, S, cue, len(shapes))  # n x S x S x 3, float in [0, 1]

    # Class object: fully inside the image, with its mask's exact bounding box.
    r_c = rng.uniform(*_CLASS_RADIUS, size=n) * scale  # n
    c_c = rng.uniform(r_c[:, None], S - r_c[:, None], size=(n, 2))  # n x 2, (cx, cy)
    th_c = rng.uniform(0, 2 * np.pi, size=n)
    col_c = _object_colours(rng, n)  # n x 3
    mask_c = _shape_masks(labels, shapes, x, y, c_c, r_c, th_c)  # n x S x S
    box, _ = _mask_boxes(mask_c)  # n x 4; the class object is never empty (radius >= 1.75 px)

    # Distractors: their bounding squares stay outside the class box, so none
    # of their pixels (centres) falls inside it; they may leave the image.
    n_d = rng.integers(_N_DISTRACTORS[0], _N_DISTRACTORS[1] + 1, size=n)
    d_boxes = [[] for _ in range(n)]
    for slot in range(_N_DISTRACTORS[1]):
        T = _PLACEMENT_TRIES
        r_d = rng.uniform(*_DISTRACTOR_RADIUS, size=(n, T)) * scale
        c_d = rng.uniform(0, S, size=(n, T, 2))
        clear = (
            (c_d[..., 0] + r_d <= box[:, None, 0])
            | (c_d[..., 0] - r_d >= box[:, None, 2])
            | (c_d[..., 1] + r_d <= box[:, None, 1])
            | (c_d[..., 1] - r_d >= box[:, None, 3])
        )  # n x T
        pick = clear.argmax(1)  # first clear candidate
        present = clear.any(1) & (slot < n_d)
        shape = rng.integers(0, len(DISTRACTOR_SHAPES), size=n)
        th_d = rng.uniform(0, 2 * np.pi, size=n)
        col_d = _object_colours(rng, n)
        ar = np.arange(n)
        mask_d = _shape_masks(shape, DISTRACTOR_SHAPES, x, y, c_d[ar, pick], r_d[ar, pick], th_d)
        mask_d &= present[:, None, None]
        img = np.where(mask_d[..., None], col_d[:, None, None, :], img)
        b_d, nonempty = _mask_boxes(mask_d)
        for i in np.flatnonzero(nonempty):
            d_boxes[i].append(b_d[i])

    img = np.where(mask_c[..., None], col_c[:, None, None, :], img)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), mask_c, box, d_boxes


def _object_colours(rng, n: int) -> np.ndarray:
    """n x 3 saturated, bright RGB colours in [0, 1] (uniform hue)."""
    return _hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(*_OBJECT_SATURATION, n), rng.uniform(*_OBJECT_VALUE, n))


def _background(rng, n: int, S: int, cue: np.ndarray | None, K: int) -> np.ndarray:
    """n x S x S x 3 smooth colour field: a coarse random grid, bilinearly upsampled (PIL).

    Less saturated and darker on average than the objects, with overlap. With a
    cue (n cue classes), the field is tinted with the cue class's hue and
    modulated by stripes whose frequency encodes the cue class.
    """
    g = _BACKGROUND_GRID
    hue = rng.uniform(0, 1, (n, g, g))
    sat = rng.uniform(*_BACKGROUND_SATURATION, (n, g, g))
    grid = _hsv_to_rgb(hue, sat, rng.uniform(*_BACKGROUND_VALUE, (n, g, g)))  # n x g x g x 3
    field = np.stack([
        np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(grid[i, ..., c]), mode="F")
                             .resize((S, S), Image.BILINEAR)) for c in range(3)], axis=-1)
        for i in range(n)
    ])  # n x S x S x 3
    if cue is None:
        return field.astype(np.float32)

    y, x = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5
    # Frequency and tint encode the cue; orientation does not, because a
    # horizontal flip (a standard augmentation) mirrors it.
    angle = rng.uniform(0, np.pi, n)
    phase = rng.uniform(0, 2 * np.pi, n)
    cycles = 4.0 + 2.0 * cue  # n, stripe periods across the image
    proj = np.cos(angle)[:, None, None] * x + np.sin(angle)[:, None, None] * y  # n x S x S
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * cycles[:, None, None] * proj / S + phase[:, None, None])  # n x S x S
    tint = _hsv_to_rgb(cue / K, np.full(n, 0.6), np.full(n, 0.55))  # n x 3
    field = 0.5 * field + 0.5 * tint[:, None, None, :]
    return (field * (0.75 + 0.25 * stripes[..., None])).astype(np.float32)


def _shape_masks(shape_idx, names, x, y, centre, radius, theta) -> np.ndarray:
    """n x S x S masks of shapes ``names[shape_idx[i]]`` inscribed in the unit circle.

    Args:
        shape_idx: n ints into ``names``.
        x, y: S x S pixel-centre coordinates.
        centre: n x 2 (cx, cy); radius: n circumradii (px); theta: n rotations (rad).
    """
    dx = (x[None] - centre[:, 0, None, None]) / radius[:, None, None]  # n x S x S
    dy = (y[None] - centre[:, 1, None, None]) / radius[:, None, None]
    c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    u, v = c * dx + s * dy, -s * dx + c * dy  # object frame, unit circumradius
    out = np.zeros(u.shape, dtype=bool)
    for k, name in enumerate(names):
        sel = shape_idx == k
        if sel.any():
            out[sel] = _SHAPES[name](u[sel], v[sel])
    return out


def _star(u, v, points: int = 5, inner: float = 0.45):
    """Star polygon with outer radius 1 and inner radius ``inner``."""
    alpha = np.pi / points  # angle from an outer vertex to the next inner vertex
    phi = np.mod(np.arctan2(v, u), 2 * alpha)
    phi = np.where(phi > alpha, 2 * alpha - phi, phi)  # fold onto one edge, phi in [0, alpha]
    p1 = np.array([1.0, 0.0])
    p2 = inner * np.array([np.cos(alpha), np.sin(alpha)])
    normal = np.array([p2[1] - p1[1], p1[0] - p2[0]])  # perpendicular to the edge p1 -> p2
    d = normal @ p1
    r_edge = d / (normal[0] * np.cos(phi) + normal[1] * np.sin(phi))
    return np.hypot(u, v) <= r_edge


def _triangle(u, v):
    """Equilateral triangle inscribed in the unit circle (edges at distance 1/2)."""
    inside = np.ones(u.shape, dtype=bool)
    for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
        inside &= np.cos(a) * u + np.sin(a) * v <= 0.5
    return inside


def _polygon(sides: int):
    """Regular polygon inscribed in the unit circle, a vertex on +v."""
    def inside(u, v):
        out = np.ones(u.shape, dtype=bool)
        for k in range(sides):
            a = np.pi / 2 + (2 * k + 1) * np.pi / sides  # edge normals between vertices
            out &= np.cos(a) * u + np.sin(a) * v <= np.cos(np.pi / sides)
        return out
    return inside


def _heart(u, v):
    """The heart curve (x² + y² − 1)³ ≤ x² y³, scaled into the unit circle."""
    x, y = u / 0.7, -v / 0.7 + 0.1
    return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0


_SHAPES = {
    "disk": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.7071,
    "triangle": _triangle,
    "plus": lambda u, v: ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95)),
    "star": _star,
    # base classes (pretraining), each inside the unit circle
    "semicircle": lambda u, v: (u * u + (v + 0.3) ** 2 <= 0.81) & (v >= -0.3),
    "ell": lambda u, v: (((u >= -0.6) & (u <= -0.2)) & (np.abs(v) <= 0.7))
    | (((v >= 0.3) & (v <= 0.7)) & (np.abs(u) <= 0.6)),
    "tee": lambda u, v: ((np.abs(u) <= 0.7) & (v >= -0.7) & (v <= -0.35)) | ((np.abs(u) <= 0.18) & (np.abs(v) <= 0.7)),
    "arrow": lambda u, v: ((u >= -0.8) & (u <= 0.2) & (np.abs(v) <= 0.18))
    | ((u >= 0.2) & (np.abs(v) <= 0.55 * (0.85 - u) / 0.65)),
    "bowtie": lambda u, v: (np.abs(u) <= 0.75) & (np.abs(v) <= 0.8 * np.abs(u)),
    "chevron": lambda u, v: (np.abs(u) <= 0.7) & (v >= 0.9 * np.abs(u) - 0.5) & (v <= 0.9 * np.abs(u) - 0.05),
    "trapezoid": lambda u, v: (np.abs(v) <= 0.45) & (np.abs(u) <= 0.45 + 0.4 * (v + 0.45) / 0.9),
    "heart": _heart,
    "pentagon": _polygon(5),
    "ushape": lambda u, v: (np.abs(u) <= 0.7) & (np.abs(v) <= 0.6) & ~((np.abs(u) < 0.3) & (v < 0.25)),
    # distractors
    "ring": lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= 0.55**2),
    "bar": lambda u, v: (np.abs(u) <= 0.97) & (np.abs(v) <= 0.22),  # corners inside the unit circle
    "crescent": lambda u, v: (u * u + v * v <= 1.0) & ((u - 0.5) ** 2 + v * v >= 0.8**2),
}


def _hsv_to_rgb(h, s, v) -> np.ndarray:
    """HSV -> RGB (matplotlib) for arrays of any (equal) shape; returns shape + (3,) in [0, 1]."""
    from matplotlib.colors import hsv_to_rgb

    return hsv_to_rgb(np.stack([np.mod(h, 1.0), s, v], axis=-1)).astype(np.float32)
