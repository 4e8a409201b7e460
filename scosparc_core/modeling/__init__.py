"""Networks: the frozen DINO backbone and the stage-1 correspondence head."""
from .backbone import DEFAULT_BACKBONE, BackboneOutput, BackboneUnavailableError, DinoBackbone, cls_attention_maps
from .stage1 import Stage1Head, full_matrix_stage1

__all__ = [
    "DEFAULT_BACKBONE",
    "BackboneOutput",
    "BackboneUnavailableError",
    "DinoBackbone",
    "Stage1Head",
    "cls_attention_maps",
    "full_matrix_stage1",
]
