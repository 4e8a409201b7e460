"""The feature cache: the frozen backbone's tokens and CLS attention, computed once per image and kept in storage.

Training samples up to 24 images of a group per step for many epochs, and the backbone never changes, so its
output can be stored once (float16) and read back instead of recomputed (the paper code runs the backbone twice
per image at every step). Per group: ``<key>.tokens.npy`` (N, P, C), ``<key>.attention.npy`` (N, h, w) (the
resampled CLS attention map training uses) and ``<key>.json`` (image names and URIs, in row order). Rows are
read with ranged reads, so a step fetches only the images it samples.
"""
from __future__ import annotations

import hashlib
import io
import json
import posixpath

import numpy as np
import torch

from scosparc_core import DinoBackbone
from scosparc_core.image import normalize
from scosparc_core.modeling import cls_attention_maps
from scosparc_core.predictor import DTYPES

from .decode import decode_group
from .listing import GroupSpec
from .stage1 import actor_device
from .storage import Storage, safe_component

FEATURE_DTYPE = np.float16


def backbone_settings(cfg: dict) -> dict:
    return {k: cfg.get(k) for k in ("backbone", "backbone_name", "backbone_kwargs", "random_init")}


def cache_folder(cache_root: str, data_root: str, cfg: dict) -> str:
    """Where one dataset's features live for one backbone: <cache_root>/<backbone hash>/<dataset>-<hash>."""
    settings = json.dumps(backbone_settings(cfg), sort_keys=True, default=str)
    model_id = hashlib.sha1(settings.encode()).hexdigest()[:12]
    name = safe_component(posixpath.basename(data_root.rstrip("/")) or "data")
    return posixpath.join(cache_root.rstrip("/"), model_id, f"{name}-{hashlib.sha1(data_root.encode()).hexdigest()[:8]}")


def build_backbone(cfg: dict) -> tuple[DinoBackbone, str, torch.dtype]:
    """The frozen backbone a worker or actor runs: (module on its device, device, autocast dtype)."""
    device, dtype = actor_device(cfg)
    backbone = DinoBackbone.create(
        cfg.get("backbone_name", "vit_base_patch8_224.dino"),
        checkpoint=cfg.get("backbone"),
        random_init=bool(cfg.get("random_init")) and cfg.get("backbone") is None,
        storage_options=cfg.get("storage_options"),
        **cfg.get("backbone_kwargs", {}),
    )
    return backbone.to(device), device, DTYPES[dtype]


def features(backbone: DinoBackbone, pixels: np.ndarray, device: str, dtype, micro_batch: int = 32):
    """(N, 224, 224, 3) uint8 network pixels -> tokens (N, P, C) and resampled CLS attention (N, h, w), float32."""
    inputs = normalize(torch.from_numpy(np.array(pixels)).to(device))
    tokens, raw = backbone.extract(inputs, micro_batch=micro_batch, dtype=dtype)
    return tokens, cls_attention_maps(raw)[1]


class FeatureCache:
    def __init__(self, url: str, storage_options: dict | None = None):
        self.store = Storage(url, storage_options or {})

    def has(self, key: str) -> bool:
        return self.store.exists(f"{key}.json")

    def index(self, key: str) -> dict:
        return self.store.read_json(f"{key}.json")

    def write(self, key: str, names: list[str], uris: list[str], tokens: torch.Tensor, attention: torch.Tensor):
        for suffix, array in (("tokens", tokens), ("attention", attention)):
            buf = io.BytesIO()
            np.save(buf, array.detach().cpu().numpy().astype(FEATURE_DTYPE))
            self.store.write_bytes(f"{key}.{suffix}.npy", buf.getvalue())
        # The index goes last: a group whose index exists is complete.
        self.store.write_json(f"{key}.json", {"names": names, "image_uris": uris, "count": len(names)})

    def read(self, key: str, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows (sorted or not) of a group -> tokens (k, P, C) and attention (k, h, w), float32."""
        rows = [int(r) for r in rows]
        return tuple(torch.from_numpy(self._rows(f"{key}.{s}.npy", rows)) for s in ("tokens", "attention"))

    def _rows(self, name: str, rows: list[int]) -> np.ndarray:
        fs, path = self.store.fs, self.store.path(name)
        with fs.open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
        if fortran:
            raise ValueError(f"{path}: Fortran-ordered arrays are not supported")
        row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        starts = [offset + r * row_bytes for r in rows]
        blobs = fs.cat_ranges([path] * len(rows), starts, [s + row_bytes for s in starts])
        out = np.frombuffer(b"".join(blobs), dtype=dtype).reshape(len(rows), *shape[1:])
        return out.astype(np.float32)


class FeatureActor:
    """Ray Data actor: a decoded group row -> its features written to the cache; returns a summary row."""

    def __init__(self, cfg: dict, cache_url: str):
        self.backbone, self.device, self.dtype = build_backbone(cfg)
        self.cache = FeatureCache(cache_url, cfg.get("storage_options"))
        self.micro_batch = int(cfg.get("micro_batch", 32))

    def __call__(self, batch: dict) -> dict:
        out = {"group_key": [], "images": [], "errors": []}
        for i in range(len(batch["group_key"])):
            row = {k: v[i] for k, v in batch.items()}
            ok = [bool(x) for x in row["ok"]]
            names = [n for n, flag in zip(row["names"], ok) if flag]
            uris = [u for u, flag in zip(row["image_uris"], ok) if flag]
            if names:
                tokens, attention = features(self.backbone, row["net"], self.device, self.dtype, self.micro_batch)
                self.cache.write(row["group_key"], names, uris, tokens, attention)
            out["group_key"].append(row["group_key"])
            out["images"].append(len(names))
            out["errors"].append(len(ok) - len(names))
        return out


def build_cache(groups: list[GroupSpec], cache_url: str, cfg: dict, actors: int, actor_args: dict) -> dict:
    """Computes the features of every group not yet in the cache (a Ray Data job). Returns counts."""
    import ray

    from .infer import group_row

    cache = FeatureCache(cache_url, cfg.get("storage_options"))
    todo = [g for g in groups if not cache.has(g.key)]
    summary = {"groups": len(groups), "cached_before": len(groups) - len(todo), "images": 0, "errors": 0}
    if not todo:
        return summary
    ds = ray.data.from_items([group_row(g) for g in todo], override_num_blocks=min(len(todo), 10_000))
    ds = ds.map(decode_group, fn_kwargs={"storage_options": cfg.get("storage_options") or {}}, num_cpus=0.25)
    # actor_args: what the inference job's plan gives its stage-1 actors (fractional CPUs on small machines)
    ds = ds.map_batches(FeatureActor, fn_constructor_kwargs={"cfg": cfg, "cache_url": cache_url}, batch_size=1,
                        compute=ray.data.ActorPoolStrategy(size=actors), **actor_args)
    for row in ds.iter_rows():
        summary["images"] += int(row["images"])
        summary["errors"] += int(row["errors"])
    return summary
