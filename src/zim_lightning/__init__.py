"""zim-lightning: an open, trainable ZIM (Zero-Shot Image Matting for Anything) on PyTorch Lightning.

The public API mirrors segment-anything's::

    from zim_lightning import zim_model_registry, ZimPredictor

    model = zim_model_registry["vit_b"](checkpoint="zim_vit_b.ckpt")
    predictor = ZimPredictor(model)

Names load lazily, so ``zim-lightning --help`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "zim_model_registry": "zim_lightning.models.build",
    "converter_model_registry": "zim_lightning.models.converter",
    "build_zim": "zim_lightning.models.build",
    "load_sam_weights": "zim_lightning.models.build",
    "Zim": "zim_lightning.models.zim",
    "ZimPredictor": "zim_lightning.predictor",
    "ZimAutomaticMatteGenerator": "zim_lightning.automatic",
    "matting_errors": "zim_lightning.metrics",
}

__all__ = [
    "Zim",
    "ZimAutomaticMatteGenerator",
    "ZimPredictor",
    "build_zim",
    "converter_model_registry",
    "load_sam_weights",
    "matting_errors",
    "zim_model_registry",
]

if TYPE_CHECKING:
    from zim_lightning.automatic import ZimAutomaticMatteGenerator
    from zim_lightning.metrics import matting_errors
    from zim_lightning.models.build import build_zim, load_sam_weights, zim_model_registry
    from zim_lightning.models.converter import converter_model_registry
    from zim_lightning.models.zim import Zim
    from zim_lightning.predictor import ZimPredictor


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'zim_lightning' has no attribute {name!r}")
