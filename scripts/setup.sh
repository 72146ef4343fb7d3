#!/usr/bin/env bash
# Create .venv with the pinned CPU stack and ditcache installed (idempotent; safe to re-run).
# The constraints file pins torch to the CPU build so pip never pulls a multi-GB CUDA wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.ditcache-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints-cpu.txt -nt "$stamp" ]; then
  log=.venv/pip-install.log
  echo "setting up .venv (pinned CPU torch; log: $log)"
  if ! { .venv/bin/pip install -c constraints-cpu.txt torch==2.13.0 \
         && .venv/bin/pip install -c constraints-cpu.txt -e ".[dev]"; } >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" | tail -40 >&2
    echo "setup failed: see $log" >&2
    exit 1
  fi
  touch "$stamp"
fi
