"""The LightningModule that runs the label converter in Lightning's predict loop (ZIM paper, Sec. 3.1).

Building SA1B-Matte is one converter prediction per SA-1B mask. ``Trainer.predict`` gives the device
placement, mixed precision (bf16 on GPU) and DDP / multi-node launch (torchrun, SLURM) for free; this
module only wraps the converter. It knows no file formats: the batches come from, and the predictions go
to, :mod:`zim_lightning.sa1b_matte`, which owns the reading and writing.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn


class MatteBuildModule(L.LightningModule):
    """Predict-only wrapper of a label converter.

    Batches are dicts with ``image`` uint8 Bx3xSxS RGB in [0, 255], ``mask`` uint8 Bx1xSxS in [0, 255]
    (the coarse segmentation resampled to the converter's frame, binary 0 / 255 as in training: see
    ``sa1b_matte.converter_mask``) and any other entries (bookkeeping of the data side), which stay on
    the host. Masks travel as uint8 rather than float [0, 1] for the same reason images do: four times
    less host-to-device traffic; they are scaled to [0, 1] here.

    Args:
        net: the converter, ``net(images Bx3xSxS [0, 255], masks Bx1xSxS [0, 1])["alpha"]`` Bx1xSxS in
            [0, 1], e.g. :class:`zim_lightning.models.converter.MattingConverter`.
    """

    def __init__(self, *, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Move only the image and mask tensors; the bookkeeping entries stay on the host as they are."""
        moved = dict(batch)
        for name in ("image", "mask"):
            moved[name] = batch[name].to(device, non_blocking=True)
        return moved

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Convert a batch of masks into mattes.

        Returns:
            uint8 Bx1xSxS alpha in [0, 255], on the module's device: quantised here to the 8 bits the
            mattes are stored in, so a quarter of the float's bytes cross back to the host.
        """
        images, masks = batch["image"], batch["mask"]
        if images.shape[0] == 0:
            # a batch that only closes a shard (its images had no convertible mask)
            return torch.zeros((0, 1, *images.shape[-2:]), dtype=torch.uint8, device=images.device)
        alpha = self.net(images.float(), masks.float() / 255.0)["alpha"]
        return (alpha.float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
