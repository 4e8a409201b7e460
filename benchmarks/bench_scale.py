"""Issue 11's scale targets: N tiny JPEGs in G groups, on moto S3 or local disk, through the inference job.

    .venv/bin/python benchmarks/bench_scale.py [--n 100000] [--groups 4000] [--where s3|local] [--size 64]
    .venv/bin/python benchmarks/bench_scale.py --one-group 10000 [--where local]
    .venv/bin/python benchmarks/bench_scale.py --resume-only [--manifest] [--n 100000] [--groups 4000]

The job is ``pipeline.infer.run_inference`` with a tiny ViT (``vit_base_patch8_224``, embed_dim 96, depth 2,
3 heads, random weights), ``--crf none`` and stage 1 on the CPU, so that the figures are those of the system
(listing, decoding, shards, records, resume), not of the backbone. Images are ``size`` x ``size`` JPEGs (a pool
of distinct pictures, so decoding is cheap but real) in the CoSOD layout ``image/<group>/<name>.jpg``, G groups
of N/G images (``--one-group N``: one group of N images, which stage 1 runs in passes when N is above
``--one-pass-images``).

Processes, each measured on its own:
  * the S3 server (``--where s3``): moto's ``ThreadedMotoServer`` in a process of its own (it holds every object;
    in the driver it would count as the driver's memory). Its ListObjectsV2 is answered from a sorted index of
    the bucket's keys (rebuilt when a key is added or removed): moto scans and sorts the whole bucket for every
    page, which S3 does not, and 4,000 group listings of a 200,000-key bucket would measure moto. Objects are
    uploaded with a thread pool;
  * the first run (a fresh driver process): Ray started, the listing timed on its own as the job does it
    (``group_dataset(...).materialize()`` + ``summarize``), then the job. A thread samples every process under
    the driver (Ray's GCS, raylet, workers) twice a second: each one's peak RSS (``VmHWM``) and peak anonymous
    RSS (``RssAnon``, i.e. without the object store's shared pages it maps);
  * the resume (another fresh driver process, as a user re-running the command): ``run_inference`` on the same
    output with everything done, timed from the call, Ray's start-up included.
Then the output is counted (Parquet shards, commit records, mask files). ``--resume-only`` replaces the first run
(29 minutes at N = 100,000 on local disk with 2 cores, 50 on moto) by the output a finished run leaves, written
with the job's own functions (``_run.json`` with its settings fingerprint, shards of rows without predictions and
their commit records), and times the real resume, which must find nothing to do (``scale-<where>-<n>x<groups>-resume-only.json``). Prints
a table and writes ``benchmarks/results/scale-<where>-<n>x<groups>.json`` (``scale-<where>-one-group-<n>.json``).
Targets (issue 11, N = 100,000 in 4,000 groups): driver peak RSS <= 1.5 GB, Parquet files <= 20, a resume with
everything done <= 60 s; one group of 10,000 images: every worker's peak RSS <= 3 GB.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from results_file import code_version, write_result  # noqa: E402

BUCKET = "bench-scale"
KEYS = {"key": "testing", "secret": "testing"}
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
TINY_VIT = {"embed_dim": 96, "depth": 2, "num_heads": 3}
POOL = 97  # distinct pictures; image i of group g gets picture (g * 31 + i) % POOL
GIB = 1024**3
TARGETS = {"driver_peak_rss_gib": 1.5, "parquet_files": 20, "resume_s": 60.0, "worker_peak_rss_gib": 3.0}


# --- the input ------------------------------------------------------------------------------------------------

def pictures(size: int, count: int = POOL) -> list[bytes]:
    """``count`` distinct JPEGs of ``size`` x ``size``: a noisy background and a disc (something to be salient)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for _ in range(count):
        rgb = rng.integers(0, 256, 3) * 0.6 + rng.normal(0, 25, (size, size, 3))
        (cy, cx), r = rng.uniform(0.3, 0.7, 2) * size, rng.uniform(0.15, 0.3) * size
        rgb[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = rng.integers(0, 256, 3)
        buf = io.BytesIO()
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def layout(n: int, groups: int) -> list[tuple[str, int]]:
    """(key under the root, picture) for n images in ``groups`` groups of n / groups images (the rest spread)."""
    base, extra = divmod(n, groups)
    keys = []
    for g in range(groups):
        for i in range(base + (g < extra)):
            keys.append((f"image/g{g:05d}/img{i:05d}.jpg", (g * 31 + i) % POOL))
    return keys


def write_local(root: Path, keys: list[tuple[str, int]], pics: list[bytes]) -> None:
    def put(item):
        path = root / item[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pics[item[1]])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, keys, chunksize=256))


