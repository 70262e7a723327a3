#!/usr/bin/env bash
# Issue 15's GPU run, in one command of about 8-9 minutes on one H200: every row of its section 1
# and the levers of section 2, on the FULL SD architectures with seeded random weights built on
# the GPU (the cost of the real models, without their weights). Steps, in order (each has its own
# time limit, and all of them share BUDGET seconds; a failed or skipped step is logged and the
# next one runs):
#
#   sd-v1-bf16     SD v1.4 shape, 512 px, bf16: 512 prompts at batch 8/16/32/64/auto (prompts/s,
#                  UNet share, peak memory, warm-up), reference protocol (4n batch-1 calls) on 16
#   sd-v1-fp32     the same model in fp32, TF32 off: memscan equals the reference to 1e-4
#   sd-v1-levers   batch 64: default (CUDA: prefetch + channels_last) vs sequential (neither),
#                  no-prefetch, no-channels-last; ratios and score differences to the default
#   sd-v2-bf16     SD 2 768-v shape, 768 px, bf16: 256 prompts at batch 8/16/32/auto, reference on 8
#   oom            a real CUDA out-of-memory under a 16 GiB cap: a batch 4x too large halves down
#                  and completes with the scores of a clean run; `auto` must not hit one
#   methods        sharpness and wen:steps=10 (and anisotropy) seconds per prompt, bf16; sharpness fp32
#   mitigate       text search and embedding optimisation seconds per prompt
#   sd-v1-compile  batch 64: default vs --compile (warm-up = time to first score, compile included)
#   sd-v1-fp32-compile  --compile in fp32, TF32 off: equals the reference (uncompiled) to 1e-4
#   cpu-demo       the CPU path on the demo model (4 threads): prefetch off (the CPU default) vs on
#   oom-card       the out-of-memory check on the whole card, no cap
#
# Run it from the repository root:
#   OUT=/some/folder bash benchmarks/gpu_check.sh
# Results ($OUT holds 4 files, as the device tool brings back at most 8):
#   $OUT/summary.md        the table of every step (also printed last)
#   $OUT/summary.json      every step's JSON under one object
#   $OUT/steps.tar.gz      per-step JSON and logs (rewritten after every step)
#   $OUT/gpu_check.log     this script's whole output
# Needs python3 with CUDA torch and transformers; diffusers may come as a wheel: when `.whl/`
# holds wheels and python3 cannot import diffusers (or WHEELS=1), they are installed with
# `pip install --no-index --no-deps --target` into a fresh private folder put on PYTHONPATH.
# Build that folder here, with the version this checkout's venv runs:
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: -d .whl \
#       "diffusers==$(.venv/bin/python -c 'import diffusers; print(diffusers.__version__)')"
# (`.whl/` is gitignored: a device run must carry it). SITE=DIR puts an existing
# `pip install --target DIR` on the path instead (a folder only you can write).
# SMOKE=1 runs every step on the tiny model on CPU (minutes; `oom` says it needs CUDA), to test
# this script; PYTHON=.venv/bin/python picks the interpreter; STEPS="a b" runs some steps only.
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error

cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-out/gpu_check}"
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
PYTHON="${PYTHON:-python3}"
BUDGET="${BUDGET:-560}"  # seconds for everything (GPU): the device tool stops a command at 600
WORK="$(mktemp -d)"      # per-step JSON and logs, packed into $OUT/steps.tar.gz
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
echo "== gpu_check $(date -u +%FT%TZ) in $PWD, results in $OUT"

# Only a folder the caller names, or one made here, goes on the import path: never a fixed,
# world-writable one under /tmp, where anyone on the machine could plant a module.
if [ -n "${SITE:-}" ]; then
    [ -d "$SITE" ] || { echo "SITE=$SITE is not a folder" >&2; exit 2; }
elif compgen -G ".whl/*.whl" >/dev/null && { [ "${WHEELS:-0}" = "1" ] || ! "$PYTHON" -c "import diffusers" 2>/dev/null; }; then
    SITE="$(mktemp -d)"
    echo "== installing $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')into $SITE"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || { echo "wheel install failed" >&2; exit 2; }
fi
export PYTHONPATH="${SITE:+$SITE:}$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "${SMOKE:-0}" = "1" ]; then
    V1=(--arch tiny --device cpu --resolution 64)
    V2=(--arch tiny --device cpu --resolution 64)
    CPU=(--arch tiny --device cpu)
    N1=48; N2=32; NL=48; NR=4; NF=8; NM=6; NX=8; BIG=24; THREADS=1
    BUDGET="${BUDGET_SMOKE:-2400}"  # a busy CPU, and inductor compiles on it for minutes when cold
    LIMIT_SCALE=4
