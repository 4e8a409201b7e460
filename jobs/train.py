"""Self-supervised training of the SCoSPARC stage-1 head on grouped images, with Ray Train.

    ray job submit -- python jobs/train.py --data s3://b/COCO9213 --data s3://b/DUTS_class --val s3://b/CoCA \
        --storage s3://b/runs --name exp1 --workers 8 --gpu --backbone s3://b/w/dino_vitbase8_pretrain.pth

Ground truth is never used for training, only for validation (--val). Running again with the same --storage and
--name resumes from the last checkpoint. The heads land in <storage>/<name>/head_best.pt and head_last.pt, in the
official format that jobs/infer.py --head loads.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs.infer import key_value  # noqa: E402
from pipeline.storage import storage_options  # noqa: E402
from pipeline.train import ADAM, TrainConfig, run_training  # noqa: E402


def parse_args(argv=None) -> TrainConfig:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", required=True, help="training root in the CoSOD layout (repeatable)")
    ap.add_argument("--val", help="validation root with ground truth (e.g. CoCA)")
    ap.add_argument("--storage", required=True, help="URL or path for checkpoints, metrics and the feature cache")
    ap.add_argument("--name", required=True, help="run name; the same name resumes")
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--val-every", type=int, default=1, help="validate every k epochs")
    ap.add_argument("--max-images", type=int, default=24, help="images sampled per group and step")
    ap.add_argument("--lr", type=float, default=ADAM["lr"])
    ap.add_argument("--weight-decay", type=float, default=ADAM["weight_decay"])
    ap.add_argument("--workers", type=int, default=1, help="DDP workers")
    ap.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL (default: CPU, gloo)")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0, help="fractions let small machines fit")
    ap.add_argument("--no-feature-cache", dest="feature_cache", action="store_false",
                    help="run the backbone at every step instead of reading cached features")
    ap.add_argument("--cache-url", help="feature cache location (default <storage>/feature-cache)")
    ap.add_argument("--backbone", help="DINO state_dict path or URL (default: timm's pretrained weights)")
    ap.add_argument("--backbone-name", default=TrainConfig.backbone_name)
    ap.add_argument("--backbone-arg", type=key_value, action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--random-init", action="store_true", help="random backbone when none is given (tests)")
    ap.add_argument("--init-head", help="start from this stage-1 checkpoint")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-failures", type=int, default=3, help="worker failures retried from the last checkpoint")
    ap.add_argument("--endpoint", help="S3-compatible endpoint URL")
    ap.add_argument("--anonymous", action="store_true")
    ap.add_argument("--storage-option", type=key_value, action="append", default=[], metavar="KEY=VALUE")
    a = ap.parse_args(argv)
    return TrainConfig(
        data=a.data, val=a.val, storage=a.storage, name=a.name, epochs=a.epochs, val_every=a.val_every,
        max_images=a.max_images, lr=a.lr, weight_decay=a.weight_decay, workers=a.workers, gpu=a.gpu,
        cpus_per_worker=a.cpus_per_worker, feature_cache=a.feature_cache, cache_url=a.cache_url,
        backbone=a.backbone, backbone_name=a.backbone_name, backbone_kwargs=dict(a.backbone_arg),
        random_init=a.random_init, init_head=a.init_head, dtype=a.dtype, seed=a.seed, max_failures=a.max_failures,
        storage_options=storage_options(a.endpoint, a.anonymous, dict(a.storage_option)),
    )


def main(argv=None) -> int:
    cfg = parse_args(argv)
    result = run_training(cfg)
    print(f"final metrics: {result.metrics}")
    print(f"heads: {cfg.run_url()}/head_last.pt, {cfg.run_url()}/head_best.pt (with --val)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
