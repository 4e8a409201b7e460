"""The user-facing API: ``SCoSPARC.from_checkpoints(...).predict_group(images)``."""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .checkpoints import load_head_checkpoint, save_head_checkpoint
from .crf import CRFParams, crf_params
from .engine import GroupEngine
from .image import crf_image, network_pixels, to_original_size, to_rgb
from .modeling.backbone import DEFAULT_BACKBONE, DinoBackbone
from .modeling.stage1 import Stage1Head


@dataclass
class PreparedImage:
    """One decoded image: network pixels (224, 224, 3) uint8 (PIL bilinear), the CRF's colour input (224, 224, 3)
    uint8 (OpenCV bilinear), and the original size."""

    pixels: np.ndarray
    crf_rgb: np.ndarray
    height: int
    width: int

    @classmethod
    def from_image(cls, image) -> "PreparedImage":
        rgb = to_rgb(image)
        return cls(pixels=network_pixels(rgb), crf_rgb=crf_image(rgb), height=rgb.shape[0], width=rgb.shape[1])


@dataclass
class GroupPrediction:
    """The result for a group of N images; every map is (N, 224, 224) unless said otherwise.

    ``masks`` holds one uint8 mask per image at its original (H, W), as the paper code writes its PNGs.
    ``timings`` gives seconds per stage: decode, backbone, stage1, stage2, crf.
    """

    stage1_weights: np.ndarray  # (N, P)
    stage1_map: np.ndarray
    confidences: np.ndarray  # (N,)
    confidence: float
    threshold: float
    stage1_mask: np.ndarray
    prototype: np.ndarray  # (C,)
    stage2_mask: np.ndarray
    mask: np.ndarray
    masks: list[np.ndarray]
    regions_found: list[int]
    regions_kept: list[int]
    fallback: list[bool]
    timings: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.masks)


