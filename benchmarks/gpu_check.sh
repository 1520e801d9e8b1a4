#!/usr/bin/env bash
# The GPU checks of issue 12 in one run (~5-6 min on one H100; each step has a hang guard):
#   the CUDA tests, the CGC step vs cross-entropy (batch 64 and 256, with and without channels_last),
#   the training loader vs the GPU step, few-shot trials packed on one GPU.
# Each step writes its stdout to $OUT/<step>.out and its stderr to $OUT/<step>.err; a failing step is
# recorded in $OUT/status.tsv (step, exit code, seconds, command) and the next one runs. The script exits
# non-zero when any step failed.
#
#   bash benchmarks/gpu_check.sh                 # results in ./gpu_out/
#   OUT=/somewhere bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
STATUS="$OUT/status.tsv"
printf 'step\trc\tseconds\tcommand\n' >"$STATUS"
failed=0

step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2 rc=0 t0=$SECONDS
    shift 2
    echo "== $name: $*" >&2
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.out" 2>"$OUT/$name.err" || rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$*" >>"$STATUS"
    echo "   rc=$rc after $((SECONDS - t0)) s (124: timed out)" >&2
    if [ "$rc" -ne 0 ]; then failed=1; fi
}

step env 60 bash -c "nvidia-smi -L && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv && \
    $PY -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.version.cuda, \
    torch.cuda.is_available(), torch.cuda.get_device_name(0))' && { git rev-parse HEAD && git status --short || true; }"
step pytest_gpu 240 "$PY" -m pytest -q -m gpu tests/test_cuda.py -p no:cacheprovider --junitxml "$OUT/pytest_gpu.xml"
# step.py --amp runs every kind as the product trains on CUDA (fp16 autocast + GradScaler); the fp32 run beside it
step step_b64_fp32 150 "$PY" benchmarks/step.py --device cuda --archs resnet18,resnet50 --batch 64 --reps 3 --json
for batch in 64 256; do
    step "step_b${batch}" 150 "$PY" benchmarks/step.py --device cuda --amp --archs resnet18,resnet50 \
        --batch "$batch" --reps 3 --json
    step "step_b${batch}_channels_last" 150 "$PY" benchmarks/step.py --device cuda --amp --archs resnet18,resnet50 \
        --batch "$batch" --reps 3 --channels-last --json
done
step loader 180 "$PY" benchmarks/loader.py --gpu-step --workers 0,1,2,4 --json
step fewshot_packing 240 "$PY" benchmarks/fewshot_packing.py --json
if (( SECONDS < 360 )); then  # room left: packing at a smaller batch, should batch 256 not fit four times
    step fewshot_packing_b64 120 "$PY" benchmarks/fewshot_packing.py --batch 64 --seconds 5 --json
else
    printf 'fewshot_packing_b64\tskipped\t0\tno time left (%s s used)\n' "$SECONDS" >>"$STATUS"
fi

echo "== done in $SECONDS s; $OUT/status.tsv:" >&2
column -t -s $'\t' "$STATUS" >&2 || cat "$STATUS" >&2
exit "$failed"
