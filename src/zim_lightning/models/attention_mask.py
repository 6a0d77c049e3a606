"""Prompt-aware attention maps for ZIM's masked attention (ZIM paper, Sec. 3.3, "prompt-aware masked
attention"), batched.

The maps follow the official ``zim_anything`` release value for value, so that a decoder exported from
here receives the same ``attn_mask`` input as the official runner computes:

- a **box** gives 1 on the grid cells ``int(x1/stride)..int(x2/stride)`` (inclusive, ``int`` truncating
  towards zero, corners ordered by min/max, clipped to the grid) and 0 elsewhere;
- **points** give, per cell, the maximum over the points of a 2D Gaussian (peak 1, ``sigma`` in cells)
  centred on the point's cell ``(int(x/stride), int(y/stride))``, truncated to a square kernel of side
  ``6*sigma+3``; points whose cell lies off the grid are skipped; point labels (positive or negative)
  do not change the map.

One deliberate difference: for a box lying entirely left of (or above) the image by at least two cells,
the official code slices with a negative end index, which Python wraps around, and marks most of the
grid. Here such a box gives an empty map (which the decoder then treats as "no restriction").

Everything is vectorised over the batch and the prompts (no Python loop), so the maps can be built on
the GPU inside a training step and traced for ONNX.
"""

from __future__ import annotations

import torch

from zim_lightning.prompt_labels import (
    LABEL_BOX_BOTTOM_RIGHT,
    LABEL_BOX_TOP_LEFT,
    LABEL_NEGATIVE,
    LABEL_POSITIVE,
)

#: Side of the attention map in cells: the 64x64 image embedding of SAM's ViT at 1024 input.
ATTENTION_MAP_SIZE = 64
#: Pixels per attention-map cell (the ViT patch size).
ATTENTION_STRIDE = 16
#: Standard deviation of the point Gaussians, in cells (official release and paper).
ATTENTION_SIGMA = 21


def _cell(coord: torch.Tensor, stride: int) -> torch.Tensor:
    """Grid cell of a pixel coordinate, truncating towards zero like Python's ``int()``."""
    return torch.trunc(coord / stride).long()


def box_attention_map(
    boxes: torch.Tensor, *, size: int = ATTENTION_MAP_SIZE, stride: int = ATTENTION_STRIDE
) -> torch.Tensor:
    """Binary attention maps of boxes.

    Args:
        boxes: Bx4 float, ``(x1, y1, x2, y2)`` pixels in the 1024 frame; corners in any order.
        size: side of the map in cells.
        stride: pixels per cell.

    Returns:
        Bxsizexsize float in {0, 1}: 1 on the cells the box covers.
    """
    xs, ys = boxes[:, 0::2], boxes[:, 1::2]  # Bx2 each
    x_lo, x_hi = _cell(xs.amin(dim=1), stride), _cell(xs.amax(dim=1), stride)  # B
    y_lo, y_hi = _cell(ys.amin(dim=1), stride), _cell(ys.amax(dim=1), stride)
    cells = torch.arange(size, device=boxes.device)
    in_x = (cells[None, :] >= x_lo[:, None]) & (cells[None, :] <= x_hi[:, None])  # Bxsize
    in_y = (cells[None, :] >= y_lo[:, None]) & (cells[None, :] <= y_hi[:, None])
    return (in_y[:, :, None] & in_x[:, None, :]).to(
        boxes.dtype if boxes.is_floating_point() else torch.float32
    )


