"""SCoSPARC, the method alone: torch and numpy, no Ray, no storage, no CLI.

    from scosparc_core import SCoSPARC
    model = SCoSPARC.from_checkpoints(backbone=PATH_OR_URL_OR_None, head=PATH_OR_URL, device="cpu")
    pred = model.predict_group(images, crf="coca")

Names are imported on first use, so that ``scosparc_core.crf``, ``.image`` and ``.metrics`` (what CPU workers
need for the CRF, masks and metrics) load without torch.
"""
from importlib import import_module

_EXPORTS = {
    "CheckpointError": "checkpoints",
    "load_head_checkpoint": "checkpoints",
    "save_head_checkpoint": "checkpoints",
    "CRF_PRESETS": "crf",
    "CRFParams": "crf",
    "dense_crf": "crf",
    "dense_crf_torch": "crf",
    "LossParts": "losses",
    "training_loss": "losses",
    "BackboneUnavailableError": "modeling",
    "DinoBackbone": "modeling",
    "Stage1Head": "modeling",
    "GroupEngine": "engine",
    "GroupResult": "engine",
    "GroupPrediction": "predictor",
    "PreparedImage": "predictor",
    "SCoSPARC": "predictor",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'scosparc_core' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
