"""Frozen DINO ViT backbone: patch tokens and the CLS attention map from one forward pass."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..image import IMAGENET_MEAN, IMAGENET_STD
from ..precision import backbone_dtype, backbone_precision, resolve

DEFAULT_BACKBONE = "vit_base_patch8_224.dino"
# The paper code upsamples each head's attention map by 16 (nearest) before averaging and normalising.
CLS_ATTENTION_UPSAMPLE = 16


class BackboneUnavailableError(RuntimeError):
    """Pretrained weights were asked for and could not be fetched."""


@dataclass
class BackboneOutput:
    """tokens: (B, P, C) final-LayerNorm patch tokens (CLS dropped); cls_token: (B, C);
    cls_attention: (B, h, w) last block's CLS->patch attention averaged over heads (raw softmax values), or None
    when it was not asked for (inference does not use it)."""

    tokens: torch.Tensor
    cls_token: torch.Tensor
    cls_attention: torch.Tensor | None


def cls_attention_maps(cls_attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Head-averaged CLS attention (B, h, w) -> the reference's (B, 16h, 16w) and (B, h, w) maps.

    Reference order: per head 28x28 -> x16 nearest -> mean over heads -> min-max -> bilinear
    (align_corners=True) back to 28x28. Nearest upsampling commutes with the head mean, so the mean is taken
    first. A constant map has no range; it normalises to zeros (the reference gives NaN).
    """
    b, h, w = cls_attention.shape
    flat = cls_attention.reshape(b, -1).float()
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = hi - lo
    norm = torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, 1.0), torch.zeros_like(flat))
    norm = norm.view(b, 1, h, w)
    big = F.interpolate(norm, scale_factor=CLS_ATTENTION_UPSAMPLE, mode="nearest")
    small = F.interpolate(big, size=(h, w), mode="bilinear", align_corners=True)
    return big[:, 0], small[:, 0]