def point_attention_map(
    point_coords: torch.Tensor,
    valid: torch.Tensor,
    *,
    size: int = ATTENTION_MAP_SIZE,
    stride: int = ATTENTION_STRIDE,
    sigma: int = ATTENTION_SIGMA,
) -> torch.Tensor:
    """Soft attention maps of point sets: the maximum of one Gaussian per point.

    Args:
        point_coords: BxNx2 float, ``(X, Y)`` pixels in the 1024 frame.
        valid: BxN bool, which points count (False for padding).
        size: side of the map in cells.
        stride: pixels per cell.
        sigma: Gaussian standard deviation in cells; the kernel is truncated to ``6*sigma+3`` cells.

    Returns:
        Bxsizexsize float in [0, 1]; all zeros for a sample without a valid point on the grid.
    """
    cx, cy = _cell(point_coords[..., 0], stride), _cell(point_coords[..., 1], stride)  # BxN
    on_grid = valid & (cx >= 0) & (cy >= 0) & (cx < size) & (cy < size)
    cells = torch.arange(size, device=point_coords.device)
    dx = cells[None, None, :] - cx[..., None]  # BxNxsize, integer offsets
    dy = cells[None, None, :] - cy[..., None]
    # Integer squared distance, then one division and exp: the same float ops as the official kernel.
    d2 = dy[..., :, None] ** 2 + dx[..., None, :] ** 2  # BxNxsizexsize
    gauss = torch.exp(-d2 / (2 * sigma**2))
    # The official kernel is a (6*sigma+3)-wide square centred on the point's cell.
    reach = 3 * sigma + 1
    in_kernel = (dy.abs() <= reach)[..., :, None] & (dx.abs() <= reach)[..., None, :]
    gauss = torch.where(in_kernel & on_grid[..., None, None], gauss, torch.zeros((), dtype=gauss.dtype))
    if gauss.shape[1] == 0:
        return gauss.new_zeros(gauss.shape[0], size, size)
    return gauss.amax(dim=1).to(point_coords.dtype)


def is_box_prompt(point_labels: torch.Tensor) -> torch.Tensor:
    """Which samples are box prompts: those with a point labelled 2 or 3.

    Args:
        point_labels: BxN float, SAM's ONNX labels (-1 pad, 0 negative, 1 positive, 2/3 box corners).

    Returns:
        B bool.
    """
    corner = (point_labels == LABEL_BOX_TOP_LEFT) | (point_labels == LABEL_BOX_BOTTOM_RIGHT)
    return corner.any(dim=1)


def attention_map_from_prompts(
    point_coords: torch.Tensor,
    point_labels: torch.Tensor,
    *,
    size: int = ATTENTION_MAP_SIZE,
    stride: int = ATTENTION_STRIDE,
    sigma: int = ATTENTION_SIGMA,
) -> torch.Tensor:
    """Attention map of each prompt set: box map for box samples, point map for point samples.

    A sample with any point labelled 2 or 3 is a box sample; its box spans the min/max of the points
    labelled 2 or 3 (so points given beside a box do not change its map). Other samples use their
    points labelled 0 or 1; padding (-1) is ignored.

    Args:
        point_coords: BxNx2 float, ``(X, Y)`` pixels in the 1024 frame.
        point_labels: BxN float, SAM's ONNX labels.
        size: side of the map in cells.
        stride: pixels per cell.
        sigma: Gaussian standard deviation in cells.

    Returns:
        Bxsizexsize float in [0, 1].
    """
    point_coords = point_coords.float()
    corner = (point_labels == LABEL_BOX_TOP_LEFT) | (point_labels == LABEL_BOX_BOTTOM_RIGHT)  # BxN
    box_sample = corner.any(dim=1)  # B
    # Python scalars, not torch.tensor(inf, device=...): that would be a blocking host-to-device copy.
    lo = torch.where(corner[..., None], point_coords, float("inf")).amin(dim=1)  # Bx2, inf for point samples
    hi = torch.where(corner[..., None], point_coords, float("-inf")).amax(dim=1)
    # Point samples get a dummy box; their box map is discarded below.
    boxes = torch.where(box_sample[:, None], torch.cat([lo, hi], dim=1), torch.zeros((), device=lo.device))
    box_map = box_attention_map(boxes, size=size, stride=stride)
    point_valid = (point_labels == LABEL_NEGATIVE) | (point_labels == LABEL_POSITIVE)
    point_map = point_attention_map(point_coords, point_valid, size=size, stride=stride, sigma=sigma)
    return torch.where(box_sample[:, None, None], box_map, point_map)
