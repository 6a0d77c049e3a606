"""The synthetic dataset in the real formats (`zim-lightning synth`).

ZIM (Kim et al., 2024) trains its label converter on public matting datasets (Sec. 3.1), converts
SA-1B into SA1B-Matte with it (Sec. 3.1), trains ZIM on SA1B-Matte (Sec. 3.2) and evaluates on
MicroMat-3K (Sec. 4.1), AM-2K and AIM-500. None of these can be downloaded here, so this module writes a
small, deterministic stand-in for every one of them, in the formats the real datasets ship in, so that
every stage of the project runs (and is tested) without downloads.

Every sample is an exact composite ``I = a * F + (1 - a) * B`` over a random crop of a photograph bundled
with scikit-image (loaded offline). Foregrounds come in two families:

- ``fine``: objects with micro-level detail - hair or fur (hundreds of thin anti-aliased strands),
  branching twigs and thin wires, nets with holes, and semi-transparent glass or smoke (alpha 0.2-0.8).
  They are drawn on a supersampled canvas and area-averaged down, so their alpha is fractional.
- ``solid``: polygons, ellipses and boxes with hard edges and binary alpha.

Layout written under ``OUT``::

    sa1b/sa_000000.tar ...          gzip-compressed tars (despite the name, as SA-1B ships) holding
                                    sa_<id>.jpg and sa_<id>.json with every SA-1B field; the masks
                                    are the objects binarised (coarse, SA-1B-like) plus a few
                                    background "stuff" regions; ids are unique across the dataset
    sa1b_alpha/sa_<id>/<ann_id>.png the exact visible alpha (8-bit L, full image) of every object
                                    annotation, to measure the SA1B-Matte builder against the truth
    matting/train/matting-000000.tar plain webdataset tars: <key>.jpg, <key>.alpha.png (8-bit L),
    matting/val/matting-000000.tar   <key>.json {"kind": "fine" | "solid", "source": str}
    seg/seg-000000.tar              <key>.jpg, <key>.mask.png (0 / 255 L), <key>.json: solid objects
                                    for the converter's spatial generalisation (STL) samples
    micromat/                       MicroMat-3K: img/NNNN.png, matte/{fine,coarse}/NNNN_K.png,
                                    seg/{fine,coarse}/NNNN_K.png, prompt/{fine,coarse}/NNNN_K.json,
                                    data_list.txt (fine = micro detail, coarse = solid objects)
    am2k/validation/{original,mask,trimap}/   AM-2K validation layout (jpg image, png alpha, trimap)
    aim500/{original,mask,trimap}/            AIM-500 layout
    preview.png                     a few samples: image | alpha | coarse mask
    synthetic.json                  the settings; marks OUT as ours, so a rerun may replace the parts,
                                    and ``"complete": true`` once every part is written

The same seed gives byte-identical files: every sample draws from its own generator seeded by
``(seed, part, index)``, tar members carry fixed metadata and sorted names, gzip streams carry no
timestamp or file name. Every file is written to a temporary name and renamed, so an interrupted or
failed run (a full disk) never leaves a complete-looking half file; the marker says ``"complete":
false`` until the last part is written.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from zim_lightning.data.tar_writer import encode_png, write_atomic, write_tar

log = logging.getLogger(__name__)

# Part identifiers mixed into each sample's seed, so parts never share random streams.
_PART_SA1B, _PART_MATTING_TRAIN, _PART_MATTING_VAL, _PART_SEG = 1, 2, 3, 4
_PART_MICROMAT, _PART_AM2K, _PART_AIM500 = 5, 6, 7

DEFAULT_IMAGE_SIZE = (384, 512)
# SA-1B images are about 1500x2250 (H x W).
SA1B_FULL_SIZE = (1500, 2250)
MIN_IMAGE_SIDE = 64
JPEG_QUALITY = 92
# Supersampling factor for fine structures; lowered for large objects to bound the canvas size.
SUPERSAMPLE = 4
MAX_SUPERSAMPLED_SIDE = 4096
# Smallest mask (pixels) kept as an SA-1B annotation.
MIN_MASK_AREA = 16
# Redraws allowed when a target object came out hidden or empty (rare; keeps every count exact).
MAX_DRAWS = 8
# Minimum RGB distance between a foreground colour and the mean background it sits on.
MIN_COLOUR_CONTRAST = 70.0
# Object sizes as a fraction of the image's shorter side; the smallest cover a few % of the image.
OBJECT_SCALES = (0.18, 0.3, 0.45, 0.65, 0.85)
# Photographs bundled with scikit-image (no download needed).
_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")
_TEXTURES = ("brick", "grass", "gravel")
# Marks OUT as written by this module (holds the settings); the parts below are what a rerun replaces.
MARKER = "synthetic.json"
_PARTS = ("sa1b", "sa1b_alpha", "matting", "seg", "micromat", "am2k", "aim500", "preview.png")


# ----------------------------------------------------------------------------- layout


@dataclass
class SyntheticLayout:
    """Paths written by :func:`generate` (all under ``root``)."""

    root: Path
    sa1b_shards: list[Path] = field(default_factory=list)
    sa1b_alpha: Path | None = None
    matting_train: list[Path] = field(default_factory=list)
    matting_val: list[Path] = field(default_factory=list)
    seg: list[Path] = field(default_factory=list)
    micromat: Path | None = None
    am2k: Path | None = None
    aim500: Path | None = None
    preview: Path | None = None


# ----------------------------------------------------------------------------- sources


@cache
def _photo(name: str) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3])


@cache
def _texture(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)().astype(np.float32) / 255.0


def _background(rng: np.random.Generator, h: int, w: int, name: str) -> np.ndarray:
    """A random crop of the bundled photograph ``name`` resized to HxWx3, float32 in [0, 255]."""
    photo = _photo(name)
    ph, pw = photo.shape[:2]
    # Crop with the target aspect ratio, covering 50-100% of the limiting side.
    frac = rng.uniform(0.5, 1.0)
    ch = min(ph, int(pw * h / w)) * frac
    cw = ch * w / h
    ch, cw = max(8, int(ch)), max(8, int(cw))
    y0 = int(rng.integers(0, ph - ch + 1))
    x0 = int(rng.integers(0, pw - cw + 1))
    crop = photo[y0 : y0 + ch, x0 : x0 + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return cv2.resize(np.ascontiguousarray(crop), (w, h), interpolation=cv2.INTER_AREA).astype(np.float32)


def _foreground(rng: np.random.Generator, h: int, w: int, behind: np.ndarray) -> np.ndarray:
    """A colour field HxWx3 in [0, 255]: a base colour far from ``behind``'s mean, a gradient, a texture."""
    mean = behind.reshape(-1, 3).mean(axis=0)
    colour = rng.uniform(0, 255, size=3)
    for _ in range(8):
        if np.linalg.norm(colour - mean) >= MIN_COLOUR_CONTRAST:
            break
        colour = rng.uniform(0, 255, size=3)
    else:
        colour = 255.0 - mean
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx / max(w, 1) + np.sin(angle) * yy / max(h, 1))[..., None]
    field_ = colour[None, None, :] + rng.uniform(-40, 40, size=3)[None, None, :] * ramp
    texture = _texture(_TEXTURES[rng.integers(len(_TEXTURES))])
    tile = cv2.resize(texture, (w, h), interpolation=cv2.INTER_LINEAR)[..., None]
    field_ = field_ * (1.0 + rng.uniform(0.0, 0.5) * (tile - 0.5))
    return np.clip(field_, 0, 255).astype(np.float32)


