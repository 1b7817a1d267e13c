#!/usr/bin/env bash
# One GPU check of Turbo (issue 14, item 6): kernels vs the PyTorch merge, ViT-B/16 throughput, pytest -m gpu.
#
#   bash scripts/gpu_check.sh [--cpu-smoke] [--only kernels,throughput]
#
# Run from anywhere on a CUDA machine (~3 minutes, hard cap 350 s). Writes $OUT/gpu_check.json when OUT is set,
# else ./gpu_check.json, then prints it. The package need not be installed: PYTHONPATH gets the repository root
# and plugins/. PYTHON picks the interpreter (default: the first of python3 / python that imports torch).
# scripts/gpu_check.py says what each section measures.
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    RESULT="$OUT/gpu_check.json"
else
    RESULT="$PWD/gpu_check.json"
fi
case "$RESULT" in /*) ;; *) RESULT="$PWD/$RESULT" ;; esac

if [ -z "${PYTHON:-}" ]; then
    for candidate in python3 python; do
        if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then
            PYTHON="$candidate"
            break
        fi
    done
    PYTHON="${PYTHON:-python3}"
fi

export PYTHONPATH="$ROOT:$ROOT/plugins${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"

rm -f "$RESULT"
cd "$ROOT"
timeout -k 5 "${GPU_CHECK_HARD_TIMEOUT_S:-350}" "$PYTHON" scripts/gpu_check.py --out "$RESULT" "$@"
status=$?
if [ ! -s "$RESULT" ]; then
    printf '{"error": "scripts/gpu_check.py exited with status %s before writing any result (python: %s)"}\n' \
        "$status" "$PYTHON" >"$RESULT"
elif [ "$status" -ne 0 ]; then
    echo "gpu_check: scripts/gpu_check.py exited with status $status; $RESULT holds the sections finished by then" >&2
fi
cat "$RESULT"
echo "gpu_check: wrote $RESULT" >&2
