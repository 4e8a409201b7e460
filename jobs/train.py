r"""Self-supervised training of the SCoSPARC stage-1 head on grouped images, with Ray Train.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py --data s3://b/COCO9213 --data s3://b/DUTS_class --val s3://b/CoCA \
        --storage s3://b/runs --name exp1 --workers 8 --gpu --backbone s3://b/w/dino_vitbase8_pretrain.pth

Ground truth is never used for training, only for validation (--val). Running again with the same --storage and
--name resumes from the last checkpoint; a run of that name started with other data, weights or settings that
change the result is refused (more --epochs is fine, fewer than it has trained are refused, as many do nothing).
The heads land in <storage>/<name>/head_best.pt and head_last.pt, in the official format that jobs/infer.py
--head loads.

GPUs: --gpu gives each worker one GPU and NCCL between workers. Several workers may share one GPU with
--gpus-per-worker 0.5 (gloo then: NCCL refuses two ranks on one GPU). If the cluster cannot place the workers
within --placement-timeout seconds, the job stops and names what is missing.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs.arguments import (Formatter, KeyValues, add_storage_args, extension_list, key_value, refused,  # noqa: E402
                            storage_from)
from pipeline.listing import LAYOUTS  # noqa: E402
from pipeline.train import TrainConfig, config_defaults, run_training  # noqa: E402
from scosparc_core.precision import PRECISIONS  # noqa: E402


def parse_args(argv=None) -> TrainConfig:
    d = config_defaults()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    ap.add_argument("--data", action="append", required=True, help="training root in the CoSOD layout (repeatable)")
    ap.add_argument("--val", help="validation root with ground truth (e.g. CoCA)")
    ap.add_argument("--layout", default=d["layout"], choices=LAYOUTS,
                    help="how the roots are read: image/ + groundtruth/ (cosod), or group folders (groups)")
    ap.add_argument("--extensions", type=extension_list, default=d["extensions"], metavar="EXT,EXT",
                    help="only files with these extensions are images of --data and --val, e.g. jpg,jpeg,png "
                         "(case ignored), so sidecar files (.json, .txt) are left out; default: every file is")
    ap.add_argument("--storage", required=True, help="URL or path for checkpoints, metrics and the feature cache")
    ap.add_argument("--name", required=True, help="run name; the same name resumes")
    ap.add_argument("--epochs", type=int, default=d["epochs"], help="epochs in all (a resumed run may add more)")
    ap.add_argument("--val-every", type=int, default=d["val_every"], help="validate every k epochs")
    ap.add_argument("--max-images", type=int, default=d["max_images"], help="images sampled per group and step")
    ap.add_argument("--lr", type=float, default=d["lr"], help="Adam learning rate")
    ap.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="Adam weight decay")
    ap.add_argument("--workers", type=int, default=d["workers"], help="DDP workers")
    ap.add_argument("--gpu", action="store_true", help="GPUs for the workers and the feature cache (else CPU)")
    ap.add_argument("--gpus-per-worker", type=float, default=d["gpus_per_worker"],
                    help="with --gpu: below 1 lets workers share a GPU (gloo instead of NCCL)")
    ap.add_argument("--cpus-per-worker", type=float, default=d["cpus_per_worker"],
                    help="fractions let small machines fit")
    ap.add_argument("--placement-timeout", type=float, default=d["placement_timeout"],
                    help="seconds to wait for the cluster to place the workers and cache actors before failing")
    ap.add_argument("--no-feature-cache", dest="feature_cache", action="store_false",
                    help="run the backbone at every step instead of reading cached features")
    ap.add_argument("--cache-url", help="feature cache location (default <storage>/feature-cache)")
    ap.add_argument("--backbone", help="DINO state_dict path or URL (default: timm's pretrained weights)")
    ap.add_argument("--backbone-name", default=d["backbone_name"], help="timm model name")
    ap.add_argument("--backbone-arg", type=key_value, nargs="+", action=KeyValues, default={}, metavar="KEY=VALUE",
                    help="architecture override for timm (embed_dim=96 ...)")
    ap.add_argument("--random-init", action="store_true", help="random backbone when none is given (tests)")
    ap.add_argument("--init-head", help="start from this stage-1 checkpoint")
    ap.add_argument("--dtype", default=d["dtype"], choices=PRECISIONS,
                    help="the backbone's number format (auto: float32, on CUDA too)")
    ap.add_argument("--micro-batch", type=int, default=d["micro_batch"], help="backbone images per forward pass")
    ap.add_argument("--seed", type=int, default=d["seed"], help="seeds the head, the group order and the sampling")
    ap.add_argument("--max-failures", type=int, default=d["max_failures"],
                    help="worker failures retried from the last checkpoint")
    add_storage_args(ap)
    a = ap.parse_args(argv)
    try:
        return _config(a)
    except ValueError as exc:  # settings that cannot work: usage and the reason, exit 2
        ap.error(str(exc))


def _config(a: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        data=tuple(a.data), val=a.val, layout=a.layout, extensions=a.extensions, storage=a.storage, name=a.name,
        epochs=a.epochs,
        val_every=a.val_every, max_images=a.max_images, lr=a.lr, weight_decay=a.weight_decay, workers=a.workers,
        gpu=a.gpu, gpus_per_worker=a.gpus_per_worker, cpus_per_worker=a.cpus_per_worker,
        placement_timeout=a.placement_timeout,
        feature_cache=a.feature_cache, cache_url=a.cache_url, backbone=a.backbone, backbone_name=a.backbone_name,
        backbone_kwargs=dict(a.backbone_arg), random_init=a.random_init, init_head=a.init_head, dtype=a.dtype,
        micro_batch=a.micro_batch, seed=a.seed, max_failures=a.max_failures,
        storage_options=storage_from(a),
    )


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        result = run_training(cfg)
    except Exception as exc:
        return refused(exc)
    if result is None:  # the run has its epochs already (run_training said so)
        return 0
    print(f"final metrics: {result.metrics}")
    print(f"heads: {cfg.run_url()}/head_last.pt, {cfg.run_url()}/head_best.pt (with --val)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