else
    V1=(--arch sd-v1 --device cuda --resolution 512)
    V2=(--arch sd-v2 --device cuda --resolution 768)
    CPU=(--device cpu)  # the demo model
    N1=512; N2=256; NL=512; NR=16; NF=32; NM=16; NX=8; BIG=64; THREADS=4
    LIMIT_SCALE=1
fi

echo "== budget ${BUDGET} s$([ "${SMOKE:-0}" = 1 ] && echo ', SMOKE: tiny model on CPU')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
"$PYTHON" - <<'EOF' || { echo "the environment cannot import torch, diffusers, transformers and memscan" >&2; exit 2; }
import sys
import torch, diffusers, transformers
import memscan
print(f"python {sys.version.split()[0]}  torch {torch.__version__} (cuda {torch.version.cuda})  "
      f"diffusers {diffusers.__version__} from {diffusers.__file__}  transformers {transformers.__version__}  "
      f"memscan {memscan.__version__} from {memscan.__file__}")
print("cuda available:", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF

status=0
ran=()
pack() { tar -czf "$OUT/steps.tar.gz.part" -C "$WORK" . && mv "$OUT/steps.tar.gz.part" "$OUT/steps.tar.gz"; }
wanted() { [ -z "${STEPS:-}" ] || [[ " $STEPS " == *" $1 "* ]]; }
step() {  # step NAME LIMIT SCRIPT ARGS...: one process, min(LIMIT, what is left of BUDGET) seconds
    local name="$1" limit="$2" script="$3"
    shift 3
    wanted "$name" || return 0
    limit=$((limit * LIMIT_SCALE))
    local left=$((BUDGET - SECONDS - 15))
    if [ "$left" -lt 30 ]; then
        echo "== $name: SKIPPED, ${left} s of the budget left"
        status=1
        return 0
    fi
    [ "$limit" -le "$left" ] || limit="$left"
    echo
    echo "== $name ($limit s): $script $*"
    local start=$SECONDS rc=0
    timeout --kill-after=10 "$limit" "$PYTHON" "benchmarks/$script" "$@" --json "$WORK/$name.json" 2>&1 \
        | tee "$WORK/$name.log"
    rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s (script at $SECONDS s)"
    [ "$rc" = 0 ] || status=1
    ran+=("$name")
    pack
}

step sd-v1-bf16 120 throughput.py "${V1[@]}" --dtype bf16 --threads "$THREADS" --prompts "$N1" \
    --batch-size 8,16,32,"$BIG",auto --reference-prompts "$NR"
step sd-v1-fp32 60 throughput.py "${V1[@]}" --dtype fp32 --no-tf32 --threads "$THREADS" \
    --prompts "$NF" --batch-size 16 --reference-prompts 8
step sd-v1-levers 90 throughput.py "${V1[@]}" --dtype bf16 --threads "$THREADS" --prompts "$NL" \
    --batch-size "$BIG" --reference-prompts 0 --variants default,sequential,no-prefetch,no-channels-last
step sd-v2-bf16 100 throughput.py "${V2[@]}" --dtype bf16 --threads "$THREADS" --prompts "$N2" \
    --batch-size 8,16,32,auto --reference-prompts 8
step oom 60 gpu_steps.py oom "${V1[@]}" --dtype bf16 --threads "$THREADS" --cap-gib 16
step methods 70 gpu_steps.py methods "${V1[@]}" --dtype bf16 --threads "$THREADS" --prompts "$NM"
step mitigate 70 gpu_steps.py mitigate "${V1[@]}" --dtype bf16 --threads "$THREADS" --prompts "$NX"
step sd-v1-compile 200 throughput.py "${V1[@]}" --dtype bf16 --threads "$THREADS" --prompts "$NL" \
    --batch-size "$BIG" --reference-prompts 0 --variants default,compile
step sd-v1-fp32-compile 150 throughput.py "${V1[@]}" --dtype fp32 --no-tf32 --threads "$THREADS" \
    --prompts "$NF" --batch-size 16 --reference-prompts 8 --variants default,compile
step cpu-demo 40 throughput.py "${CPU[@]}" --threads "$THREADS" --prompts 256 \
    --reference-prompts 8 --variants default,prefetch
step oom-card 60 gpu_steps.py oom "${V1[@]}" --dtype bf16 --threads "$THREADS" --cap-gib 0

echo
echo "== summary of ${ran[*]:-no step}"
if [ "${#ran[@]}" -gt 0 ]; then
    steps_csv="$(IFS=,; echo "${ran[*]}")"
    "$PYTHON" benchmarks/gpu_steps.py summary "$WORK" --steps "$steps_csv" \
        --json "$OUT/summary.json" --markdown "$OUT/summary.md" || status=1
fi
pack
echo "== gpu_check done in ${SECONDS} s, status $status"
ls -l "$OUT"
exit "$status"
