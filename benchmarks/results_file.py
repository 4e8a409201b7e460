"""Where a benchmark's figures go: one JSON file under ``benchmarks/results/``, naming the code it measured."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def code_version() -> dict:
    """The commit measured, and the files of the method and the pipeline that differ from it (a shared tree)."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "modified": git("status", "--porcelain", "--", "pipeline", "scosparc_core").splitlines()}


def write_result(result: dict, out: str | Path | None, name: str) -> Path:
    """Writes ``result`` (plus ``code``) to ``out``: a .json path, a folder (then ``name`` in it) or None (then
    ``benchmarks/results/<name>``)."""
    path = Path(out) if out else RESULTS
    path = path if path.suffix == ".json" else path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    result.setdefault("code", code_version())
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return path