# ----------------------------------------------------------------------------- alpha shapes


def _supersample(h: int, w: int) -> int:
    return max(1, min(SUPERSAMPLE, MAX_SUPERSAMPLED_SIDE // max(h, w, 1)))


def _down(canvas: np.ndarray, h: int, w: int) -> np.ndarray:
    """Area-average a supersampled uint8 canvas to HxW alpha in [0, 1]."""
    return cv2.resize(canvas, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def _hair(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Fur ball or a head of hair: a solid core and hundreds of thin curved strands (fractional alpha).

    Fur strands leave the core radially; hair strands leave its upper arc and fall under gravity.
    """
    s = _supersample(h, w)
    canvas = np.zeros((h * s, w * s), np.uint8)
    falling = rng.random() < 0.5
    cx, cy = w * s / 2, h * s * (0.3 if falling else 0.5)
    ax, ay = w * s * rng.uniform(0.15, 0.25), h * s * rng.uniform(0.15, 0.25)
    cv2.ellipse(canvas, (int(cx), int(cy)), (int(ax), int(ay)), 0, 0, 360, 255, -1, cv2.LINE_AA)
    n, steps = int(rng.integers(200, 450)), 14
    if falling:
        # Image y points down: angles in (pi, 2 pi) lie on the upper arc.
        theta = rng.uniform(0.9 * np.pi, 2.1 * np.pi, n)
        length = h * s * rng.uniform(0.3, 0.65, n)
        to_down = (np.pi / 2 - theta + np.pi) % (2 * np.pi) - np.pi
        turn = to_down[:, None] * np.minimum(1.0, np.arange(1, steps + 1) / (0.4 * steps))[None, :]
    else:
        theta = rng.uniform(0, 2 * np.pi, n)
        length = min(h, w) * s * rng.uniform(0.15, 0.3, n)
        turn = np.zeros((n, steps))
    roots = np.stack([cx + 0.9 * ax * np.cos(theta), cy + 0.9 * ay * np.sin(theta)], axis=1)
    bend = rng.normal(0, 0.08, n)[:, None] + rng.normal(0, 0.12, (n, steps)).cumsum(axis=1) * 0.3
    heading = theta[:, None] + turn + bend
    step = (length / steps)[:, None]
    path = np.stack([np.cos(heading), np.sin(heading)], axis=2) * step[..., None]
    points = np.concatenate([roots[:, None], roots[:, None] + path.cumsum(axis=1)], axis=1)
    points = np.round(points).astype(np.int32)
    # Strands in groups of different opacity and width (1 or 2 supersampled pixels = sub-pixel).
    groups = rng.integers(0, 4, n)
    for g, (value, thickness) in enumerate(((255, 1), (190, 1), (130, 2), (255, 2))):
        strands = list(points[groups == g])
        if strands:
            cv2.polylines(canvas, strands, False, value, thickness, cv2.LINE_AA)
    return _down(canvas, h, w)


def _twigs(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Branching twigs plus a few thin wires; the finest branches are sub-pixel wide."""
    s = _supersample(h, w)
    canvas = np.zeros((h * s, w * s), np.uint8)
    stack = [
        (np.array([w * s * rng.uniform(0.35, 0.65), h * s * 0.98]), -np.pi / 2, h * s * 0.45, 3.0 * s, 0)
    ]
    depth_max = int(rng.integers(4, 6))
    while stack:
        start, heading, length, thickness, depth = stack.pop()
        steps = 6
        headings = heading + rng.normal(0, 0.08, steps).cumsum()
        deltas = np.stack([np.cos(headings), np.sin(headings)], axis=1) * (length / steps)
        points = np.concatenate([start[None], start[None] + deltas.cumsum(axis=0)])
        cv2.polylines(
            canvas, [np.round(points).astype(np.int32)], False, 255, max(1, int(thickness)), cv2.LINE_AA
        )
        if depth < depth_max:
            for _ in range(int(rng.integers(2, 4))):
                at = points[int(rng.integers(2, steps + 1))]
                turn = rng.choice([-1, 1]) * rng.uniform(0.3, 0.9)
                stack.append(
                    (at, headings[-1] + turn, length * rng.uniform(0.55, 0.75), thickness * 0.62, depth + 1)
                )
    for _ in range(int(rng.integers(1, 4))):
        xs = np.linspace(0, w * s, 40)
        ys = h * s * rng.uniform(0.1, 0.9) + h * s * 0.1 * np.sin(
            xs / (w * s) * rng.uniform(2, 8) + rng.uniform(0, 6)
        )
        wire = np.round(np.stack([xs, ys], axis=1)).astype(np.int32)
        cv2.polylines(canvas, [wire], False, 255, int(rng.integers(1, 5)), cv2.LINE_AA)
    return _down(canvas, h, w)


def _net(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A net: a warped grid of thin threads with holes, inside an elliptic frame."""
    s = _supersample(h, w)
    H, W = h * s, w * s
    canvas = np.zeros((H, W), np.uint8)
    spacing = rng.uniform(6, 14) * s
    angle = rng.uniform(0, np.pi)
    diag = math.hypot(H, W)
    offsets = np.arange(-diag / 2, diag / 2, spacing)
    t = np.linspace(-diag / 2, diag / 2, 64)
    lines = []
    for rot in (angle, angle + np.pi / 2 + rng.uniform(-0.3, 0.3)):
        u = np.array([np.cos(rot), np.sin(rot)])
        v = np.array([-u[1], u[0]])
        pts = offsets[:, None, None] * v + t[None, :, None] * u + np.array([W / 2, H / 2])
        pts = pts + spacing * 0.3 * np.sin(pts[..., ::-1] / (spacing * 3.0))
        lines.extend(np.round(pts).astype(np.int32))
    cv2.polylines(canvas, lines, False, 255, int(rng.integers(1, 2 * s)), cv2.LINE_AA)
    frame = np.zeros_like(canvas)
    axes = (int(W * 0.45), int(H * 0.45))
    cv2.ellipse(frame, (W // 2, H // 2), axes, 0, 0, 360, 255, -1, cv2.LINE_AA)
    canvas = ((canvas.astype(np.uint16) * frame) // 255).astype(np.uint8)
    cv2.ellipse(canvas, (W // 2, H // 2), axes, 0, 0, 360, 255, 2 * s, cv2.LINE_AA)
    return _down(canvas, h, w)


def _glass(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Semi-transparent glass (alpha 0.2-0.5 inside, ~0.8 rim) or smoke (smooth alpha up to 0.8)."""
    s = _supersample(h, w)
    if rng.random() < 0.5:
        canvas = np.zeros((h * s, w * s), np.uint8)
        centre, axes = (w * s // 2, h * s // 2), (int(w * s * 0.42), int(h * s * 0.42))
        inner = int(255 * rng.uniform(0.2, 0.5))
        cv2.ellipse(canvas, centre, axes, 0, 0, 360, inner, -1, cv2.LINE_AA)
        cv2.ellipse(canvas, centre, axes, 0, 0, 360, int(255 * 0.8), max(2, 3 * s), cv2.LINE_AA)
        # A specular streak: a brighter, still translucent band.
        cv2.ellipse(
            canvas, centre, (axes[0] // 2, axes[1] // 2), 0, 200, 250, int(255 * 0.7), 3 * s, cv2.LINE_AA
        )
        return _down(canvas, h, w)
    noise = cv2.resize(rng.random((6, 6)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    radial = 1.0 - np.hypot((xx - w / 2) / (w / 2), (yy - h / 2) / (h / 2))
    density = np.clip(noise * 0.6 + radial, 0, None)
    density = cv2.GaussianBlur(density, (0, 0), sigmaX=max(1.0, min(h, w) / 30))
    return np.clip((density - 0.35) * 1.6, 0.0, 0.8).astype(np.float32)


def _polygon(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A star-convex polygon, a rotated box or an ellipse with binary alpha and hard edges."""
    canvas = np.zeros((h, w), np.uint8)
    cx, cy = w / 2, h / 2
    kind = rng.integers(3)
    if kind == 0:
        n = int(rng.integers(5, 12))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radius = rng.uniform(0.55, 1.0, n)
        pts = np.stack(
            [cx + radius * 0.48 * w * np.cos(angles), cy + radius * 0.48 * h * np.sin(angles)], axis=1
        )
        cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], 1, cv2.LINE_8)
    elif kind == 1:
        box = ((cx, cy), (w * rng.uniform(0.5, 0.7), h * rng.uniform(0.5, 0.7)), float(rng.uniform(0, 90)))
        cv2.fillPoly(canvas, [np.round(cv2.boxPoints(box)).astype(np.int32)], 1, cv2.LINE_8)
    else:
        axes = (max(1, int(w * rng.uniform(0.3, 0.48))), max(1, int(h * rng.uniform(0.3, 0.48))))
        cv2.ellipse(canvas, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1, cv2.LINE_8)
    return canvas.astype(np.float32)


_FINE_SHAPES: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "hair": _hair,
    "twigs": _twigs,
    "net": _net,
    "glass": _glass,
}


# ----------------------------------------------------------------------------- scenes


@dataclass
class _Object:
    kind: str  # "fine" | "solid"
    shape: str
    alpha: np.ndarray  # HxW float32 in [0, 1], visible alpha after later objects covered it


@dataclass
class _Scene:
    image: np.ndarray  # HxWx3 uint8
    objects: list[_Object]
    source: str


def _quantise(alpha: np.ndarray) -> np.ndarray:
    """Round alpha to the 8-bit grid it is stored on, so the composite matches the stored alpha."""
    return np.round(alpha * 255.0).astype(np.float32) / 255.0


def _scene(rng: np.random.Generator, h: int, w: int, kinds: list[str], scales: list[float]) -> _Scene:
    """Composite objects (back to front) over a photograph; returns image and exact visible alphas."""
    image_source = _PHOTOS[int(rng.integers(len(_PHOTOS)))]
    image = _background(rng, h, w, image_source)
    objects: list[_Object] = []
    for kind, scale in zip(kinds, scales, strict=True):
        side = max(8, int(min(h, w) * scale))
        bh = min(h, max(8, int(side * rng.uniform(0.8, 1.2))))
        bw = min(w, max(8, int(side * rng.uniform(0.8, 1.2))))
        y0, x0 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        if kind == "fine":
            shape = list(_FINE_SHAPES)[int(rng.integers(len(_FINE_SHAPES)))]
            local = _FINE_SHAPES[shape](rng, bh, bw)
        else:
            shape, local = "solid", _polygon(rng, bh, bw)
        local = _quantise(local)
        region = (slice(y0, y0 + bh), slice(x0, x0 + bw))
        colour = _foreground(rng, bh, bw, image[region])
        a = local[..., None]
        image[region] = a * colour + (1.0 - a) * image[region]
        for previous in objects:
            previous.alpha[region] *= 1.0 - local
        full = np.zeros((h, w), np.float32)
        full[region] = local
        objects.append(_Object(kind=kind, shape=shape, alpha=full))
    for obj in objects:
        obj.alpha = _quantise(obj.alpha)
    return _Scene(
        image=np.clip(np.round(image), 0, 255).astype(np.uint8), objects=objects, source=image_source
    )


def _coarse_mask(alpha: np.ndarray) -> np.ndarray:
    """SA-1B-like binary mask of a matte: threshold, then close small gaps (thin strands become blobs)."""
    mask = (alpha > 0.3).astype(np.uint8)
    if not mask.any():
        return mask.astype(bool)
    side = int(np.sqrt(mask.sum()))
    k = max(3, side // 12) | 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    return cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel).astype(bool)


def _trimap(alpha: np.ndarray) -> np.ndarray:
    """Trimap (0 background, 128 unknown, 255 foreground) with an unknown band around the transition."""
    h, w = alpha.shape
    k = max(3, min(h, w) // 40) | 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    fg = cv2.erode((alpha >= 1.0).astype(np.uint8), kernel).astype(bool)
    bg = cv2.erode((alpha <= 0.0).astype(np.uint8), kernel).astype(bool)
    trimap = np.full((h, w), 128, np.uint8)
    trimap[fg], trimap[bg] = 255, 0
    return trimap


# ----------------------------------------------------------------------------- encoding and writing


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _alpha_u8(alpha: np.ndarray) -> np.ndarray:
    return np.round(alpha * 255.0).astype(np.uint8)


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)


def _sample_rng(seed: int, part: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, part, index])


def _pick_scale(rng: np.random.Generator, *, smallest: int = 0) -> float:
    return float(OBJECT_SCALES[int(rng.integers(smallest, len(OBJECT_SCALES)))])


# ----------------------------------------------------------------------------- parts


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return rle


def _sa1b_record(
    rng: np.random.Generator, image_id: int, first_ann_id: int, h: int, w: int
) -> tuple[bytes, dict, dict[int, np.ndarray]]:
    """One SA-1B image: jpeg bytes, its json record, and exact alphas keyed by annotation id."""
    from pycocotools import mask as mask_utils

    n = int(rng.integers(3, 7))
    kinds = [("fine" if rng.random() < 0.6 else "solid") for _ in range(n)]
    # Large objects behind, small ones in front, so that small objects stay visible.
    scales = sorted((_pick_scale(rng) for _ in range(n)), reverse=True)
    scene = _scene(rng, h, w, kinds, scales)
    masks: list[tuple[np.ndarray, np.ndarray | None]] = []
    covered = np.zeros((h, w), bool)
    for obj in scene.objects:
        mask = _coarse_mask(obj.alpha)
        covered |= obj.alpha > 0.1
        masks.append((mask, obj.alpha))
    # Background "stuff" regions: half-planes of the photograph minus the objects.
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(int(rng.integers(1, 3))):
        angle = rng.uniform(0, 2 * np.pi)
        offset = rng.uniform(-0.3, 0.3) * min(h, w)
        side = (xx - w / 2) * np.cos(angle) + (yy - h / 2) * np.sin(angle) > offset
        masks.append((side & ~covered, None))
    annotations, alphas = [], {}
    ann_id = first_ann_id
    for mask, alpha in masks:
        area = int(mask.sum())
        if area < MIN_MASK_AREA:
            continue
        rle = _rle(mask)
        ys, xs = np.nonzero(mask)
        pick = int(rng.integers(len(xs)))
        annotations.append(
            {
                "id": ann_id,
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "area": area,
                "predicted_iou": round(float(rng.uniform(0.86, 1.02)), 6),
                "point_coords": [[float(xs[pick]), float(ys[pick])]],
                "crop_box": [0.0, 0.0, float(w), float(h)],
                "stability_score": round(float(rng.uniform(0.92, 0.99)), 6),
            }
        )
        if alpha is not None:
            alphas[ann_id] = alpha
        ann_id += 1
    record = {
        "image": {"image_id": image_id, "width": w, "height": h, "file_name": f"sa_{image_id}.jpg"},
        "annotations": annotations,
    }
    return _jpeg(scene.image), record, alphas


def _write_sa1b(
    out: Path, *, seed: int, num_shards: int, per_shard: int, size: tuple[int, int]
) -> list[Path]:
    shard_dir, alpha_dir = out / "sa1b", out / "sa1b_alpha"
    shard_dir.mkdir(parents=True, exist_ok=True)
    shards, ann_id = [], 1
    for s in range(num_shards):
        members = []
        for i in range(per_shard):
            image_id = s * per_shard + i + 1
            rng = _sample_rng(seed, _PART_SA1B, image_id)
            jpg, record, alphas = _sa1b_record(rng, image_id, ann_id, *size)
            ann_id += len(record["annotations"])
            members += [(f"sa_{image_id}.jpg", jpg), (f"sa_{image_id}.json", json.dumps(record).encode())]
            for aid, alpha in alphas.items():
                _write_file(alpha_dir / f"sa_{image_id}" / f"{aid}.png", encode_png(_alpha_u8(alpha)))
        path = shard_dir / f"sa_{s:06d}.tar"
        write_tar(path, members, compress=True)
        shards.append(path)
    return shards


def _visible(obj: _Object) -> bool:
    """Whether an object shows enough opaque pixels to be a target (not hidden by later objects)."""
    return int((obj.alpha > 0.5).sum()) >= MIN_MASK_AREA


def _matting_sample(rng: np.random.Generator, h: int, w: int, kind: str) -> tuple[_Scene, _Object]:
    """One target object composited last (so its alpha is exact), sometimes over a distractor."""
    kinds, scales = [], []
    if rng.random() < 0.5:
        kinds.append("solid")
        scales.append(_pick_scale(rng))
    kinds.append(kind)
    scales.append(_pick_scale(rng, smallest=1))
    for _ in range(MAX_DRAWS):
        scene = _scene(rng, h, w, kinds, scales)
        if _visible(scene.objects[-1]):
            break
    return scene, scene.objects[-1]


def _write_shards(
    directory: Path,
    name: str,
    *,
    count: int,
    shard_size: int,
    members: Callable[[int], list[tuple[str, bytes]]],
) -> list[Path]:
    """``name-000000.tar``, ... in ``directory``: samples 0..count-1, ``shard_size`` a tar, each sample's
    members from ``members(i)``."""
    directory.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(math.ceil(count / shard_size)):
        path = directory / f"{name}-{s:06d}.tar"
        samples = range(s * shard_size, min(count, (s + 1) * shard_size))
        write_tar(path, [member for i in samples for member in members(i)], compress=False)
        shards.append(path)
    return shards


def _matting_members(
    i: int, *, seed: int, part: int, split: str, size: tuple[int, int]
) -> list[tuple[str, bytes]]:
    rng = _sample_rng(seed, part, i)
    # Three fine samples for one solid one: micro detail is what the converter must learn.
    kind = "solid" if i % 4 == 3 else "fine"
    scene, target = _matting_sample(rng, *size, kind)
    key = f"synth_{split}_{i:06d}"
    meta = {"kind": kind, "source": f"synthetic/{target.shape}/{scene.source}"}
    return [
        (f"{key}.jpg", _jpeg(scene.image)),
        (f"{key}.alpha.png", encode_png(_alpha_u8(target.alpha))),
        (f"{key}.json", json.dumps(meta).encode()),
    ]


def _seg_members(i: int, *, seed: int, size: tuple[int, int]) -> list[tuple[str, bytes]]:
    rng = _sample_rng(seed, _PART_SEG, i)
    scene, target = _matting_sample(rng, *size, "solid")
    key = f"synth_seg_{i:06d}"
    mask = np.where(target.alpha > 0.5, 255, 0).astype(np.uint8)
    meta = {"kind": "solid", "source": f"synthetic/solid/{scene.source}"}
    return [
        (f"{key}.jpg", _jpeg(scene.image)),
        (f"{key}.mask.png", encode_png(mask)),
        (f"{key}.json", json.dumps(meta).encode()),
    ]


def _prompt(rng: np.random.Generator, alpha: np.ndarray, *, positives: int = 3, negatives: int = 2) -> dict:
    """MicroMat-3K prompt from a matte: bbox = the matte's support, points on alpha > 0.5 and off the
    matte (alpha 0) (X, Y)."""
    ys, xs = np.nonzero(alpha > 0)
    box = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
    on = np.argwhere(alpha > 0.5)
    if len(on) == 0:
        on = np.argwhere(alpha >= alpha.max())
    # negatives off the object: not on its translucent parts (hair, glass), unless it covers everything
    off = np.argwhere(alpha == 0)
    if len(off) == 0:
        off = np.argwhere(alpha <= 0.5)
    points = []
    for pool, label, k in ((on, 1, positives), (off, 0, negatives)):
        for j in rng.choice(len(pool), size=min(k, len(pool)), replace=False):
            y, x = pool[j]
            points.append([int(x), int(y), label])
    return {"point": points, "bbox": box}


def _write_micromat(out: Path, *, seed: int, instances: int, size: tuple[int, int]) -> Path:
    root = out / "micromat"
    for sub in (
        "img",
        "matte/fine",
        "matte/coarse",
        "seg/fine",
        "seg/coarse",
        "prompt/fine",
        "prompt/coarse",
    ):
        (root / sub).mkdir(parents=True, exist_ok=True)
    lines = []
    for n in range(math.ceil(instances / 2)):
        rng = _sample_rng(seed, _PART_MICROMAT, n)
        # One fine and one solid (coarse) instance per image; the solid one is composited last so
        # its visible alpha stays binary where the two overlap.
        kinds = ["fine", "solid"] if instances - 2 * n > 1 else ["fine"]
        scales = [_pick_scale(rng, smallest=1) for _ in kinds]
        for _ in range(MAX_DRAWS):
            scene = _scene(rng, *size, kinds, scales)
            if all(_visible(obj) for obj in scene.objects):
                break
        stem = f"{n + 1:04d}"
        _write_file(root / "img" / f"{stem}.png", encode_png(scene.image))
        for k, obj in enumerate(scene.objects, start=1):
            if not (obj.alpha > 0).any():
                continue
            subset = "fine" if obj.kind == "fine" else "coarse"
            name = f"{stem}_{k}"
            _write_file(root / "matte" / subset / f"{name}.png", encode_png(_alpha_u8(obj.alpha)))
            seg = np.where(_coarse_mask(obj.alpha), 255, 0).astype(np.uint8)
            _write_file(root / "seg" / subset / f"{name}.png", encode_png(seg))
            prompt = _prompt(rng, obj.alpha)
            _write_file(root / "prompt" / subset / f"{name}.json", json.dumps(prompt).encode())
            lines.append(
                f"img/{stem}.png matte/{subset}/{name}.png prompt/{subset}/{name}.json seg/{subset}/{name}.png"
            )
    _write_file(root / "data_list.txt", ("\n".join(lines) + "\n").encode())
    return root


def _write_matting_folder(
    root: Path, *, seed: int, part: int, prefix: str, count: int, size: tuple[int, int]
) -> Path:
    """AM-2K / AIM-500 layout: original/<stem>.jpg, mask/<stem>.png (alpha), trimap/<stem>.png."""
    for i in range(count):
        rng = _sample_rng(seed, part, i)
        scene, target = _matting_sample(rng, *size, "fine" if i % 3 != 2 else "solid")
        stem = f"{prefix}_{i + 1:04d}"
        _write_file(root / "original" / f"{stem}.jpg", _jpeg(scene.image))
        _write_file(root / "mask" / f"{stem}.png", encode_png(_alpha_u8(target.alpha)))
        _write_file(root / "trimap" / f"{stem}.png", encode_png(_trimap(target.alpha)))
    return root


def _write_preview(
    path: Path, *, seed: int, size: tuple[int, int], height: int = 128, tries: int = 64
) -> None:
    """One row per foreground shape (hair, twigs, net, glass, solid): image | alpha | coarse mask."""
    rows: dict[str, np.ndarray] = {}
    for i in range(tries):
        rng = _sample_rng(seed, _PART_MATTING_TRAIN, i)
        scene, target = _matting_sample(rng, *size, "solid" if i % 4 == 3 else "fine")
        if target.shape in rows:
            continue
        alpha = _alpha_u8(target.alpha)
        mask = np.where(_coarse_mask(target.alpha), 255, 0).astype(np.uint8)
        row = np.concatenate(
            [scene.image, *(np.repeat(m[..., None], 3, axis=2) for m in (alpha, mask))], axis=1
        )
        width = int(row.shape[1] * height / row.shape[0])
        rows[target.shape] = cv2.resize(row, (width, height), interpolation=cv2.INTER_AREA)
        if len(rows) == len(_FINE_SHAPES) + 1:
            break
    order = [*_FINE_SHAPES, "solid"]
    _write_file(path, encode_png(np.concatenate([rows[k] for k in order if k in rows], axis=0)))


# ----------------------------------------------------------------------------- API


def _check_size(name: str, value: int, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _is_marker(path: Path) -> bool:
    """Whether ``path`` is the marker this module writes (its settings as JSON), not any file of that name:
    the folders it marks get deleted."""
    try:
        settings = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(settings, dict) and {"seed", "num_shards", "num_images"} <= settings.keys()


def _prepare_out(out: Path, settings: dict) -> None:
    """Create OUT (or clear an earlier synthetic dataset in it) and prove it is writable.

    A previous run is recognised by its marker file; only the parts this module writes are removed, so
    files from another seed or size never linger. A non-empty OUT without the marker is refused.
    """
    marker = out / MARKER
    if out.is_dir() and any(out.iterdir()) and not _is_marker(marker):
        raise FileExistsError(
            f"--out {str(out)!r} is not empty and holds no earlier synthetic dataset ({MARKER} written "
            "by this command); choose an empty or new directory"
        )
    try:
        for part in _PARTS if _is_marker(marker) else ():
            target = out / part
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        out.mkdir(parents=True, exist_ok=True)
        # Written first, so that the next run can clear an interrupted one; complete once all is written.
        _write_marker(marker, settings, complete=False)
    except OSError as err:
        raise OSError(f"--out {str(out)!r} is not a writable directory: {err.strerror or err}") from err


def _write_marker(marker: Path, settings: dict, *, complete: bool) -> None:
    write_atomic(marker, (json.dumps({**settings, "complete": complete}, sort_keys=True) + "\n").encode())


def is_complete(out: str | Path) -> bool:
    """Whether ``out`` holds a synthetic dataset whose every part was written (not an interrupted run's)."""
    marker = Path(out) / MARKER
    return _is_marker(marker) and json.loads(marker.read_text()).get("complete") is True


def generate(
    out: str | Path,
    *,
    seed: int = 0,
    num_shards: int = 2,
    num_images: int = 8,
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    sa1b_size: tuple[int, int] | None = None,
    matting_train: int = 64,
    matting_val: int = 16,
    seg: int = 32,
    shard_size: int = 32,
    micromat: int = 12,
    eval_images: int = 4,
) -> SyntheticLayout:
    """Write the synthetic dataset under ``out`` (see the module docstring for the layout).

    Args:
        out: output directory, created if missing.
        seed: random seed; the same seed gives byte-identical files.
        num_shards: number of SA-1B tars.
        num_images: images per SA-1B tar.
        image_size: (H, W) of every image.
        sa1b_size: (H, W) of the SA-1B images; None uses ``image_size``.
        matting_train: matting training samples; matting_val: validation samples.
        seg: segmentation (STL) samples.
        shard_size: samples per matting / segmentation tar.
        micromat: MicroMat-3K instances (half fine, half coarse).
        eval_images: images in each of AM-2K and AIM-500.

    Returns:
        The paths written.

    Raises:
        ValueError: a size is not a positive integer, or an image side is under 64.
        OSError: ``out`` cannot be created or written.
    """
    for name, value in (
        ("num_shards", num_shards),
        ("num_images", num_images),
        ("matting_train", matting_train),
        ("matting_val", matting_val),
        ("seg", seg),
        ("shard_size", shard_size),
        ("micromat", micromat),
        ("eval_images", eval_images),
    ):
        _check_size(name, value)
    _check_size("seed", seed, minimum=0)
    sa1b_size = tuple(int(side) for side in (sa1b_size or image_size))
    for name, hw in (("image_size", tuple(image_size)), ("sa1b_size", sa1b_size)):
        if len(hw) != 2:
            raise ValueError(f"{name} must be (H, W), got {hw!r}")
        for side in hw:
            _check_size(f"{name} side", side, minimum=MIN_IMAGE_SIDE)
    size = (int(image_size[0]), int(image_size[1]))
    out = Path(out)
    settings = {
        "seed": int(seed),
        "num_shards": int(num_shards),
        "num_images": int(num_images),
        "image_size": list(size),
        "sa1b_size": list(sa1b_size),
        "matting_train": int(matting_train),
        "matting_val": int(matting_val),
        "seg": int(seg),
        "shard_size": int(shard_size),
        "micromat": int(micromat),
        "eval_images": int(eval_images),
    }
    _prepare_out(out, settings)

    layout = SyntheticLayout(root=out)
    layout.sa1b_shards = _write_sa1b(
        out, seed=seed, num_shards=num_shards, per_shard=num_images, size=sa1b_size
    )
    layout.sa1b_alpha = out / "sa1b_alpha"

    def matting(split: str, part: int, count: int) -> list[Path]:
        members = partial(_matting_members, seed=seed, part=part, split=split, size=size)
        return _write_shards(
            out / "matting" / split, "matting", count=count, shard_size=shard_size, members=members
        )

    layout.matting_train = matting("train", _PART_MATTING_TRAIN, matting_train)
    layout.matting_val = matting("val", _PART_MATTING_VAL, matting_val)
    seg_members = partial(_seg_members, seed=seed, size=size)
    layout.seg = _write_shards(out / "seg", "seg", count=seg, shard_size=shard_size, members=seg_members)
    layout.micromat = _write_micromat(out, seed=seed, instances=micromat, size=size)
    layout.am2k = _write_matting_folder(
        out / "am2k" / "validation", seed=seed, part=_PART_AM2K, prefix="m", count=eval_images, size=size
    )
    layout.aim500 = _write_matting_folder(
        out / "aim500", seed=seed, part=_PART_AIM500, prefix="o", count=eval_images, size=size
    )
    layout.preview = out / "preview.png"
    _write_preview(layout.preview, seed=seed, size=size)
    _write_marker(out / MARKER, settings, complete=True)
    log.info("synthetic dataset (seed %d) written to %s", seed, out)
    return layout


# ----------------------------------------------------------------------------- CLI


def _int_at_least(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1  # not a number: the same error as a number out of range
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1, "positive")


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "non-negative")


def _image_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected HxW such as 384x512, got {text!r}")
    h, w = int(match.group(1)), int(match.group(2))
    if min(h, w) < MIN_IMAGE_SIDE:
        raise argparse.ArgumentTypeError(f"both sides must be >= {MIN_IMAGE_SIDE} pixels, got {text!r}")
    return h, w


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zim-lightning synth",
        description="Write the synthetic dataset (SA-1B, matting/seg shards, MicroMat-3K, AM-2K, AIM-500).",
    )
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default 0)")
    p.add_argument("--num-shards", type=_positive_int, default=2, help="SA-1B tars (default 2)")
    p.add_argument("--num-images", type=_positive_int, default=8, help="images per SA-1B tar (default 8)")
    p.add_argument("--image-size", type=_image_size, default=DEFAULT_IMAGE_SIZE, help="HxW (default 384x512)")
    p.add_argument(
        "--sa1b-full-size",
        "--sa1b-size",
        dest="sa1b_full_size",
        action="store_true",
        help=f"SA-1B images at the real size {SA1B_FULL_SIZE[0]}x{SA1B_FULL_SIZE[1]} (slower; --sa1b-size: "
        "the older name)",
    )
    p.add_argument("--matting-train", type=_positive_int, default=64, help="matting training samples")
    p.add_argument("--matting-val", type=_positive_int, default=16, help="matting validation samples")
    p.add_argument("--seg", type=_positive_int, default=32, help="segmentation (STL) samples")
    p.add_argument("--shard-size", type=_positive_int, default=32, help="samples per matting/seg tar")
    p.add_argument("--micromat", type=_positive_int, default=12, help="MicroMat-3K instances")
    p.add_argument("--eval-images", type=_positive_int, default=4, help="images in AM-2K and in AIM-500")
    return p


def _summary(layout: SyntheticLayout, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"synthetic dataset in {layout.root} ({seconds:.1f} s)")
    table.add_column("part")
    table.add_column("path")
    table.add_column("files", justify="right")

    def rel(p: Path) -> str:
        return str(p.relative_to(layout.root))

    table.add_row("SA-1B", "sa1b/", str(len(layout.sa1b_shards)))
    table.add_row(
        "SA-1B exact alphas", rel(layout.sa1b_alpha), str(sum(1 for _ in layout.sa1b_alpha.rglob("*.png")))
    )
    table.add_row("matting train", "matting/train/", str(len(layout.matting_train)))
    table.add_row("matting val", "matting/val/", str(len(layout.matting_val)))
    table.add_row("segmentation", "seg/", str(len(layout.seg)))
    instances = len((layout.micromat / "data_list.txt").read_text().splitlines())
    table.add_row("MicroMat-3K", rel(layout.micromat), f"{instances} instances")
    table.add_row("AM-2K", rel(layout.am2k), str(sum(1 for _ in (layout.am2k / "original").iterdir())))
    table.add_row("AIM-500", rel(layout.aim500), str(sum(1 for _ in (layout.aim500 / "original").iterdir())))
    table.add_row("preview", rel(layout.preview), "1")
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    """`zim-lightning synth --out DIR --seed N [sizes]`; returns 0, or 2 when OUT is not writable."""
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    try:
        layout = generate(
            args.out,
            seed=args.seed,
            num_shards=args.num_shards,
            num_images=args.num_images,
            image_size=args.image_size,
            sa1b_size=SA1B_FULL_SIZE if args.sa1b_full_size else None,
            matting_train=args.matting_train,
            matting_val=args.matting_val,
            seg=args.seg,
            shard_size=args.shard_size,
            micromat=args.micromat,
            eval_images=args.eval_images,
        )
    except (OSError, ValueError) as err:
        print(f"zim-lightning synth: error: {err}", file=sys.stderr)
        return 2
    _summary(layout, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
