"""End to end: `ray start --head` on loopback, `ray job submit jobs/infer.py` over an S3 bucket (moto)."""
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.fs
import pytest

from conftest import TINY_ARGS, make_bucket
from pipeline.sample import write_sample
from pipeline.storage import storage_options
from reliability.ray_session import children, title

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_of(temp_dir: str) -> list[int]:
    """Running PIDs whose command line names our cluster's temp dir, and all their descendants."""
    kids = children()
    found = {pid for pids in kids.values() for pid in pids if temp_dir in title(pid)}
    todo = list(found)
    while todo:
        for child in kids.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return sorted(found)


def stop_cluster(temp_dir: str) -> None:
    """Stops only the cluster this test started (never `ray stop`, which stops every cluster here)."""
    # SIGTERM lets Ray's processes exit cleanly; whatever is left after 3 s gets SIGKILL
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0), (signal.SIGKILL, 10.0)):
        pids = processes_of(temp_dir)  # again after SIGTERM: a raylet may have started workers meanwhile
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and processes_of(temp_dir):
            time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster(s3_server):
    temp_dir = f"/tmp/rt-{secrets.token_hex(4)}"
    dashboard = free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16), "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run(
        [str(BIN / "ray"), "start", "--head", f"--port={free_port()}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2", f"--temp-dir={temp_dir}",
         # own ports throughout: the session's local Ray (another cluster on this machine) holds the defaults
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
         "--disable-usage-stats"],
        env=env, check=True, capture_output=True, timeout=120,
    )
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        stop_cluster(temp_dir)
        assert not processes_of(temp_dir)


def test_ray_job_submit_over_a_bucket(cluster, s3_server, tiny_weights):
    address, env = cluster
    fs = make_bucket(s3_server, "e2e")
    opts = storage_options(s3_server)
    write_sample("s3://e2e/CoCA", {"horse": 3, "disc": 2}, storage_options=opts)
    whole = fs.cat_file("e2e/CoCA/image/horse/horse_000.jpg")
    fs.pipe_file("e2e/CoCA/image/horse/broken.jpg", whole[: len(whole) // 2])  # a truncated JPEG
    for name, path in zip(("backbone.pth", "head.pt"), tiny_weights):
        fs.put_file(path, f"e2e/weights/{name}")

    command = [
        str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
        "--runtime-env-json", '{"excludes": ["tests/golden/*.npz", "out", ".git"]}', "--",
        "python", "jobs/infer.py", "--input", "s3://e2e/CoCA", "--output", "s3://e2e/runs/r1",
        "--endpoint", s3_server, "--backbone", "s3://e2e/weights/backbone.pth", "--head", "s3://e2e/weights/head.pt",
        *TINY_ARGS, "--progress-interval", "2",
    ]
    for _ in range(30):  # the head's job agent may still be starting: submission is refused, nothing is created
        job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        if "No available agent to submit job" not in job.stdout + job.stderr:
            break
        time.sleep(2)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "succeeded" in job.stdout + job.stderr
    assert "rows 6 (ok 5, errors 1: 0 transient)" in job.stdout

    fs.invalidate_cache()
    assert fs.exists("e2e/runs/r1/_SUCCESS") and fs.exists("e2e/runs/r1/_manifest.json")
    masks = sorted(p.rsplit("/", 2)[-2] + "/" + p.rsplit("/", 1)[-1] for p in fs.find("e2e/runs/r1/masks"))
    assert masks == ["disc/disc_000.png", "disc/disc_001.png", "horse/horse_000.png", "horse/horse_001.png",
                     "horse/horse_002.png"]
    s3 = pyarrow.fs.S3FileSystem(endpoint_override=s3_server, access_key="testing", secret_key="testing",
                                 region="us-east-1")
    table = pads.dataset("e2e/runs/r1/predictions", format="parquet", filesystem=s3).to_table().to_pandas()
    assert len(table) == 6 and table["image_uri"].is_unique
    broken = table[table["name"] == "broken.jpg"].iloc[0]
    assert broken["status"] == "error" and broken["error_kind"] == "CorruptImage"
