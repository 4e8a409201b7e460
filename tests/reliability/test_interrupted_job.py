"""A job interrupted with Ctrl-C (SIGINT to ``jobs/infer.py``) while a second job tries the same output, then re-run.

Groups stream through the job one by one, and their rows are committed a few groups at a time (with
``--rows-per-shard 1``; by default a shard waits for 10,000 rows). Stage 1 is made slow (an injected second per
group, set on the job's config by a wrapper that then runs ``jobs/infer.py`` as ``__main__``), and its rows leave
it a block of groups at a time, so at the first commit a whole block still needs seconds: the job is interrupted
then. While it runs,
the same job started again is refused with the holder named; the re-run afterwards skips every finished group (the
manifest's ``processed`` counts and the run number in each shard's name say so) and does only the rest.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fsspec.implementations.local import LocalFileSystem

from audit import Rerun, output_rows
from conftest import TINY_ARGS, TINY_VIT, record_fault, record_rows
from pipeline.infer import InferConfig, run_inference
from pipeline.lease import LeaseHeld
from pipeline.sample import write_sample

ROOT = Path(__file__).resolve().parents[2]
GROUPS = {f"{kind}{i}": 2 for i in range(1, 9) for kind in ("horse", "disc")}  # two blocks of 8 groups
# jobs/infer.py run as the command line does, with the injected delay on the config it builds
WRAPPER = """import runpy, sys
sys.path.insert(0, {root!r})
import pipeline.infer as infer
run = infer.run_inference
infer.run_inference = lambda cfg: run(cfg.replace(fault={{"delay_s": 1.0}}))
sys.argv = [{script!r}, *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""


def wait_for(condition, timeout: float, what: str, job, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if job.poll() is not None:
            raise AssertionError(f"the job ended (rc {job.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def test_an_interrupted_job_is_rerun_skipping_its_finished_groups(ray_local, tiny_weights, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    write_sample(str(data), GROUPS)
    out.mkdir()
    (out / "_SUCCESS").write_bytes(b"")  # left by an earlier run: a run in progress is no success
    backbone, head = tiny_weights
    cfg = InferConfig(input=str(data), output=str(out), backbone=backbone, head=head, crf="none", rows_per_shard=1,
                      chunk_size=2, backbone_name="vit_base_patch8_224", backbone_kwargs=dict(TINY_VIT),
                      progress_interval=2)
    args = ["--input", str(data), "--output", str(out), "--backbone", backbone, "--head", head, *TINY_ARGS,
            "--crf", "none", "--rows-per-shard", "1", "--chunk-size", "2", "--progress-interval", "2"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    log = tmp_path / "job.log"  # a file, not a pipe: a full pipe would stall the job
    with open(log, "w") as printed:
        wrapper = WRAPPER.format(root=str(ROOT), script=str(ROOT / "jobs" / "infer.py"))
        job = subprocess.Popen([sys.executable, "-c", wrapper, *args], env=env, stdout=printed,
                               stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (out / "_lease.json").exists(), 180, "lease", job, log)
        with pytest.raises(LeaseHeld) as refused:  # a second job on the same output while the first runs
            run_inference(cfg)
        wait_for(lambda: any((out / "_commits").glob("*.json")), 300, "first commit", job, log)
        job.send_signal(signal.SIGINT)  # Ctrl-C in the middle of the run
        job.wait(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    records = [json.loads(p.read_text()) for p in (out / "_commits").glob("*.json")]
    finished = {g for r in records for g, v in r["groups"].items() if v["indices"] == [[0, v["n"]]]}
    before = output_rows(LocalFileSystem(), str(out))
    success_after_interrupt, lease_after_interrupt = (out / "_SUCCESS").exists(), (out / "_lease.json").exists()

    manifest = run_inference(cfg)
    rerun = Rerun(before, output_rows(LocalFileSystem(), str(out)), manifest["input"]["images"])
    record_rows(rerun.images_in, rerun.after["key"])
    runs = dict(zip(rerun.after["group"], rerun.after["run"]))
    skipped = manifest["processed"] == {"groups": len(GROUPS) - len(finished),
                                        "images": sum(n for g, n in GROUPS.items() if g not in finished)}
    survived = (skipped and rerun.lost == 0 and rerun.duplicates == 0 and rerun.ok_redone == set()
                and (out / "_SUCCESS").exists())
    record_fault("job interrupted (SIGINT) and re-run", int(0 < len(finished) < len(GROUPS)), survived)
    record_fault("second job on an output in use (refused)", 1, f"pid {job.pid}" in str(refused.value))

    assert f"pid {job.pid}" in str(refused.value) and "another job is writing this output" in str(refused.value)
    assert 0 < len(finished) < len(GROUPS), log.read_text()[-3000:]  # interrupted with groups done and to do
    assert not success_after_interrupt and not lease_after_interrupt
    assert set(before["group"]) == finished  # what the interrupted job committed is whole groups only
    assert skipped, (manifest["processed"], len(finished))
    assert (rerun.lost, rerun.duplicates, rerun.ok_redone) == (0, 0, set())
    assert {g for g, r in runs.items() if r == 1} == finished and set(runs) == set(GROUPS)
    assert (out / "_SUCCESS").exists() and manifest["output"]["rows"] == sum(GROUPS.values())
