"""Evaluation at scale: rows/s and peak memory of ``pipeline.evaluate`` on a synthetic run's predictions Parquet.

    .venv/bin/python benchmarks/bench_evaluate.py [--rows 1000000] [--groups 40000] [--shard-rows 10000]
        [--row-group 4096] [--interleaved] [--data DIR] [--keep] [--old-way]

Writes shards as jobs/infer.py does (``predictions/part-r0001-<digest>.parquet``, so name order is not group
order) with the columns that evaluation reads, random metrics and curves with full 53-bit mantissas (8 KiB of
curves per row, ~8.4 GB per million rows; a group may straddle two shards). ``--interleaved`` scatters each
group's rows over all shards (the worst case for open groups: past MAX_OPEN_GROUPS the run is read in passes).
The evaluation runs in a fresh process; its peak RSS (ru_maxrss) is reported with the RSS it had after its
imports, and its CPU seconds beside the wall time (on a shared machine rows per CPU-second is the steadier
figure). ``--old-way`` also measures the previous design's first step, every row loaded into pandas (its exact
sums came on top), on the same data. Prints a table and writes benchmarks/results/evaluate.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
from pipeline.evaluate import Source, evaluate
import pyarrow.dataset as pads
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
cpu = lambda: (lambda u: u.ru_utime + u.ru_stime)(resource.getrusage(resource.RUSAGE_SELF))
base = rss()
t0, c0 = time.perf_counter(), cpu()
if {old!r}:
    frame = pads.dataset({run!r} + "/predictions", format="parquet").to_table().to_pandas()
    rows, extra = len(frame), {{}}
else:
    metrics, details = evaluate([Source("bench", run={run!r}, dataset="synthetic")])
    d = details["bench"]
    rows, extra = d["rows"], {{"groups": d["groups"], "most_open_groups": d["most_open_groups"], "passes": d["passes"],
                               "max_fm": float(metrics.iloc[0]["max_fm"])}}
print(json.dumps({{"rows": rows, "seconds": time.perf_counter() - t0, "cpu_seconds": cpu() - c0,
                  "rss_after_imports_mib": base,
                  "peak_rss_mib": rss(), **extra}}))
"""


def write_shards(run: Path, rows: int, groups: int, shard_rows: int, interleaved: bool, row_group: int,
                 seed: int = 0) -> int:
    """Synthetic predictions; returns the bytes written."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from scosparc_core.metrics import CURVE_POINTS, CURVES, SCALARS

    out = run / "predictions"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    group_of = np.sort(rng.integers(0, groups, rows))  # sizes vary around rows / groups
    if interleaved:
        group_of = rng.permutation(group_of)
    written = 0
    for shard, start in enumerate(range(0, rows, shard_rows)):
        g = group_of[start : start + shard_rows]
        n = len(g)
        ok = rng.random(n) > 0.01  # 1% error rows without metrics
        names = [f"g{x:06d}" for x in g]
        columns = {
            "group": pa.array(names),
            "name": pa.array([f"{nm}_{start + i:08d}" for i, nm in enumerate(names)]),
            "status": pa.array(np.where(ok, "ok", "error")),
            "mask_uri": pa.array([f"masks/{nm}/{start + i:08d}.png" for i, nm in enumerate(names)]),
        }
        for k in SCALARS:
            columns[k] = pa.array(rng.random(n), mask=~ok)
        for k in CURVES:
            flat = pa.array(rng.random(n * CURVE_POINTS) ** 3)
            columns[k] = pa.FixedSizeListArray.from_arrays(flat, CURVE_POINTS, mask=pa.array(~ok))
        path = out / f"part-r0001-{hashlib.sha1(str(shard).encode()).hexdigest()[:16]}.parquet"  # digest names
        pq.write_table(pa.table(columns), path, row_group_size=row_group)
        written += path.stat().st_size
    return written


def measure(run: Path, old: bool = False) -> dict:
    code = CHILD.format(root=str(ROOT), run=str(run), old=old)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-4000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--groups", type=int, default=40_000)
    ap.add_argument("--shard-rows", type=int, default=10_000, help="rows per shard (jobs/infer.py: 10,000)")
    ap.add_argument("--row-group", type=int, default=4096, help="rows per Parquet row group")
    ap.add_argument("--interleaved", action="store_true", help="each group's rows spread over all shards")
    ap.add_argument("--data", help="where the synthetic run goes (default: a temporary folder, removed after)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic run")
    ap.add_argument("--old-way", action="store_true", help="also load every row into pandas, as before")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "evaluate.json"))
    args = ap.parse_args()

    import shutil

    run = Path(args.data or tempfile.mkdtemp(prefix="bench-evaluate-"))
    spec = {"rows": args.rows, "groups": args.groups, "shard_rows": args.shard_rows, "row_group": args.row_group,
            "interleaved": args.interleaved}
    marker = run / "_bench.json"
    t0 = time.perf_counter()
    if marker.exists() and json.loads(marker.read_text()).get("spec") == spec:
        size = json.loads(marker.read_text())["bytes"]
        print(f"reusing {run}")
    else:
        shutil.rmtree(run / "predictions", ignore_errors=True)
        size = write_shards(run, args.rows, args.groups, args.shard_rows, args.interleaved, args.row_group)
        marker.write_text(json.dumps({"spec": spec, "bytes": size}))
        print(f"wrote {args.rows:,} rows ({size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s to {run}")
    results = {"streaming": measure(run)}
    if args.old_way:
        results["all rows in pandas (before)"] = measure(run, old=True)
    if not (args.keep or args.data):
        shutil.rmtree(run, ignore_errors=True)

    print(f"\n{args.rows:,} rows in {args.groups:,} groups, {args.shard_rows:,}-row shards"
          f"{', groups interleaved over all shards' if args.interleaved else ''}; Parquet {size / 2**30:.2f} GiB")
    print(f"{'reader':<28} {'seconds':>8} {'rows/s':>9} {'CPU s':>8} {'rows/CPU-s':>11} {'peak RSS MiB':>13} "
          f"{'after imports MiB':>18} {'open groups':>12} {'passes':>7}")
    for name, r in results.items():
        print(f"{name:<28} {r['seconds']:>8.1f} {r['rows'] / r['seconds']:>9,.0f} {r['cpu_seconds']:>8.1f} "
              f"{r['rows'] / r['cpu_seconds']:>11,.0f} {r['peak_rss_mib']:>13,.0f} "
              f"{r['rss_after_imports_mib']:>18,.0f} {r.get('most_open_groups', ''):>12} {r.get('passes', ''):>7}")
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    history = json.loads(path.read_text()) if path.exists() else []
    history.append({**spec, "parquet_bytes": size, "results": results})
    path.write_text(json.dumps(history, indent=2))


if __name__ == "__main__":
    main()
