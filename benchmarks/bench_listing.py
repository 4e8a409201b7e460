"""Listing an input of N images in G groups: the old sequential walk against the job's listing.

    .venv/bin/python benchmarks/bench_listing.py [--n 100000] [--groups 4000] [--gt-fraction 0.5]
                                                 [--stores local s3] [--latency-ms 20] [--per-key-ms 0.15]

Three ways, each in a fresh process so that its peak RSS is its own:
  * sequential  the listing before issue 11: one recursive ``find`` of image/ and one of groundtruth/ on the
                driver, with the filesystem's default listings cache (kept here as it was);
  * threads     ``list_layout``: the group folders listed by a bounded thread pool on the driver (on S3: runs
                of neighbouring groups, each one walk over its range of keys);
  * ray         ``group_dataset(...).materialize()`` (Ray tasks list the groups) then ``summarize``.
Group sizes are log-uniform between 5 and 2,000 images (a long tail, as in real collections), scaled to N.

S3 is served from a separate process in one of two ways (--s3-server):
  * light (default): a small aiohttp server that answers ListObjectsV2 / HeadObject / GetObject from a sorted
    index of the keys and counts the list requests. moto spends 5-50 ms of Python per request on one core
    and renders every page with a template, so on a small machine it measures moto, not the client: S3 serves
    requests in parallel across its fleet, and what a client waits for is latency. The light server keeps its
    own CPU per request well under a millisecond so that the emulated latency dominates, as on S3;
  * moto: moto's server with its ListObjectsV2 answered from the same sorted index (moto scans and sorts the
    whole bucket for every page, which S3 does not).
Either way each list request waits ``latency-ms + per-key-ms x keys returned`` (the defaults give a full
1,000-key page 170 ms, the ~180 ms per page that issue 11's "20,000 pages, ~1 h" implies). Local disk is listed
as it is. Prints a table and writes benchmarks/results/listing.json (listing-moto.json with --s3-server moto).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BUCKET = "bench-listing"
KEYS = {"key": "testing", "secret": "testing"}


def layout(n: int, groups: int, gt_fraction: float, seed: int = 0) -> list[tuple[str, bool]]:
    """(key under the root, is ground truth) for n images in `groups` groups of long-tailed sizes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    raw = np.exp(rng.uniform(np.log(5), np.log(2000), groups))
    sizes = np.maximum(1, np.floor(raw / raw.sum() * n)).astype(int)
    sizes[: max(0, n - sizes.sum())] += 1  # floor() left a few out
    keys = []
    for g, size in enumerate(sizes):
        for i in range(size):
            keys.append((f"image/group{g:05d}/img{i:05d}.jpg", False))
            if rng.random() < gt_fraction:
                keys.append((f"groundtruth/group{g:05d}/img{i:05d}.png", True))
    return keys


# --- the S3 server (its own process) -------------------------------------------------------------------------

def serve_s3(args) -> None:
    names = sorted(f"root/{key}" for key, _ in layout(args.n, args.groups, args.gt_fraction))
    (serve_moto if args.s3_server == "moto" else serve_light)(names, args.latency_ms / 1e3, args.per_key_ms / 1e3)


def list_page(names: list[str], prefix: str, delimiter: str, after: str | None, max_keys: int):
    """(keys, folders, truncated, last name) of one ListObjectsV2 page, by bisection over the sorted keys."""
    import bisect

    i = bisect.bisect_right(names, after) if after and after >= prefix else bisect.bisect_left(names, prefix)
    keys, folders, last = [], [], None
    while i < len(names) and names[i].startswith(prefix) and len(keys) + len(folders) < max_keys:
        rest = names[i][len(prefix):]
        if delimiter and delimiter in rest:
            last = prefix + rest.split(delimiter)[0] + delimiter
            folders.append(last)
            i = bisect.bisect_left(names, last + "\U0010ffff")  # past every key in that folder
        else:
            last = names[i]
            keys.append(last)
            i += 1
    return keys, folders, i < len(names) and names[i].startswith(prefix), last


