#!/usr/bin/env bash
# Create .venv with every pinned dependency (requirements/lock.txt) and install MedCLIPSAMLib in it.
# Re-running is cheap: it does nothing when the lock file and pyproject have not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${MEDCLIPSAM_VENV:-.venv}
stamp="$VENV/.medclipsam-installed"
want=$(cat requirements/lock.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setup: creating $VENV and installing pinned dependencies (first time: a few minutes, several GB)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# (this machine's pip config names local index folders that may be absent: hide those warnings)
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pip install -c requirements/lock.txt torch torchvision
pip install -c requirements/lock.txt -e ".[train,test]"
# sam2 is an sdist whose setup imports torch: no build isolation, and no CUDA extension (optional in sam2).
SAM2_BUILD_CUDA=0 pip install -c requirements/lock.txt --no-build-isolation sam2
echo "$want" > "$stamp"
echo "setup: done ($VENV)" >&2
