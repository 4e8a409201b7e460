"""Training speed: groups/s per epoch with and without the feature cache, and the cache pass's images/s.

    .venv/bin/python benchmarks/bench_train.py [--groups 8] [--per-group 25] [--max-images 24] [--epochs 2]
    python3 benchmarks/bench_train.py --device-check --out DIR [--quick]

Benchmark (default): synthetic groups, ViT-B/8 with random weights, one worker, on CUDA when torch sees a GPU
(``--gpu``: one GPU, the cache built there) and on the CPU otherwise. Prints a table and writes
``benchmarks/results/train-<device>.json``.

Device check (``--device-check``): what a new user does on a GPU machine, each step under a hard timeout, in
about 5 minutes at most (on an H100 the first run alone needs ~2: Ray, the cache pass and Ray Train's start): 40 synthetic groups x 25 images written to /tmp, then ``jobs/train.py --gpu --workers 1
--epochs 3 --random-init --max-images 24`` with validation and the feature cache, then a resume (one more epoch,
from the checkpoint, the cache reused), then 2 workers sharing the one GPU (``--gpus-per-worker 0.5``). Into DIR:
``device_check.json`` (per run: exit code, time, groups/s per epoch, cache-build images/s, what was written), each
run's driver output, and on a failure or timeout ``diagnostics.txt`` (the cluster's resources and live actors while
it hangs, and the tails of Ray's logs). ``--quick``: a tiny ViT and 4 groups x 4 images, for a CPU machine; without
a GPU the runs use the CPU (gloo) and the check says so.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = {"embed_dim": 96, "depth": 2, "num_heads": 3}  # --quick: the tests' tiny ViT architecture, random weights
BUDGET_S = 300.0  # the device check's whole wall-clock budget (--budget); 175 s ran out on an H100
# the feature-cache pass's figures (pipeline.feature_cache.build_cache) kept in the results
CACHE_FIGURES = ("images", "seconds", "images_per_s", "startup_seconds", "busy_seconds", "busy_images_per_s",
                 "backbone_seconds", "write_seconds")


def cache_line(c: dict) -> str:
    """The cache pass in one line: whole pass, start-up, while the actors worked, and the calls' split."""
    return (f"{c['images']} images, {c['images_per_s']:.1f} img/s over the pass ({c['seconds']:.1f} s, "
            f"{c['startup_seconds']:.1f} s before the first group), {c['busy_images_per_s']:.1f} img/s while actors "
            f"worked ({c['busy_seconds']:.1f} s); calls' seconds: backbone {c['backbone_seconds']:.1f}, "
            f"write {c['write_seconds']:.1f}")


def group_names(n: int) -> list[str]:
    """write_sample group names: an object kind and a variant number ("horse", "disc", "horse1", ...)."""
    return [f"{('horse', 'disc')[i % 2]}{i // 2 or ''}" for i in range(n)]


def _write_group(root: str, name: str, count: int) -> None:
    from pipeline.sample import write_sample

    write_sample(root, {name: count})


