#!/usr/bin/env bash
# The GPU check, for a session that is lent a GPU for a few minutes (H100/H200): everything the
# CPU cannot show. Each step has its own time limit and a failing step does not stop the next, so
# one bad step costs only its own minutes.
#   1. tests/test_kernels.py on CUDA tensors: compiled kernels, bf16, autotuned tiles, torch.compile
#   2. tools/bench_kernels.py --bench: fwd+bwd time and peak memory against SDPA-flash and eager (bf16)
#   3. data.py + distill.py config/parent_1gpu.py for 100 steps: bf16 autocast, torch.compile, MFU
#   4. sample.py from that checkpoint: generation with the KV cache and flash-decoding on the GPU
# Usage: bash gpu_check.sh [all|kernels|train]    kernels = steps 1-2 (at most 8.5 minutes), train =
# steps 3-4 (at most 4.5); `all` can reach 13 minutes at the limits, past a 10-minute device call, so
# on the device tool run `kernels` and `train` as two calls.
# Logs go to $OUT (the device tool's folder) or out/gpu_check.
set -u
cd "$(dirname "$0")"
LOG=${OUT:-out/gpu_check}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}   # the device machine has python3 (with torch), not always python
failed=()

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$LOG/$name.log"
  rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start))s"
  [ "$rc" -eq 0 ] || failed+=("$name")
}

part=${1:-all}
case $part in all|kernels|train) ;; *) echo "usage: bash gpu_check.sh [all|kernels|train]"; exit 2;; esac
step versions 30 "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', \
triton.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO GPU')"
if [ "$part" != train ]; then
  # -v and --durations: a run cut off at its limit still shows which test it was in, and the slow ones
  step tests 240 "$PY" -m pytest -v --durations=15 tests/test_kernels.py
  step bench 240 "$PY" tools/bench_kernels.py --bench --seqlens=1024,2048,4096,8192
fi
if [ "$part" != kernels ]; then
  step data 30 "$PY" data.py
  step distill 150 "$PY" distill.py config/parent_1gpu.py --max_steps=100
  step sample 45 "$PY" sample.py --ckpt=out/parent_gpu --chat=False --prompt="3+5+2+7 / " --max_new_tokens=64
  [ -f out/parent_gpu/metrics.jsonl ] && cp out/parent_gpu/metrics.jsonl "$LOG/distill_metrics.jsonl"
fi
echo "failed steps: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
