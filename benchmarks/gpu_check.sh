#!/usr/bin/env bash
# One short GPU check (about 3-5 minutes on one H100): memscan vs the reference per-prompt
# protocol on the FULL SD architectures with seeded random weights, built directly on the GPU.
#
#   1. sd-v1 (SD v1.4 shape, 860 M UNet), 512x512, bf16: 256 prompts, batch 8/16/32, reference 16
#   2. sd-v2 (SD 2 768-v shape), 768x768, bf16: 128 prompts, batch 8/16/32, reference 8
#   3. sd-v1, 512x512, fp32 without TF32: 32 prompts, reference 8 -> scores must be EQUAL
#
# Results: $OUT/<step>.json (see benchmarks/README.md), logs $OUT/<step>.log, $OUT/gpu_check.log.
# Needs: python3 with torch (CUDA), diffusers, transformers; memscan importable from the checkout
# (PYTHONPATH gets the repository root; SITE=DIR also puts DIR, a `pip install --target DIR` of
# the dependencies, in front: use a folder only you can write, e.g. from `mktemp -d`).
# Run from the repository root:  OUT=/some/folder bash benchmarks/gpu_check.sh
# SMOKE=1 runs the same steps on the tiny model on CPU in seconds (to test this script).
set -euo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error

cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_check}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
# Only a folder the caller names goes on the import path: never a fixed, world-writable one
# under /tmp, where anyone on the machine could plant a module that this script imports.
if [ -n "${SITE:-}" ]; then
    [ -d "$SITE" ] || { echo "SITE=$SITE is not a folder" >&2; exit 2; }
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

if [ "${SMOKE:-0}" = "1" ]; then
    V1=(--arch tiny --device cpu --resolution 64)
    V2=(--arch tiny --device cpu --resolution 64)
    DT=(--dtype bf16)
    THREADS=1
else
    V1=(--arch sd-v1 --device cuda --resolution 512)
    V2=(--arch sd-v2 --device cuda --resolution 768)
    DT=(--dtype bf16)
    THREADS=4
fi

echo "== gpu_check $(date -u +%FT%TZ) in $PWD, results in $OUT"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PYTHON" - <<'EOF'
import sys
import torch, diffusers, transformers
import memscan
print(f"python {sys.version.split()[0]}  torch {torch.__version__} (cuda {torch.version.cuda})  "
      f"diffusers {diffusers.__version__}  transformers {transformers.__version__}  "
      f"memscan from {memscan.__file__}")
print("cuda available:", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF

status=0
step() {  # step NAME SECONDS ARGS...: one benchmark process; a failed step is recorded, not fatal
    local name="$1" limit="$2"
    shift 2
    echo
    echo "== $name: throughput.py $*"
    local start=$SECONDS rc=0
    timeout --kill-after=10 "$limit" "$PYTHON" benchmarks/throughput.py --threads "$THREADS" \
        --json "$OUT/$name.json" "$@" 2>&1 | tee "$OUT/$name.log" || rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" = 0 ] || status=1
}

step sd-v1-bf16 170 "${V1[@]}" "${DT[@]}" --prompts 256 --batch-size 8,16,32 --reference-prompts 16
step sd-v2-bf16 130 "${V2[@]}" "${DT[@]}" --prompts 128 --batch-size 8,16,32 --reference-prompts 8
step sd-v1-fp32 80 "${V1[@]}" --dtype fp32 --no-tf32 --prompts 32 --batch-size 16 --reference-prompts 8

echo
echo "== gpu_check done in ${SECONDS} s, status $status"
ls -l "$OUT"
exit "$status"