def write_groups(root: str, groups: int, per_group: int) -> float:
    """Writes the synthetic groups in parallel processes; returns seconds."""
    start = time.perf_counter()
    with ProcessPoolExecutor(max(1, min(16, os.cpu_count() or 1, groups))) as pool:
        list(pool.map(_write_group, [root] * groups, group_names(groups), [per_group] * groups))
    return time.perf_counter() - start


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------- benchmark
def benchmark(args) -> None:
    import pandas as pd
    import ray

    from pipeline.train import TrainConfig, run_training

    gpu = cuda_available()
    device = "cuda" if gpu else "cpu"
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    write_groups(str(work / "data"), args.groups, args.per_group)
    ray.init(address="local", log_to_driver=False)
    cpus = ray.cluster_resources().get("CPU", 1)
    rows = []
    for label, cache in (("feature cache", True), ("no cache (backbone every step)", False)):
        cfg = TrainConfig(data=(str(work / "data"),), storage=str(work / "runs"), name="cache" if cache else "nocache",
                          epochs=args.epochs, max_images=args.max_images, gpu=gpu,
                          cpus_per_worker=min(2.0, cpus / 2) if gpu else float(cpus),
                          feature_cache=cache, random_init=True, cache_url=str(work / "cache"),
                          backbone_kwargs=TINY if args.tiny else {}, backbone_name="vit_base_patch8_224" if args.tiny
                          else TrainConfig.backbone_name)
        t0 = time.perf_counter()
        run_training(cfg)
        total = time.perf_counter() - t0
        hist = pd.read_parquet(f"{cfg.run_url()}/metrics.parquet")
        record = json.loads(Path(cfg.run_url(), "train_config.json").read_text())
        built = next(iter(record.get("feature_cache", {}).values()), {})
        rows.append({"config": label, "feature_cache": cache, "total_s": total,
                     "epoch_s": hist["epoch_seconds"].tolist(), "groups_per_s": hist["groups_per_s"].tolist(),
                     "cache_build": {k: built.get(k) for k in CACHE_FIGURES} if built else None})
    ray.shutdown()
    import torch

    name = torch.cuda.get_device_name() if gpu else "CPU"
    print(f"\n{args.groups} groups x {args.per_group} images, {args.max_images} sampled per step, "
          f"{'tiny ViT' if args.tiny else 'ViT-B/8'} (random), {args.epochs} epochs, 1 worker, {name}")
    print(f"{'config':<32} {'groups/s per epoch':>30} {'whole run s':>12}")
    for r in rows:
        print(f"{r['config']:<32} {' '.join(f'{g:.2f}' for g in r['groups_per_s']):>30} {r['total_s']:>12.1f}")
    c = rows[0]
    if c["cache_build"] and c["cache_build"]["images_per_s"]:
        print(f"cache build: {cache_line(c['cache_build'])}")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"train-{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "groups": args.groups, "per_group": args.per_group,
                               "max_images": args.max_images, "tiny": args.tiny, "runs": rows}, indent=2))
    print(f"wrote {out}")


# ------------------------------------------------------------------------------------------- device check
def tail(path: str, lines: int = 40, limit: int = 6000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 64_000))
            text = f.read().decode(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])[-limit:]


CLUSTER_PROBE = r"""
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
out = {"cluster": ray.cluster_resources(), "available": ray.available_resources(), "actors": None}
try:
    from ray.util.state import list_actors
    out["actors"] = [(a.class_name, a.state, a.required_resources) for a in list_actors(
        address=sys.argv[1], detail=True, limit=200, raise_on_missing_output=False, timeout=10)]
except Exception as exc:
    from ray._private import state
    out["actors"] = [(a["ActorClassName"], a["State"]) for a in state.actors().values()]
    out["state_api"] = repr(exc)
print(json.dumps(out, default=str))
"""


def cluster_probe(ray_tmp: str, timeout: float) -> str:
    """The live cluster's resources and actors, from a separate driver (the run may be stuck in ray.get)."""
    try:
        address = Path(ray_tmp, "ray", "ray_current_cluster").read_text().strip()
    except OSError:
        return "(no cluster: the run had not started Ray)"
    try:
        p = subprocess.run([sys.executable, "-c", CLUSTER_PROBE, address], capture_output=True, text=True,
                           timeout=max(5.0, timeout))
        return p.stdout.strip()[-8000:] or p.stderr.strip()[-3000:]
    except subprocess.TimeoutExpired:
        return "(the cluster probe timed out)"


def ray_log_tails(ray_tmp: str, per_file: int = 25) -> str:
    logs = sorted(glob.glob(f"{ray_tmp}/ray/session_latest/logs/*"), key=os.path.getmtime)
    kinds = ("worker", "raylet", "gcs_server", "python-core-driver")
    wanted = [p for p in logs if os.path.basename(p).startswith(kinds) or "train" in os.path.basename(p).lower()]
    return "\n".join(f"--- {p}\n{tail(p, per_file, 3000)}" for p in wanted[-14:])


