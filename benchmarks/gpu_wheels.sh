#!/usr/bin/env bash
# Fill a wheel folder for benchmarks/gpu_check.sh, on a machine with PyPI access (the device
# machine has no network). Usage: benchmarks/gpu_wheels.sh [DIR]   (default .whl, git-ignored)
#
# * basicsr 1.4.2: built from its sdist (pure Python; constraints.txt keeps the isolated build,
#   which declares setup_requires=torch, on the CPU torch);
# * what basicsr imports at import time (or the project needs) and the device image may lack:
#   lmdb, PyYAML, tqdm, requests (+ urllib3, idna, certifi, charset-normalizer), addict, yapf
#   (+ platformdirs), future, setuptools (distutils for basicsr on Python 3.12); binary wheels
#   for CPython 3.12 manylinux x86_64. tb-nightly is not needed: tensorboard is on the device.
# gpu_check.sh installs only those whose module cannot be imported there.
# PYTHON picks the interpreter whose pip is used (default python3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/.whl}"
PY="${PYTHON:-python3}"
PKGS=(lmdb PyYAML tqdm requests urllib3 idna certifi charset-normalizer addict yapf platformdirs future setuptools)
if ! "$PY" -m pip --version >/dev/null 2>&1; then
    echo "gpu_wheels.sh: error: '$PY -m pip' does not run; set PYTHON to an interpreter with pip" >&2
    exit 2
fi
mkdir -p "$DIR"
export PIP_DISABLE_PIP_VERSION_CHECK=1
PIP_CONSTRAINT="$ROOT/constraints.txt" "$PY" -m pip wheel --no-deps basicsr==1.4.2 -w "$DIR"
"$PY" -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --no-deps -d "$DIR" "${PKGS[@]}"
ls -1 "$DIR"
