"""The three jobs run the way the README shows them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_the_readme_sample_command_runs_the_job_on_the_embedded_sample(tmp_path):
    """`jobs/infer.py --sample --random-init`, the README's first command (ViT-B/8 with random weights)."""
    out = tmp_path / "run"
    done = run("jobs/infer.py", "--sample", "--random-init", "--output", str(out), "--crf", "none")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rows 7 (ok 7, errors 0: 0 transient)" in done.stdout
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["output"]["rows"] == manifest["input"]["images"] == 7 and (out / "_SUCCESS").exists()
    assert len(list((out / "masks").rglob("*.png"))) == 7


@pytest.mark.parametrize("job", ["infer", "train", "evaluate"])
def test_help_shows_the_defaults(job):
    done = run(f"jobs/{job}.py", "--help", timeout=120)
    assert done.returncode == 0 and "(default:" in done.stdout
    assert "--storage-option KEY=VALUE [KEY=VALUE ...]" in done.stdout


def test_storage_options_as_the_readme_writes_them():
    sys.path.insert(0, str(ROOT))
    from jobs.infer import parse_args

    cfg, _ = parse_args(["--input", "s3://b/x", "--storage-option", "key=AKIA1", "secret=s3cr3t",
                         "--storage-option", "profile=prod", "--endpoint", "http://127.0.0.1:9000"])
    opts = cfg.storage_options
    assert (opts["key"], opts["secret"], opts["profile"]) == ("AKIA1", "s3cr3t", "prod")
    assert opts["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:9000"
    assert opts["config_kwargs"]["retries"]["mode"] == "adaptive"


def test_a_missing_head_fails_before_anything_is_written(tmp_path):
    done = run("jobs/infer.py", "--input", str(ROOT / "tests" / "golden"), "--output", str(tmp_path / "out"),
               timeout=120)
    assert done.returncode != 0 and "no stage-1 head" in done.stderr and "Weights" in done.stderr
    assert not (tmp_path / "out").exists()