def upload_s3(endpoint: str, keys: list[tuple[str, int]], pics: list[bytes], threads: int = 32) -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1", config=Config(max_pool_connections=threads))
    client.create_bucket(Bucket=BUCKET)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda kp: client.put_object(Bucket=BUCKET, Key=f"in/{kp[0]}", Body=pics[kp[1]]), keys,
                      chunksize=64))


def write_manifest(root_url: str, options: dict, keys: list[tuple[str, int]]) -> str:
    """``<root>/manifest.parquet``: group, image_uri (relative to the manifest) for every image. Returns its URL."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"group": [k.split("/")[1] for k, _ in keys], "image_uri": [k for k, _ in keys]})
    url = f"{root_url}/manifest.parquet"
    with fsspec.open(url, "wb", **options) as f:
        pq.write_table(table, f)
    return url


# --- the S3 server (its own process) -------------------------------------------------------------------------

def serve_s3() -> None:
    """moto's server with ListObjectsV2 answered from a sorted index of the bucket's keys; prints its URL and
    runs until stdin closes."""
    from bench_listing import list_page
    from moto.s3 import models
    from moto.server import ThreadedMotoServer

    os.environ.update(AWS_ENV)
    index: dict[str, list[str]] = {}  # bucket -> sorted key names, dropped when a key is added or removed
    lock = threading.Lock()
    put_object, delete_object = models.S3Backend.put_object, models.S3Backend.delete_object

    def put(self, bucket_name, key_name, *args, **kwargs):
        new = key_name not in self.get_bucket(bucket_name).keys
        key = put_object(self, bucket_name, key_name, *args, **kwargs)
        if new:
            with lock:
                index.pop(bucket_name, None)
        return key

    def delete(self, bucket_name, key_name, *args, **kwargs):
        result = delete_object(self, bucket_name, key_name, *args, **kwargs)
        with lock:
            index.pop(bucket_name, None)
        return result

    def list_objects_v2(self, bucket, prefix, delimiter, continuation_token, start_after, max_keys):
        with lock:
            names = index.get(bucket.name)
            if names is None:
                names = index[bucket.name] = sorted(bucket.keys.keys())
        after = self._pagination_tokens.get(continuation_token) if continuation_token else start_after
        keys, folders, truncated, last = list_page(names, prefix or "", delimiter, after, max_keys)
        token = None
        if truncated:
            token = f"t{len(self._pagination_tokens)}"
            self._pagination_tokens[token] = last
        return sorted([bucket.keys[k] for k in keys] + folders, key=self._get_name), truncated, token

    models.S3Backend.put_object, models.S3Backend.delete_object = put, delete
    models.S3Backend.list_objects_v2 = list_objects_v2
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    print(f"http://{host}:{port}", flush=True)
    sys.stdin.read()  # until the parent closes the pipe
    server.stop()


# --- one driver (its own process) ----------------------------------------------------------------------------

def _status(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)
                if k in ("VmHWM", "VmRSS", "RssAnon")}


class ProcessPeaks(threading.Thread):
    """Samples every process under this one (Ray's GCS, raylet, workers): per pid its title (Ray sets
    ``ray::<actor or task>``), peak RSS (the kernel's ``VmHWM``, exact whenever sampled) and peak anonymous RSS."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval, self.stopped = interval, threading.Event()
        self.procs: dict[int, dict] = {}

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stopped.is_set():
            self.sample(me)
            self.stopped.wait(self.interval)
        self.sample(me)

    def sample(self, me) -> None:
        import psutil

        for p in me.children(recursive=True):
            try:
                argv = " ".join(p.cmdline()).split()
                st = _status(p.pid)
            except (psutil.Error, OSError, ValueError):
                continue
            rec = self.procs.setdefault(p.pid, {"pid": p.pid, "titles": [], "peak_rss": 0, "peak_anon": 0})
            if not argv or argv[0].startswith("ray::"):
                short = argv[0] if argv else "?"
            else:  # a program, or python and its script (Ray's dashboard, log monitor ...)
                short = " ".join(os.path.basename(a) for a in argv[:2 if "python" in argv[0] else 1])
            if short not in rec["titles"]:
                rec["titles"].append(short)
            rec["peak_rss"] = max(rec["peak_rss"], st.get("VmHWM", 0))
            rec["peak_anon"] = max(rec["peak_anon"], st.get("RssAnon", 0))

    def stop(self) -> list[dict]:
        self.stopped.set()
        self.join()
        return sorted(self.procs.values(), key=lambda r: -r["peak_rss"])


def _config(spec: dict):
    from pipeline.infer import InferConfig

    sizes = {k: spec[k] for k in ("row_images", "one_pass_images") if spec.get(k)}  # else the job's defaults
    return InferConfig(input=spec["input"], manifest=spec.get("manifest"), output=spec["output"], random_init=True,
                       backbone_name="vit_base_patch8_224", backbone_kwargs=dict(TINY_VIT), crf="none", device="cpu",
                       storage_options=spec["storage_options"], mask_format=spec["mask_format"],
                       progress_interval=30.0, **sizes)


def drive(mode: str, spec: dict) -> dict:
    """One driver: ``run`` (Ray started here, the listing timed on its own, then the job), ``record`` (the same
    listing, then the output a finished run leaves, without running the model: ``--resume-only``) or ``resume``
    (the job alone, starting its own Ray, as a re-run of the command)."""
    import warnings

    warnings.simplefilter("ignore")
    from pipeline.infer import run_inference
    from pipeline.listing import group_dataset, summarize

    cfg = _config(spec)
    result: dict = {"rss_after_imports": _status(os.getpid())["VmRSS"]}
    peaks = ProcessPeaks()
    peaks.start()
    t0 = time.perf_counter()
    try:
        if mode in ("run", "record"):
            import ray

            ray.init(address="local", include_dashboard=False, log_to_driver=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
            result["ray_start_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            listed = group_dataset(cfg.spec()).materialize()
            summary = summarize(listed)
            result["listing_s"] = time.perf_counter() - t1
            result["listed"] = {k: summary[k] for k in ("groups", "images")}
            if mode == "record":
                result.update(record_finished_run(cfg, listed))
                return result
            del listed
        t1 = time.perf_counter()
        manifest = run_inference(cfg)
        result["run_inference_s"] = time.perf_counter() - t1
    finally:
        result["processes"] = peaks.stop()
    # the kernel's high-water mark of this process's memory: ru_maxrss would also count the parent's RSS at the
    # spawn (Linux keeps the old mm's peak across exec)
    result["driver_peak_rss"] = _status(os.getpid())["VmHWM"]
    keep = ("seconds", "dataset_seconds", "images_per_s", "processed", "output", "plan", "input")
    result["manifest"] = {k: manifest.get(k) for k in keep}
    return result


def record_finished_run(cfg, listed) -> dict:
    """Writes what run 1 of the job leaves when every image is ok, with the job's own functions: ``_run.json``
    (its settings fingerprint) and shards of ``rows_per_shard`` rows, each with its commit record
    (``write_shard``); the rows carry the columns a resume reads, not predictions. ``listed``: the job's listing."""
    import pyarrow as pa

    from pipeline.infer import RUN_FILE, check_weights, fingerprint
    from pipeline.predictions import ROW_SCHEMA, group_hash, write_shard
    from pipeline.storage import Storage
    from scosparc_core.precision import resolve

    t0 = time.perf_counter()
    out = Storage(cfg.output, cfg.storage_options)
    settings = fingerprint(cfg, check_weights(cfg), resolve(cfg.dtype, "cpu"), "none")
    out.write_json(RUN_FILE, {"settings": settings, "run": 1, "started": "record_finished_run"})
    schema = pa.schema([ROW_SCHEMA.field(c) for c in ("group_key", "index", "group_size", "group_hash",
                                                      "image_bytes", "status", "error_kind", "error_class",
                                                      "mask_key")])
    rows: list[dict] = []
    shards = 0
    for batch in listed.iter_batches(batch_format="pyarrow", batch_size=256):
        for group in batch.to_pylist():
            names = list(group["names"])
            h = group_hash(names)
            for i, size in enumerate(group["image_bytes"]):
                rows.append({"group_key": group["group_key"], "index": i, "group_size": len(names),
                             "group_hash": h, "image_bytes": size, "status": "ok"})
                if len(rows) == cfg.rows_per_shard:
                    write_shard(out, 1, pa.Table.from_pylist(rows, schema), cfg.mask_format)
                    rows, shards = [], shards + 1
    if rows:
        write_shard(out, 1, pa.Table.from_pylist(rows, schema), cfg.mask_format)
        shards += 1
    return {"recorded": {"shards": shards, "seconds": time.perf_counter() - t0}}


def run_driver(mode: str, spec: dict, log: Path) -> dict:
    env = {**os.environ, **AWS_ENV, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    with open(log, "w") as err:
        out = subprocess.run([sys.executable, __file__, "--drive", mode, json.dumps(spec)], stdout=subprocess.PIPE,
                             stderr=err, text=True, cwd=ROOT, env=env)
    if out.returncode:
        raise RuntimeError(f"the {mode} driver failed ({out.returncode}); its log {log}:\n"
                           + log.read_text()[-6000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the output state alone (what a resume reads, at sizes the job cannot reach here) ----------------------

def write_records(folder: Path, n: int, groups: int, rows_per_shard: int) -> int:
    """Commit records as the sink writes them for n rows in ``groups`` groups of n / groups images, shards of
    ``rows_per_shard`` consecutive rows (a group may span two shards); no errors. Returns the records written."""
    from pipeline.predictions import COMMITS, ranges

    sizes = [n // groups + (g < n % groups) for g in range(groups)]
    (folder / COMMITS).mkdir(parents=True, exist_ok=True)
    shard, rows, record_groups, written = 0, 0, {}, 0

    def flush():
        nonlocal shard, rows, record_groups, written
        name = f"part-r0001-{shard:016x}"
        record = {"shard": f"predictions/{name}.parquet", "tar": None, "run": 1, "rows": rows, "groups": record_groups}
        (folder / COMMITS / f"{name}.json").write_text(json.dumps(record))
        shard, rows, record_groups, written = shard + 1, 0, {}, written + 1

    for g, size in enumerate(sizes):
        start = 0
        while start < size:
            take = min(size - start, rows_per_shard - rows)
            record_groups[f"g{g:07d}"] = {"n": size, "hash": f"{g:016x}", "indices": ranges(range(start, start + take)),
                                          "errors": {}}
            start, rows = start + take, rows + take
            if rows == rows_per_shard:
                flush()
    if rows:
        flush()
    return written


def state_cost(folder: str) -> dict:
    """One process: OutputState.load over the records (as _settle does at the start and end of every run),
    then plans(), counts() and superseded(); seconds of each and the peak RSS above the start."""
    from pipeline.output_state import OutputState
    from pipeline.storage import Storage

    out = Storage(folder, {})
    before = _status(os.getpid())["VmRSS"]
    times = {}
    t0 = time.perf_counter()
    state = OutputState.load(out)
    times["load_s"] = time.perf_counter() - t0
    for step in ("plans", "counts", "superseded"):
        t0 = time.perf_counter()
        value = getattr(state, step)()
        times[f"{step}_s"] = time.perf_counter() - t0
        if step == "counts":
            times["rows"] = value["rows"]
    peak = _status(os.getpid())["VmHWM"]
    return {**times, "records": len(state.records), "rss_before": before, "peak_rss": peak,
            "peak_over_start": peak - before}


def state_scaling(sizes: list[tuple[int, int]], rows_per_shard: int, work: Path) -> list[dict]:
    rows = []
    for n, groups in sizes:
        folder = work / f"state-{n}x{groups}"
        records = write_records(folder, n, groups, rows_per_shard)
        out = subprocess.run([sys.executable, __file__, "--state-child", str(folder)], capture_output=True, text=True,
                             cwd=ROOT)
        if out.returncode:
            raise RuntimeError(out.stderr[-4000:])
        row = {"n_images": n, "groups": groups, "records_written": records,
               **json.loads(out.stdout.strip().splitlines()[-1])}
        assert row["rows"] == n, row
        rows.append(row)
        print(f"[bench] output state of {n:,} rows in {groups:,} groups ({records:,} records): load "
              f"{row['load_s']:.1f} s, plans {row['plans_s']:.1f} s, counts {row['counts_s']:.1f} s, superseded "
              f"{row['superseded_s']:.1f} s; peak RSS {row['peak_rss'] / 2**20:.0f} MiB "
              f"({row['peak_over_start'] / 2**20:.0f} over the start)", flush=True)
    return rows


# --- the comparison ------------------------------------------------------------------------------------------

def count_outputs(fs, root: str) -> dict:
    """Files under the output, by kind (one listing of each folder, after the runs)."""
    def files(folder: str, suffix: str) -> int:
        path = f"{root}/{folder}"
        return sum(1 for p in fs.find(path) if p.endswith(suffix)) if fs.exists(path) else 0

    return {"parquet": files("predictions", ".parquet"), "records": files("_commits", ".json"),
            "masks": files("masks", ".png"), "tars": files("masks", ".tar")}


def workers(processes: list[dict]) -> list[dict]:
    """The Ray worker processes (tasks and actors), largest peak first."""
    return [p for p in processes if any(t.startswith("ray::") for t in p["titles"])]


def summary_line(name: str, r: dict) -> str:
    w = workers(r["processes"])
    top = w[0] if w else {"peak_rss": 0, "peak_anon": 0, "titles": ["-"]}
    return (f"{name:7} {r['run_inference_s']:9.1f} {r['manifest']['seconds']:9.1f} "
            f"{r['manifest']['dataset_seconds']:9.1f} "
            f"{r['manifest']['seconds'] - r['manifest']['dataset_seconds']:9.1f} "
            f"{r['driver_peak_rss'] / 2**20:10.0f} {top['peak_rss'] / 2**20:10.0f} {top['peak_anon'] / 2**20:10.0f}  "
            f"{'/'.join(t for t in top['titles'] if t != 'ray::IDLE')[:50]}")


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="images")
    ap.add_argument("--groups", type=int, default=4_000)
    ap.add_argument("--one-group", type=int, metavar="N", help="one group of N images instead of --n/--groups")
    ap.add_argument("--where", default="s3", choices=["s3", "local"])
    ap.add_argument("--size", type=int, default=64, help="width and height of the JPEGs")
    ap.add_argument("--mask-format", default="png", choices=["png", "parquet", "webdataset"])
    ap.add_argument("--row-images", type=int, default=None, help="the job's row_images (default: its own)")
    ap.add_argument("--one-pass-images", type=int, default=None, help="the job's one_pass_images (default: its own)")
    ap.add_argument("--no-resume", action="store_true", help="skip the resume run")
    ap.add_argument("--manifest", action="store_true",
                    help="the job reads a Parquet manifest of the images (group, image_uri) instead of listing them")
    ap.add_argument("--resume-only", action="store_true",
                    help="instead of the first run, write the output a finished run leaves (its settings, shards "
                         "and commit records, rows without predictions), then time the real resume")
    ap.add_argument("--work", help="folder for local data, outputs and logs (default: a temporary one)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/scale-...json)")
    ap.add_argument("--rows-per-shard", type=int, help="--state-only: rows per shard (default: the job's)")
    ap.add_argument("--state-only", nargs="+", metavar="NxG",
                    help="only the output state a resume reads, from synthetic commit records of N rows in G groups "
                         "(e.g. 100000x4000 1000000x40000 10000000x400000)")
    ap.add_argument("--drive", nargs=2, metavar=("MODE", "SPEC"), help=argparse.SUPPRESS)
    ap.add_argument("--state-child", help=argparse.SUPPRESS)
    ap.add_argument("--serve-s3", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.serve_s3:
        return serve_s3()
    if a.drive:
        print(json.dumps(drive(a.drive[0], json.loads(a.drive[1]))))
        return None
    if a.state_child:
        print(json.dumps(state_cost(a.state_child)))
        return None
    if a.state_only:
        from pipeline.infer import InferConfig

        per_shard = a.rows_per_shard or InferConfig.rows_per_shard
        work = Path(a.work or tempfile.mkdtemp(prefix="bench-scale-state-"))
        sizes = [tuple(int(x) for x in s.split("x")) for s in a.state_only]
        result = {"rows_per_shard": per_shard, "code": code_version(), "load": os.getloadavg(),
                  "rows": state_scaling(sizes, per_shard, work)}
        write_result(result, a.out, "scale-output-state.json")
        return result

    n, groups = (a.one_group, 1) if a.one_group else (a.n, a.groups)
    name = f"scale-{a.where}-" + (f"one-group-{n}" if a.one_group else f"{n}x{groups}")
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    keys = layout(n, groups)
    pics = pictures(a.size)
    server = None
    result: dict = {"n_images": n, "groups": groups, "where": a.where, "size": a.size, "mask_format": a.mask_format,
                    "cpus": os.cpu_count(), "load_before": os.getloadavg()}
    result["code"] = code_version()
    try:
        t0 = time.perf_counter()
        if a.where == "local":
            root, options = work / "input", {}
            write_local(root, keys, pics)
            input_url, output_url = str(root), str(work / "output")
        else:
            server = subprocess.Popen([sys.executable, __file__, "--serve-s3"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
            endpoint = server.stdout.readline().strip()
            upload_s3(endpoint, keys, pics)
            options = {"client_kwargs": {"endpoint_url": endpoint}, **KEYS}
            input_url, output_url = f"s3://{BUCKET}/in", f"s3://{BUCKET}/out"
        result["input_ready_s"] = time.perf_counter() - t0
        print(f"[bench] {n:,} images of {a.size}x{a.size} in {groups:,} groups on {a.where} in "
              f"{result['input_ready_s']:.0f} s", flush=True)
        spec = {"input": input_url, "output": output_url, "storage_options": options, "mask_format": a.mask_format,
                "row_images": a.row_images, "one_pass_images": a.one_pass_images}
        if a.manifest:  # the same images, named by a Parquet manifest beside them instead of listed
            spec["manifest"], spec["input"] = write_manifest(input_url, options, keys), None
            name += "-manifest"
        result["settings"] = {k: v for k, v in spec.items() if k != "storage_options"}
        if a.resume_only:
            return resume_only(result, spec, work, a, name)
        result["run"] = run_driver("run", spec, work / "run.log")
        m = result["run"]["manifest"]
        print(f"[bench] run: {m['output']['rows']:,} rows in {m['seconds']:.0f} s "
              f"({m['images_per_s']:.1f} img/s in Ray Data)", flush=True)
        if not a.no_resume:
            result["resume"] = run_driver("resume", spec, work / "resume.log")
            print(f"[bench] resume: {result['resume']['run_inference_s']:.1f} s, processed "
                  f"{result['resume']['manifest']['processed']}", flush=True)
        if a.where == "local":
            import fsspec

            fs = fsspec.filesystem("file")
        else:
            import s3fs

            fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, **KEYS, use_listings_cache=False)
        result["files"] = count_outputs(fs, output_url.removeprefix("s3://"))
    finally:
        if server:
            server.stdin.close()
            server.wait(timeout=120)
    result["load_after"] = os.getloadavg()
    report(result, a)
    write_result(result, a.out, f"{name}.json")
    return result


def resume_only(result: dict, spec: dict, work: Path, a, name: str) -> dict:
    """``--resume-only``: the job's resume at sizes whose first run takes hours here."""
    result["run"] = run_driver("record", spec, work / "record.log")
    print(f"[bench] recorded a finished run: {result['run']['recorded']['shards']} shards in "
          f"{result['run']['recorded']['seconds']:.0f} s (listing {result['run']['listing_s']:.0f} s)", flush=True)
    r = result["resume"] = run_driver("resume", spec, work / "resume.log")
    m = r["manifest"]
    if m["processed"]["images"] or m["output"]["rows"] != result["n_images"]:
        raise RuntimeError(f"the resume found work to do: {m['processed']}, rows {m['output']['rows']}")
    w = workers(r["processes"])
    result["figures"] = {"resume_s": r["run_inference_s"], "resume_job_s": m["seconds"],
                         "resume_driver_peak_rss_gib": r["driver_peak_rss"] / GIB,
                         "resume_worker_peak_rss_gib": max((p["peak_rss"] for p in w), default=0) / GIB,
                         "records_shards": result["run"]["recorded"]["shards"]}
    result["targets"] = {"resume_s": {"target": TARGETS["resume_s"], "value": r["run_inference_s"],
                                      "met": r["run_inference_s"] <= TARGETS["resume_s"]}}
    result["load_after"] = os.getloadavg()
    f = result["figures"]
    print(f"\nresume with everything done, {a.n:,} images in {a.groups:,} groups on {a.where}"
          f"{' (manifest)' if a.manifest else ''}: "
          f"{f['resume_s']:.1f} s from the call ({f['resume_job_s']:.1f} s in the job), driver peak RSS "
          f"{f['resume_driver_peak_rss_gib']:.2f} GiB, largest worker {f['resume_worker_peak_rss_gib']:.2f} GiB; "
          f"{f['records_shards']} shards; load average {result['load_before'][0]:.1f} before / "
          f"{result['load_after'][0]:.1f} after")
    print(f"target: resume_s {f['resume_s']:.1f} <= {TARGETS['resume_s']} "
          f"{'met' if result['targets']['resume_s']['met'] else 'MISSED'}")
    write_result(result, a.out, f"{name}-resume-only.json")
    return result


def report(r: dict, a) -> None:
    run, m = r["run"], r["run"]["manifest"]
    rows = m["output"]["rows"]
    w = workers(run["processes"])
    worker_peak = max((p["peak_rss"] for p in w), default=0)
    r["figures"] = {
        "listing_s": run["listing_s"],
        "driver_peak_rss_gib": run["driver_peak_rss"] / GIB,
        "driver_outside_ray_data_s": m["seconds"] - m["dataset_seconds"],
        "images_per_s_ray_data": m["images_per_s"],
        "images_per_s_whole_job": rows / m["seconds"],
        "worker_peak_rss_gib": worker_peak / GIB,
        "worker_peak_anon_gib": max((p["peak_anon"] for p in w), default=0) / GIB,
        "parquet_files": r["files"]["parquet"],
        "records": r["files"]["records"],
        "mask_files": r["files"]["masks"] + r["files"]["tars"],
        "resume_s": r["resume"]["run_inference_s"] if "resume" in r else None,
        "resume_driver_peak_rss_gib": r["resume"]["driver_peak_rss"] / GIB if "resume" in r else None,
        "rows_equal_images": rows == r["n_images"],
    }
    f = r["figures"]
    checks = {"driver_peak_rss_gib": f["driver_peak_rss_gib"] <= TARGETS["driver_peak_rss_gib"],
              "parquet_files": f["parquet_files"] <= TARGETS["parquet_files"],
              "worker_peak_rss_gib": f["worker_peak_rss_gib"] <= TARGETS["worker_peak_rss_gib"]}
    if f["resume_s"] is not None:
        checks["resume_s"] = f["resume_s"] <= TARGETS["resume_s"]
    r["targets"] = {k: {"target": TARGETS[k], "value": f[k], "met": v} for k, v in checks.items()}

    shape = f"one group of {r['n_images']:,}" if a.one_group else f"{r['n_images']:,} images in {r['groups']:,} groups"
    print(f"\n{shape} ({r['size']}x{r['size']} JPEGs) on {r['where']}, tiny ViT, --crf none, CPU, masks "
          f"{r['mask_format']}; {r['cpus']} cores, load average {r['load_before'][0]:.1f} before / "
          f"{r['load_after'][0]:.1f} after")
    print(f"listing {f['listing_s']:.1f} s ({run['listed']['groups']:,} groups, {run['listed']['images']:,} images); "
          f"rows {rows:,} ({m['output']['errors']} errors); {f['images_per_s_ray_data']:.1f} img/s in Ray Data, "
          f"{f['images_per_s_whole_job']:.1f} img/s over the whole job")
    print(f"output: {f['parquet_files']} Parquet shards, {f['records']} commit records, {f['mask_files']:,} mask "
          "files")
    print(f"\n{'driver':7} {'call s':>9} {'job s':>9} {'Ray Data':>9} {'outside':>9} {'driver MiB':>10} "
          f"{'worker MiB':>10} {'anon MiB':>10}  largest worker")
    print(summary_line("run", run))
    if "resume" in r:
        print(summary_line("resume", r["resume"]))
    print("\nlargest processes of the run (peak RSS / peak anonymous RSS, MiB):")
    for p in run["processes"][:8]:
        print(f"  {p['peak_rss'] / 2**20:7.0f} {p['peak_anon'] / 2**20:7.0f}  pid {p['pid']:<7} "
              f"{' / '.join(p['titles'])[:90]}")
    print("\ntargets: " + "; ".join(f"{k} {v['value']:.2f} <= {v['target']} {'met' if v['met'] else 'MISSED'}"
                                    for k, v in r["targets"].items()))


if __name__ == "__main__":
    main()
