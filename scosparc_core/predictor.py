"""The user-facing API: ``SCoSPARC.from_checkpoints(...).predict_group(images)``."""
from __future__ import annotations

import multiprocessing
import time
import warnings
import weakref
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from .checkpoints import load_head_checkpoint, save_head_checkpoint
from .crf import CRFParams, Stage2Image, crf_params, crf_refine
from .image import crf_image, mask_to_original, network_input, to_rgb
from .modeling.backbone import DEFAULT_BACKBONE, DinoBackbone, cls_attention_maps
from .modeling.stage1 import Stage1Head
from .region_filter import group_prototype, region_filter
from .threshold import adaptive_threshold, image_confidences, stage1_map

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class PreparedImage:
    """One decoded image: network input (3, 224, 224), CRF colour input (224, 224, 3) uint8, original size."""

    input: torch.Tensor
    crf_rgb: np.ndarray
    height: int
    width: int

    @classmethod
    def from_image(cls, image) -> "PreparedImage":
        rgb = to_rgb(image)
        return cls(input=network_input(rgb), crf_rgb=crf_image(rgb), height=rgb.shape[0], width=rgb.shape[1])


@dataclass
class GroupStage1:
    """Everything stage 1 decides for a group of N images (arrays on the CPU).

    tokens (N, P, C) float32; cls_attention (N, h, w) resampled CLS attention map; stage1_weights (N, P);
    stage1_map (N, 224, 224) float32; confidences (N,); confidence, threshold: the group's c and tau;
    stage1_mask (N, 224, 224) bool; prototype (C,).
    """

    tokens: torch.Tensor
    cls_attention: torch.Tensor
    stage1_weights: np.ndarray
    stage1_map: np.ndarray
    confidences: np.ndarray
    confidence: float
    threshold: float
    stage1_mask: np.ndarray
    prototype: torch.Tensor
    grid: tuple[int, int]


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


def stage2_image(
    stage1_mask: np.ndarray,
    stage1_map_: np.ndarray,
    tokens: torch.Tensor,
    prototype: torch.Tensor,
    grid: tuple[int, int] = (28, 28),
) -> Stage2Image:
    """Stage-2 region filter for one image: stage-1 mask (224, 224) bool, stage-1 map (224, 224), tokens (P, C),
    group prototype (C,)."""
    kept = region_filter(stage1_mask, tokens, prototype, grid=grid)
    if kept is None:
        return Stage2Image(np.asarray(stage1_map_, dtype=np.float32), 0, 0, True)
    return Stage2Image(kept.mask.astype(np.float32), kept.found, kept.kept, False)


