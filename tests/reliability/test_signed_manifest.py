"""A job over a manifest of signed URLs with user info (HTTP, as a presigned S3 URL is), run through
``jobs/infer.py``: its credentials appear nowhere - not in the outputs, the driver's output or the Ray session's
log files - and its settings guard the output: a re-run with other weights (by content), precision, input or CRF is
refused, and ``--overwrite`` removes only what the job writes."""
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlencode

import pandas as pd
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from audit import by_key, output_rows
from conftest import TINY_ARGS, TINY_VIT, make_bucket, record_fault, record_rows
from pipeline.decode import DecodeSettings, decode_images
from pipeline.infer import InferConfig, run_inference
from pipeline.output_state import clear_output
from pipeline.sample import synthetic_image
from pipeline.storage import Storage, storage_options
from ray_session import files_holding, session_logs
from s3_faults import FaultProxy

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "pw-in-the-url-never-written-5e1"
ACCESS_KEY = "ASIASIGNEDURL0000001"
TOKEN = "session-token-never-written-7c2"
SIGNATURE = "5f1e0b3c9a7d4e2f8b6c1a0d3e5f7a9b1c3d5e7f9a1b3c5d7e9f1a3b5c7d9e1f"
SECRETS = [PASSWORD, ACCESS_KEY, TOKEN, SIGNATURE]


def signed(base: str, key: str) -> str:
    """A presigned-looking URL with user info: every secret in it."""
    host = base.split("://", 1)[1]
    query = urlencode({"X-Amz-Algorithm": "AWS4-HMAC-SHA256",
                       "X-Amz-Credential": f"{ACCESS_KEY}/20250101/us-east-1/s3/aws4_request",
                       "X-Amz-Date": "20250101T000000Z", "X-Amz-Expires": "3600", "X-Amz-SignedHeaders": "host",
                       "X-Amz-Security-Token": TOKEN, "X-Amz-Signature": SIGNATURE})
    return f"http://reader:{PASSWORD}@{host}/{key}?{query}"


def jpeg_and_mask(kind: str, i: int) -> tuple[bytes, bytes]:
    rgb, mask = synthetic_image(kind, i, seed=3)
    out = []
    for array, fmt in ((rgb, "JPEG"), (mask, "PNG")):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format=fmt)
        out.append(buf.getvalue())
    return out[0], out[1]


@pytest.fixture(scope="module")
def signed_job(ray_local, s3_server, tiny_weights, tmp_path_factory):
    """The job run through jobs/infer.py on a manifest: 2 groups, 7 images: one of them missing (404, permanent),
    one answering 500 (transient, accepted with --accept-transient-errors)."""
    fs = make_bucket(s3_server, "signed")
    proxy = FaultProxy(s3_server, {"horse/h2.jpg": (500, None)})
    work = tmp_path_factory.mktemp("signed")
    rows = []
    for group, kind, n in (("horse", "horse", 3), ("disc", "disc", 3)):
        for i in range(n):
            jpeg, mask = jpeg_and_mask(kind, i)
            stem = f"{group[0]}{i}"
            fs.pipe_file(f"signed/img/{group}/{stem}.jpg", jpeg)
            fs.pipe_file(f"signed/gt/{group}/{stem}.png", mask)
            rows.append((group, signed(proxy.url, f"signed/img/{group}/{stem}.jpg"),
                         signed(proxy.url, f"signed/gt/{group}/{stem}.png")))
    rows.append(("horse", signed(proxy.url, "signed/img/horse/missing.jpg"), ""))
    manifest = work / "manifest.csv"
    pd.DataFrame(rows, columns=["group", "image_uri", "gt_uri"]).to_csv(manifest, index=False)
    backbone = work / "backbone.pth"  # a copy this test may change later (same path, other content)
    shutil.copy(tiny_weights[0], backbone)
    out = work / "out"
    args = ["--manifest", str(manifest), "--output", str(out), "--backbone", str(backbone),
            "--head", tiny_weights[1], *TINY_ARGS, "--crf", "none", "--accept-transient-errors",
            "--progress-interval", "2"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "infer.py"), *args], env=env, capture_output=True,
                          text=True, timeout=600)
    yield {"done": done, "out": out, "manifest": manifest, "backbone": backbone, "head": tiny_weights[1],
           "proxy": proxy, "images": len(rows)}
    proxy.stop()


