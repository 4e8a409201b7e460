#!/usr/bin/env bash
# Creates .venv at the repo root and installs the project with its test extra. Safe to re-run:
# it reinstalls only when pyproject.toml changed since the last successful run.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.scosparc-installed
want=$(sha256sum pyproject.toml setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # Known-good torch pair; on x86_64 pip takes both from the local wheel store when one exists.
  if [ "$(uname -m)" = "x86_64" ]; then
    .venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
  else
    .venv/bin/python -m pip install -q torch==2.9.1 torchvision==0.24.1
  fi
  .venv/bin/python -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi
