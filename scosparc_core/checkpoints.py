"""Checkpoint formats: the official DINO backbone state_dict and the official stage-1 head state_dict.

Everything loads with ``torch.load(weights_only=True)``: a file that carries code is refused. Errors name the
file and the keys or shapes at fault. ``source`` may be a local path, a file object, or a URL; URLs are opened
with fsspec (imported only then), so ``s3://``, ``gs://`` and ``https://`` work where their filesystems exist.
"""
from __future__ import annotations

import io
import os
from collections.abc import Mapping

import torch
from torch import nn

HEAD_PREFIX = "encoder_attn."
HEAD_LAYERS = ("conv", "query_transform", "key_transform")


class CheckpointError(ValueError):
    """A checkpoint could not be read, or does not fit the model it is loaded into."""


def _name(source) -> str:
    return getattr(source, "name", None) or str(source)


def _open(source, mode: str, storage_options=None):
    """``storage_options``: fsspec options for URLs, as a dict or as a function of the URL (a job's options are
    for its object store; an https checkpoint must not get them)."""
    if hasattr(source, "read" if "r" in mode else "write"):
        return _Borrowed(source)
    path = os.fspath(source)
    if "://" in path and not path.startswith("file://"):
        import fsspec  # URLs only; the core needs no storage library otherwise

        options = storage_options(path) if callable(storage_options) else storage_options
        return fsspec.open(path, mode, **(options or {})).open()
    path = path.removeprefix("file://")
    if "w" in mode:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return open(path, mode)


class _Borrowed:
    """A caller's file object used in a ``with`` block without being closed."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self.f

    def __exit__(self, *exc):
        return False


def load_state_dict(source, storage_options: dict | None = None) -> dict[str, torch.Tensor]:
    """Reads a state_dict of tensors from ``source`` with ``weights_only=True``.

    ``storage_options`` go to fsspec for URLs (endpoint, credentials ...)."""
    name = _name(source)
    try:
        with _open(source, "rb", storage_options) as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{name}: checkpoint file not found") from None
    except OSError as exc:
        raise CheckpointError(f"{name}: cannot read checkpoint ({exc})") from exc
    if not data:
        raise CheckpointError(f"{name}: checkpoint file is empty")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "Weights only load failed" in text or "weights_only" in text:
            raise CheckpointError(
                f"{name}: refused, the file holds Python objects other than tensors and could run code when "
                "unpickled; only plain state_dicts load (weights_only=True)"
            ) from exc
        raise CheckpointError(f"{name}: not a readable torch checkpoint, truncated or corrupt? ({exc})") from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{name}: expected a state_dict (a mapping of names to tensors), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{name}: entries that are not tensors: {sorted(map(str, bad))[:8]}")
    return dict(obj)


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], name: str, what: str) -> None:
    _check_fits(module.state_dict(), state, name, what)
    module.load_state_dict(state, strict=True)


def _check_fits(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], name: str, what: str) -> None:
    """Raises CheckpointError naming the keys and shapes of ``state`` that differ from the model's ``own``."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if shapes:
            parts.append(f"shape mismatches {shapes[:8]}")
        raise CheckpointError(f"{name}: does not fit the {what}: " + "; ".join(parts))


def load_backbone_checkpoint(vit: nn.Module, source, storage_options: dict | None = None) -> None:
    """Loads a DINO-format backbone state_dict (e.g. ``dino_vitbase8_pretrain.pth``) into a timm ViT, strictly.

    A ``module.`` or ``backbone.`` prefix (DDP / DINO's multi-crop wrapper) is stripped.
    """
    _load_strict(vit, _backbone_keys(load_state_dict(source, storage_options)), _name(source), "backbone")


def _backbone_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}


def head_state_dict(head: nn.Module) -> dict[str, torch.Tensor]:
    """The head's parameters under the official keys ``encoder_attn.{conv,query_transform,key_transform}.*``."""
    return {HEAD_PREFIX + k: v.detach().cpu().clone() for k, v in head.state_dict().items()}