def test_signed_urls_are_read_and_recorded_redacted(signed_job):
    done, out = signed_job["done"], signed_job["out"]
    assert done.returncode == 0, done.stderr[-4000:]
    rows = output_rows(LocalFileSystem(), str(out))
    record_rows(signed_job["images"], rows["key"], rows["error_kind"].dropna())
    assert len(rows) == signed_job["images"] and rows["key"].is_unique
    rows = by_key(rows)
    ok = rows[rows["status"] == "ok"]
    assert len(ok) == 5  # read through the signed URLs, ground truth too
    assert rows.loc["horse/missing.jpg", "error_kind"] == "Read:FileNotFoundError"
    assert rows.loc["horse/missing.jpg", "error_class"] == "permanent"
    assert rows.loc["horse/h2.jpg", "error_class"] == "transient"
    assert "X-Amz-Signature=REDACTED" in rows.loc["horse/missing.jpg", "error"]  # the URL is in the text, redacted
    assert rows["image_uri"].str.contains("X-Amz-Signature=REDACTED").all()
    assert not rows["image_uri"].str.contains("@").any() and not ok["gt_uri"].str.contains("@").any()
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["output"]["transient_errors"] == 1 and (out / "_SUCCESS").exists()  # accepted


def test_no_secret_in_outputs_driver_output_or_ray_logs(signed_job):
    done, out = signed_job["done"], signed_job["out"]
    assert all(s in signed_job["manifest"].read_text() for s in SECRETS)  # the job was given every one of them
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"_manifest.json", "_run.json", "_SUCCESS"}
    assert any(p.suffix == ".parquet" for p in files) and any(p.parent.name == "_commits" for p in files)
    in_outputs = files_holding(files, SECRETS)
    in_names = [str(p) for p in files if any(s in str(p) for s in SECRETS)]
    driver = done.stdout + done.stderr
    in_driver = [s for s in SECRETS if s in driver]
    logs = session_logs()
    in_logs = files_holding(logs, SECRETS)
    clean = not (in_outputs or in_names or in_driver or in_logs)
    record_fault("credentials in signed URLs and user info (nowhere written)", len(SECRETS), clean)
    assert "[infer]" in driver and "rows 7" in driver  # the driver's own output, worker logs streamed into it
    assert any(b"Stage1Actor" in p.read_bytes() for p in logs)  # the session that ran the job
    assert (in_outputs, in_names, in_driver, in_logs) == ({}, [], [], {})


def cfg_of(signed_job, **changes) -> InferConfig:
    """The job's settings as the command line gave them."""
    return InferConfig(manifest=str(signed_job["manifest"]), output=str(signed_job["out"]),
                       backbone=str(signed_job["backbone"]), head=signed_job["head"],
                       backbone_name="vit_base_patch8_224", backbone_kwargs=dict(TINY_VIT), crf="none",
                       progress_interval=2).replace(**changes)


def test_a_rerun_with_other_settings_is_refused(signed_job, tmp_path):
    """One re-run that changes four settings at once: the refusal must name each of them (one job instead of four
    on these 2 cores; a setting missing from the comparison would be missing from the message)."""
    assert signed_job["done"].returncode == 0
    other_manifest = tmp_path / "same-rows.csv"
    shutil.copy(signed_job["manifest"], other_manifest)  # the same rows, another input
    state = torch.load(signed_job["backbone"], weights_only=True)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name] + 1e-3
    torch.save(state, signed_job["backbone"])  # other weights under the same path: refused by content
    with pytest.raises(RuntimeError, match="other settings") as refused:
        run_inference(cfg_of(signed_job, crf="coca", dtype="bfloat16", manifest=str(other_manifest)))
    message = str(refused.value)
    for key, old, new in (("backbone", None, None), ("crf", "'none'", "'coca'"),
                          ("precision", "'float32'", "'bfloat16'"), ("manifest", None, None)):
        assert f"{key}: " in message, (key, message)
        if old:
            assert f"{key}: {old} -> {new}" in message
    assert not any(s in message for s in SECRETS)
    assert not (signed_job["out"] / "_lease.json").exists()  # the refused job released the lease


def test_overwrite_removes_what_the_job_wrote_and_keeps_files_beside_it(signed_job, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(signed_job["out"], out)
    (out / "notes.txt").write_text("mine")
    (out / "other-tool").mkdir()
    (out / "other-tool" / "result.parquet").write_bytes(b"not ours")
    assert (out / "masks").is_dir() and (out / "predictions").is_dir() and (out / "_commits").is_dir()
    clear_output(Storage(str(out)))
    # the lease's lock file stays: deleting a lock file that another job may be waiting on would race it
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "_lease.json.lock", "notes.txt", "other-tool", "other-tool/result.parquet"]


def test_overwrite_keeps_files_it_did_not_write_inside_its_folders(signed_job, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(signed_job["out"], out)
    (out / "masks" / "README.txt").write_text("how these masks were reviewed")
    (out / "predictions" / "reviewed.csv").write_text("group,name,ok\n")
    clear_output(Storage(str(out)))
    assert (out / "masks" / "README.txt").exists() and (out / "predictions" / "reviewed.csv").exists()


def test_signed_https_urls_are_read_when_the_output_needs_s3_options(signed_job, s3_server):
    opts = storage_options(s3_server, extra={"key": "testing", "secret": "testing"}, retries=2)
    url = signed(signed_job["proxy"].url, "signed/img/disc/d0.jpg")
    decoded = decode_images([url], DecodeSettings(storage_options=opts))
    assert decoded.ok.all(), decoded.errors
