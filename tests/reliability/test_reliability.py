"""A bucket of everything that goes wrong in the wild, with storage, GPU and worker faults on top; a run, then a
re-run once the transient causes are gone. The job must account for every file: one row per input image, no
duplicates, the transient errors (and only those, with inputs that changed) redone by the re-run.

One run with many faults at once keeps the suite short on 2 cores; each fault touches its own group, so the
checks below still tell them apart:

    group       fault (first run)                                 first run              re-run
    mixed ...   34 bad inputs; S3 500 once / always, 403           kinds as listed        the 500-always image
    throttled   503 SlowDown on each key's first 2 requests        ok (client retries)    nothing
    maskfail    the PUT of one mask fails past every retry         that image transient   that image
    (shards)    the first 4 Parquet PUTs fail                      ok (write retries)     -
    vanish      gone.jpg deleted after listing, before reading     404: permanent         the group (it changed)
    uploads     partial.jpg truncated, completed after the run     CorruptImage           partial.jpg only
    oomonce     one CUDA out-of-memory in stage 1                  ok (smaller batches)   nothing
    (actors)    stage-1 actor and a refine actor SIGKILLed         nothing lost           -
    (lease)     a stale lease left by a dead job                   -                      taken over
"""
import contextlib
import io
import json
import logging
import os
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from audit import Rerun, by_key, output_rows
from conftest import GOLDEN, TINY_VIT, make_bucket, record_fault, record_rows
from pipeline.infer import InferConfig, run_inference
from pipeline.sample import synthetic_group, synthetic_image
from pipeline.storage import storage_options
from ray_session import files_holding, kill_busy, session_logs, workers
from s3_faults import Fault, FaultProxy
from scosparc_core import CheckpointError

