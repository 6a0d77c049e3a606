"""The reading side (DataLoader workers): each claimed shard read, decoded and cropped into batches that never
span two shards."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.utils.data

from zim_lightning.data.sa1b import CorruptSample, decode_mask, iter_tar, sa1b_record
from zim_lightning.data.skips import SkipTally
from zim_lightning.sa1b_matte.geometry import (
    CropConfig,
    converter_mask,
    crop_square,
    mask_band,
    matte_box,
    resample_square,
    rle_box,
)
from zim_lightning.sa1b_matte.resume import ShardClaims


@dataclass
class ImageItem:
    """An image that goes to the output: its key, original JPEG bytes and parsed json."""

    key: str
    jpg: bytes
    record: dict


@dataclass
class MaskItem:
    """One mask of the last :class:`ImageItem`: row ``row`` of the batch tensors is its converter input.

    ``square`` is (x0, y0, side), ``box`` (x, y, w, h), both in image pixels; ``band`` is the h x w
    uint8 clamp region or None.
    """

    ann_index: int
    row: int
    square: tuple[int, int, int]
    box: tuple[int, int, int, int]
    band: np.ndarray | None


@dataclass
class ShardEnd:
    """The end of an input shard, with what the reading side counted."""

    samples: int
    skipped: dict[str, int]


def _annotation_id(annotation: dict) -> str | None:
    """The id as it appears in member names, or None if it cannot name a tar member."""
    ann_id = annotation.get("id")
    if isinstance(ann_id, bool) or not isinstance(ann_id, int | str):
        return None
    text = str(ann_id)
    return text if text and all(c.isalnum() or c in "_-" for c in text) else None


def _shard_batches(shard: Path, config: CropConfig, batch_size: int) -> Iterator[dict[str, Any]]:
    """Batches of converter inputs for one shard, with the bookkeeping the writer needs, in order.

    Each batch is ``{"image": uint8 Bx3xSxS, "mask": uint8 Bx1xSxS, "shard": name, "items": [...]}``
    with B <= batch_size; ``items`` holds :class:`ImageItem`, :class:`MaskItem` (pointing at rows) and,
    in the last batch, a :class:`ShardEnd`. A batch never holds two shards.
    """
    size = config.crop_size
    skips = SkipTally()
    samples = 0
    items: list[Any] = []
    images: list[np.ndarray] = []
    masks: list[np.ndarray] = []

    def flush(final: bool) -> dict[str, Any]:
        nonlocal items, images, masks
        if final:
            items.append(ShardEnd(samples=samples, skipped=dict(skips.counts)))
        batch = {
            "image": torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
            if images
            else torch.zeros((0, 3, size, size), dtype=torch.uint8),
            "mask": torch.from_numpy(np.stack(masks))[:, None]
            if masks
            else torch.zeros((0, 1, size, size), dtype=torch.uint8),
            "shard": shard.name,
            "items": items,
        }
        items, images, masks = [], [], []
        return batch

    for sample in iter_tar(str(shard), counter=skips):
        samples += 1
        key = sample["__key__"]
        try:
            image, record = sa1b_record(sample)
            height, width = record["image"]["height"], record["image"]["width"]
            if image.shape[:2] != (height, width):
                raise CorruptSample(
                    f"image is {image.shape[1]}x{image.shape[0]}, its json says {width}x{height}",
                    key=key,
                    reason="corrupt_image",
                )
        except CorruptSample as error:
            skips.skip(error.reason, error.key, error)
            continue
        items.append(ImageItem(key=key, jpg=sample["jpg"], record=record))
        whole = None
        if config.mode == "whole":
            # one resize per image, shared by all its masks
            whole = resample_square(image, *crop_square((0, 0, width, height), (height, width), config), size)
        seen: set[str] = set()
        for index, annotation in enumerate(record["annotations"]):
            ann_id = _annotation_id(annotation)
            if ann_id is None or ann_id in seen:
                skips.skip(
                    "bad_json", f"{key} annotation {annotation.get('id')!r}", "unusable or repeated id"
                )
                continue
            seen.add(ann_id)
            try:
                mask = decode_mask(annotation, key=key, image_size=(height, width))
            except CorruptSample as error:
                skips.skip(error.reason, error.key, error)
                continue
            box = rle_box(annotation)
            bx, by, bw, bh, margin = matte_box(box, (height, width), config.margin)
            square = crop_square(box, (height, width), config)
            band = None
            if config.clamp:
                band = mask_band(mask[by : by + bh, bx : bx + bw], margin)
            x0, y0, side = square
            masks.append(converter_mask(mask, x0, y0, side, size))
            images.append(whole if whole is not None else resample_square(image, x0, y0, side, size))
            items.append(
                MaskItem(ann_index=index, row=len(images) - 1, square=square, box=(bx, by, bw, bh), band=band)
            )
            if len(images) == batch_size:
                yield flush(final=False)
    yield flush(final=True)


class ShardDataset(torch.utils.data.IterableDataset):
    """Batches of converter inputs for a list of shards; DataLoader workers take whole shards each.

    Args:
        shards: the shards to build, in order.
        config: cropping options.
        batch_size: masks per batch (the last batch of a shard may hold fewer).
        claims: the run's claims: every worker (of every rank sharing them) builds the shards it claims
            first, in order.
    """

    def __init__(
        self,
        *,
        shards: Sequence[Path],
        config: CropConfig,
        batch_size: int,
        claims: ShardClaims,
    ) -> None:
        super().__init__()
        self.shards = list(shards)
        self.config = config
        self.batch_size = batch_size
        self.claims = claims

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for shard in self.shards:
            if self.claims.claim(shard):
                yield from _shard_batches(shard, self.config, self.batch_size)


def worker_init(_: int, *, log_level: int = logging.WARNING) -> None:
    # one OpenCV thread per worker: the workers are the parallelism
    cv2.setNumThreads(1)
    # spawned workers start with no logging set up; they report what they clean up and skip
    logging.basicConfig(level=log_level, format=f"%(levelname)s %(name)s (worker {os.getpid()}): %(message)s")