def load_head_checkpoint(head: nn.Module, source, storage_options: dict | None = None) -> None:
    """Loads an official-format stage-1 checkpoint (``model_combined.pt`` and the like) into ``head``."""
    name = _name(source)
    state = load_state_dict(source, storage_options)
    if not any(k.startswith(HEAD_PREFIX) for k in state):
        raise CheckpointError(
            f"{name}: no '{HEAD_PREFIX}*' keys; a stage-1 checkpoint holds "
            f"{HEAD_PREFIX}{{{','.join(HEAD_LAYERS)}}}.{{weight,bias}} (found {sorted(state)[:6]})"
        )
    _load_strict(head, {k.removeprefix(HEAD_PREFIX): v for k, v in state.items()}, name, "stage-1 head")


def save_head_checkpoint(head: nn.Module, dest, storage_options: dict | None = None) -> None:
    """Writes the head in the official format (a plain state_dict, loadable with weights_only=True)."""
    buf = io.BytesIO()
    torch.save(head_state_dict(head), buf)
    with _open(dest, "wb", storage_options) as f:
        f.write(buf.getvalue())


def checkpoint_digest(source, storage_options: dict | None = None, span: int = 1 << 20) -> str:
    """A content fingerprint of a (large) file: its size and the SHA-256 of its first and last MiB. Enough to
    tell two checkpoints apart without reading gigabytes; runs record it instead of the path."""
    import hashlib

    name = _name(source)
    try:
        with _open(source, "rb", storage_options) as f:
            head = f.read(span)
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(size - span, len(head)))
            tail = f.read(span)
    except FileNotFoundError:
        raise CheckpointError(f"{name}: checkpoint file not found") from None
    except OSError as exc:
        raise CheckpointError(f"{name}: cannot read checkpoint ({exc})") from exc
    return f"{size}:{hashlib.sha256(head + tail).hexdigest()[:32]}"


def check_checkpoints(backbone, head, backbone_name: str, backbone_kwargs: dict | None = None,
                      storage_options: dict | None = None, pretrained: bool = False) -> dict[str, str]:
    """What a job does before any work: reads both checkpoints (weights only, refusing files that carry code),
    checks that the backbone file fits the declared architecture (``backbone_name`` with ``backbone_kwargs``, key
    for key and shape for shape, as loading it will) and that the head fits the backbone's width, and returns
    their content digests (``checkpoint_digest``) by role. ``None`` skips a role. ``pretrained`` (no backbone
    file): fetch timm's pretrained weights here, as every worker will, so that a machine without access to them
    fails before the work (``BackboneUnavailableError``), not in the workers."""
    import timm

    from .modeling import DinoBackbone
    from .modeling.stage1 import Stage1Head

    digests, dim = {}, None
    if backbone:
        state = load_state_dict(backbone, storage_options)
        with torch.device("meta"):  # the architecture's keys and shapes only: no memory, no initialisation
            vit = timm.create_model(backbone_name, pretrained=False, num_classes=0, **(backbone_kwargs or {}))
        arguments = "".join(f", {k}={v}" for k, v in (backbone_kwargs or {}).items())
        _check_fits(vit.state_dict(), _backbone_keys(state), _name(backbone), f"backbone ({backbone_name}{arguments})")
        dim = int(vit.embed_dim)
        digests["backbone"] = checkpoint_digest(backbone, storage_options)
    if head:
        load_head_checkpoint(Stage1Head(dim or DinoBackbone.width(backbone_name, **(backbone_kwargs or {}))), head,
                             storage_options)
        digests["head"] = checkpoint_digest(head, storage_options)
    if pretrained and not backbone:  # last: a download, after the checks that read small files
        DinoBackbone.create(backbone_name, **(backbone_kwargs or {}))  # into timm's cache; the model is dropped
    return digests

