"""Offline evaluation: per-image CoSOD metrics from inference runs or from any method's maps, aggregated per
dataset and per group (exactly: fsum means, so any split of the images over workers gives the same numbers).

Two kinds of input, each under a label:
  * a run of jobs/infer.py: its predictions Parquet already holds every image's metrics;
  * maps in the CoSOD layout, ``<maps>/<group>/<stem>.png``, against ground truth ``<gt>/<group>/<stem>.png``:
    metrics are computed here (pysodmetrics), locally or on Ray Data.
"""
from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
from PIL import Image

from scosparc_core.metrics import CURVES, SCALARS, aggregate, image_metrics

from .decode import error_kind, read_many
from .refine import read_gt
from .storage import Storage

# Published SCoSPARC figures (trained on COCO-9213 + DUTS-Class): max-F, S-measure, max-E, MAE (DESIGN.md §4).
PAPER = {
    "coca": {"max_fm": 0.614, "sm": 0.711, "max_em": 0.782, "mae": 0.092},
    "cosal2015": {"max_fm": 0.869, "sm": 0.851, "max_em": 0.905, "mae": 0.062},
    "cosod3k": {"max_fm": 0.827, "sm": 0.823, "max_em": 0.889, "mae": 0.064},
}
SUMMARY = ("max_fm", "mean_fm", "adp_fm", "sm", "max_em", "mean_em", "adp_em", "mae", "wfm")


@dataclass
class Source:
    """One labelled input: a run (``run`` URL) or maps (``maps`` root + ``gt`` root)."""

    label: str
    run: str | None = None
    maps: str | None = None
    gt: str | None = None
    dataset: str | None = None
    options: dict = field(default_factory=dict)


def dataset_name(source: Source) -> str:
    if source.dataset:
        return source.dataset
    if source.run:
        try:
            manifest = Storage(source.run, source.options).read_json("_run.json")
            url = manifest["settings"].get("input") or manifest["settings"].get("manifest") or ""
            return posixpath.basename(url.rstrip("/")) or "dataset"
        except (FileNotFoundError, KeyError):
            return "dataset"
    parent = posixpath.dirname(source.gt.rstrip("/"))
    leaf = posixpath.basename(source.gt.rstrip("/"))
    return posixpath.basename(parent) if leaf.lower() in ("groundtruth", "gt") else leaf


def run_rows(source: Source) -> pd.DataFrame:
    """Per-image rows of an inference run that have metrics (ok images with ground truth)."""
    out = Storage(source.run, source.options)
    table = pads.dataset(out.path("predictions"), format="parquet", filesystem=out.fs).to_table().to_pandas()
    table["has_metrics"] = table["mae"].notna()
    return table


def map_pairs(source: Source) -> tuple[list[dict], int]:
    """(prediction, ground truth) pairs by <group>/<stem>; returns the pairs and how many GTs have no map."""
    maps, gts = Storage(source.maps, source.options), Storage(source.gt, source.options)

    def index(store: Storage) -> dict[str, str]:
        found = {}
        for p in store.fs.find(store.base):
            rel = posixpath.relpath(p, store.base)
            if not posixpath.basename(rel).startswith("."):
                found.setdefault(posixpath.splitext(rel)[0], store.fs.unstrip_protocol(p))
        return found

    pred_index, gt_index = index(maps), index(gts)
    pairs = [{"group": posixpath.dirname(k), "name": posixpath.basename(k), "mask_uri": pred_index[k],
              "gt_uri": gt_index[k]} for k in sorted(gt_index) if k in pred_index]
    return pairs, len(set(gt_index) - set(pred_index))


def score_pairs(batch: dict, options: dict) -> dict:
    """Metrics for a batch of pairs (Ray Data map_batches, or called directly)."""
    n = len(batch["gt_uri"])
    preds = read_many(list(batch["mask_uri"]), options)
    gts = read_many(list(batch["gt_uri"]), options)
    out: dict = {k: [] for k in ("group", "name", "mask_uri", "gt_uri", "error", *SCALARS, *CURVES)}
    for i in range(n):
        for k in ("group", "name", "mask_uri", "gt_uri"):
            out[k].append(batch[k][i])
        try:
            if isinstance(preds[i], BaseException):
                raise preds[i]
            pred = np.asarray(Image.open(io.BytesIO(preds[i])).convert("L"))
            metrics = image_metrics(pred, read_gt(gts[i]))
            out["error"].append(None)
        except Exception as exc:  # noqa: BLE001 - counted, not fatal
            metrics = {k: None for k in (*SCALARS, *CURVES)}
            out["error"].append(f"{error_kind(exc)}: {exc}")
        for k in (*SCALARS, *CURVES):
            v = metrics[k]
            out[k].append(v.tolist() if isinstance(v, np.ndarray) else v)
    return out


def maps_rows(source: Source, use_ray: bool = False, batch_size: int = 64) -> tuple[pd.DataFrame, int]:
    pairs, missing = map_pairs(source)
    if not pairs:
        return pd.DataFrame(columns=["group", "name", "mask_uri", "gt_uri", "error", *SCALARS, *CURVES]), missing
    if use_ray:
        import ray

        ds = ray.data.from_items(pairs).map_batches(score_pairs, fn_kwargs={"options": source.options},
                                                      batch_size=batch_size, batch_format="pandas")
        frame = ds.to_pandas()
    else:
        parts = [score_pairs(pd.DataFrame(pairs[i : i + batch_size]).to_dict("list"), source.options)
                 for i in range(0, len(pairs), batch_size)]
        frame = pd.concat([pd.DataFrame(p) for p in parts], ignore_index=True)
    frame["has_metrics"] = frame["error"].isna()
    frame["status"] = np.where(frame["has_metrics"], "ok", "error")
    return frame, missing


def evaluate(sources: list[Source], use_ray: bool = False) -> tuple[pd.DataFrame, dict]:
    """Returns (metrics table: one row per source x (dataset | group), details for the report)."""
    records, details = [], {}
    for source in sources:
        if source.run:
            rows, missing = run_rows(source), 0
        else:
            rows, missing = maps_rows(source, use_ray)
        dataset = dataset_name(source)
        usable = rows[rows["has_metrics"]]
        agg = aggregate(usable.to_dict("records"))
        base = {"label": source.label, "dataset": dataset}
        records.append({**base, "scope": "dataset", "group": None, "images": int(len(usable)),
                        "images_without_metrics": int(len(rows) - len(usable)), "missing_predictions": missing,
                        **{k: agg[k] for k in SUMMARY}, **{k: np.asarray(agg[k]).tolist() for k in CURVES}})
        for group, part in usable.groupby("group", sort=True):
            g = aggregate(part.to_dict("records"))
            records.append({**base, "scope": "group", "group": group, "images": int(len(part)),
                            **{k: g[k] for k in SUMMARY}})
        details[source.label] = {"dataset": dataset, "rows": rows, "summary": agg, "missing": missing,
                                 "source": source}
    return pd.DataFrame(records), details


def write_outputs(output: str, options: dict, metrics: pd.DataFrame, report_html: str) -> tuple[str, str]:
    """Writes metrics.parquet and report.html under ``output``; returns their URLs."""
    store = Storage(output, options)
    buf = io.BytesIO()
    metrics.to_parquet(buf, index=False)
    return store.write_bytes("report.html", report_html.encode()), store.write_bytes("metrics.parquet", buf.getvalue())
