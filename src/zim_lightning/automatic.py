"""Automatic matting of everything in an image (`zim-lightning matte-all`).

ZIM keeps SAM's promptable interface (paper, Sec. 3), so SAM's automatic mask generation (Kirillov et
al. 2023, Sec. 7.1 and Appendix A) carries over to mattes: prompt the decoder with a regular grid of
points, batched over one image embedding; keep the mattes whose predicted IoU and stability are high;
drop duplicates by non-maximum suppression on the boxes of the binarised mattes; optionally repeat on
overlapping zoomed-in crops. The differences from SAM's generator: the outputs are alpha mattes in [0, 1]
rather than binary masks, and the stability score is measured on the alpha (thresholds 0.5 +- offset,
as the official ZIM release does) rather than on logits.

The grid, crop and box helpers come from ``segment_anything.utils.amg``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from segment_anything.utils.amg import (
    batch_iterator,
    batched_mask_to_box,
    build_all_layer_point_grids,
    calculate_stability_score,
    generate_crop_boxes,
    is_box_near_crop_edge,
    remove_small_regions,
    uncrop_boxes_xyxy,
    uncrop_points,
)
from torchvision.ops import batched_nms, box_area

from zim_lightning.data.tar_writer import staging_folder
from zim_lightning.images import alpha_to_uint8

logger = logging.getLogger(__name__)

#: Bounds of the grid and the crop layers: a million point prompts per crop, and 4**5 crops in the last
#: layer, are already far past any use (the memory and time grow with their squares).
MAX_POINTS_PER_SIDE = 1024
MAX_CROP_LAYERS = 5
#: Alpha above which a pixel counts as foreground for boxes, areas and NMS.
BINARIZE_THRESHOLD = 0.5
#: The same threshold on alpha stored as uint8 (alpha * 255 rounded): a value above it is foreground.
_UINT8_THRESHOLD = int(BINARIZE_THRESHOLD * 255)


@dataclass(frozen=True)
class Preset:
    """Generator settings tuned for a use; any can be overridden one by one."""

    points_per_side: int
    points_per_batch: int
    pred_iou_thresh: float
    stability_score_thresh: float
    crop_n_layers: int
    min_mask_region_area: int


#: ``fast``: a 16x16 grid and no crops, for CPU and the tiny model; ``quality``: SAM's 32x32 grid,
#: larger decoder batches and one crop layer, for a GPU and a real checkpoint. A decoder batch holds
#: points_per_batch x 4 float32 mattes at the image's size (32 x 4 x 12 MP x 4 bytes, about 6 GB, and
#: about twice that at the peak, while the kept ones are copied), hence 32, not 64. Each returned object
#: is a float32 matte at the image's size (48 MB at 12 MP).
PRESETS: dict[str, Preset] = {
    "fast": Preset(
        points_per_side=16,
        points_per_batch=16,
        pred_iou_thresh=0.86,
        stability_score_thresh=0.9,
        crop_n_layers=0,
        min_mask_region_area=0,
    ),
    "quality": Preset(
        points_per_side=32,
        points_per_batch=32,
        pred_iou_thresh=0.88,
        stability_score_thresh=0.92,
        crop_n_layers=1,
        min_mask_region_area=100,
    ),
}


def default_preset(model_name: str | None) -> str:
    """The preset a model size gets when none is named: ``fast`` for ``tiny``, else ``quality``."""
    return "fast" if model_name == "tiny" else "quality"


@dataclass
class _Candidates:
    """Mattes kept so far for one crop.

    To bound memory before NMS (a 32x32 grid gives thousands of candidates), each alpha is kept as
    uint8 and cut to its support, the box of its non-zero pixels; it is placed back in the full frame
    only once it survives.
    """

    alphas: list[torch.Tensor]  # each hxw uint8 (alpha * 255), the support patch
    offsets: list[tuple[int, int]]  # (X, Y) of each patch's top-left pixel in the crop frame
    boxes: list[torch.Tensor]  # each 4, XYXY in the crop frame (inclusive max, SAM's convention)
    iou: list[torch.Tensor]
    stability: list[torch.Tensor]
    points: list[torch.Tensor]  # each 2, (X, Y) in the crop frame


@dataclass
class _Mattes:
    """An image's candidate mattes, one row each, in the full image's coordinates.

    ``alphas`` are uint8 patches at ``offsets`` until :meth:`ZimAutomaticMatteGenerator._place` puts them
    in the full frame; ``boxes`` (XYXY, inclusive max) and ``crops`` (XYXY) are Nx4 float tensors.
    """

    alphas: list[torch.Tensor | None]
    offsets: list[tuple[int, int]]
    points: list[torch.Tensor]
    boxes: torch.Tensor
    crops: torch.Tensor
    iou: torch.Tensor
    stability: torch.Tensor

    @classmethod
    def from_crop(cls, found: _Candidates, crop_box: list[int]) -> _Mattes:
        """A crop's candidates moved from the crop's frame into the image's."""
        count = len(found.alphas)
        return cls(
            alphas=list(found.alphas),
            offsets=[(x + crop_box[0], y + crop_box[1]) for x, y in found.offsets],
            points=[uncrop_points(p[None], crop_box)[0] for p in found.points],
            boxes=uncrop_boxes_xyxy(torch.stack(found.boxes), crop_box).float()
            if count
            else torch.zeros(0, 4),
            crops=torch.tensor([crop_box] * count, dtype=torch.float32).reshape(count, 4),
            iou=torch.stack(found.iou).float() if count else torch.zeros(0),
            stability=torch.stack(found.stability).float() if count else torch.zeros(0),
        )

    @classmethod
    def concatenate(cls, parts: list[_Mattes]) -> _Mattes:
        return cls(
            alphas=[a for p in parts for a in p.alphas],
            offsets=[o for p in parts for o in p.offsets],
            points=[q for p in parts for q in p.points],
            boxes=torch.cat([p.boxes for p in parts]),
            crops=torch.cat([p.crops for p in parts]),
            iou=torch.cat([p.iou for p in parts]),
            stability=torch.cat([p.stability for p in parts]),
        )

    def take(self, keep: list[int] | torch.Tensor) -> _Mattes:
        """The rows ``keep`` (indices), in that order."""
        index = torch.as_tensor(keep, dtype=torch.long)
        rows = index.tolist()
        return _Mattes(
            alphas=[self.alphas[i] for i in rows],
            offsets=[self.offsets[i] for i in rows],
            points=[self.points[i] for i in rows],
            boxes=self.boxes[index],
            crops=self.crops[index],
            iou=self.iou[index],
            stability=self.stability[index],
        )