KEY, SECRET = "AKIARELIABILITY00001", "reliability-secret-never-written-01"
OUT = "wild/runs/r1"
THROTTLED = ("t0.jpg", "t1.jpg", "t2.jpg")


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def bad_inputs() -> list[tuple[str, str, bytes, bytes | None, str]]:
    """(group, file name, bytes, ground-truth PNG bytes or None, expected: "ok" or the error kind)."""
    (rgb, gt), (rgb2, gt2), (rgb3, gt3) = synthetic_group("horse", 3)
    img, mask = Image.fromarray(rgb), Image.fromarray(gt)
    jpeg, gt_png = encode(img, "JPEG"), encode(mask, "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [Image.fromarray(rgb2), Image.fromarray(rgb3)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    deep = (np.asarray(img.convert("L")).astype(np.uint16) * 257)
    palette_gt = mask.convert("P")
    return [
        ("mixed", "zero.jpg", b"", None, "EmptyFile"),
        ("mixed", "truncated.jpg", jpeg[: len(jpeg) // 2], gt_png, "CorruptImage"),
        ("mixed", "random.jpg", np.random.default_rng(0).bytes(5000), None, "NotAnImage"),
        ("mixed", "error_page.jpg", b"<!DOCTYPE html><html><body>503 Service Unavailable</body></html>", None,
         "NotAnImage(html)"),
        ("mixed", "readme.txt", b"these are my holiday photos\n", None, "NotAnImage"),
        ("mixed", "alpha.png", encode(img.convert("RGBA"), "PNG"), gt_png, "ok"),
        ("mixed", "deep16.png", encode(Image.fromarray(deep), "PNG"), gt_png, "ok"),
        ("mixed", "gray.jpg", encode(img.convert("L"), "JPEG"), gt_png, "ok"),
        ("mixed", "cmyk.jpg", encode(img.convert("CMYK"), "JPEG"), gt_png, "ok"),
        ("mixed", "exif_rotated.jpg", encode(img, "JPEG", exif=exif), None, "ok"),
        ("mixed", "animated.gif", gif.getvalue(), None, "ok"),
        ("mixed", "tiny.png", encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), None, "ok"),
        ("mixed", "strip.png", encode(Image.new("RGB", (3000, 2), (9, 90, 200)), "PNG"), None, "ok"),
        ("mixed", "bomb.png", encode(Image.new("1", (9500, 9500)), "PNG"), None, "DecompressionBomb"),
        ("mixed", "palette.png", encode(img.convert("P"), "PNG"), gt_png, "ok"),
        ("mixed", "webp.webp", encode(img, "WEBP"), gt_png, "ok"),
        ("mixed", "tiff.tif", encode(img, "TIFF"), gt_png, "ok"),
        ("mixed", "UPPER.JPG", jpeg, gt_png, "ok"),
        ("mixed", "dup.jpg", jpeg, gt_png, "ok"),
        ("mixed", "dup.png", encode(img, "PNG"), None, "ok"),
        ("mixed", "café ü 漢字.jpg", jpeg, gt_png, "ok"),
        ("mixed", "with spaces.jpg", jpeg, gt_png, "ok"),
        ("mixed", "gt_other_size.jpg", jpeg, encode(mask.resize((64, 48)), "PNG"), "ok"),
        ("mixed", "gt_rgb.jpg", jpeg, encode(mask.convert("RGB"), "PNG"), "ok"),
        ("mixed", "gt_palette.jpg", jpeg, encode(palette_gt, "PNG"), "ok"),
        ("mixed", "gt_corrupt.jpg", jpeg, b"\x89PNG\r\n\x1a\n broken", "ok"),
        ("mixed", "s3_500_once.jpg", jpeg, None, "ok"),
        ("mixed", "s3_500_always.jpg", jpeg, None, "Read:OSError"),
        ("mixed", "s3_denied.jpg", jpeg, None, "Read:PermissionError"),
        ("solo", "only.jpg", encode(Image.fromarray(rgb2), "JPEG"), encode(Image.fromarray(gt2), "PNG"), "ok"),
        ("..", "dotdot.jpg", jpeg, None, "ok"),
        ("a..b", "x.jpg", jpeg, None, "ok"),
        ("back\\slash", "x.jpg", jpeg, None, "ok"),
        ("pct%2F..%2Fescape", "x.jpg", jpeg, None, "ok"),
    ]


# (first-run kind, class) of the errors that are not about the bytes: a 500 that outlasts the retries is transient
TRANSIENT_BAD = {"mixed/s3_500_always.jpg"}


def fault_groups() -> dict[str, list[tuple[str, bytes, bytes]]]:
    """group -> [(name, JPEG bytes, ground-truth PNG bytes)]: plain good images, one group per fault."""
    def images(kind: str, names: list[str], seed: int):
        out = []
        for i, name in enumerate(names):
            rgb, mask = synthetic_image(kind, i, seed)
            out.append((name, encode(Image.fromarray(rgb), "JPEG", quality=90), encode(Image.fromarray(mask), "PNG")))
        return out

    return {
        "throttled": images("horse", list(THROTTLED), 11),
        "maskfail": images("disc", ["m0.jpg", "m1.jpg"], 12),
        "vanish": images("horse", ["gone.jpg", "kept.jpg"], 13),
        "uploads": images("disc", ["partial.jpg", "u0.jpg", "u1.jpg"], 14),
        "oomonce": images("horse", ["o0.jpg", "o1.jpg", "o2.jpg"], 15),
    }


# What the first run must say per image of the fault groups (others: ok), and what the re-run must redo.
FIRST = {"maskfail/m1.jpg": ("Refine:", "transient"), "vanish/gone.jpg": ("Read:FileNotFoundError", "permanent"),
         "uploads/partial.jpg": ("CorruptImage", "permanent")}
REDONE = {"mixed/s3_500_always.jpg", "maskfail/m1.jpg", "vanish/kept.jpg", "uploads/partial.jpg"}


class Saboteur:
    """Faults that need timing, from a thread polling the proxy's counters: gone.jpg is deleted while its
    (delayed) GET is in flight, after the listing saw it; a refine actor is SIGKILLed while it runs a task, once
    masks are being written."""

    def __init__(self, fs, proxy: FaultProxy):
        self.fs, self.proxy = fs, proxy
        self.deleted = None
        self.killed: tuple[int, str] | None = None
        self.masks_at_kill = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self):
        while not self._stop.wait(0.02):
            hits = self.proxy.hits
            if self.deleted is None and hits["latency:gone.jpg"]:
                self.fs.rm("wild/CoCA/image/vanish/gone.jpg")  # straight to S3, not through the proxy
                self.deleted = time.monotonic()
            if self.killed is None and hits["latency:masks"] >= 3:
                self.killed = kill_busy("MapBatches(RefineActor)")
                self.masks_at_kill = hits["latency:masks"] if self.killed else 0


@pytest.fixture(scope="module")
def bucket(s3_server, tiny_weights):
    fs = make_bucket(s3_server, "wild")
    cases = bad_inputs()
    for group, name, data, gt, _ in cases:
        fs.pipe_file(f"wild/CoCA/image/{group}/{name}", data)
        if gt is not None:
            fs.pipe_file(f"wild/CoCA/groundtruth/{group}/{os.path.splitext(name)[0]}.png", gt)
    fs.pipe_file("wild/CoCA/image/empty/", b"")  # an empty group: a folder marker and nothing in it
    groups = fault_groups()
    for group, images in groups.items():
        for name, jpeg, gt in images:
            data = jpeg[: len(jpeg) // 3] if name == "partial.jpg" else jpeg  # an upload still in progress
            fs.pipe_file(f"wild/CoCA/image/{group}/{name}", data)
            fs.pipe_file(f"wild/CoCA/groundtruth/{group}/{os.path.splitext(name)[0]}.png", gt)
    fs.put_file(tiny_weights[0], "wild/weights/backbone.pth")
    fs.put_file(tiny_weights[1], "wild/weights/head.pt")
    proxy = FaultProxy(s3_server, {"s3_500_once.jpg": (500, 1), "s3_500_always.jpg": (500, None),
                                   "s3_denied.jpg": (403, None)})
    yield fs, proxy, cases, groups
    proxy.stop()


def config(proxy: FaultProxy, **kw) -> InferConfig:
    return InferConfig(
        input="s3://wild/CoCA", output=f"s3://{OUT}", backbone="s3://wild/weights/backbone.pth",
        head="s3://wild/weights/head.pt", backbone_name="vit_base_patch8_224", backbone_kwargs=dict(TINY_VIT),
        storage_options=storage_options(proxy.url, extra={"key": KEY, "secret": SECRET}, retries=2),
        chunk_size=8, progress_interval=5, **kw)


def oom_logged() -> int:
    """Out-of-memory retries the stage-1 actors logged so far (their stderr lands in the session's logs)."""
    return sum(p.read_bytes().count(b"out of memory on a batch") for p in session_logs() if p.suffix == ".err")


@contextlib.contextmanager
def driver_output():
    """What the job prints on this process (its log lines, the lease's warnings), as one growing text."""
    text = io.StringIO()
    handler = logging.StreamHandler(text)
    lease_log = logging.getLogger("pipeline.lease")
    lease_log.addHandler(handler)
    try:
        with contextlib.redirect_stderr(text), contextlib.redirect_stdout(text):
            yield text
    finally:
        lease_log.removeHandler(handler)


@pytest.fixture(scope="module")
def first_run(ray_local, bucket, tmp_path_factory):
    fs, proxy, cases, groups = bucket
    marker = tmp_path_factory.mktemp("faults") / "stage1-killed"
    # SlowDown on the first two requests of every image of the group: s3fs reads each with a HEAD then a GET, and
    # a HEAD's 503 has no body to say SlowDown, so only botocore retries it - 3 tries with retries=2 (full-jitter
    # backoff guarantees no time window, so the burst is counted in requests, not seconds)
    for name in THROTTLED:
        proxy.add(Fault(f"CoCA/image/throttled/{name}", 503, 2, ("GET", "HEAD"), name=f"slowdown:{name}"))
    proxy.fail_puts(f"{OUT}/masks/maskfail/m1.png")
    proxy.fail_puts(f"{OUT}/predictions/", times=4)
    proxy.add(Fault("CoCA/image/vanish/gone.jpg", None, None, ("GET",), delay=2.0, name="latency:gone.jpg"))
    proxy.add(Fault(f"{OUT}/masks/", None, None, ("PUT",), delay=0.1, name="latency:masks"))
    fault = {"kill_after_groups": 3, "marker": str(marker), "oom": {"oomonce": 1}}
    oom_before = oom_logged()
    with driver_output() as printed, Saboteur(fs, proxy) as saboteur:
        manifest = run_inference(config(proxy, fault=fault))
    rows = output_rows(fs, OUT)
    fs.invalidate_cache()
    return {"manifest": manifest, "rows": rows, "printed": printed.getvalue(), "saboteur": saboteur,
            "stage1_killed": marker.read_text() if marker.exists() else None, "oom": oom_logged() - oom_before,
            "injected": dict(proxy.injected), "success": fs.exists(f"{OUT}/_SUCCESS"),
            "images": len(cases) + sum(len(v) for v in groups.values())}


@pytest.fixture(scope="module")
def second_run(first_run, bucket):
    """The same job again once the transient causes are gone (the 403 stays), the upload completed, and a stale
    lease left by a dead job on the output."""
    fs, proxy, _, groups = bucket
    for fault in list(proxy.faults):
        if fault.pattern != "s3_denied.jpg":
            proxy.remove(fault)
    (full,) = [jpeg for name, jpeg, _ in groups["uploads"] if name == "partial.jpg"]
    fs.pipe_file("wild/CoCA/image/uploads/partial.jpg", full)  # the upload completed: other bytes, other size
    stale = {"holder": "f" * 32, "host": "gone-host", "pid": 4242, "job_id": "dead-job", "started": "then",
             "renewed": "then", "expires": time.time() - 3600, "expires_at": "an hour ago", "ttl": 120.0}
    fs.pipe_file(f"{OUT}/_lease.json", json.dumps(stale).encode())
    with driver_output() as printed:
        manifest = run_inference(config(proxy))
    rows = output_rows(fs, OUT)
    return {"manifest": manifest, "printed": printed.getvalue(), "success": fs.exists(f"{OUT}/_SUCCESS"),
            "lease_left": fs.exists(f"{OUT}/_lease.json"),
            "rerun": Rerun(first_run["rows"], rows, manifest["input"]["images"], changed_groups={"vanish"})}


def test_first_run_one_row_per_image_with_its_kind_and_class(first_run, bucket):
    fs, proxy, cases, groups = bucket
    rows, manifest = first_run["rows"], first_run["manifest"]
    record_rows(first_run["images"], rows["key"], rows["error_kind"].dropna())
    assert manifest["input"]["images"] == first_run["images"] == len(rows)
    assert rows["key"].is_unique and rows["image_uri"].is_unique
    assert manifest["input"]["empty_groups"]["count"] == 1
    by_name = by_key(rows)
    for group, name, _, _, expected in cases:
        row = by_name.loc[f"{group}/{name}"]
        got = "ok" if row["status"] == "ok" else row["error_kind"]
        assert got == expected, (group, name, row["error"])
        if row["status"] != "ok":
            assert row["error"].startswith(expected)
            want = "transient" if f"{group}/{name}" in TRANSIENT_BAD else "permanent"
            assert row["error_class"] == want, (group, name, row["error"])
    for group, images in groups.items():
        for name, _, _ in images:
            row = by_name.loc[f"{group}/{name}"]
            kind, cls = FIRST.get(f"{group}/{name}", ("ok", None))
            got = "ok" if row["status"] == "ok" else row["error_kind"]
            got_class = row["error_class"] if isinstance(row["error_class"], str) else None
            assert got.startswith(kind) and got_class == cls, (group, name, row["error"])
    # the counts in the manifest are those of the rows, and transient errors keep _SUCCESS away
    transient = int((rows["error_class"] == "transient").sum())
    assert manifest["output"]["transient_errors"] == transient == 2
    assert manifest["output"]["permanent_errors"] == int((rows["error_class"] == "permanent").sum())
    assert manifest["output"]["rows"] == len(rows) and not first_run["success"]


def test_first_run_defined_results_for_odd_inputs_masks_and_no_secret(first_run, bucket):
    fs, proxy, cases, _ = bucket
    rows = by_key(first_run["rows"])
    ok = rows[rows["status"] == "ok"]
    h, w = synthetic_group("horse", 1)[0][0].shape[:2]
    assert tuple(Image.open(io.BytesIO(fs.cat_file(ok.loc["mixed/exif_rotated.jpg", "mask_uri"]))).size) == (h, w)
    assert Image.open(io.BytesIO(fs.cat_file(ok.loc["mixed/strip.png", "mask_uri"]))).size == (3000, 2)
    # masks match the rows exactly (duplicate stems and odd names did not collide), all under the output
    masks = {"s3://" + p for p in fs.find(f"{OUT}/masks")}
    assert masks == set(ok["mask_uri"]) and len(masks) == len(ok)
    written = [p for p in fs.find("wild") if not p.startswith(("wild/CoCA/", "wild/weights/"))]
    assert all(p.startswith(f"{OUT}/") for p in written), written
    for p in written:
        blob = b"" if p.endswith(".png") else fs.cat_file(p)
        assert KEY.encode() not in blob and SECRET.encode() not in blob, p
    assert SECRET not in first_run["printed"] and KEY not in first_run["printed"]
    assert "[infer]" in first_run["printed"]  # it is the job's output


def test_storage_faults_survived(first_run):
    rows, injected = by_key(first_run["rows"]), first_run["injected"]
    saboteur = first_run["saboteur"]
    throttled = rows[rows["group"] == "throttled"]
    checks = {
        "S3 500 once (client retry)": (injected.get("500:s3_500_once.jpg", 0),
                                       rows.loc["mixed/s3_500_once.jpg", "status"] == "ok"),
        "S3 403 AccessDenied (permanent row)": (injected.get("403:s3_denied.jpg", 0),
                                                rows.loc["mixed/s3_denied.jpg", "error_class"] == "permanent"),
        "S3 503 SlowDown burst on a group's keys": (sum(injected.get(f"503:slowdown:{n}", 0) for n in THROTTLED),
                                                    len(throttled) == 3 and (throttled["status"] == "ok").all()),
        "Parquet PUT failing 4 times": (injected.get("500:put:wild/runs/r1/predictions/", 0),
                                        first_run["manifest"]["output"]["rows"] == len(rows)),
        "object deleted between listing and reading": (
            int(saboteur.deleted is not None),
            rows.loc["vanish/gone.jpg", "error_kind"] == "Read:FileNotFoundError"
            and rows.loc["vanish/kept.jpg", "status"] == "ok"),
    }
    for name, (n, survived) in checks.items():
        record_fault(name, n, bool(survived))
    assert {k: v[0] > 0 for k, v in checks.items()} == {k: True for k in checks}, injected
    assert injected["500:put:wild/runs/r1/predictions/"] == 4  # more than one PUT's client retries (3 tries)
    # the burst hit every key of the group twice; each read there survived on the clients' retries alone
    assert [injected.get(f"503:slowdown:{n}") for n in THROTTLED] == [2, 2, 2]
    assert {k: bool(v[1]) for k, v in checks.items()} == {k: True for k in checks}


def test_a_stage1_out_of_memory_and_killed_actors_lose_nothing(first_run):
    rows = by_key(first_run["rows"])
    killed = first_run["saboteur"].killed
    complete = first_run["manifest"]["output"]["rows"] == len(rows) == first_run["images"] and rows.index.is_unique
    checks = {
        "stage-1 out-of-memory once, job (smaller micro-batches)": (
            first_run["oom"], (rows[rows["group"] == "oomonce"]["status"] == "ok").all()),
        "stage-1 actor killed (SIGKILL)": (int(first_run["stage1_killed"] is not None), complete),
        "refine (CRF) actor killed (SIGKILL)": (int(killed is not None), complete),
    }
    for name, (n, survived) in checks.items():
        record_fault(name, n, bool(survived))
    assert first_run["oom"] >= 1, "the stage-1 actor never logged an out-of-memory retry"
    assert killed is not None and "RefineActor" in killed[1], workers("RefineActor")
    assert first_run["saboteur"].masks_at_kill < int((rows["status"] == "ok").sum())  # killed mid-job
    assert {k: bool(v[1]) and v[0] > 0 for k, v in checks.items()} == {k: True for k in checks}


def test_rerun_redoes_exactly_the_transient_errors_and_changed_inputs(first_run, second_run, bucket):
    fs, proxy, cases, groups = bucket
    rerun, manifest = second_run["rerun"], second_run["manifest"]
    after = by_key(rerun.after)
    record_rows(rerun.images_in, rerun.after["key"], rerun.after["error_kind"].dropna())
    assert rerun.images_in == first_run["images"] - 1  # gone.jpg is not listed any more
    assert (rerun.lost, rerun.duplicates) == (0, 0) and rerun.after["image_uri"].is_unique
    assert rerun.ok_redone == set()
    assert rerun.redone == REDONE, rerun.redone ^ REDONE
    assert rerun.transient_left == set() and rerun.transient_before <= REDONE
    assert "vanish/gone.jpg" not in after.index and after.loc["uploads/partial.jpg", "status"] == "ok"
    # what stays an error is exactly the permanent errors of the bad inputs (403 included)
    errors = set(after.index[after["status"] != "ok"])
    assert errors == {f"{g}/{n}" for g, n, _, _, e in cases if e != "ok"} - TRANSIENT_BAD
    assert manifest["processed"]["images"] == len(REDONE)  # and no more images went through stage 1's rows
    assert manifest["output"] == {**manifest["output"], "rows": rerun.images_in, "transient_errors": 0}
    assert second_run["success"] and not second_run["lease_left"]
    assert "took over the stale lease" in second_run["printed"] and "dead-job" in second_run["printed"]
    names = {"S3 500 always (transient row, redone)": {"mixed/s3_500_always.jpg"},
             "mask PNG PUT failing past the retries": {"maskfail/m1.jpg"},
             "truncated upload completed later": {"uploads/partial.jpg"}}
    for name, keys in names.items():
        record_fault(name, len(keys), keys <= rerun.redone and (after.loc[list(keys), "status"] == "ok").all())
    record_fault("stale lease of a dead job", 1, second_run["success"] and not second_run["lease_left"])


def test_no_credential_in_the_ray_session_logs(first_run, second_run):
    logs = session_logs()
    assert any(b"Stage1Actor" in p.read_bytes() for p in logs)  # the logs of the cluster that ran the jobs
    assert files_holding(logs, [SECRET, KEY]) == {}


def test_a_checkpoint_that_carries_code_is_refused_before_the_job_starts(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    evil = tmp_path / "model_combined.pt"
    torch.save({"encoder_attn.conv.weight": torch.zeros(1), "x": Payload()}, evil)
    with pytest.raises(CheckpointError, match="refused.*weights_only"):
        run_inference(InferConfig(input=str(GOLDEN), output=str(tmp_path / "out"), head=str(evil)))
    refused = not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()
    record_fault("checkpoint carrying code", 1, refused)
    assert refused
