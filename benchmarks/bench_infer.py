"""The inference job against predict_group alone, on the same kind of images, model and settings (CPU).

    .venv/bin/python benchmarks/bench_infer.py [--groups 2 6] [--per-group 8] [--dtype float32]

ViT-B/8 with random weights (timing does not depend on them). The job runs on a small and a large set, which
separates its fixed start-up (actors, model loading) from its cost per additional image; that per-image cost is
what compares with predict_group's. Prints a table and writes benchmarks/results/infer.json.
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


def make_data(root: Path, groups: int, per_group: int):
    from pipeline.listing import list_layout
    from pipeline.sample import write_sample
    from pipeline.storage import Storage

    names = [f"{('horse', 'disc')[i % 2]}{i // 2 or ''}" for i in range(groups)]
    write_sample(str(root), {name: per_group for name in names})
    return list_layout(Storage(str(root)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, nargs=2, default=[2, 6], metavar=("SMALL", "LARGE"))
    ap.add_argument("--per-group", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "infer.json"))
    args = ap.parse_args()

    from PIL import Image

    from pipeline.infer import InferConfig, run_inference
    from scosparc_core import SCoSPARC

    work = Path(tempfile.mkdtemp(prefix="bench-infer-"))
    sizes = {}
    for label, groups in zip(("small", "large"), args.groups):
        specs = make_data(work / label, groups, args.per_group)
        sizes[label] = (specs, sum(len(g.images) for g in specs))

    # predict_group alone: one process, the same model settings, masks written as PNGs like the job does
    specs, n_large = sizes["large"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SCoSPARC.from_checkpoints(random_init=True, dtype=args.dtype, micro_batch=32)
        model.predict_group([Image.open(specs[0].images[0].image_uri.removeprefix("file://"))], crf="coca")  # warm
        t0 = time.perf_counter()
        for spec in specs:
            pred = model.predict_group([Image.open(im.image_uri.removeprefix("file://")) for im in spec.images])
            for mask in pred.masks:
                Image.fromarray(mask).save(work / "direct.png")
        direct_s = time.perf_counter() - t0
    del model

    job = {}
    for label, (_, n) in sizes.items():
        cfg = InferConfig(input=str(work / label), output=str(work / f"run-{label}"), random_init=True,
                          dtype=args.dtype, micro_batch=32, progress_interval=30)
        t0 = time.perf_counter()
        manifest = run_inference(cfg)
        job[label] = {"images": n, "command_s": time.perf_counter() - t0, "dataset_s": manifest["dataset_seconds"]}
    small, large = job["small"], job["large"]
    marginal = (large["dataset_s"] - small["dataset_s"]) / (large["images"] - small["images"])
    fixed = large["dataset_s"] - marginal * large["images"]
    direct_per_image = direct_s / n_large
    result = {
        "dtype": args.dtype, "per_group": args.per_group, "predict_group_s_per_image": direct_per_image,
        "job": job, "job_marginal_s_per_image": marginal, "job_fixed_s": fixed,
        "marginal_overhead_vs_predict_group": marginal / direct_per_image - 1,
        "whole_large_run_overhead": large["dataset_s"] / direct_s - 1,
    }
    print(f"\nViT-B/8 {args.dtype}, CRF coca, CPU, {args.per_group} images per group")
    print(f"{'path':<52} {'images':>6} {'seconds':>8} {'img/s':>7}")
    print(f"{'predict_group alone (one process)':<52} {n_large:>6} {direct_s:>8.1f} {n_large / direct_s:>7.3f}")
    for label, r in job.items():
        print(f"{'job, Ray Data execution (' + label + ')':<52} {r['images']:>6} {r['dataset_s']:>8.1f} "
              f"{r['images'] / r['dataset_s']:>7.3f}")
        print(f"{'job, whole command incl. Ray start-up (' + label + ')':<52} {r['images']:>6} {r['command_s']:>8.1f} "
              f"{r['images'] / r['command_s']:>7.3f}")
    print(f"job per additional image: {marginal:.3f} s vs predict_group {direct_per_image:.3f} s "
          f"({100 * result['marginal_overhead_vs_predict_group']:+.1f}%); fixed start-up {fixed:.1f} s "
          f"(actors, model loading); the whole {n_large}-image run: {100 * result['whole_large_run_overhead']:+.1f}%")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
