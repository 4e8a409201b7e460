"""Runs scosparc_core on the embedded sample groups and writes masks to a local folder.

    .venv/bin/python jobs/predict_sample.py [--out out/sample] [--backbone PATH] [--head PATH]

Without --backbone/--head the weights are random (the official ones need network access): the masks then show
the plumbing, not the method. Stand-in until jobs/infer.py (the distributed job) exists.
"""
import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from PIL import Image  # noqa: E402

from pipeline.sample import synthetic_group  # noqa: E402
from scosparc_core import SCoSPARC  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/sample")
    ap.add_argument("--backbone", default=None, help="DINO ViT-B/8 state_dict (path or URL)")
    ap.add_argument("--head", default=None, help="stage-1 checkpoint in the official format (path or URL)")
    ap.add_argument("--crf", default="coca", choices=["coca", "cosal2015", "cosod3k", "none"])
    args = ap.parse_args()
    random = args.backbone is None or args.head is None
    if random:
        warnings.warn("no --backbone/--head given: using RANDOM weights", stacklevel=1)
    model = SCoSPARC.from_checkpoints(backbone=args.backbone, head=args.head, random_init=random)
    for kind, count in (("horse", 4), ("disc", 3)):
        images = [rgb for rgb, _ in synthetic_group(kind, count)]
        pred = model.predict_group(images, crf=args.crf)
        os.makedirs(os.path.join(args.out, kind), exist_ok=True)
        for i, (rgb, mask) in enumerate(zip(images, pred.masks)):
            Image.fromarray(rgb).save(os.path.join(args.out, kind, f"{kind}_{i:03d}.jpg"))
            Image.fromarray(mask).save(os.path.join(args.out, kind, f"{kind}_{i:03d}.png"))
        print(f"{kind}: {len(images)} images, threshold {pred.threshold:.3f}, regions kept {pred.regions_kept}")
    print(f"masks written under {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