class SCoSPARC:
    """Frozen DINO backbone + stage-1 head + adaptive threshold + region filter + dense CRF.

    >>> model = SCoSPARC.from_checkpoints(backbone="dino_vitbase8_pretrain.pth", head="model_combined.pt")
    >>> pred = model.predict_group(images, crf="coca")   # PIL images or HxWx3 uint8 arrays, any sizes

    The work is done by a ``GroupEngine`` (``model.engine``), the same one the pipeline's GPU actors run.
    """

    def __init__(
        self,
        backbone: DinoBackbone,
        head: Stage1Head,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "auto",
        micro_batch: int | None = None,
        compile: bool = False,
        crf_workers: int = 0,
    ):
        device = torch.device(device)
        self.engine = GroupEngine(backbone, head, device=device, precision=dtype, micro_batch=micro_batch,
                                  crf_workers=crf_workers)
        if compile:
            backbone.compile_forward()

    @property
    def backbone(self) -> DinoBackbone:
        return self.engine.backbone

    @property
    def head(self) -> Stage1Head:
        return self.engine.head

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @classmethod
    def from_checkpoints(
        cls,
        backbone=None,
        head=None,
        device: str | torch.device = "cpu",
        *,
        backbone_name: str = DEFAULT_BACKBONE,
        random_init: bool = False,
        dtype: str | torch.dtype = "auto",
        micro_batch: int | None = None,
        compile: bool = False,
        crf_workers: int = 0,
        storage_options: dict | None = None,
        **backbone_kwargs,
    ) -> "SCoSPARC":
        """backbone: DINO state_dict path/URL, or None for timm's pretrained weights (needs a network).
        head: official-format stage-1 checkpoint path/URL. With ``random_init=True`` whichever is None gets
        random weights, with a warning; without it a missing head is an error. ``dtype``: the backbone's number
        format (``scosparc_core.precision``: auto = float32, on the CPU and on CUDA).
        ``micro_batch``: backbone images per forward (default per device). ``compile=True``: see
        ``DinoBackbone.compile_forward``. ``crf_workers`` >= 2 runs a group's pydensecrf CRFs in that many
        spawned processes (scripts then need the ``if __name__ == "__main__":`` guard). ``storage_options`` go
        to fsspec when a checkpoint is a URL (a dict, or a function of the URL that returns one)."""
        if head is None and not random_init:
            raise ValueError(
                "no stage-1 head checkpoint: pass head='model_combined.pt' (official format) or a checkpoint "
                "written by training, or random_init=True for tests"
            )
        net = DinoBackbone.create(
            backbone_name,
            checkpoint=backbone,
            random_init=random_init and backbone is None,
            storage_options=storage_options,
            **backbone_kwargs,
        )
        with torch.random.fork_rng(devices=[]):  # a random head is the same in every process (actors, re-runs)
            torch.manual_seed(0)
            stage1_head = Stage1Head(net.embed_dim)
        if head is not None:
            load_head_checkpoint(stage1_head, head, storage_options)
        else:
            warnings.warn("stage-1 head has RANDOM weights (random_init=True): its masks mean nothing", stacklevel=2)
        return cls(net, stage1_head, device=device, dtype=dtype, micro_batch=micro_batch, compile=compile,
                   crf_workers=crf_workers)

    def save_head(self, dest) -> None:
        save_head_checkpoint(self.head, dest)

    # -- stages ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def stage1(self, tokens: torch.Tensor) -> torch.Tensor:
        """One group's tokens (N, P, C) -> stage-1 weights (N, P): those ``predict_group`` computes."""
        return self.engine._weights(tokens.to(self.device, torch.float32))

    # -- whole group ----------------------------------------------------------------------------------------
    def predict_group(self, images, crf: str | CRFParams | None = "coca", crf_backend: str = "auto") -> GroupPrediction:
        """images: a list of PIL images or (H, W, 3) uint8 arrays of any sizes (other modes are converted).
        ``crf_backend``: ``auto`` (the torch CRF on CUDA, pydensecrf on the CPU), ``torch`` or ``pydensecrf``.

        An empty list gives an empty prediction with NaN confidence and threshold.
        """
        params = crf_params(crf)  # fail on a bad preset before any work
        start = time.perf_counter()
        prepared = []
        for i, image in enumerate(images):
            try:
                prepared.append(PreparedImage.from_image(image))
            except Exception as exc:
                raise ValueError(f"image {i}: {exc}") from exc
        return self.predict_prepared(prepared, params, crf_backend, decode_s=time.perf_counter() - start)

    def predict_prepared(self, prepared: list[PreparedImage], crf: str | CRFParams | None = "coca",
                         crf_backend: str = "auto", decode_s: float = 0.0) -> GroupPrediction:
        """Like ``predict_group``, for images already decoded."""
        shape = (0, 224, 224, 3)
        pixels = np.stack([p.pixels for p in prepared]) if prepared else np.zeros(shape, np.uint8)
        rgb = np.stack([p.crf_rgb for p in prepared]) if prepared else np.zeros(shape, np.uint8)
        r = self.engine.run([pixels], [rgb], crf=crf, crf_backend=crf_backend, details=True)[0]
        d = r.details
        with _timed(r.timings, "stage2"):
            masks = [to_original_size(r.final[i], p.height, p.width) for i, p in enumerate(prepared)]
        return GroupPrediction(
            stage1_weights=d.stage1_weights,
            stage1_map=d.stage1_map,
            confidences=r.image_confidence,
            confidence=r.confidence,
            threshold=r.threshold,
            stage1_mask=d.stage1_mask,
            prototype=d.prototype,
            stage2_mask=d.stage2_mask,
            mask=d.mask,
            masks=masks,
            regions_found=[int(v) for v in r.regions_found],
            regions_kept=[int(v) for v in r.regions_kept],
            fallback=[bool(v) for v in r.fallback],
            timings={"decode": decode_s, **r.timings},
        )


class _timed:
    def __init__(self, timings: dict, key: str):
        self.timings, self.key = timings, key

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.key] = self.timings.get(self.key, 0.0) + time.perf_counter() - self.start