class DinoBackbone(nn.Module):
    """A timm ViT that returns patch tokens and, when asked, the head-averaged CLS attention of its last block.

    Inference runs timm's ``forward_features`` as it is (compiled when asked). Only training asks for the
    attention: that path runs the same modules one by one and projects the last block's input to q and k once
    more (~1% of the forward), so no hook or per-call state is needed and threads may share the backbone (the
    paper code runs the whole backbone twice per image). The ImageNet mean and std live here as buffers, so
    pixels become network inputs in one place and on the backbone's device.
    """

    def __init__(self, vit: nn.Module):
        super().__init__()
        if not hasattr(vit, "blocks") or not hasattr(vit.blocks[-1].attn, "qkv"):
            raise TypeError("DinoBackbone needs a timm VisionTransformer (blocks[-1].attn.qkv)")
        self.vit = vit.eval().requires_grad_(False)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)
        self._features = vit.forward_features

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.vit.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        h, w = self.grid_size
        return h * w

    def compile_forward(self) -> "DinoBackbone":
        """Runs the inference forward (``tokens``) through torch.compile (inductor, frozen weights, dynamic
        batch size). Costs ~30 s once per process on CPU, then about 10% less time per image there (bias and
        GELU fused into the matmuls); worth it for long runs, not for a single small group."""
        self._features = torch.compile(self.vit.forward_features, dynamic=True, options={"freezing": True})
        return self

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """(..., 224, 224, 3) uint8 pixels -> (..., 3, 224, 224) network input in the weights' dtype (float32
        unless ``float64`` was asked for): /255, then ImageNet
        mean/std. The same operations, in the same order, as to_tensor -> normalize in the paper code."""
        x = pixels.movedim(-1, -3).to(self.pixel_mean.dtype).div(255)
        return x.sub_(self.pixel_mean).div_(self.pixel_std)

    @classmethod
    def create(
        cls,
        name: str = DEFAULT_BACKBONE,
        checkpoint=None,
        random_init: bool = False,
        storage_options: dict | None = None,
        **model_kwargs,
    ) -> "DinoBackbone":
        """Builds timm ``name`` (any timm ViT) with ``num_classes=0``.

        ``checkpoint``: a path, URL or file object holding a DINO-format state_dict (e.g.
        ``dino_vitbase8_pretrain.pth``), loaded strictly. ``None``: timm's pretrained weights, which need a
        network. ``random_init=True`` (and no checkpoint): random weights (seeded: the same in every process), with a warning.
        ``storage_options`` go to fsspec for URLs. ``model_kwargs`` override the architecture
        (``embed_dim``, ``depth``, ``num_heads`` ...).
        """
        import timm  # here, not at the top: drivers and tasks that only plan or read use no ViT (timm ~3 s)

        from ..checkpoints import load_backbone_checkpoint

        kwargs = dict(num_classes=0, **model_kwargs)
        if checkpoint is not None:
            vit = timm.create_model(name, pretrained=False, **kwargs)
            load_backbone_checkpoint(vit, checkpoint, storage_options)
        elif random_init:
            warnings.warn(
                f"backbone {name!r} has RANDOM weights (random_init=True): its masks mean nothing",
                stacklevel=2,
            )
            with torch.random.fork_rng(devices=[]):  # same weights in every process; caller's RNG untouched
                torch.manual_seed(0)
                vit = timm.create_model(name, pretrained=False, **kwargs)
        else:
            try:
                vit = timm.create_model(name, pretrained=True, **kwargs)
            except Exception as exc:  # hub, HTTP and offline errors all surface here
                raise BackboneUnavailableError(
                    f"could not fetch timm's pretrained weights for {name!r} ({type(exc).__name__}: {exc}). "
                    "Without network access, pass the official checkpoint instead (--backbone "
                    "/path/or/url/dino_vitbase8_pretrain.pth; backbone=... in the API), or --random-init "
                    "(random_init=True) for tests."
                ) from exc
        return cls(vit)

    @classmethod
    def width(cls, name: str = DEFAULT_BACKBONE, **model_kwargs) -> int:
        """The token width C of timm ``name`` with ``model_kwargs`` (a one-block model, random weights: no
        download), what a stage-1 head must match."""
        if "embed_dim" in model_kwargs:
            return int(model_kwargs["embed_dim"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the random weights' warning: only the shape is read
            return cls.create(name, random_init=True, **{**model_kwargs, "depth": 1}).embed_dim

    def forward(self, images: torch.Tensor, with_attention: bool = True) -> BackboneOutput:
        """images: (B, 3, H, W) normalised -> BackboneOutput (see its docstring)."""
        vit = self.vit
        prefix = vit.num_prefix_tokens
        images = images.to(self.pixel_mean.dtype)  # float64 weights (precision float64) take float64 inputs
        if not with_attention:
            feats = self._features(images)
            return BackboneOutput(tokens=feats[:, prefix:], cls_token=feats[:, 0], cls_attention=None)
        # forward_features, module by module, keeping the last block's input for its attention
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        for block in vit.blocks[:-1]:
            x = block(x)
        last = vit.blocks[-1]
        qkv = last.attn.qkv(last.norm1(x))
        feats = vit.norm(last(x))

        attn = last.attn
        b, n, _ = qkv.shape
        qkv = qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        # Same expression as the DINO reference: softmax((q * scale) @ k^T), CLS row only. In float32 even under
        # a reduced backbone precision: autocast would run the matmul in its format despite the casts.
        with torch.autocast(device_type=images.device.type, enabled=False):
            logits = (q[:, :, :1].float() * attn.scale) @ k.float().transpose(-2, -1)
            cls_attn = logits.softmax(dim=-1)[:, :, 0, prefix:].mean(dim=1)
        h, w = self.grid_size
        return BackboneOutput(tokens=feats[:, prefix:], cls_token=feats[:, 0], cls_attention=cls_attn.reshape(b, h, w))

    def tokens(self, inputs: torch.Tensor, precision: str = "float32") -> torch.Tensor:
        """(B, 3, 224, 224) network inputs on the backbone's device -> patch tokens (B, P, C) float32, no
        attention. ``precision``: a name resolved by ``scosparc_core.precision.resolve``."""
        self._check_weights(precision)
        with backbone_precision(precision, inputs.device):
            return self.forward(inputs, with_attention=False).tokens.float()

    def to_precision(self, device: str | torch.device, precision: str) -> "DinoBackbone":
        """Moves the backbone to ``device`` with its weights in the dtype ``precision`` (resolved) runs on, in
        place: float64 for ``float64``, float32 otherwise."""
        return self.to(device, backbone_dtype(precision))

    def _check_weights(self, precision: str) -> None:
        """float64 runs on float64 weights, every other precision on float32 ones: a mismatch is a caller's error,
        not something to run in the weights' format instead."""
        want = backbone_dtype(precision)
        if self.pixel_mean.dtype != want:
            raise ValueError(f"precision {precision!r} needs the backbone's weights in {want}; they are in "
                             f"{self.pixel_mean.dtype} (convert with backbone.to({want}))")

    @torch.inference_mode()
    def extract(
        self,
        images: torch.Tensor,
        micro_batch: int = 32,
        dtype: torch.dtype | str = "float32",
        out_device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, 224, 224) -> tokens (N, P, C) float32 and CLS attention (N, h, w) float32 (raw head mean).

        Runs in micro-batches on the backbone's device; ``dtype``: a precision name (``float16``, ``bfloat16``,
        ``tf32`` ...) or torch dtype, resolved for the device (``scosparc_core.precision``).
        """
        device = self.device
        precision = resolve(dtype, device)
        self._check_weights(precision)
        out_device = device if out_device is None else torch.device(out_device)
        n = images.shape[0]
        tokens = torch.empty((n, self.num_patches, self.embed_dim), dtype=torch.float32, device=out_device)
        attn = torch.empty((n, *self.grid_size), dtype=torch.float32, device=out_device)
        with backbone_precision(precision, device):
            for start in range(0, n, max(1, micro_batch)):
                chunk = images[start : start + micro_batch].to(device, non_blocking=True)
                out = self.forward(chunk)
                stop = start + chunk.shape[0]
                tokens[start:stop] = out.tokens.float().to(out_device)
                attn[start:stop] = out.cls_attention.float().to(out_device)
        return tokens, attn
