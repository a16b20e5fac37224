#!/usr/bin/env bash
# Set up the environment if needed, then run the whole test suite (offline).
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRL_EXPERIMENTAL_SILENCE=1
exec .venv/bin/python -m pytest "$@"
