"""Stage 2 of the pipeline (GPU actors): backbone, stage 1, threshold, prototype and region filter, per group.

One whole group per call: stage 1 compares every image with every other, so a group is never split here. The
region filter runs here too, beside the tokens: it needs every image's 784x768 tokens (2.4 MB), and shipping
those to CPU workers would move gigabytes per second through the object store at GPU rates; what leaves this
actor is the stage-2 mask (224x224) and the CRF's colour input. The group then goes out in chunks of at most
``chunk_size`` images, the units the CPU actors (CRF, PNGs, metrics, Parquet) work on.
"""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import torch

from scosparc_core import SCoSPARC, stage2_image
from scosparc_core.image import INPUT_SIZE, normalize

from .decode import error_kind

# Columns carried from the decoded group row into every chunk, one value per image.
PER_IMAGE = ("names", "image_uris", "gt_uris", "mask_keys", "ok", "error", "error_kind", "height", "width")


def actor_device(cfg: dict) -> tuple[str, str]:
    """(device, dtype) for an actor or worker from the job's model settings; on CPU, torch gets the planned
    thread count (Ray would otherwise leave it one thread per requested CPU)."""
    device = "cuda" if cfg.get("num_gpus", 0) and torch.cuda.is_available() else "cpu"
    if device == "cpu" and cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg["cpu_threads"]))
    dtype = cfg.get("dtype", "auto")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return device, dtype


def build_model(cfg: dict) -> SCoSPARC:
    """The model an actor runs, from the job's model settings (plain dict: it travels to Ray workers)."""
    device, dtype = actor_device(cfg)
    return SCoSPARC.from_checkpoints(
        backbone=cfg.get("backbone"),
        head=cfg.get("head"),
        device=device,
        backbone_name=cfg.get("backbone_name", "vit_base_patch8_224.dino"),
        random_init=bool(cfg.get("random_init")),
        dtype=dtype,
        micro_batch=int(cfg.get("micro_batch", 32)),
        compile=bool(cfg.get("compile")),
        storage_options=cfg.get("storage_options"),
        **cfg.get("backbone_kwargs", {}),
    )


class Stage1Actor:
    def __init__(self, model_cfg: dict, chunk_size: int = 32):
        self.model = build_model(model_cfg)
        self.chunk_size = max(1, int(chunk_size))
        self.fault = model_cfg.get("fault")
        self.calls = 0

    def __call__(self, batch: dict) -> dict:
        chunks = [chunk for i in range(len(batch["group"])) for chunk in self.group(_row(batch, i))]
        self.calls += 1
        self._maybe_die()
        return {k: [c[k] for c in chunks] for k in chunks[0]} if chunks else {}

    def _maybe_die(self) -> None:
        """Fault injection (tests): the process is killed once, before returning its n-th group, so Ray must
        restart the actor and redo that group. ``fault = {"kill_after_groups": n, "marker": local path}``."""
        if not self.fault or self.calls < int(self.fault["kill_after_groups"]):
            return
        marker = self.fault["marker"]
        if not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(f"stage-1 actor {os.getpid()} killed after {self.calls} groups")
            os.kill(os.getpid(), signal.SIGKILL)

    def group(self, row: dict) -> list[dict]:
        """One decoded group row -> chunk rows with everything the CPU stage needs."""
        start = time.perf_counter()
        ok = list(row["ok"])
        n, good = len(ok), [i for i, flag in enumerate(ok) if flag]
        errors, kinds = list(row["error"]), list(row["error_kind"])
        stage2 = np.zeros((n, INPUT_SIZE, INPUT_SIZE), np.float32)
        found, kept, fallback = [0] * n, [0] * n, [False] * n
        confidences = [float("nan")] * n
        confidence = threshold = float("nan")
        if good:
            try:
                model = self.model
                pixels = torch.from_numpy(np.array(row["net"]))  # writable copy of the object-store view
                tokens, _ = model.features(normalize(pixels.to(model.device)))
                s1 = model.group_stage1(tokens)
                confidence, threshold = s1.confidence, s1.threshold
                for j, i in enumerate(good):
                    s2 = stage2_image(s1.stage1_mask[j], s1.stage1_map[j], s1.tokens[j], s1.prototype, s1.grid)
                    stage2[i], found[i], kept[i], fallback[i] = s2.mask, s2.regions_found, s2.regions_kept, s2.fallback
                    confidences[i] = float(s1.confidences[j])
            except Exception as exc:  # noqa: BLE001 - the whole group becomes error rows, the job goes on
                kind = f"Stage1:{error_kind(exc)}"
                for i in good:
                    ok[i], errors[i], kinds[i] = False, f"{kind}: {exc}", kind
        crf = np.zeros((n, INPUT_SIZE, INPUT_SIZE, 3), np.uint8)
        if good:
            crf[good] = np.asarray(row["crf"])
        stage1_s = time.perf_counter() - start
        per_image = {k: list(row[k]) for k in PER_IMAGE}
        per_image.update(ok=ok, error=errors, error_kind=kinds)
        parts = max(1, -(-n // self.chunk_size))
        out = []
        for part in range(parts):
            sl = slice(part * self.chunk_size, (part + 1) * self.chunk_size)
            out.append({
                "group": row["group"],
                "group_key": row["group_key"],
                "part": part,
                "parts": parts,
                **{k: v[sl] for k, v in per_image.items()},
                "image_confidence": confidences[sl],
                "regions_found": found[sl],
                "regions_kept": kept[sl],
                "fallback": fallback[sl],
                "stage2": stage2[sl],
                "crf": crf[sl],
                "confidence": confidence,
                "threshold": threshold,
                "decode_s": float(row["decode_s"]) / max(n, 1),
                "stage1_s": stage1_s / max(n, 1),
            })
        return out


def _row(batch: dict, i: int) -> dict:
    return {k: v[i] for k, v in batch.items()}
