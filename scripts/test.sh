#!/usr/bin/env bash
# Set up the pinned environment and run the whole test suite (offline, CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MEDCLIPSAM_OFFLINE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
exec .venv/bin/python -m pytest "$@"
