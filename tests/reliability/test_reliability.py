"""A bucket of everything that goes wrong in the wild, faults on top, and the jobs must account for every file."""
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.fs
import pytest
import torch
from PIL import Image

from conftest import GOLDEN, TINY_ARGS, TINY_VIT, count, make_bucket, RELIABILITY
from pipeline.infer import InferConfig, run_inference
from pipeline.sample import synthetic_group, write_sample
from pipeline.storage import storage_options
from s3_faults import FaultProxy
from scosparc_core import CheckpointError

ROOT = Path(__file__).resolve().parents[2]
KEY, SECRET = "AKIARELIABILITY00001", "reliability-secret-never-written-01"


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


FAULTS = {"s3_500_once.jpg": (500, 1), "s3_500_always.jpg": (500, None), "s3_denied.jpg": (403, None)}


@pytest.fixture(scope="module")
def bucket(s3_server):
    fs = make_bucket(s3_server, "wild")
    cases = bad_inputs()
    for group, name, data, gt, _ in cases:
        fs.pipe_file(f"wild/CoCA/image/{group}/{name}", data)
        if gt is not None:
            fs.pipe_file(f"wild/CoCA/groundtruth/{group}/{os.path.splitext(name)[0]}.png", gt)
    fs.pipe_file("wild/CoCA/image/empty/", b"")  # an empty group: a folder marker and nothing in it
    proxy = FaultProxy(s3_server, FAULTS)
    yield fs, proxy, cases
    proxy.stop()


def test_bad_inputs_and_storage_faults_and_a_killed_actor(ray_local, bucket, tiny_weights, tmp_path):
    fs, proxy, cases = bucket
    backbone, head = tiny_weights
    fs.put_file(backbone, "wild/weights/backbone.pth")
    fs.put_file(head, "wild/weights/head.pt")
    opts = storage_options(proxy.url, extra={"key": KEY, "secret": SECRET})
    marker = tmp_path / "stage1-killed"
    manifest = run_inference(InferConfig(
        input="s3://wild/CoCA", output="s3://wild/runs/r1", backbone="s3://wild/weights/backbone.pth",
        head="s3://wild/weights/head.pt", backbone_name="vit_base_patch8_224", backbone_kwargs=dict(TINY_VIT),
        storage_options=opts, chunk_size=8, progress_interval=5,
        fault={"kill_after_groups": 2, "marker": str(marker)}))
    fs.invalidate_cache()

    s3 = pyarrow.fs.S3FileSystem(endpoint_override=proxy.url, access_key=KEY, secret_key=SECRET, region="us-east-1")
    rows = pads.dataset("wild/runs/r1/predictions", format="parquet", filesystem=s3).to_table().to_pandas()
    assert len(rows) == len(cases) == manifest["input"]["images"] and rows["image_uri"].is_unique
    assert manifest["input"]["empty_groups"] == ["empty"]
    by_name = rows.set_index(rows["group"] + "/" + rows["name"])
    for group, name, _, _, expected in cases:
        row = by_name.loc[f"{group}/{name}"]
        got = "ok" if row["status"] == "ok" else row["error_kind"]
        assert got == expected, (group, name, row["error"])
        if row["status"] != "ok":
            assert row["error"] and row["error"].startswith(expected)
    # defined results for the odd-but-valid ones
    ok = by_name[by_name["status"] == "ok"]
    rotated = ok.loc["mixed/exif_rotated.jpg"]
    h, w = synthetic_group("horse", 1)[0][0].shape[:2]
    assert (rotated["height"], rotated["width"]) == (w, h)  # the mask follows the displayed orientation
    assert (ok.loc["mixed/tiny.png"]["height"], ok.loc["mixed/tiny.png"]["width"]) == (1, 1)
    with_gt = [f"mixed/{n}" for n in ("gt_other_size.jpg", "gt_rgb.jpg", "gt_palette.jpg", "alpha.png")]
    assert ok.loc[with_gt, "mae"].notna().all()
    assert ok.loc["mixed/gt_corrupt.jpg", "gt_error"] and np.isnan(ok.loc["mixed/gt_corrupt.jpg", "mae"])
    assert np.isnan(ok.loc["mixed/exif_rotated.jpg", "mae"])  # no ground truth: no metrics, still a mask

    # masks match the rows exactly, and nothing was written outside the output prefix
    masks = {"s3://" + p for p in fs.find("wild/runs/r1/masks")}
    assert masks == set(ok["mask_uri"])
    assert len(masks) == len(ok)  # duplicate stems and odd names did not collide
    written = [p for p in fs.find("wild") if not p.startswith(("wild/CoCA/", "wild/weights/"))]
    assert all(p.startswith("wild/runs/r1/") for p in written), written
    for p in written:
        if not p.endswith(".png"):
            blob = fs.cat_file(p)
            assert KEY.encode() not in blob and SECRET.encode() not in blob, p
    shape = Image.open(io.BytesIO(fs.cat_file(ok.loc["mixed/strip.png", "mask_uri"]))).size
    assert shape == (3000, 2)

    # the faults happened, and the job lived through them
    assert marker.exists()
    assert proxy.injected["500:s3_500_once.jpg"] == 1 and proxy.injected["403:s3_denied.jpg"] >= 1
    RELIABILITY["inputs tried"] += len(cases)
    RELIABILITY["rows out"] += len(rows)
    for kind, n in rows["error_kind"].value_counts().items():
        count("errors by kind", kind, int(n))
    for name, survived in (("S3 500 once (retried)", True), ("S3 500 always (error row)", True),
                           ("S3 403 AccessDenied (error row)", True), ("stage-1 actor killed (SIGKILL)", True)):
        count("faults injected", name)
        count("faults survived", name, int(survived))