def serve_light(names: list[str], delay: float, per_key: float) -> None:
    import asyncio
    import base64
    from urllib.parse import quote
    from xml.sax.saxutils import escape

    from aiohttp import web

    index = set(names)
    stats = {"list_requests": 0, "keys_listed": 0}

    def enc(text: str, url: bool) -> str:
        return escape(quote(text, safe="/") if url else text)

    async def bucket(request: web.Request) -> web.Response:
        if request.method == "HEAD":
            return web.Response()
        q = request.query
        token = q.get("continuation-token")
        after = base64.urlsafe_b64decode(token).decode() if token else q.get("start-after")
        prefix, delimiter, url = q.get("prefix", ""), q.get("delimiter", ""), q.get("encoding-type") == "url"
        keys, folders, truncated, last = list_page(names, prefix, delimiter, after, int(q.get("max-keys", 1000)))
        stats["list_requests"] += 1
        stats["keys_listed"] += len(keys) + len(folders)
        await asyncio.sleep(delay + per_key * (len(keys) + len(folders)))
        parts = ['<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">',
                 f"<Name>{BUCKET}</Name><Prefix>{enc(prefix, url)}</Prefix><KeyCount>{len(keys) + len(folders)}</KeyCount>",
                 f"<MaxKeys>{q.get('max-keys', 1000)}</MaxKeys><Delimiter>{enc(delimiter, url)}</Delimiter>",
                 f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"]
        if url:
            parts.append("<EncodingType>url</EncodingType>")
        if truncated:
            parts.append(f"<NextContinuationToken>{base64.urlsafe_b64encode(last.encode()).decode()}</NextContinuationToken>")
        parts += [f"<Contents><Key>{enc(k, url)}</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified>"
                  f"<ETag>&quot;0&quot;</ETag><Size>100</Size><StorageClass>STANDARD</StorageClass></Contents>" for k in keys]
        parts += [f"<CommonPrefixes><Prefix>{enc(f, url)}</Prefix></CommonPrefixes>" for f in folders]
        parts.append("</ListBucketResult>")
        return web.Response(body="".join(parts).encode(), content_type="application/xml")

    async def obj(request: web.Request) -> web.Response:
        key = request.match_info["key"]
        if key not in index:
            return web.Response(status=404, content_type="application/xml",
                                body=b"<Error><Code>NoSuchKey</Code><Message>no such key</Message></Error>")
        headers = {"ETag": '"0"', "Last-Modified": "Thu, 01 Jan 2026 00:00:00 GMT", "Content-Length": "100"}
        return web.Response(headers=headers, body=None if request.method == "HEAD" else b"x" * 100)

    async def stats_handler(request: web.Request) -> web.Response:
        return web.json_response(stats)

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/_stats", stats_handler)
        app.router.add_route("*", f"/{BUCKET}", bucket)
        app.router.add_route("*", f"/{BUCKET}/{{key:.+}}", obj)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        print(f"http://127.0.0.1:{port}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes the pipe
        await runner.cleanup()

    asyncio.run(main())


def serve_moto(names: list[str], delay: float, per_key: float) -> None:
    from moto.core.models import DEFAULT_ACCOUNT_ID
    from moto.s3 import models
    from moto.server import ThreadedMotoServer

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(key, value)
    backend = models.s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    backend.create_bucket(BUCKET, "us-east-1")
    for name in names:
        backend.put_object(BUCKET, name, b"x" * 100)

    def list_objects_v2(self, bucket, prefix, delimiter, continuation_token, start_after, max_keys):
        after = self._pagination_tokens.get(continuation_token) if continuation_token else start_after
        keys, folders, truncated, last = list_page(names, prefix or "", delimiter, after, max_keys)
        token = None
        if truncated:
            token = f"t{len(self._pagination_tokens)}"
            self._pagination_tokens[token] = last
        time.sleep(delay + per_key * (len(keys) + len(folders)))
        return sorted([bucket.keys[k] for k in keys] + folders, key=self._get_name), truncated, token

    models.S3Backend.list_objects_v2 = list_objects_v2
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    print(f"http://{host}:{port}", flush=True)
    sys.stdin.read()  # until the parent closes the pipe
    server.stop()


# --- one measurement (its own process) ----------------------------------------------------------------------

def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sequential(storage):
    """The listing before issue 11, as it was: two recursive walks on the driver, default listings cache."""
    from pipeline.listing import GroupSpec, ImageSpec, _hidden, _relative, _stem, finish

    fs = storage.fs
    if fs.isdir(storage.path("image")):
        image_root, gt_root = storage.path("image"), storage.path("groundtruth")
    else:
        image_root, gt_root = storage.base, None
    files = [p for p in fs.find(image_root) if not p.endswith("/") and not _hidden(_relative(p, image_root))]
    folders = [_relative(e["name"], image_root).rstrip("/") for e in fs.ls(image_root, detail=True)
               if e["type"] == "directory"]
    gts: dict[str, str] = {}
    if gt_root and fs.isdir(gt_root):
        for p in fs.find(gt_root):
            rel = _relative(p, gt_root)
            if not p.endswith("/") and not _hidden(rel):
                gts.setdefault(_stem(rel), p)
    groups = {name: GroupSpec(name) for name in folders if name}
    for p in sorted(files):
        rel = _relative(p, image_root)
        group, _, name = rel.partition("/") if "/" in rel else ("", "", rel)
        spec = groups.setdefault(group, GroupSpec(group))
        gt = gts.get(f"{group}/{_stem(name)}" if group else _stem(name))
        spec.images.append(ImageSpec(fs.unstrip_protocol(p), fs.unstrip_protocol(gt) if gt else None, name))
    return finish(list(groups.values()))


def _warm(batch):
    import pipeline.listing  # noqa: F401 - what a listing task imports

    return batch


def measure(method: str, url: str, options: dict, groups_per_task: int | None = None) -> dict:
    from pipeline import listing
    from pipeline.listing import LIST_CPUS, InputSpec, _listing_fs, group_dataset, list_layout, summarize
    from pipeline.storage import Storage

    result: dict = {"method": method}
    if method == "ray":
        import ray

        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        # Ray's fixed start-up (worker processes, imports) apart from the listing: a pass that does nothing
        t0 = time.perf_counter()
        ray.data.range(64, override_num_blocks=16).map_batches(_warm, num_cpus=LIST_CPUS).materialize()
        result["ray_warmup_s"] = time.perf_counter() - t0
    base = rss_mib()
    cpu0 = cpu_s()
    t0 = time.perf_counter()
    if method == "sequential":
        storage = Storage(url, options)
        groups = sequential(storage)
        result["cache_entries"] = sum(len(v) for v in storage.fs.dircache.values())
    elif method == "threads":
        groups = list_layout(Storage(url, options))
        result["cache_entries"] = sum(len(v) for v in _listing_fs(url, options)[0].dircache.values())
    else:
        if groups_per_task:
            listing.GROUPS_PER_TASK = groups_per_task
        result["groups_per_task"] = listing.GROUPS_PER_TASK
        ds = group_dataset(InputSpec(input=url, storage_options=options)).materialize()
        result["list_s"] = time.perf_counter() - t0
        summary = summarize(ds)
        result["summarize_s"] = time.perf_counter() - t0 - result["list_s"]
        result["cache_entries"] = sum(len(v) for v in _listing_fs(url, options)[0].dircache.values())
    result["seconds"] = time.perf_counter() - t0
    result["driver_cpu_s"] = cpu_s() - cpu0  # this process only: the Ray tasks' work is elsewhere
    if method != "ray":
        result.setdefault("list_s", result["seconds"])
        summary = {"groups": len(groups), "images": sum(len(g.images) for g in groups),
                   "images_with_gt": sum(im.gt_uri is not None for g in groups for im in g.images)}
    result.update({k: summary[k] for k in ("groups", "images", "images_with_gt")})
    result["rss_before_mib"] = base
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["peak_over_before_mib"] = result["peak_rss_mib"] - base
    return result


def run_child(method: str, url: str, options: dict, groups_per_task: int | None) -> dict:
    extra = ["--groups-per-task", str(groups_per_task)] if groups_per_task else []
    out = subprocess.run([sys.executable, __file__, "--child", method, url, json.dumps(options), *extra],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{method} on {url} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the comparison ------------------------------------------------------------------------------------------

def light_stats(endpoint: str) -> dict | None:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{endpoint}/_stats", timeout=10) as r:
            return json.loads(r.read())
    except OSError:  # moto has no such page
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="images")
    ap.add_argument("--groups", type=int, default=4_000)
    ap.add_argument("--gt-fraction", type=float, default=0.5, help="share of images with a ground-truth mask")
    ap.add_argument("--stores", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    ap.add_argument("--methods", nargs="+", default=["sequential", "threads", "ray"],
                    choices=["sequential", "threads", "ray"])
    ap.add_argument("--s3-server", default="light", choices=["light", "moto"])
    ap.add_argument("--latency-ms", type=float, default=20.0, help="S3: fixed time per list request")
    ap.add_argument("--per-key-ms", type=float, default=0.15, help="S3: time per key a list request returns")
    ap.add_argument("--groups-per-task", type=int, help="ray: group folders per listing task (GROUPS_PER_TASK)")
    ap.add_argument("--out", help="default benchmarks/results/listing.json (listing-moto.json with moto)")
    ap.add_argument("--child", nargs=3, metavar=("METHOD", "URL", "OPTIONS"), help=argparse.SUPPRESS)
    ap.add_argument("--serve-s3", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_s3:
        return serve_s3(args)
    if args.child:
        method, url, options = args.child
        print(json.dumps(measure(method, url, json.loads(options), args.groups_per_task)))
        return
    out = Path(args.out or ROOT / "benchmarks" / "results" /
               ("listing-moto.json" if args.s3_server == "moto" else "listing.json"))

    keys = layout(args.n, args.groups, args.gt_fraction)
    rows, server, load = [], None, os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for store in args.stores:
                t0 = time.perf_counter()
                endpoint = None
                if store == "local":
                    url, options = str(Path(tmp) / "root"), {}
                    for key, _ in keys:
                        path = Path(url) / key
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_bytes(b"x" * 100)
                else:
                    server = subprocess.Popen(
                        [sys.executable, __file__, "--serve-s3", "--s3-server", args.s3_server, "--n", str(args.n),
                         "--groups", str(args.groups), "--gt-fraction", str(args.gt_fraction),
                         "--latency-ms", str(args.latency_ms), "--per-key-ms", str(args.per_key_ms)],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
                    endpoint = server.stdout.readline().strip()
                    url, options = f"s3://{BUCKET}/root", {"client_kwargs": {"endpoint_url": endpoint}, **KEYS}
                print(f"[bench] {store}: {len(keys)} objects ready in {time.perf_counter() - t0:.0f} s", flush=True)
                for method in args.methods:
                    before = light_stats(endpoint) if endpoint else None
                    row = {"store": store, **run_child(method, url, options, args.groups_per_task)}
                    after = light_stats(endpoint) if endpoint else None
                    if before and after:
                        row["list_requests"] = after["list_requests"] - before["list_requests"]
                    print(f"[bench] {json.dumps(row)}", flush=True)
                    rows.append(row)
                if server:
                    server.stdin.close()
                    server.wait(timeout=120)
                    server = None
        finally:
            if server:
                server.kill()

    print(f"\n{args.n:,} images ({len(keys):,} objects with ground truth) in {args.groups:,} groups; S3: "
          f"{args.s3_server} server, {args.latency_ms:g} ms + {args.per_key_ms:g} ms/key per list request")
    print(f"{'store':6} {'method':11} {'list s':>8} {'summary s':>9} {'driver CPU s':>12} {'requests':>8} "
          f"{'peak RSS MiB':>12} {'over start':>10} {'cache entries':>13} {'groups':>7} {'images':>8}")
    for r in rows:
        print(f"{r['store']:6} {r['method']:11} {r['list_s']:8.1f} {r.get('summarize_s', 0):9.1f} "
              f"{r['driver_cpu_s']:12.1f} {r.get('list_requests', '-'):>8} {r['peak_rss_mib']:12.0f} "
              f"{r['peak_over_before_mib']:10.0f} {r['cache_entries']:13,} {r['groups']:7,} {r['images']:8,}")
    print(f"load average (1 min) at start and end: {load[0]:.1f}, {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    counts = {(r["store"], r["groups"], r["images"], r["images_with_gt"]) for r in rows}
    assert len(counts) == len(args.stores), f"the methods disagree: {counts}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "n_images": args.n, "groups": args.groups, "objects": len(keys), "gt_fraction": args.gt_fraction,
        "s3_server": {"kind": args.s3_server, "latency_ms": args.latency_ms, "per_key_ms": args.per_key_ms},
        "cpus": os.cpu_count(), "load_average_start_end": [load[0], os.getloadavg()[0]], "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
