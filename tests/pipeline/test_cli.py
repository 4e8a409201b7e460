"""The three jobs run the way the README shows them.

The README's first command runs as its own process. The other checks run each script as ``__main__`` in this
process (``runpy``): the same code path as the command line, without a fresh interpreter importing torch, timm
and Ray again for every check (~10 s each on 2 cores).
"""
import json
import os
import runpy
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


def run_script(script: str, *args, monkeypatch, capsys):
    """``python jobs/<script> args...`` as __main__ in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / "jobs" / script), *args])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "jobs" / script), run_name="__main__")
    out = capsys.readouterr()
    return done.value.code or 0, out.out, out.err


@pytest.mark.parametrize("job", ["infer", "train", "evaluate"])
def test_help_shows_the_defaults(job, monkeypatch, capsys):
    code, out, _ = run_script(f"{job}.py", "--help", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and "(default:" in out
    assert "--storage-option KEY=VALUE [KEY=VALUE ...]" in out


def test_storage_options_as_the_readme_writes_them():
    sys.path.insert(0, str(ROOT))
    from jobs.infer import parse_args

    cfg, _ = parse_args(["--input", "s3://b/x", "--storage-option", "key=AKIA1", "secret=s3cr3t",
                         "--storage-option", "profile=prod", "--endpoint", "http://127.0.0.1:9000"])
    opts = cfg.storage_options
    assert (opts["key"], opts["secret"], opts["profile"]) == ("AKIA1", "s3cr3t", "prod")
    assert opts["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:9000"
    assert opts["config_kwargs"]["retries"]["mode"] == "adaptive"


def test_a_missing_head_fails_before_anything_is_written(tmp_path, monkeypatch, capsys):
    code, _, err = run_script("infer.py", "--input", str(ROOT / "tests" / "golden"), "--output",
                              str(tmp_path / "out"), monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and err.startswith("error: no stage-1 head") and "Weights" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setting", [("--stall-timeout", "0"), ("--chunk-size", "0"), ("--micro-batch", "-4"),
                                     ("--gpus-per-actor", "1.5")])
def test_settings_that_cannot_work_are_refused_before_anything_is_written(setting, tmp_path, monkeypatch, capsys):
    code, _, err = run_script("infer.py", "--input", str(ROOT / "tests" / "golden"), "--output",
                              str(tmp_path / "out"), "--random-init", *setting, monkeypatch=monkeypatch, capsys=capsys)
    name = setting[0].removeprefix("--").replace("-", "_")
    assert code == 2 and err.startswith(f"error: {name} must be") and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_an_unreachable_object_store_is_a_refusal_not_a_traceback(tmp_path, monkeypatch, capsys):
    """Any failure before the work (here botocore's, from checking the input) exits 2 with one line."""
    code, _, err = run_script("infer.py", "--input", "s3://no-bucket/x", "--endpoint", "http://127.0.0.1:1",
                              "--s3-retries", "0", "--output", str(tmp_path / "out"), "--random-init",
                              monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_the_sample_is_written_only_for_settings_that_work(tmp_path, monkeypatch, capsys):
    code, _, err = run_script("infer.py", "--sample", "--output", str(tmp_path / "out"), "--random-init",
                              "--chunk-size", "0", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and err.startswith("error: chunk_size must be")
    assert list(tmp_path.iterdir()) == []  # neither the sample nor the output


def test_a_value_error_during_the_work_keeps_its_traceback(ray_local, tiny_weights, tmp_path, monkeypatch, capsys):
    """Only refusals before any work exit 2 with a one-line message; a failure once the job has started is not
    reported as 'refused'."""
    from conftest import TINY_ARGS
    from pipeline import infer

    def broken(*args, **kwargs):
        raise ValueError("a bug in the middle of the job")

    monkeypatch.setattr(infer, "_run_dataset", broken)
    backbone, head = tiny_weights
    monkeypatch.setattr(sys, "argv", [str(ROOT / "jobs" / "infer.py"), "--input", str(ROOT / "tests" / "golden"),
                                      "--output", str(tmp_path / "out"), "--backbone", backbone, "--head", head,
                                      "--crf", "none", *TINY_ARGS])
    with pytest.raises(ValueError, match="a bug in the middle"):
        runpy.run_path(str(ROOT / "jobs" / "infer.py"), run_name="__main__")
    assert (tmp_path / "out" / "_run.json").exists() and not (tmp_path / "out" / "_SUCCESS").exists()