class SCoSPARC:
    """Frozen DINO backbone + stage-1 head + adaptive threshold + region filter + dense CRF.

    >>> model = SCoSPARC.from_checkpoints(backbone="dino_vitbase8_pretrain.pth", head="model_combined.pt")
    >>> pred = model.predict_group(images, crf="coca")   # PIL images or HxWx3 uint8 arrays, any sizes
    """

    def __init__(
        self,
        backbone: DinoBackbone,
        head: Stage1Head,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        micro_batch: int = 16,
        compile: bool = False,
        crf_workers: int = 0,
    ):
        if head.dim != backbone.embed_dim:
            raise ValueError(f"head width {head.dim} does not match backbone width {backbone.embed_dim}")
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.micro_batch = micro_batch
        self.backbone = backbone.to(self.device).eval()
        self.head = head.to(self.device).eval()
        if compile:
            self.backbone.compile_forward()
        self.crf_workers = crf_workers
        self._pool: ProcessPoolExecutor | None = None

    def _crf_pool(self) -> ProcessPoolExecutor | None:
        # pydensecrf holds the GIL, so a group's CRFs run in parallel only in processes (spawned: no torch fork).
        if self.crf_workers < 2:
            return None
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.crf_workers, mp_context=multiprocessing.get_context("spawn"))
            weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
        return self._pool

    @classmethod
    def from_checkpoints(
        cls,
        backbone=None,
        head=None,
        device: str | torch.device = "cpu",
        *,
        backbone_name: str = DEFAULT_BACKBONE,
        random_init: bool = False,
        dtype: str | torch.dtype = "float32",
        micro_batch: int = 16,
        compile: bool = False,
        crf_workers: int = 0,
        storage_options: dict | None = None,
        **backbone_kwargs,
    ) -> "SCoSPARC":
        """backbone: DINO state_dict path/URL, or None for timm's pretrained weights (needs a network).
        head: official-format stage-1 checkpoint path/URL. With ``random_init=True`` whichever is None gets
        random weights, with a warning; without it a missing head is an error. ``compile=True``: see
        ``DinoBackbone.compile_forward``. ``crf_workers`` >= 2 runs a group's CRFs in that many processes.
        ``storage_options`` go to fsspec when a checkpoint is a URL."""
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
    def features(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs (N, 3, 224, 224) -> tokens (N, P, C) float32 and resampled CLS attention (N, h, w) on the device."""
        tokens, raw = self.backbone.extract(inputs, micro_batch=self.micro_batch, dtype=self.dtype)
        return tokens, cls_attention_maps(raw)[1]

    @torch.inference_mode()
    def stage1(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (N, P, C) -> stage-1 weights (N, P)."""
        return self.head(tokens.to(self.device, torch.float32))

    @torch.inference_mode()
    def group_stage1(self, tokens: torch.Tensor, cls_attention: torch.Tensor | None = None) -> GroupStage1:
        """tokens (N, P, C) -> stage-1 weights, map, threshold, masks and prototype for the whole group."""
        grid = self.backbone.grid_size
        tokens = tokens.to(self.device, torch.float32)
        weights = self.head(tokens)
        maps = stage1_map(weights, grid)
        confidences = image_confidences(maps, grid)
        confidence, threshold = adaptive_threshold(confidences)
        prototype = group_prototype(tokens, weights, threshold)
        maps_np = maps.cpu().numpy()
        if cls_attention is None:
            cls_attention = tokens.new_zeros((tokens.shape[0], *grid))
        return GroupStage1(
            tokens=tokens.cpu(),
            cls_attention=cls_attention.cpu(),
            stage1_weights=weights.cpu().numpy(),
            stage1_map=maps_np,
            confidences=confidences,
            confidence=confidence,
            threshold=threshold,
            stage1_mask=maps_np >= np.float32(threshold),
            prototype=prototype.cpu(),
            grid=grid,
        )

    # -- whole group ----------------------------------------------------------------------------------------
    def predict_group(self, images, crf: str | CRFParams | None = "coca") -> GroupPrediction:
        """images: a list of PIL images or (H, W, 3) uint8 arrays of any sizes (other modes are converted).

        An empty list gives an empty prediction with NaN confidence and threshold.
        """
        params = crf_params(crf)  # fail on a bad preset before any work
        timings: dict[str, float] = defaultdict(float)
        with _timed(timings, "decode"):
            prepared = []
            for i, image in enumerate(images):
                try:
                    prepared.append(PreparedImage.from_image(image))
                except Exception as exc:
                    raise ValueError(f"image {i}: {exc}") from exc
        return self.predict_prepared(prepared, params, timings)

    def predict_prepared(self, prepared: list[PreparedImage], crf: str | CRFParams | None = "coca", timings=None) -> GroupPrediction:
        """Like ``predict_group``, for images already decoded (the pipeline decodes on other workers)."""
        crf = crf_params(crf)
        timings = defaultdict(float) if timings is None else timings
        dim, grid = self.backbone.embed_dim, self.backbone.grid_size
        n = len(prepared)
        if n == 0:
            empty = np.zeros((0, 224, 224), np.float32)
            return GroupPrediction(
                np.zeros((0, grid[0] * grid[1]), np.float32), empty, np.zeros(0, np.float32), float("nan"),
                float("nan"), empty.astype(bool), np.zeros(dim, np.float32), empty, empty, [], [], [], [], dict(timings),
            )
        with _timed(timings, "backbone", self.device):
            tokens, attention = self.features(torch.stack([p.input for p in prepared]))
        with _timed(timings, "stage1", self.device):
            s1 = self.group_stage1(tokens, attention)
        with _timed(timings, "stage2"):
            stage2 = [
                stage2_image(s1.stage1_mask[i], s1.stage1_map[i], s1.tokens[i], s1.prototype, grid) for i in range(n)
            ]
        with _timed(timings, "crf"):
            args = [(s2, p.crf_rgb, crf) for s2, p in zip(stage2, prepared)]
            pool = self._crf_pool() if crf is not None and n > 1 else None
            final = np.stack(list(pool.map(crf_refine, *zip(*args))) if pool else [crf_refine(*a) for a in args])
        with _timed(timings, "stage2"):
            masks = [mask_to_original(final[i], p.height, p.width) for i, p in enumerate(prepared)]
        return GroupPrediction(
            stage1_weights=s1.stage1_weights,
            stage1_map=s1.stage1_map,
            confidences=s1.confidences,
            confidence=s1.confidence,
            threshold=s1.threshold,
            stage1_mask=s1.stage1_mask,
            prototype=s1.prototype.numpy(),
            stage2_mask=np.stack([s.mask for s in stage2]),
            mask=final,
            masks=masks,
            regions_found=[s.regions_found for s in stage2],
            regions_kept=[s.regions_kept for s in stage2],
            fallback=[s.fallback for s in stage2],
            timings=dict(timings),
        )


@contextmanager
def _timed(timings: dict, key: str, device: torch.device | None = None):
    start = time.perf_counter()
    yield
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    timings[key] += time.perf_counter() - start
