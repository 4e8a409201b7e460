"""SCoSPARC inference over grouped images in object storage or on disk, on Ray.

On a cluster:   RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
                    python jobs/infer.py --input s3://bucket/CoCA --output s3://bucket/runs/r1 \
                    --backbone s3://bucket/w/dino_vitbase8_pretrain.pth --head s3://bucket/w/model_combined.pt
                (cluster.yaml's Ray uses token auth; `ray dashboard cluster.yaml` opens the tunnel to 8265)
On a laptop:    python jobs/infer.py --input data/CoCA --output out/r1 --backbone ... --head ...
Quick look:     python jobs/infer.py --sample --random-init     (synthetic sample, random weights)
Plan only:      python jobs/infer.py --input ... --dry-run      (lists the input, prints the plan)

Re-running with the same --output resumes (and redoes transient errors); --overwrite starts again.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs.arguments import (Formatter, KeyValues, add_storage_args, extension_list, key_value, refused,  # noqa: E402
                            storage_from)
from pipeline.errors import Refusals  # noqa: E402
from pipeline.infer import CRF_BACKEND_CHOICES, DEVICES, InferConfig, run_inference, validate  # noqa: E402
from pipeline.listing import LAYOUTS  # noqa: E402
from pipeline.predictions import MASK_FORMATS  # noqa: E402
from pipeline.storage import redact_url  # noqa: E402
from scosparc_core.crf import CRF_PRESETS  # noqa: E402
from scosparc_core.precision import PRECISIONS  # noqa: E402


def parse_args(argv=None) -> tuple[InferConfig, bool]:
    d = InferConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    src = ap.add_argument_group("input and output")
    src.add_argument("--input", help="URL or path: <root>/image/<group>/* (CoSOD layout) or <root>/<group>/*")
    src.add_argument("--manifest", help="Parquet, CSV or CSV.gz with columns group, image_uri [, gt_uri]")
    src.add_argument("--layout", default=d.layout, choices=LAYOUTS,
                     help="how --input is read; auto refuses a root that looks like image/mask folders")
    src.add_argument("--extensions", type=extension_list, default=d.extensions, metavar="EXT,EXT",
                     help="only files with these extensions are images, e.g. jpg,jpeg,png,webp (case ignored), so "
                          "sidecar files (.json, .txt) are not inputs; default: every file is, and one that is not "
                          "an image becomes an error row")
    src.add_argument("--sample", action="store_true", help="write the embedded synthetic sample and run on it")
    src.add_argument("--output", default=d.output, help="URL or path for the results")
    src.add_argument("--overwrite", action="store_true", help="clear this job's earlier outputs first")
    src.add_argument("--mask-format", default=d.mask_format, choices=MASK_FORMATS,
                     help="png: masks/<group>/<stem>.png; parquet: PNG bytes in the predictions; webdataset: tar "
                          "shards of PNGs (for millions of masks)")
    src.add_argument("--rows-per-shard", type=int, default=d.rows_per_shard,
                     help="rows per predictions Parquet file (at least: whole blocks; a run's last has fewer)")
    src.add_argument("--dry-run", action="store_true", help="list the input and print the plan; run nothing")
    src.add_argument("--accept-transient-errors", action="store_true",
                     help="write _SUCCESS even when transient errors remain (a re-run would redo them)")
    model = ap.add_argument_group("model")
    model.add_argument("--backbone", help="DINO ViT-B/8 state_dict (dino_vitbase8_pretrain.pth), path or URL; "
                                          "default: timm's pretrained weights (needs network)")
    model.add_argument("--head", help="stage-1 checkpoint in the official format (model_combined.pt), path or URL")
    model.add_argument("--random-init", action="store_true", help="random weights for what is not given (demos)")
    model.add_argument("--backbone-name", default=d.backbone_name, help="any timm ViT name")
    model.add_argument("--backbone-arg", type=key_value, nargs="+", action=KeyValues, default={},
                       metavar="KEY=VALUE", help="timm architecture override, e.g. depth=2")
    model.add_argument("--crf", default=d.crf, choices=sorted(CRF_PRESETS),
                       help="the paper's CRF preset: coca and cosod3k share one; Cosal2015 needs cosal2015")
    model.add_argument("--crf-backend", default=d.crf_backend, choices=CRF_BACKEND_CHOICES,
                       help="auto: the torch CRF beside stage 1 on GPUs, pydensecrf on CPU workers otherwise")
    model.add_argument("--dtype", default=d.dtype, choices=PRECISIONS,
                       help="the backbone's number format; auto: float32, on CUDA too (README, Precision on GPUs)")
    model.add_argument("--compile", action="store_true", help="torch.compile the backbone (long runs)")
    run = ap.add_argument_group("resources")
    run.add_argument("--device", default=d.device, choices=DEVICES,
                     help="auto: GPUs when the cluster has or can have them (cluster.yaml), else CPUs")
    run.add_argument("--gpu-wait", type=float, default=d.gpu_wait,
                     help="seconds to wait for an autoscaling cluster's first GPU before failing")
    run.add_argument("--micro-batch", type=int, default=d.micro_batch,
                     help="backbone images per forward (default: 128 on CUDA, 64 there in float64, 32 on CPU)")
    run.add_argument("--chunk-size", type=int, default=d.chunk_size, help="images per row after stage 1")
    run.add_argument("--gpu-actors", type=int, default=d.gpu_actors,
                     help="most stage-1 actors (default: one per GPU the cluster has or can have)")
    run.add_argument("--gpus-per-actor", type=float, default=d.gpus_per_actor, help="default: 1")
    run.add_argument("--max-pixels", type=int, default=d.max_pixels, help="larger images are error rows")
    run.add_argument("--fast-decode", action="store_true",
                     help="JPEG draft decoding (DCT scaling): much faster for large photos, but it can change "
                          "their masks a lot (README, 'Speed')")
    run.add_argument("--row-images", type=int, default=d.row_images,
                     help="groups with more images are read by the stage-1 actor, not decode tasks")
    run.add_argument("--one-pass-images", type=int, default=d.one_pass_images,
                     help="groups with more images run stage 1 in passes (memory bounded by the micro-batch); default: "
                          "what fits the stage-1 actor: ~250 on CPUs (ViT-B/8), from free GPU memory on CUDA, "
                          "at most 2048")
    run.add_argument("--token-dir", default=d.token_dir,
                     help="a local folder where groups run in passes keep their decoded images (0.15 MB an image, "
                          "0.3 MB with a CRF) and tokens (2.4 MB for ViT-B/8) between passes, so each image is "
                          "decoded and runs through the backbone once (not three times); default: each node's temp "
                          "folder, when it has room and is not RAM-backed; none: recompute them")
    run.add_argument("--progress-interval", type=float, default=d.progress_interval, help="seconds")
    run.add_argument("--stall-timeout", type=float, default=d.stall_timeout,
                     help="seconds without a row out before the job stops (-1: never); default: 1800 plus 4 s "
                          "(CPU) or 0.1 s (CUDA) per image of the largest group")
    add_storage_args(ap)
    a = ap.parse_args(argv)
    if a.sample == bool(a.input or a.manifest):
        ap.error("give exactly one of --input, --manifest or --sample")
    cfg = InferConfig(
        input=a.input, manifest=a.manifest, layout=a.layout, output=a.output, backbone=a.backbone, head=a.head,
        random_init=a.random_init, backbone_name=a.backbone_name, backbone_kwargs=dict(a.backbone_arg),
        crf=a.crf, crf_backend=a.crf_backend, device=a.device, dtype=a.dtype, micro_batch=a.micro_batch,
        chunk_size=a.chunk_size, compile=a.compile, gpu_actors=a.gpu_actors, gpus_per_actor=a.gpus_per_actor,
        gpu_wait=a.gpu_wait, max_pixels=a.max_pixels, fast_decode=a.fast_decode, row_images=a.row_images,
        one_pass_images=a.one_pass_images, token_dir=a.token_dir, extensions=a.extensions, mask_format=a.mask_format,
        rows_per_shard=a.rows_per_shard, storage_options=storage_from(a), overwrite=a.overwrite,
        accept_transient_errors=a.accept_transient_errors,
        dry_run=a.dry_run, progress_interval=a.progress_interval, stall_timeout=a.stall_timeout,
    )
    return cfg, a.sample


def main(argv=None) -> int:
    cfg, sample = parse_args(argv)
    try:
        if sample:
            cfg = with_sample(cfg)
        result = run_inference(cfg)
    except Exception as exc:
        return refused(exc)
    if cfg.dry_run:
        return 0
    out = result["output"]
    print(f"rows {out['rows']} (ok {out['ok']}, errors {out['errors']}: {out['transient_errors']} transient), "
          f"{result['images_per_s']:.2f} images/s in the dataset execution")
    base = redact_url(cfg.output.rstrip("/"))
    masks = {"png": f"{base}/masks/<group>/<stem>.png", "parquet": f"{base}/predictions/*.parquet (mask_png)",
             "webdataset": f"{base}/masks/shard-*.tar"}[cfg.mask_format]
    print(f"masks:       {masks}")
    print(f"predictions: {base}/predictions/*.parquet")
    print(f"manifest:    {base}/_manifest.json")
    return 0


def with_sample(cfg: InferConfig) -> InferConfig:
    """--sample: the embedded sample is written next to the output (with the output's storage options), once the
    settings are known to be valid; a failure here is one before any work."""
    from pipeline.sample import write_sample

    cfg = cfg.replace(input=os.path.join(os.path.dirname(cfg.output.rstrip("/")) or ".", "sample-input"))
    with Refusals():
        validate(cfg)
        write_sample(cfg.input, storage_options=cfg.storage_options)
    return cfg


if __name__ == "__main__":
    sys.exit(main())
