"""Attention maps equal the official zim_anything ones (box and point, edge cases), batched."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from zim_lightning.models.attention_mask import (
    attention_map_from_prompts,
    box_attention_map,
    point_attention_map,
)

official_zim = pytest.importorskip("zim_anything.modeling.zim", reason="official zim_anything not installed")


@pytest.fixture(scope="module")
def official():
    """The official Zim object; only its mask functions are under test, so the ONNX parts are stubs."""
    return official_zim.Zim(encoder=None, decoder=SimpleNamespace(num_mask_tokens=4))


def random_boxes(generator: torch.Generator, count: int) -> torch.Tensor:
    # Corners in any order, some partly outside the 1024 frame, some on cell borders (multiples of 16).
    boxes = torch.rand(count, 4, generator=generator) * 1200 - 60
    boxes[: count // 4] = torch.randint(-2, 66, (count // 4, 4), generator=generator).float() * 16
    return boxes


def test_box_map_equals_official(official):
    generator = torch.Generator().manual_seed(0)
    boxes = random_boxes(generator, 400)
    edge_cases = torch.tensor(
        [
            [0.0, 0.0, 1023.9, 1023.9],  # whole frame
            [15.99, 15.99, 16.0, 16.0],  # straddles a cell border
            [500.0, 500.0, 500.0, 500.0],  # degenerate: one cell
            [-10.0, -10.0, 5.0, 5.0],  # starts left of the frame
            [1000.0, 1000.0, 1500.0, 1500.0],  # ends beyond the frame
            [1100.0, 1100.0, 1200.0, 1200.0],  # entirely beyond the frame: empty
            [-20.0, -20.0, -17.0, -17.0],  # left of the frame by less than two cells
            [800.0, 900.0, 100.0, 200.0],  # corners swapped
        ]
    )
    boxes = torch.cat([boxes, edge_cases])
    # The official code wraps negative slice ends (boxes ending >= 2 cells left of / above the frame);
    # documented deviation, tested separately below.
    keep = (torch.trunc(boxes[:, 0::2].amax(1) / 16) > -2) & (torch.trunc(boxes[:, 1::2].amax(1) / 16) > -2)
    boxes = boxes[keep]
    ours = box_attention_map(boxes)
    assert ours.shape == (len(boxes), 64, 64)
    assert torch.equal(ours, official.bbox_attn_mask(boxes))


def test_box_far_outside_gives_empty_map():
    # Official: slice end -1 wraps and marks most of the grid; ours: nothing (decoder then un-masks).
    boxes = torch.tensor([[-100.0, 10.0, -40.0, 300.0], [10.0, -300.0, 300.0, -40.0]])
    assert box_attention_map(boxes).sum() == 0


def test_point_map_equals_official(official):
    generator = torch.Generator().manual_seed(1)
    coords = torch.rand(60, 5, 2, generator=generator) * 1200 - 80  # some off the grid
    coords[:10] = torch.randint(-1, 65, (10, 5, 2), generator=generator).float() * 16  # on cell borders
    coords[10, :, :] = torch.tensor([-0.5, -0.5])  # just left of the frame: int() truncates to cell 0
    coords[11, :, :] = 1030.0  # all off the grid: empty map
    coords[12, :, :] = torch.tensor(
        [[0.0, 0.0], [1023.0, 1023.0], [0.0, 1023.0], [1023.0, 0.0], [512.0, 512.0]]
    )
    ours = point_attention_map(coords, torch.ones(coords.shape[:2], dtype=torch.bool))
    assert torch.equal(ours, official.point_attn_mask(coords))
    assert ours[11].sum() == 0


def test_point_map_other_sigma_truncates_like_official(official):
    # With a small sigma the (6*sigma+3)-cell kernel no longer covers the grid: truncation must match.
    official.encode_kernel = 3
    official.g = official_zim.gaussian(3)
    try:
        coords = torch.rand(20, 3, 2, generator=torch.Generator().manual_seed(2)) * 1024
        ours = point_attention_map(coords, torch.ones(20, 3, dtype=torch.bool), sigma=3)
        assert torch.equal(ours, official.point_attn_mask(coords))
    finally:
        official.encode_kernel = 21
        official.g = official_zim.gaussian(21)


def test_invalid_points_are_ignored():
    coords = torch.tensor([[[100.0, 100.0], [900.0, 900.0]]])
    both = point_attention_map(coords, torch.tensor([[True, True]]))
    first = point_attention_map(coords[:, :1], torch.tensor([[True]]))
    assert torch.equal(point_attention_map(coords, torch.tensor([[True, False]])), first)
    assert not torch.equal(both, first)


def test_prompts_choose_box_or_points_per_sample(official):
    coords = torch.tensor(
        [
            [[100.0, 200.0], [600.0, 700.0], [-0.5, -0.5]],  # box + padding
            [[300.0, 400.0], [800.0, 100.0], [-0.5, -0.5]],  # positive, negative, padding
            [[50.0, 60.0], [700.0, 900.0], [400.0, 400.0]],  # box corners + a point: box wins
        ]
    )
    labels = torch.tensor([[2.0, 3.0, -1.0], [1.0, 0.0, -1.0], [2.0, 3.0, 1.0]])
    maps = attention_map_from_prompts(coords, labels)
    assert torch.equal(maps[0], official.bbox_attn_mask(torch.tensor([[100.0, 200.0, 600.0, 700.0]]))[0])
    # Padding (-1) is not a point of the map, though int(-0.5/16) = 0 lies on the grid.
    assert torch.equal(maps[1], official.point_attn_mask(coords[1:2, :2])[0])
    assert torch.equal(maps[2], official.bbox_attn_mask(torch.tensor([[50.0, 60.0, 700.0, 900.0]]))[0])
