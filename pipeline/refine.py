"""Stage 3 of the pipeline (CPU actors): dense CRF, PNG masks, per-image metrics, one Parquet part per chunk.

Each chunk of a group becomes ``predictions/part-<group>-<part>-of-<parts>.parquet`` holding one row per input
image, successful or not. A part is written in one piece after its masks, so a part that exists is complete;
a group is done when all its parts exist (that is what a re-run checks).
"""
from __future__ import annotations

import io
import re
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from scosparc_core.crf import Stage2Image, crf_refine
from scosparc_core.image import mask_to_original
from scosparc_core.metrics import CURVE_POINTS, CURVES, SCALARS, gt_to_mask, image_metrics

from .decode import error_kind, read_many
from .storage import Storage, redact_url

# "part-" first: readers (pyarrow, Spark) skip files whose names start with "_" or ".", as group names may.
PART_NAME = re.compile(r"^part-(?P<key>.+)-(?P<part>\d{5})-of-(?P<parts>\d{5})\.parquet$")

CURVE = pa.list_(pa.float64(), CURVE_POINTS)
SCHEMA = pa.schema(
    [
        ("group", pa.string()),
        ("name", pa.string()),
        ("image_uri", pa.string()),
        ("gt_uri", pa.string()),
        ("mask_uri", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("status", pa.string()),  # ok | error
        ("error", pa.string()),
        ("error_kind", pa.string()),
        ("threshold", pa.float64()),  # the group's tau
        ("confidence", pa.float64()),  # the group's c
        ("image_confidence", pa.float64()),
        ("regions_found", pa.int32()),
        ("regions_kept", pa.int32()),
        ("fallback", pa.bool_()),  # no stage-1 region: the mask is the continuous stage-1 map
        ("foreground_fraction", pa.float64()),  # share of mask pixels >= 128 at original size
        ("decode_s", pa.float64()),
        ("stage1_s", pa.float64()),  # backbone + stage 1 + region filter, the group's time per image
        ("crf_s", pa.float64()),
        ("write_s", pa.float64()),
        ("gt_error", pa.string()),
        *[(k, pa.float64()) for k in SCALARS],
        *[(k, CURVE) for k in CURVES],
    ]
)


def part_key(group_key: str, part: int, parts: int) -> str:
    return f"predictions/part-{group_key}-{part:05d}-of-{parts:05d}.parquet"


def read_gt(data) -> np.ndarray:
    """Ground-truth bytes -> (H, W) uint8 0/255; RGB, palette and 16-bit masks are normalised (>128 = object)."""
    if isinstance(data, BaseException):
        raise data
    image = Image.open(io.BytesIO(data))
    image.load()
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return gt_to_mask(np.asarray(image))
    return gt_to_mask(np.asarray(image.convert("L")))


class RefineActor:
    def __init__(self, output: str, storage_options: dict, crf: str = "coca"):
        self.out = Storage(output, storage_options)
        self.options = storage_options
        self.crf = crf

    def __call__(self, batch: dict) -> dict:
        rows = [self.chunk({k: v[i] for k, v in batch.items()}) for i in range(len(batch["group"]))]
        return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}

    def chunk(self, c: dict) -> dict:
        start = time.perf_counter()
        n = len(c["ok"])
        gt_uris = list(c["gt_uris"])
        wanted = [i for i in range(n) if c["ok"][i] and gt_uris[i]]
        gts = dict(zip(wanted, read_many([gt_uris[i] for i in wanted], self.options)))
        records = [self.image(c, i, gts.get(i)) for i in range(n)]
        table = pa.Table.from_pylist(records, schema=SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.out.write_bytes(part_key(c["group_key"], int(c["part"]), int(c["parts"])), buf.getvalue())
        errors = [r["error_kind"] for r in records if r["status"] != "ok"]
        return {
            "group": c["group"],
            "part": int(c["part"]),
            "parts": int(c["parts"]),
            "images": n,
            "errors": len(errors),
            "error_kinds": ",".join(errors),
            "seconds": time.perf_counter() - start,
        }

    def image(self, c: dict, i: int, gt_data) -> dict:
        rec = {
            "group": c["group"],
            "name": c["names"][i],
            "image_uri": redact_url(c["image_uris"][i]),
            "gt_uri": redact_url(c["gt_uris"][i]) if c["gt_uris"][i] else None,
            "status": "ok" if c["ok"][i] else "error",
            "error": c["error"][i] or None,
            "error_kind": c["error_kind"][i] or None,
            "threshold": _finite(c["threshold"]),
            "confidence": _finite(c["confidence"]),
            "decode_s": float(c["decode_s"]),
            "stage1_s": float(c["stage1_s"]) if c["ok"][i] else None,
        }
        if not c["ok"][i]:
            return rec
        try:
            t0 = time.perf_counter()
            s2 = Stage2Image(np.asarray(c["stage2"][i], np.float32), int(c["regions_found"][i]),
                             int(c["regions_kept"][i]), bool(c["fallback"][i]))
            final = crf_refine(s2, np.asarray(c["crf"][i], np.uint8), self.crf)
            t1 = time.perf_counter()
            h, w = int(c["height"][i]), int(c["width"][i])
            png = mask_to_original(final, h, w)
            buf = io.BytesIO()
            Image.fromarray(png).save(buf, format="PNG")
            mask_uri = self.out.write_bytes(c["mask_keys"][i], buf.getvalue())
            rec.update(
                height=h, width=w, mask_uri=redact_url(mask_uri),
                image_confidence=_finite(c["image_confidence"][i]),
                regions_found=s2.regions_found, regions_kept=s2.regions_kept, fallback=s2.fallback,
                foreground_fraction=float((png >= 128).mean()),
                crf_s=t1 - t0, write_s=time.perf_counter() - t1,
            )
        except Exception as exc:  # noqa: BLE001 - this image's error row; the chunk goes on
            kind = f"Refine:{error_kind(exc)}"
            rec.update(status="error", error=f"{kind}: {exc}", error_kind=kind)
            return rec
        if gt_data is not None:
            try:
                metrics = image_metrics(png, read_gt(gt_data))
                rec.update({k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in metrics.items()})
            except Exception as exc:  # noqa: BLE001 - a bad ground truth loses the metrics, not the mask
                rec["gt_error"] = f"{error_kind(exc)}: {exc}"
        return rec


def _finite(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None
