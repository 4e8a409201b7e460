"""The inference job against predict_group alone, on the same images, same model and settings (CPU).

    .venv/bin/python benchmarks/bench_infer.py [--groups 4] [--per-group 8] [--dtype float32]

ViT-B/8 with random weights (timing does not depend on them). Prints a table and writes
benchmarks/results/infer.json. The job's figure is given twice: for the whole command (Ray start-up, listing,
model loading in the actors, counting the output) and for the Ray Data execution alone.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--per-group", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "infer.json"))
    args = ap.parse_args()

    from PIL import Image

    from pipeline.infer import InferConfig, run_inference
    from pipeline.listing import list_layout
    from pipeline.sample import write_sample
    from pipeline.storage import Storage
    from scosparc_core import SCoSPARC

    work = Path(tempfile.mkdtemp(prefix="bench-infer-"))
    names = [f"{('horse', 'disc')[i % 2]}{i // 2 or ''}" for i in range(args.groups)]
    write_sample(str(work / "data"), {name: args.per_group for name in names})
    specs = list_layout(Storage(str(work / "data")))
    n_images = sum(len(g.images) for g in specs)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SCoSPARC.from_checkpoints(random_init=True, dtype=args.dtype, micro_batch=32)
        model.predict_group([Image.open(specs[0].images[0].image_uri.removeprefix("file://"))], crf="coca")  # warm
        t0 = time.perf_counter()
        for spec in specs:
            images = [Image.open(im.image_uri.removeprefix("file://")) for im in spec.images]
            pred = model.predict_group(images, crf="coca")
            for im, mask in zip(spec.images, pred.masks):
                Image.fromarray(mask).save(work / "direct.png")
        direct_s = time.perf_counter() - t0
    del model

    cfg = InferConfig(input=str(work / "data"), output=str(work / "run"), random_init=True, dtype=args.dtype,
                      micro_batch=32, progress_interval=10)
    t0 = time.perf_counter()
    manifest = run_inference(cfg)
    job_s = time.perf_counter() - t0
    data_s = manifest["dataset_seconds"]
    result = {
        "images": n_images, "groups": len(specs), "dtype": args.dtype,
        "predict_group_images_per_s": n_images / direct_s,
        "job_images_per_s_whole_command": n_images / job_s,
        "job_images_per_s_dataset_execution": n_images / data_s,
        "overhead_whole_command": direct_s and (job_s - direct_s) / direct_s,
        "overhead_dataset_execution": (data_s - direct_s) / direct_s,
        "rows": manifest["output"]["rows"],
    }
    print(f"\n{n_images} images in {len(specs)} groups, ViT-B/8 {args.dtype}, CRF coca, CPU")
    print(f"{'path':<40} {'seconds':>8} {'img/s':>7} {'vs predict_group':>17}")
    print(f"{'predict_group (one process)':<40} {direct_s:>8.1f} {n_images / direct_s:>7.3f} {'':>17}")
    print(f"{'job: Ray Data execution':<40} {data_s:>8.1f} {n_images / data_s:>7.3f} "
          f"{100 * result['overhead_dataset_execution']:>+16.1f}%")
    print(f"{'job: whole command (start-up included)':<40} {job_s:>8.1f} {n_images / job_s:>7.3f} "
          f"{100 * result['overhead_whole_command']:>+16.1f}%")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
