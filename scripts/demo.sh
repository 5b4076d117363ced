#!/usr/bin/env bash
# Set up the pinned environment and segment a sample volume from a text prompt.
# Writes demo-output/<sample>.seg.nrrd, <sample>-saliency.nrrd (saliency maps), <sample>-report.json
# (per-prompt report) and <sample>-overview.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/medclipsam demo --output-dir demo-output "$@"
