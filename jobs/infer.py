"""SCoSPARC inference over grouped images in object storage or on disk, on Ray.

On a cluster:   ray job submit --working-dir . -- python jobs/infer.py --input s3://bucket/CoCA \
                    --output s3://bucket/runs/r1 --backbone s3://bucket/w/dino_vitbase8_pretrain.pth \
                    --head s3://bucket/w/model_combined.pt
On a laptop:    python jobs/infer.py --input data/CoCA --output out/r1 --backbone ... --head ...
Quick look:     python jobs/infer.py --sample --random-init     (synthetic sample, random weights)

Re-running with the same --output resumes; --overwrite starts again.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.infer import InferConfig, run_inference  # noqa: E402
from pipeline.storage import storage_options  # noqa: E402


def key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parse_args(argv=None) -> tuple[InferConfig, bool]:
    d = InferConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_argument_group("input and output")
    src.add_argument("--input", help="URL or path: <root>/image/<group>/* (CoSOD layout) or <root>/<group>/*")
    src.add_argument("--manifest", help="Parquet or CSV with columns group, image_uri [, gt_uri]")
    src.add_argument("--sample", action="store_true", help="write the embedded synthetic sample and run on it")
    src.add_argument("--output", default=d.output, help=f"URL or path for the results (default {d.output})")
    src.add_argument("--overwrite", action="store_true", help="clear this job's earlier outputs first")
    model = ap.add_argument_group("model")
    model.add_argument("--backbone", help="DINO state_dict (dino_vitbase8_pretrain.pth), path or URL; "
                                          "default: timm's pretrained weights (needs network)")
    model.add_argument("--head", help="stage-1 checkpoint in the official format, path or URL")
    model.add_argument("--random-init", action="store_true", help="random weights for what is not given (tests)")
    model.add_argument("--backbone-name", default=d.backbone_name, help="any timm ViT name")
    model.add_argument("--backbone-arg", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                       help="timm architecture override, e.g. depth=2 (repeatable)")
    model.add_argument("--crf", default=d.crf, choices=["coca", "cosal2015", "cosod3k", "none"])
    model.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16"])
    model.add_argument("--compile", action="store_true", help="torch.compile the backbone (long runs)")
    run = ap.add_argument_group("resources")
    run.add_argument("--micro-batch", type=int, default=d.micro_batch, help="images per backbone forward")
    run.add_argument("--chunk-size", type=int, default=d.chunk_size, help="images per CRF work unit")
    run.add_argument("--gpu-actors", type=int, help="stage-1 actors (default: one per GPU, else 1)")
    run.add_argument("--gpus-per-actor", type=float, help="default: 1 when the cluster has GPUs, else 0")
    run.add_argument("--cpu-actors", type=int, help="CRF actors (default: the CPUs left over)")
    run.add_argument("--max-pixels", type=int, default=d.max_pixels, help="larger images are error rows")
    run.add_argument("--progress-interval", type=float, default=d.progress_interval, help="seconds")
    store = ap.add_argument_group("storage")
    store.add_argument("--endpoint", help="S3-compatible endpoint URL (MinIO, R2, a test server)")
    store.add_argument("--anonymous", action="store_true", help="unsigned requests (public buckets)")
    store.add_argument("--storage-option", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                       help="any fsspec option, e.g. profile=prod (repeatable; never logged)")
    a = ap.parse_args(argv)
    if a.sample == bool(a.input or a.manifest):
        ap.error("give exactly one of --input, --manifest or --sample")
    cfg = InferConfig(
        input=a.input, output=a.output, manifest=a.manifest, backbone=a.backbone, head=a.head,
        random_init=a.random_init, backbone_name=a.backbone_name, backbone_kwargs=dict(a.backbone_arg),
        crf=a.crf, dtype=a.dtype, micro_batch=a.micro_batch, chunk_size=a.chunk_size, compile=a.compile,
        gpu_actors=a.gpu_actors, gpus_per_actor=a.gpus_per_actor, cpu_actors=a.cpu_actors,
        storage_options=storage_options(a.endpoint, a.anonymous, dict(a.storage_option)),
        overwrite=a.overwrite, max_pixels=a.max_pixels, progress_interval=a.progress_interval,
    )
    return cfg, a.sample


def main(argv=None) -> int:
    cfg, sample = parse_args(argv)
    if sample:
        from pipeline.sample import write_sample

        cfg.input = os.path.join(os.path.dirname(cfg.output.rstrip("/")) or ".", "sample-input")
        write_sample(cfg.input)
    manifest = run_inference(cfg)
    out = manifest["output"]
    print(f"rows {out['rows']} (ok {out['ok']}, errors {out['errors']}), "
          f"{manifest['images_per_s']:.2f} images/s overall")
    print(f"masks:       {cfg.output.rstrip('/')}/masks/<group>/<stem>.png")
    print(f"predictions: {cfg.output.rstrip('/')}/predictions/*.parquet")
    print(f"manifest:    {cfg.output.rstrip('/')}/_manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
