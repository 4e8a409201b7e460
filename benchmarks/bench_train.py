"""Training speed on CPU: groups/s with 1 and 2 DDP workers, and epoch time with and without the feature cache.

    .venv/bin/python benchmarks/bench_train.py [--groups 4] [--per-group 8] [--epochs 2]

ViT-B/8 with random weights, synthetic groups. Prints a table and writes benchmarks/results/train.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--per-group", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train.json"))
    args = ap.parse_args()

    import pandas as pd
    import ray

    from pipeline.sample import write_sample
    from pipeline.train import TrainConfig, run_training

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    names = [f"{('horse', 'disc')[i % 2]}{i // 2 or ''}" for i in range(args.groups)]
    write_sample(str(work / "data"), {n: args.per_group for n in names})
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    rows = []
    for label, workers, cache in (("no cache, 1 worker", 1, False), ("cache, 1 worker", 1, True),
                                  ("cache, 2 workers", 2, True)):
        cfg = TrainConfig(data=[str(work / "data")], storage=str(work / "runs"), name=label.replace(" ", "_"),
                          epochs=args.epochs, workers=workers, cpus_per_worker=2 / workers,
                          feature_cache=cache, random_init=True, cache_url=str(work / "cache"))
        t0 = time.perf_counter()
        run_training(cfg)
        total = time.perf_counter() - t0
        hist = pd.read_parquet(f"{cfg.run_url()}/metrics.parquet")
        rows.append({"config": label, "workers": workers, "feature_cache": cache, "total_s": total,
                     "epoch_s": hist["epoch_seconds"].tolist(), "groups_per_s": hist["groups_per_s"].tolist()})
    ray.shutdown()
    print(f"\n{args.groups} groups x {args.per_group} images, ViT-B/8 (random), {args.epochs} epochs, CPU")
    print(f"{'config':<22} {'first epoch s':>14} {'later epoch s':>14} {'groups/s (later)':>17} {'whole run s':>12}")
    for r in rows:
        print(f"{r['config']:<22} {r['epoch_s'][0]:>14.2f} {r['epoch_s'][-1]:>14.2f} {r['groups_per_s'][-1]:>17.2f} "
              f"{r['total_s']:>12.1f}")
    base, cached = rows[0]["epoch_s"][-1], rows[1]["epoch_s"][-1]
    print(f"later epochs with the cache: {base / cached:.0f}x faster (the cache itself was built in the 'cache, "
          f"1 worker' run's total)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"runs": rows, "cache_speedup_later_epochs": base / cached}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