def run_step(name: str, argv: list[str], timeout: float, out: Path, diagnostics: list[str]) -> dict:
    """One jobs/train.py run under a hard timeout, in its own process group (its Ray goes with it). Its Ray
    lives under /tmp/rck-<name> (RAY_TMPDIR): the probe finds that cluster, and its logs are that run's."""
    log = out / f"{name}.log"
    ray_tmp = f"/tmp/rck-{name}"
    shutil.rmtree(ray_tmp, ignore_errors=True)
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    start = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "train.py"), *argv], stdout=f,
                                stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True, env=env)
        timed_out = False
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out, rc = True, None
            diagnostics.append(f"===== {name}: timed out after {timeout:.0f} s; cluster while stuck:\n"
                               f"{cluster_probe(ray_tmp, 15)}")
            for sig, wait in ((signal.SIGINT, 8), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                    rc = proc.wait(timeout=wait)
                    break
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    continue
    wall = time.monotonic() - start
    if timed_out or rc != 0:
        diagnostics.append(f"===== {name}: exit {rc}{' (timeout)' if timed_out else ''}; driver output tail:\n"
                           f"{tail(str(log), 60)}\n===== {name}: Ray log tails ({ray_tmp})\n{ray_log_tails(ray_tmp)}")
    return {"name": name, "argv": argv, "rc": rc, "timed_out": timed_out, "wall_s": round(wall, 1),
            "timeout_s": round(timeout, 1)}


def run_outputs(storage: Path, name: str) -> dict:
    """What a run left: history (groups/s per epoch ...), checkpoints, heads, the cache pass's figures."""
    import pandas as pd

    run = storage / name
    found = {"metrics_parquet": (run / "metrics.parquet").exists(),
             "checkpoints": sum(p.is_dir() for p in run.glob("checkpoint_*")),
             "head_last": (run / "head_last.pt").exists(), "head_best": (run / "head_best.pt").exists()}
    if found["metrics_parquet"]:
        h = pd.read_parquet(run / "metrics.parquet")
        for col in ("epoch", "groups_per_s", "epoch_seconds", "val_seconds", "val_max_fm", "params_identical",
                    "attempt"):
            if col in h:
                found[col] = [None if pd.isna(v) else (v.item() if hasattr(v, "item") else v) for v in h[col]]
    record = run / "train_config.json"
    if record.exists():
        cache = json.loads(record.read_text()).get("feature_cache", {})
        found["feature_cache"] = {root: {k: s.get(k) for k in ("groups", "computed", *CACHE_FIGURES)}
                                  for root, s in cache.items()}
    return found


def verdicts(steps: dict) -> dict:
    """What the runs show: finished and written, resumed from the checkpoint (the first run's rows kept), the
    cache reused, the workers' parameters identical, and the cached epochs' speed against the target."""
    fresh, resume, shared = steps.get("fresh", {}), steps.get("resume", {}), steps.get("shared", {})
    cached_epochs = (fresh.get("groups_per_s") or [])[1:]  # the first epoch also warms up (threads, kernels)
    first = fresh.get("attempt") or []
    return {
        "fresh_wrote_3_epochs_checkpoints_and_metrics": fresh.get("epoch") == [0, 1, 2] and bool(
            fresh.get("checkpoints")) and bool(fresh.get("metrics_parquet")) and bool(fresh.get("head_best")),
        "resume_kept_the_first_run_s_epochs": bool(first) and (resume.get("attempt") or [])[:3] == first and len(
            set(resume.get("attempt") or [])) == 2,
        "resume_reused_the_cache": all(c.get("computed") == 0 for c in (resume.get("feature_cache") or {}).values())
        and bool(resume.get("feature_cache")),
        "shared_params_identical": bool(shared.get("params_identical")) and all(shared["params_identical"]),
        "cached_epoch_groups_per_s": max(cached_epochs) if cached_epochs else None,
        "target_20_groups_per_s_met": bool(cached_epochs) and max(cached_epochs) >= 20,
    }


def device_check(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    report: dict = {"quick": args.quick, "budget_s": args.budget, "steps": [], "ok": False}
    diagnostics: list[str] = []

    def left() -> float:
        return args.budget - (time.monotonic() - t0)

    def save() -> None:
        report["wall_s"] = round(time.monotonic() - t0, 1)
        (out / "device_check.json").write_text(json.dumps(report, indent=2, default=str))
        if diagnostics:
            (out / "diagnostics.txt").write_text("\n\n".join(diagnostics)[-2_000_000:])

    try:
        import torch

        gpu = torch.cuda.is_available()
        report["device"] = torch.cuda.get_device_name() if gpu else "cpu (no CUDA device: the GPU path is not run)"
        report["torch"] = torch.__version__
        groups, per_group, max_images = (4, 4, 4) if args.quick else (40, 25, 24)
        work = Path(tempfile.mkdtemp(prefix="train-check-", dir="/tmp"))
        data, storage = work / "syn", work / "runs"
        report["data"] = {"groups": groups, "per_group": per_group, "seconds": round(
            write_groups(str(data), groups, per_group), 1)}
        save()
        model = (["--backbone-name", "vit_base_patch8_224"] + [a for k, v in TINY.items()
                                                                for a in ("--backbone-arg", f"{k}={v}")]
                 if args.quick else [])
        cpus = os.cpu_count() or 2
        common = ["--data", str(data), "--storage", str(storage), "--random-init", "--max-images", str(max_images),
                  "--placement-timeout", "120" if args.quick else "60", "--max-failures", "0", *model]
        if gpu:
            per_worker = str(min(2, max(1, cpus // 4)))
            one = ["--gpu", "--workers", "1", "--cpus-per-worker", per_worker]
            two = ["--gpu", "--workers", "2", "--gpus-per-worker", "0.5", "--cpus-per-worker", per_worker]
        else:
            one = ["--workers", "1", "--cpus-per-worker", "0.5"]
            two = ["--workers", "2", "--cpus-per-worker", "0.5"]
        steps = [
            ("fresh", ["--name", "g", "--val", str(data), "--epochs", "3", *one], 0.55),
            ("resume", ["--name", "g", "--val", str(data), "--epochs", "4", *one], 0.5),
            ("shared", ["--name", "shared", "--epochs", "2", *two], 1.0),
        ]
        for name, argv, share in steps:
            budget = left() * share
            if budget < 20:
                report["steps"].append({"name": name, "skipped": f"only {left():.0f} s of the budget left"})
                continue
            step = run_step(name, [*common, *argv], budget, out, diagnostics)
            step.update(run_outputs(storage, "g" if name != "shared" else "shared"))
            report["steps"].append(step)
            save()
        ran = [s for s in report["steps"] if "rc" in s]
        report["ok"] = len(ran) == len(steps) and all(s["rc"] == 0 for s in ran)
        report["checks"] = verdicts({s["name"]: s for s in report["steps"]})
    except Exception as exc:  # noqa: BLE001 - the check reports, whatever happens
        report["error"] = f"{type(exc).__name__}: {exc}"
        diagnostics.append(f"===== device check error\n{report['error']}")
    finally:
        save()
    for s in report["steps"]:
        gps = " ".join(f"{g:.1f}" for g in s.get("groups_per_s", []) or [])
        cache = next(iter(s.get("feature_cache", {}).values()), {})
        rate = f", cache build {cache_line(cache)}" if cache.get("images_per_s") else ""
        print(f"{s['name']:<7} rc {s.get('rc')} {'TIMEOUT ' if s.get('timed_out') else ''}{s.get('wall_s', '-')} s  "
              f"groups/s per epoch: {gps or '-'}{rate}  checkpoints {s.get('checkpoints')}  "
              f"metrics.parquet {s.get('metrics_parquet')}  {s.get('skipped', '')}")
    for k, v in (report.get("checks") or {}).items():
        print(f"  {k}: {v}")
    print(f"device check {'passed' if report['ok'] else 'FAILED'} in {report['wall_s']} s; see {out}")
    return 0 if report["ok"] else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device-check", action="store_true", help="the unattended GPU-machine check (see above)")
    ap.add_argument("--quick", action="store_true", help="device check with a tiny ViT and tiny sizes (CPU)")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="device check: seconds for all of it")
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--per-group", type=int, default=25)
    ap.add_argument("--max-images", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="benchmark the tiny ViT instead of ViT-B/8")
    ap.add_argument("--out", help="benchmark: JSON path; device check: output folder")
    args = ap.parse_args()
    if args.device_check:
        if not args.out:
            ap.error("--device-check needs --out DIR")
        sys.exit(device_check(args))
    benchmark(args)


if __name__ == "__main__":
    main()
