#!/usr/bin/env bash
# GRL on the GPU (issue 32): one command on a CUDA machine without network.
#
#   benchmarks/gpu_check.sh [--only tests,job,bench] [--out DIR] [--wheels DIR] [--cpu-smoke]
#
# Stages (default all; details in benchmarks/gpu_check.py):
#   tests  pytest tests/test_cuda.py
#   job    small photo LMDB; torchrun --nproc_per_node=1 -m grl_plugin.train --launcher pytorch
#          (nccl), GRL-S SR x2 geometry at shrunk depth, bf16, 200 iterations, uninterrupted and
#          killed with SIGKILL after a checkpoint + --auto_resume: the losses must be equal;
#          then grl-test with tiles, PSNR against bicubic
#   bench  official / reference / fast side by side: train step GRL-S@sr 8x64^2, GRL-B denoise
#          geometry 1x256^2, eval GRL-B x4 480x640; fp32 and bf16
# What the machine lacks (basicsr, lmdb, addict, yapf, ...) is installed from the wheel folder
# (--wheels, $GRL_WHEELS, default .whl) that benchmarks/gpu_wheels.sh filled beforehand.
# Results: JSON in --out / $GRL_GPU_RESULTS (default benchmarks/results), one file per stage
# and gpu_check.json; scratch data in <out>/work (removed at the end unless GRL_KEEP_WORK=1).
# --cpu-smoke: the same steps in miniature on the CPU (gloo, tiny sizes, test_cuda.py with
# GRL_TEST_CUDA_DEVICE=cpu); nothing is unpacked. Uses `python` from PATH (or $PYTHON).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$(command -v python || command -v python3 || echo python)}"
ONLY="tests,job,bench"
OUT="${GRL_GPU_RESULTS:-$ROOT/benchmarks/results}"
WHEELS="${GRL_WHEELS:-$ROOT/.whl}"
SMOKE=0

die() { echo "gpu_check.sh: error: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --only) [ $# -ge 2 ] || die "--only needs a list (tests,job,bench)"; ONLY="$2"; shift 2 ;;
        --only=*) ONLY="${1#*=}"; shift ;;
        --out) [ $# -ge 2 ] || die "--out needs a folder"; OUT="$2"; shift 2 ;;
        --out=*) OUT="${1#*=}"; shift ;;
        --wheels) [ $# -ge 2 ] || die "--wheels needs a folder"; WHEELS="$2"; shift 2 ;;
        --wheels=*) WHEELS="${1#*=}"; shift ;;
        --cpu-smoke) SMOKE=1; shift ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

STAGES=()
IFS=',' read -r -a _items <<< "$ONLY"
for s in "${_items[@]}"; do
    case "$s" in
        tests|job|bench) STAGES+=("$s") ;;
        *) die "--only: unknown stage '$s' (choose from tests,job,bench)" ;;
    esac
done
[ ${#STAGES[@]} -gt 0 ] || die "--only: no stage given"

command -v "$PY" >/dev/null 2>&1 || die "'$PY' not found on PATH (set PYTHON)"
"$PY" -c 'import torch' 2>/dev/null || die "'$PY' cannot import torch"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$OUT/work"
rm -rf "$WORK" && mkdir -p "$WORK"
for s in tests job bench; do rm -f "$OUT/$s.json"; done
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
SMOKE_ARG=()

if [ "$SMOKE" = 1 ]; then
    SMOKE_ARG=(--smoke)
    export CUDA_VISIBLE_DEVICES=""
else
    "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
        || die "no CUDA device visible to torch (use --cpu-smoke for a CPU run)"
    # module -> distribution, unpacked from the wheel folder into a scratch site folder (on
    # PYTHONPATH) only when the import fails: no pip, no network, nothing written to the image
    MISSING=()
    for pair in basicsr:basicsr lmdb:lmdb yaml:pyyaml tqdm:tqdm requests:requests urllib3:urllib3 idna:idna \
                certifi:certifi charset_normalizer:charset_normalizer addict:addict yapf:yapf \
                platformdirs:platformdirs future:future; do
        "$PY" -c "import ${pair%%:*}" 2>/dev/null || MISSING+=("${pair#*:}")
    done
    NEED_DISTUTILS=0
    "$PY" -c 'from distutils.version import LooseVersion' 2>/dev/null || { NEED_DISTUTILS=1; MISSING+=(setuptools); }
    if [ ${#MISSING[@]} -gt 0 ]; then
        [ -d "$WHEELS" ] || die "missing ${MISSING[*]} and no wheel folder '$WHEELS' (fill it with benchmarks/gpu_wheels.sh, pass --wheels DIR)"
        SITE="$OUT/work/site"
        mkdir -p "$SITE"
        echo "== unpacking from $WHEELS: ${MISSING[*]}"
        "$PY" - "$WHEELS" "$SITE" "${MISSING[@]}" <<'PYEOF' || exit 2
import sys, zipfile
from pathlib import Path
wheels, site, names = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
for name in names:
    found = sorted(w for w in wheels.glob("*.whl") if w.name.lower().split("-")[0] == name.lower())
    if not found:
        sys.exit(f"gpu_check.sh: error: no wheel of {name} in {wheels} (fill it with benchmarks/gpu_wheels.sh)")
    try:
        zipfile.ZipFile(found[-1]).extractall(site)
    except (OSError, zipfile.BadZipFile) as err:
        sys.exit(f"gpu_check.sh: error: cannot unpack {found[-1]}: {err}")
    print(f"   {found[-1].name}")
PYEOF
        # basicsr imports distutils (gone in Python 3.12): setuptools' copy under that name
        if [ "$NEED_DISTUTILS" = 1 ]; then cp -r "$SITE/setuptools/_distutils" "$SITE/distutils"; fi
        export PYTHONPATH="$PYTHONPATH:$SITE"
    fi
    "$PY" -c 'import grl_plugin, basicsr' || die "grl_plugin / basicsr do not import after the installs"
fi

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
FAILED=0
for s in "${STAGES[@]}"; do
    echo "== stage $s ($(date -u +%H:%M:%S))"
    "$PY" benchmarks/gpu_check.py "$s" --out "$OUT" --work "$WORK" "${SMOKE_ARG[@]}" || FAILED=1
done
[ "${GRL_KEEP_WORK:-0}" = 1 ] || find "$WORK" -mindepth 1 -maxdepth 1 ! -name site -exec rm -rf {} +
echo
"$PY" benchmarks/gpu_check.py summary --out "$OUT" "${SMOKE_ARG[@]}" || FAILED=1
[ "${GRL_KEEP_WORK:-0}" = 1 ] || rm -rf "$WORK"
exit "$FAILED"