def test_an_interrupted_job_is_rerun_to_exactly_one_row_per_image(ray_local, tiny_weights, tmp_path):
    data = tmp_path / "data"
    write_sample(str(data), {"horse": 4, "disc": 3, "horse2": 3, "disc2": 3})
    (data / "image" / "disc" / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    out = tmp_path / "out"
    backbone, head = tiny_weights
    args = ["--input", str(data), "--output", str(out), "--backbone", backbone, "--head", head, *TINY_ARGS,
            "--chunk-size", "2", "--progress-interval", "1"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    job = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "infer.py"), *args], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not list((out / "predictions").glob("*.parquet")):
        time.sleep(0.2)
    job.send_signal(signal.SIGINT)  # Ctrl-C in the middle of the run
    job.communicate(timeout=120)
    done_before = len(list((out / "predictions").glob("*.parquet")))
    assert 0 < done_before and not (out / "_SUCCESS").exists()

    manifest = run_inference(InferConfig(input=str(data), output=str(out), backbone=backbone, head=head,
                                         backbone_name="vit_base_patch8_224", backbone_kwargs=dict(TINY_VIT),
                                         chunk_size=2))
    rows = pads.dataset(str(out / "predictions"), format="parquet").to_table().to_pandas()
    assert len(rows) == 14 and rows["image_uri"].is_unique and (out / "_SUCCESS").exists()
    masks = sorted(str(p) for p in (out / "masks").rglob("*.png"))
    assert masks == sorted(u.removeprefix("file://") for u in rows.loc[rows["status"] == "ok", "mask_uri"])
    count("faults injected", "job interrupted (SIGINT) and re-run")
    count("faults survived", "job interrupted (SIGINT) and re-run", int(manifest["output"]["rows"] == 14))


def test_a_checkpoint_that_carries_code_is_refused_before_the_job_starts(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    evil = tmp_path / "model_combined.pt"
    torch.save({"encoder_attn.conv.weight": torch.zeros(1), "x": Payload()}, evil)
    with pytest.raises(CheckpointError, match="refused.*weights_only"):
        run_inference(InferConfig(input=str(GOLDEN), output=str(tmp_path / "out"), head=str(evil)))
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()
    count("faults injected", "checkpoint carrying code")
    count("faults survived", "checkpoint carrying code")
