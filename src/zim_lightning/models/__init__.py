"""Plain nn.Modules of ZIM and the label converter; no Lightning, no file formats."""

from zim_lightning.models.attention_mask import (
    attention_map_from_prompts,
    box_attention_map,
    point_attention_map,
)
from zim_lightning.models.build import (
    ZIM_VARIANTS,
    LoadReport,
    build_zim,
    load_sam_weights,
    zim_model_registry,
)
from zim_lightning.models.checkpoint import CheckpointError, load_exactly, read_state_dict
from zim_lightning.models.converter import converter_model_registry
from zim_lightning.models.zim import Zim

__all__ = [
    "ZIM_VARIANTS",
    "CheckpointError",
    "LoadReport",
    "Zim",
    "attention_map_from_prompts",
    "box_attention_map",
    "build_zim",
    "converter_model_registry",
    "load_exactly",
    "load_sam_weights",
    "point_attention_map",
    "read_state_dict",
    "zim_model_registry",
]
