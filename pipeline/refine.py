"""Refine (CPU actors): the dense CRF where it did not run on the GPU, masks at original size, metrics, rows.

Each chunk of a group becomes one row per image in the predictions schema, successful or not. The mask is
resized to the image's original size once and encoded as PNG; it is written to ``masks/<group>/<stem>.png``
(``--mask-format png``) or travels on as bytes to the sink (``parquet``, ``webdataset``). With ground truth the
per-image metrics (pysodmetrics) are computed here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import pyarrow as pa

from scosparc_core.crf import crf_params, dense_crf
from scosparc_core.image import to_original_size
from scosparc_core.metrics import image_metrics

from .decode import read_gt, read_many
from .errors import TRANSIENT, classify
from .memory import keep_large_blocks_out_of_the_heap
from .predictions import ROW_SCHEMA
from .storage import Storage, recorded_url


@dataclass(frozen=True)
class RefineSettings:
    """output: the job's output URL; crf: preset for the CRFs still to run (pydensecrf); mask_format: png,
    parquet or webdataset; png_compression: zlib level of the mask PNGs (1: fast; masks compress well)."""

    output: str
    storage_options: dict = field(default_factory=dict)
    crf: str = "coca"
    mask_format: str = "png"
    png_compression: int = 1


class RefineActor:
    """The refine stage as a Ray Data actor: an actor stage is never fused into the sink, so rows flow to the
    shards as they come instead of waiting for a shard's worth of input before any CRF or PNG is done."""

    def __init__(self, settings: RefineSettings, state=None):
        keep_large_blocks_out_of_the_heap()
        self.settings, self.state = settings, state

    def __call__(self, batch: dict) -> pa.Table:
        return refine_batch(batch, self.settings, self.state)


def refine_batch(batch: dict, settings: RefineSettings, state=None) -> pa.Table:
    """Ray Data ``map_batches`` over chunk rows -> a table of prediction rows (``predictions.ROW_SCHEMA``)."""
    out = Storage(settings.output, settings.storage_options)
    records = []
    for c in range(len(batch["group"])):
        chunk = {k: v[c] for k, v in batch.items()}
        rows = refine_chunk(chunk, settings, out)
        records += rows
        if state is not None:
            errors = sum(r["status"] != "ok" for r in rows)
            state.images_done.remote(str(chunk["group_key"]), len(rows), errors, int(chunk["group_rows"]))
    return pa.Table.from_pylist(records, schema=ROW_SCHEMA)


def refine_chunk(c: dict, settings: RefineSettings, out: Storage) -> list[dict]:
    n = len(c["index"])
    gt_uris = list(c["gt_uris"])
    wanted = [i for i in range(n) if c["ok"][i] and gt_uris[i]]
    gts = dict(zip(wanted, read_many([gt_uris[i] for i in wanted], settings.storage_options)))
    return [refine_image(c, i, gts.get(i), settings, out) for i in range(n)]


def refine_image(c: dict, i: int, gt_data, settings: RefineSettings, out: Storage) -> dict:
    ok = bool(c["ok"][i])
    rec = {
        "group": str(c["group"]),
        "group_key": str(c["group_key"]),
        "index": int(c["index"][i]),
        "name": str(c["names"][i]),
        "image_uri": recorded_url(str(c["image_uris"][i])),
        "image_bytes": int(c["image_bytes"][i]),
        "gt_uri": recorded_url(str(c["gt_uris"][i])) if c["gt_uris"][i] else None,
        "status": "ok" if ok else "error",
        "error": str(c["error"][i]) or None,
        "error_kind": str(c["error_kind"][i]) or None,
        "error_class": str(c["error_class"][i]) or None,
        "threshold": _finite(c["threshold"]),
        "confidence": _finite(c["confidence"]),
        "decode_s": float(c["decode_s"]),
        "stage1_s": float(c["stage1_s"]) if ok else None,
        "mask_key": str(c["mask_keys"][i]),
        "group_size": int(c["group_size"]),
        "group_hash": str(c["group_hash"]),
    }
    if not ok:
        return rec
    try:
        t0 = time.perf_counter()
        final = np.asarray(c["final"][i], np.uint8)
        fallback = bool(c["fallback"][i])
        if c["crf_pending"] and not fallback:
            params = crf_params(settings.crf)
            final = dense_crf(np.asarray(c["crf"][i], np.uint8), final // 255, params) * np.uint8(255)
        t1 = time.perf_counter()
        h, w = int(c["height"][i]), int(c["width"][i])
        png = to_original_size(final, h, w)
        encoded = cv2.imencode(".png", png, [cv2.IMWRITE_PNG_COMPRESSION, settings.png_compression])[1].tobytes()
        if settings.mask_format == "png":
            rec["mask_uri"] = recorded_url(write_mask(out, rec["mask_key"], encoded))
        else:
            rec["mask_png"] = encoded
        rec.update(
            height=h, width=w,
            image_confidence=_finite(c["image_confidence"][i]),
            regions_found=int(c["regions_found"][i]), regions_kept=int(c["regions_kept"][i]), fallback=fallback,
            foreground_fraction=float((png >= 128).mean()),
            crf_s=t1 - t0, write_s=time.perf_counter() - t1,
        )
    except Exception as exc:  # noqa: BLE001 - this image's error row
        info = classify(exc, "Refine")
        rec.update(status="error", error=info.text, error_kind=info.kind, error_class=info.error_class)
        return rec
    if gt_data is not None:
        try:
            metrics = image_metrics(png, read_gt(gt_data))
            rec.update({k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in metrics.items()})
        except Exception as exc:  # noqa: BLE001 - a bad ground truth loses the metrics, not the mask
            info = classify(exc, "GroundTruth")
            rec["gt_error"] = info.text
            # a read that may work later (not a file that will not decode): an error row, so a re-run redoes it
            if isinstance(gt_data, BaseException) and info.error_class == TRANSIENT:
                rec.update(status="error", error=info.text, error_kind=info.kind, error_class=TRANSIENT)
    return rec


def write_mask(out: Storage, key: str, png: bytes) -> str:
    """Writes one mask PNG; a failure (after the retries) is transient whatever its cause: it is the output's
    (access denied, a read-only mount, a file where the group folder goes), not the image's, so the row must be
    redone once the output is fixed, and _SUCCESS stays off until then."""
    try:
        return out.write_bytes(key, png)
    except Exception as exc:
        exc.error_class = TRANSIENT
        raise


def _finite(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None
