"""SCoSPARC, the method alone: torch and numpy, no Ray, no storage, no CLI.

    from scosparc_core import SCoSPARC
    model = SCoSPARC.from_checkpoints(backbone=PATH_OR_URL_OR_None, head=PATH_OR_URL, device="cpu")
    pred = model.predict_group(images, crf="coca")
"""
from .checkpoints import CheckpointError, load_head_checkpoint, save_head_checkpoint
from .crf import CRF_PRESETS, CRFParams
from .losses import LossParts, training_loss
from .modeling import BackboneUnavailableError, DinoBackbone, Stage1Head
from .predictor import GroupPrediction, GroupStage1, PreparedImage, SCoSPARC, Stage2Image, crf_refine, stage2_image

__all__ = [
    "CRF_PRESETS",
    "BackboneUnavailableError",
    "CRFParams",
    "CheckpointError",
    "DinoBackbone",
    "GroupPrediction",
    "GroupStage1",
    "LossParts",
    "PreparedImage",
    "SCoSPARC",
    "Stage1Head",
    "load_head_checkpoint",
    "Stage2Image",
    "crf_refine",
    "save_head_checkpoint",
    "stage2_image",
    "training_loss",
]