def _nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices kept by non-maximum suppression of Nx4 XYXY boxes with inclusive max (SAM's convention),
    compared as the pixels they cover: a matte one pixel thin covers an area of 1, not 0 (torchvision
    takes max as exclusive, so its IoU with itself would be NaN and it would never be suppressed)."""
    edges = boxes.float() + torch.tensor([0.0, 0.0, 1.0, 1.0])
    return batched_nms(edges, scores, torch.zeros(len(scores), dtype=torch.long), threshold)


class ZimAutomaticMatteGenerator:
    """Matte every object in an image with a grid of point prompts.

    Args:
        model: a ZIM network (``zim_model_registry[...]``), in eval mode on its device.
        points_per_side: grid points along each side of the image (the grid has this squared points).
        points_per_batch: point prompts decoded together (decoder batch size; memory grows with it).
        pred_iou_thresh: keep mattes whose predicted IoU exceeds this (0 keeps all).
        stability_score_thresh: keep mattes whose stability score is at least this (0 keeps all).
        stability_score_offset: the alpha offset around 0.5 for the stability score: the IoU of the
            mattes binarised at 0.5 + offset and at 0.5 - offset.
        box_nms_thresh: box IoU above which the lower-scored of two mattes of one crop is dropped.
        crop_n_layers: crop layers; layer i splits the image into (2**i)**2 overlapping crops.
        crop_nms_thresh: box IoU above which duplicates across crops are dropped (smaller crops win).
        crop_overlap_ratio: overlap of neighbouring crops as a fraction of the image side (layer 1).
        crop_n_points_downscale_factor: crop layer i uses ``points_per_side / factor**i`` points a side.
        min_mask_region_area: if > 0, islands and holes of the binarised matte smaller than this many
            pixels are removed (alpha set to 0) or filled (alpha set to 1), then NMS runs again.
        multimask_output: decode all 4 mask tokens per point (True, as SAM) or only the first.
        mask_dedupe_iou_thresh: if set, after NMS also drop a matte whose binarised mask has an IoU
            above this with a higher-scored kept one (catches duplicates with differing boxes).
        precision: the predictor's (``"fp32"``, or ``"bf16"`` for the ViT encoder under autocast, see
            :class:`~zim_lightning.predictor.ZimPredictor`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.92,
        stability_score_offset: float = 0.1,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        min_mask_region_area: int = 0,
        multimask_output: bool = True,
        mask_dedupe_iou_thresh: float | None = None,
        precision: str = "fp32",
    ) -> None:
        from zim_lightning.predictor import ZimPredictor

        counts = {  # (value, least, most)
            "points_per_side": (points_per_side, 1, MAX_POINTS_PER_SIDE),
            "points_per_batch": (points_per_batch, 1, None),
            "crop_n_layers": (crop_n_layers, 0, MAX_CROP_LAYERS),
            "crop_n_points_downscale_factor": (crop_n_points_downscale_factor, 1, None),
            "min_mask_region_area": (min_mask_region_area, 0, None),
        }
        for name, (value, least, most) in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name}: expected an integer >= {least}, got {value!r}")
            if most is not None and value > most:
                raise ValueError(f"{name}: expected at most {most}, got {value}")
        deepest = points_per_side // crop_n_points_downscale_factor**crop_n_layers
        if deepest < 1:
            raise ValueError(
                f"points_per_side {points_per_side} / crop_n_points_downscale_factor "
                f"{crop_n_points_downscale_factor} ** crop_n_layers {crop_n_layers} leaves the last crop "
                "layer no point: use fewer layers or a smaller factor"
            )
        if not 0.0 <= crop_overlap_ratio < 1.0:
            raise ValueError(f"crop_overlap_ratio: expected in [0, 1), got {crop_overlap_ratio}")
        if not 0.0 < stability_score_offset < BINARIZE_THRESHOLD:
            raise ValueError(f"stability_score_offset: expected in (0, 0.5), got {stability_score_offset}")
        fractions = {
            "pred_iou_thresh": pred_iou_thresh,
            "stability_score_thresh": stability_score_thresh,
            "box_nms_thresh": box_nms_thresh,
            "crop_nms_thresh": crop_nms_thresh,
            "mask_dedupe_iou_thresh": 0.0 if mask_dedupe_iou_thresh is None else mask_dedupe_iou_thresh,
        }
        for name, value in fractions.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: expected in [0, 1], got {value}")
        self.predictor = ZimPredictor(model, precision=precision)
        # Normalised [0, 1] (X, Y) grids, one per crop layer.
        self.point_grids = build_all_layer_point_grids(
            points_per_side, crop_n_layers, crop_n_points_downscale_factor
        )
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.min_mask_region_area = min_mask_region_area
        self.multimask_output = multimask_output
        self.mask_dedupe_iou_thresh = mask_dedupe_iou_thresh

    @classmethod
    def from_preset(cls, model: torch.nn.Module, preset: str, **overrides: Any) -> ZimAutomaticMatteGenerator:
        """A generator with a named preset's settings (see :data:`PRESETS`), some overridden."""
        if preset not in PRESETS:
            raise ValueError(f"preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
        settings = {**vars(PRESETS[preset]), **{k: v for k, v in overrides.items() if v is not None}}
        return cls(model, **settings)

    @torch.inference_mode()
    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Matte every object found in an image.

        Args:
            image: HxWx3 uint8 RGB.

        Returns:
            One dict per object, sorted by area (largest first):
            ``alpha`` HxW float32 in [0, 1]; ``bbox`` [x, y, w, h] of the binarised matte (alpha > 0.5),
            pixels, as segment-anything's generator gives it (w = x2 - x1 of the inclusive box, one less
            than the pixels it spans); ``area`` its pixel count; ``predicted_iou``; ``stability_score``;
            ``point_coords`` [[x, y]], the prompt that produced it (original pixels); ``crop_box``
            [x, y, w, h].
        """
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image: expected HxWx3 uint8 RGB, got shape {image.shape} dtype {image.dtype}")
        height, width = image.shape[:2]
        crop_boxes, layer_indices = generate_crop_boxes(
            (height, width), self.crop_n_layers, self.crop_overlap_ratio
        )

        pieces = []
        for crop_box, layer in zip(crop_boxes, layer_indices, strict=True):
            pieces.append(_Mattes.from_crop(self._process_crop(image, crop_box, layer), crop_box))
        found = _Mattes.concatenate(pieces)
        if not found.alphas:
            return []
        if len(crop_boxes) > 1:
            # Across crops, prefer the matte from the smaller (more zoomed-in) crop.
            areas = box_area(found.crops)
            found = found.take(_nms(found.boxes, 1.0 / areas, self.crop_nms_thresh))
        found.alphas = [
            self._place(a, o, height, width) for a, o in zip(found.alphas, found.offsets, strict=True)
        ]
        if self.min_mask_region_area > 0:
            cleaned, boxes, keep = self._clean_regions(found.alphas, found.boxes)
            found = found.take(keep)
            found.alphas, found.boxes = cleaned, boxes
        if self.mask_dedupe_iou_thresh is not None:
            found = found.take(self._dedupe_by_mask_iou(found.alphas, found.iou))

        records = []
        for index in range(len(found.alphas)):
            alpha, found.alphas[index] = found.alphas[index], None  # each matte is released once converted
            x1, y1, x2, y2 = found.boxes[index].tolist()
            cx1, cy1, cx2, cy2 = found.crops[index].int().tolist()
            records.append(
                {
                    "alpha": alpha.float().div_(255.0).numpy(),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": int((alpha > _UINT8_THRESHOLD).sum()),
                    "predicted_iou": float(found.iou[index]),
                    "stability_score": float(found.stability[index]),
                    "point_coords": [[float(v) for v in found.points[index].tolist()]],
                    "crop_box": [cx1, cy1, cx2 - cx1, cy2 - cy1],
                }
            )
        records.sort(key=lambda record: record["area"], reverse=True)
        return records

    # ------------------------------------------------------------------------------------------------
    def _process_crop(self, image: np.ndarray, crop_box: list[int], layer: int) -> _Candidates:
        x0, y0, x1, y1 = crop_box
        found = _Candidates([], [], [], [], [], [])
        if x1 <= x0 or y1 <= y0:  # segment-anything's crops of a 1-pixel-wide image have no pixels
            return found
        crop = np.ascontiguousarray(image[y0:y1, x0:x1])
        crop_h, crop_w = crop.shape[:2]
        self.predictor.set_image(crop)
        # Grid points, (X, Y) pixels in the crop frame.
        grid = self.point_grids[layer] * np.array([[crop_w, crop_h]], dtype=np.float64)
        full_image = [0, 0, image.shape[1], image.shape[0]]
        for (batch,) in batch_iterator(self.points_per_batch, grid):
            self._process_batch(batch, crop_box, full_image, found)
        if not found.alphas:
            return found
        boxes = torch.stack(found.boxes).float()
        scores = torch.stack(found.iou).float()
        keep = _nms(boxes, scores, self.box_nms_thresh).tolist()
        return _Candidates(*([items[i] for i in keep] for items in vars(found).values()))

    def _process_batch(
        self, points: np.ndarray, crop_box: list[int], full_image: list[int], found: _Candidates
    ) -> None:
        alpha, iou = self._decode_points(points)  # BxKxhxw in [0, 1], BxK
        count = alpha.shape[1]
        alpha = alpha.flatten(0, 1)
        iou = iou.flatten(0, 1)
        prompts = torch.as_tensor(points, dtype=torch.float32, device=alpha.device).repeat_interleave(
            count, dim=0
        )

        keep = (
            iou > self.pred_iou_thresh if self.pred_iou_thresh > 0 else torch.ones_like(iou, dtype=torch.bool)
        )
        alpha, iou, prompts = alpha[keep], iou[keep], prompts[keep]
        stability = calculate_stability_score(alpha, BINARIZE_THRESHOLD, self.stability_score_offset)
        # From here on the alpha is kept as uint8; binarising the stored values keeps boxes and areas
        # consistent with what the caller receives.
        alpha = (alpha * 255.0).round_().to(torch.uint8)
        binary = alpha > _UINT8_THRESHOLD
        keep = stability >= self.stability_score_thresh
        keep &= binary.flatten(1).any(dim=1)  # an empty matte has no box to suppress with
        alpha, iou, prompts, stability, binary = (t[keep] for t in (alpha, iou, prompts, stability, binary))
        boxes = batched_mask_to_box(binary)
        # Mattes cut by a crop's border are partial views of an object that another crop sees whole.
        if crop_box != full_image and len(boxes):
            keep = ~is_box_near_crop_edge(boxes, crop_box, full_image)
            alpha, iou, prompts, stability, boxes = (t[keep] for t in (alpha, iou, prompts, stability, boxes))
        # Support boxes (alpha > 0) contain the foreground boxes, so they are never empty here.
        support = batched_mask_to_box(alpha > 0).int().tolist()
        alpha = alpha.cpu()
        for index, (x1, y1, x2, y2) in enumerate(support):
            found.alphas.append(alpha[index, y1 : y2 + 1, x1 : x2 + 1].clone())
            found.offsets.append((x1, y1))
        found.boxes += list(boxes.cpu())
        found.iou += list(iou.float().cpu())
        found.stability += list(stability.float().cpu())
        found.points += list(prompts.cpu())

    def _decode_points(self, points: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one positive point per prompt, all in one decoder call.

        Args:
            points: Bx2 (X, Y) pixels of the image set in the predictor.

        Returns:
            alpha BxKxHxW in [0, 1] at the set image's size, predicted IoU BxK.
        """
        predictor = self.predictor
        # predict_torch takes prompts in the resized 1024 frame.
        resized = predictor.transform.apply_coords(
            np.asarray(points, dtype=np.float64), predictor.original_size
        )
        # on the host: predict_torch checks them there and copies them to the device without waiting
        coords = torch.as_tensor(resized, dtype=torch.float32)[:, None, :]
        labels = torch.ones(coords.shape[:2], dtype=torch.float32)
        alpha, iou, _ = predictor.predict_torch(coords, labels, multimask_output=self.multimask_output)
        return alpha, iou

    @staticmethod
    def _place(patch: torch.Tensor, offset: tuple[int, int], height: int, width: int) -> torch.Tensor:
        """Put an hxw alpha patch whose top-left pixel is at (X, Y) = ``offset`` into an HxW frame."""
        x, y = offset
        if (x, y) == (0, 0) and tuple(patch.shape) == (height, width):
            return patch
        full = torch.zeros((height, width), dtype=patch.dtype)
        full[y : y + patch.shape[0], x : x + patch.shape[1]] = patch
        return full

    def _clean_regions(
        self, alphas: list[torch.Tensor], boxes: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor, list[int]]:
        """Remove small islands and fill small holes of the binarised mattes, then suppress again.

        Returns the cleaned mattes, their boxes and the indices kept. Changed mattes rank below
        unchanged ones in the second NMS, as they needed repair.
        """
        threshold = _UINT8_THRESHOLD
        cleaned, scores, new_boxes = [], [], []
        for alpha in alphas:
            binary = (alpha > threshold).numpy()
            filled, changed_holes = remove_small_regions(binary, self.min_mask_region_area, mode="holes")
            result, changed_islands = remove_small_regions(filled, self.min_mask_region_area, mode="islands")
            alpha = alpha.clone()
            alpha[torch.from_numpy(result & ~binary)] = 255  # filled holes become foreground
            removed = binary & ~result
            if removed.any():
                alpha[torch.from_numpy(removed | _soft_edge_of(removed, result, (alpha > 0).numpy()))] = 0
            cleaned.append(alpha)
            scores.append(0.0 if (changed_holes or changed_islands) else 1.0)
            new_boxes.append(batched_mask_to_box(torch.from_numpy(result)[None])[0])
        new_boxes_t = torch.stack(new_boxes).float()
        nonempty = [i for i, alpha in enumerate(cleaned) if bool((alpha > threshold).any())]
        if not nonempty:
            return [], new_boxes_t[:0], []
        index = torch.tensor(nonempty)
        keep = _nms(
            new_boxes_t[index], torch.tensor(scores)[index], max(self.box_nms_thresh, self.crop_nms_thresh)
        )
        kept = index[keep].tolist()
        return [cleaned[i] for i in kept], new_boxes_t[kept], kept

    def _dedupe_by_mask_iou(self, alphas: list[torch.Tensor], scores: torch.Tensor) -> list[int]:
        """Greedy suppression on binarised-matte IoU, highest predicted IoU first."""
        threshold = _UINT8_THRESHOLD
        order = torch.argsort(scores, descending=True).tolist()
        kept: list[int] = []
        masks = [(alpha > threshold).flatten() for alpha in alphas]
        for i in order:
            duplicate = False
            for j in kept:
                union = (masks[i] | masks[j]).sum().item()
                if union and (masks[i] & masks[j]).sum().item() / union > self.mask_dedupe_iou_thresh:
                    duplicate = True
                    break
            if not duplicate:
                kept.append(i)
        return sorted(kept)


