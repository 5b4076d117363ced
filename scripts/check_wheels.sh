#!/usr/bin/env bash
# Asks the package index whether every runtime dependency installs without a compiler: a wheel (binary
# or pure Python) for Windows x86-64, macOS arm64 and Linux x86-64 (manylinux), Python 3.10, 3.11, 3.12
# (3D Slicer 5.10 ships 3.12). Only resolves (pip install --dry-run --no-deps --only-binary=:all: with
# the target's --platform / --python-version): wheel metadata is read, no wheel is installed.
#
# Allowed as source distributions (pure Python, nothing to compile):
#   sam2==1.1.0   PyPI's sam2 is a third-party upload of Meta's facebookresearch/sam2 sources, pinned
#                 exactly; built with SAM2_BUILD_CUDA=0 (its optional CUDA extension is skipped) and
#                 --no-build-isolation against the installed torch.
# Not a runtime dependency: pydensecrf2 (source only, needs a C++ compiler) is the optional extra
# `medclipsam[crf]`; without it the CRF runs on numpy/scipy.
#
# Usage: scripts/check_wheels.sh [--train] [python]   (python: the interpreter whose pip asks; default python3)
# Exit status 0 when every requirement resolves to a wheel everywhere; the table lists each failure.
set -u
cd "$(dirname "$0")/.."

extras=""
if [ "${1:-}" = "--train" ]; then extras="train"; shift; fi
PY="${1:-python3}"
SDIST_ALLOWED="sam2"

mapfile -t REQUIREMENTS < <("$PY" - "$extras" <<'EOF'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
requirements = list(project["dependencies"])
for extra in filter(None, sys.argv[1].split(",")):
    requirements += project["optional-dependencies"][extra]
print("\n".join(requirements))
EOF
)
if [ "${#REQUIREMENTS[@]}" -eq 0 ]; then echo "no requirements read from pyproject.toml" >&2; exit 2; fi

# pip accepts wheels for the platform tags given; list the older compatible ones explicitly.
linux=(); for minor in $(seq 17 28); do linux+=(--platform "manylinux_2_${minor}_x86_64"); done
linux+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
mac=(); for major in 11 12 13 14 15; do mac+=(--platform "macosx_${major}_0_arm64" --platform "macosx_${major}_0_universal2"); done
windows=(--platform win_amd64)

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
status=0

check() {  # platform-name python-version requirement...
  local name="$1" version="$2"; shift 2
  local -n tags="$name"
  "$PY" -m pip install --dry-run --quiet --no-deps --ignore-installed --only-binary=:all: --target "$tmp/t" \
    --python-version "$version" --implementation cp "${tags[@]}" "$@" >"$tmp/log" 2>&1
}

printf '%-9s %-6s %s\n' platform python result
for platform in windows mac linux; do
  for version in 3.10 3.11 3.12; do
    if check "$platform" "$version" "${REQUIREMENTS[@]}"; then
      printf '%-9s %-6s %s\n' "$platform" "$version" "all ${#REQUIREMENTS[@]} have wheels"
      continue
    fi
    for requirement in "${REQUIREMENTS[@]}"; do  # one at a time, to name the culprit
      check "$platform" "$version" "$requirement" && continue
      printf '%-9s %-6s %s\n' "$platform" "$version" "NO WHEEL: $requirement ($(grep -m1 -i 'error' "$tmp/log" | cut -c1-100))"
      status=1
    done
  done
done
for name in $SDIST_ALLOWED; do
  echo "allowed source distribution (pure Python): $name"
done
exit $status