def _soft_edge_of(removed: np.ndarray, kept: np.ndarray, support: np.ndarray) -> np.ndarray:
    """A removed island's soft edge (HxW bool each): the soft pixels of ``support`` that go with the
    ``removed`` foreground. A part of the support that holds removed foreground and no ``kept`` goes
    whole; in a part that holds both (the island's soft edge runs into the object's), each soft pixel
    goes with its nearest foreground pixel of that part."""
    _, parts = cv2.connectedComponents(support.astype(np.uint8), connectivity=8)
    edge = np.zeros_like(removed)
    for label in np.unique(parts[removed]):
        part = parts == label
        if not (kept & part).any():
            edge |= part
            continue
        rows, columns = np.nonzero(part)
        window = np.s_[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
        inside = part[window]
        gone, stays = removed[window] & inside, kept[window] & inside
        _, (ny, nx) = ndimage.distance_transform_edt(~(gone | stays), return_indices=True)
        edge[window] |= inside & gone[ny, nx] & ~stays
    return edge


# ----------------------------------------------------------------------------------------------------
# `zim-lightning matte-all`

#: Folders that write_results stages its files in, inside the output folder.
STAGING_PREFIX = ".matte-all-"
#: Opacity of each object's colour in the overlay picture.
OVERLAY_OPACITY = 0.55


def overlay_picture(image: np.ndarray, records: list[dict[str, Any]], *, seed: int = 0) -> np.ndarray:
    """Colour every matte over the image, largest first so small objects stay visible.

    Args:
        image: HxWx3 uint8 RGB.
        records: :meth:`ZimAutomaticMatteGenerator.generate` output.
        seed: seed of the random colours.

    Returns:
        HxWx3 uint8 RGB.
    """
    rng = np.random.default_rng(seed)
    out = image.astype(np.float32)
    for record in sorted(records, key=lambda r: r["area"], reverse=True):
        colour = rng.uniform(40, 255, size=3).astype(np.float32)
        weight = record["alpha"][..., None] * OVERLAY_OPACITY
        out = out * (1.0 - weight) + colour * weight
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


#: The names of the mattes :func:`write_results` writes (and removes when it writes again).
OUTPUT_MATTE = re.compile(r"matte_\d{3,}\.png")
#: The other files it writes.
OUTPUT_FILES = ("index.json", "overlay.png")


def _is_output_name(name: str) -> bool:
    return name in OUTPUT_FILES or OUTPUT_MATTE.fullmatch(name) is not None


def write_results(
    out_dir: Path, image: np.ndarray, records: list[dict[str, Any]], meta: dict[str, Any]
) -> dict[str, Any]:
    """Write one 8-bit alpha PNG per object, ``index.json`` and ``overlay.png`` into ``out_dir``.

    Everything is written to a staging folder inside ``out_dir`` first. Then the earlier run's
    ``index.json`` and mattes (``matte_<3 or more digits>.png``, the names this writes: other files,
    such as a ``matte_photo.png`` of the user's, stay) are removed, the new files moved in, and
    ``index.json`` last: the folder holds exactly the objects its ``index.json`` lists, and a folder
    without ``index.json`` is an interrupted run's. (One run per output folder at a time: a run removes
    the staging folders it finds, a killed run's.)

    Returns:
        The index written to ``index.json``.
    """
    with staging_folder(out_dir, STAGING_PREFIX) as staging:
        index = _write_files(staging, image, records, meta)
        (out_dir / "index.json").unlink(missing_ok=True)
        for stale in out_dir.glob("matte_*.png"):
            if OUTPUT_MATTE.fullmatch(stale.name):
                stale.unlink()
        for produced in sorted(staging.iterdir(), key=lambda p: p.name == "index.json"):
            produced.replace(out_dir / produced.name)
    return index


def _write_files(
    out_dir: Path, image: np.ndarray, records: list[dict[str, Any]], meta: dict[str, Any]
) -> dict[str, Any]:
    width = max(3, len(str(max(len(records) - 1, 0))))
    objects = []
    for index, record in enumerate(records):
        name = f"matte_{index:0{width}d}.png"
        alpha = alpha_to_uint8(record["alpha"])
        Image.fromarray(alpha, mode="L").save(out_dir / name)
        objects.append(
            {
                "file": name,
                "bbox": [round(float(v), 2) for v in record["bbox"]],
                "area": record["area"],
                "predicted_iou": round(record["predicted_iou"], 6),
                "stability_score": round(record["stability_score"], 6),
                "point_coords": record["point_coords"],
                "crop_box": [round(float(v), 2) for v in record["crop_box"]],
            }
        )
    Image.fromarray(overlay_picture(image, records)).save(out_dir / "overlay.png")
    index = {**meta, "width": int(image.shape[1]), "height": int(image.shape[0]), "objects": objects}
    (out_dir / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


def main(argv: list[str] | None = None) -> int:
    """Run ``zim-lightning matte-all``."""
    from zim_lightning.command_checks import check_out_folder, device_for_command
    from zim_lightning.images import read_rgb
    from zim_lightning.model_options import (
        add_precision_argument,
        add_zim_arguments,
        describe_model,
        zim_for_command,
    )
    from zim_lightning.models.build import variant_of

    parser = argparse.ArgumentParser(
        prog="zim-lightning matte-all",
        description="Matte every object in an image with a grid of point prompts (automatic matting).",
    )
    parser.add_argument("image", type=Path, help="input image (any format Pillow reads)")
    add_zim_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="settings preset (default: fast for tiny, else quality)",
    )
    parser.add_argument("--points-per-side", type=int, default=None)
    parser.add_argument("--points-per-batch", type=int, default=None)
    parser.add_argument("--pred-iou-thresh", type=float, default=None)
    parser.add_argument("--stability-score-thresh", type=float, default=None)
    parser.add_argument("--box-nms-thresh", type=float, default=None)
    parser.add_argument("--crop-n-layers", type=int, default=None)
    parser.add_argument("--min-mask-region-area", type=int, default=None)
    parser.add_argument("--mask-dedupe-iou-thresh", type=float, default=None)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_precision_argument(parser)
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for random weights (no checkpoint) and colours"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_out_folder(parser, args.out)
    if args.image.parent.resolve() == args.out.resolve() and _is_output_name(args.image.name):
        parser.error(
            f"{args.image}: the input would be replaced by an output of the same name in --out; "
            "choose another --out"
        )
    try:
        image = read_rgb(args.image)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))

    torch.manual_seed(args.seed)
    model = zim_for_command(parser, args).to(device_for_command(parser, args.device)).eval()
    preset = args.preset or default_preset(args.model or variant_of(model))
    overrides = {
        "points_per_side": args.points_per_side,
        "points_per_batch": args.points_per_batch,
        "pred_iou_thresh": args.pred_iou_thresh,
        "stability_score_thresh": args.stability_score_thresh,
        "box_nms_thresh": args.box_nms_thresh,
        "crop_n_layers": args.crop_n_layers,
        "min_mask_region_area": args.min_mask_region_area,
        "mask_dedupe_iou_thresh": args.mask_dedupe_iou_thresh,
    }
    try:
        generator = ZimAutomaticMatteGenerator.from_preset(
            model, preset, precision=args.precision, **overrides
        )
    except ValueError as error:
        parser.error(str(error))
    try:
        records = generator.generate(image)
    except ValueError as error:  # an image the network cannot take (e.g. 1x3000 pixels)
        parser.error(f"{args.image}: {error}")
    meta = {
        "image": args.image.name,
        "model": describe_model(args),
        "checkpoint": Path(args.checkpoint).name if args.checkpoint else None,
        "sam_checkpoint": Path(args.sam_checkpoint).name if args.sam_checkpoint else None,
        "preset": preset,
        "precision": args.precision,
        "settings": {k: v for k, v in overrides.items() if v is not None},
    }
    write_results(args.out, image, records, meta)
    print(f"{len(records)} objects matted; wrote {args.out}/index.json, overlay.png and one PNG per object")
    return 0
