#!/usr/bin/env bash
# The GPU check: everything docs/benchmarks.md's GPU section needs, in one run that fits in about
# 8 minutes on one H100/H200, so a short loan of a GPU machine is spent on measuring, not on setup.
#
#   scripts/device_check.sh [OUT_DIR]          # default: device_check/ (ignored by git)
#   DEVICE_CHECK_SMOKE=1 scripts/device_check.sh OUT_DIR   # the same steps at toy sizes, any backend
#
# Steps, each under its own time limit (a step that fails or runs out is reported, the rest go on):
#   1. tests/test_gpu.py: cuDNN attention = einsum in bf16; bf16 greedy rollouts = fp32 (arith fixture)
#   2. bench.py sampler, train, rl-step (the GPU goals' sizes: d20, bf16) with --profile
#   3. bench.py floor (decode matmuls alone) and train with cuDNN attention
#   4. bench.py sampler on the arith fixture checkpoint (real prompts, calculator live), then an
#      eval's shape (128 questions x 8 samples) decoded in 256 refilled slots and all at once
# Output: OUT_DIR/device_check.jsonl (one bench record per line), OUT_DIR/steps.jsonl (rc and seconds
# of each step), a log per step, profiles under OUT_DIR/prof/, and one summary table on stdout.
# Needs jax, flax, optax, orbax, tiktoken and torch (the fixture is a .pt checkpoint); datasets,
# tensorboardX and rustbpe may be missing; no network, no install: jaxrl runs from the tree. Fixtures come
# from $JAXRL_SHARED, else ../shared, else a shared/ copy inside the repo (docs/benchmarks.md, "GPU").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-device_check}
mkdir -p "$OUT/prof"
JSONL=$OUT/device_check.jsonl
: >"$JSONL"
: >"$OUT/steps.jsonl"
if [ -z "${JAXRL_SHARED:-}" ]; then
  if [ -d ../shared/fixtures ]; then JAXRL_SHARED=../shared; else JAXRL_SHARED=shared; fi
fi
export JAXRL_SHARED PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# $PYTHON, else python (an activated venv), else python3 (a GPU image may have no plain `python`)
PY=${PYTHON:-$(command -v python || command -v python3)}
CK=$JAXRL_SHARED/fixtures/nanochat-sft-arith
DATA=$JAXRL_SHARED/data/arith

if [ "${DEVICE_CHECK_SMOKE:-0}" = 1 ]; then  # toy sizes: a rehearsal of every step on any machine
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
  export JAX_NUM_CPU_DEVICES=${JAX_NUM_CPU_DEVICES:-1}  # one device, as on the GPU (bench.py sampler takes a core each)
  MODEL=(--model d4 --dtype float32 --repeats 1 --prompt-len 16)
  SAMPLER=(--rows 4 --max-new-tokens 8)
  TRAIN=(--rows 8 --seq-len 32)
  RLSTEP=(--questions 2 --num-samples 2 --max-new-tokens 8 --device-batch-size 2)
  FLOOR=(--rows 4 --steps 4)
  ARITH=(--prompts 1 --num-samples 2 --max-new-tokens 8 --repeats 1)
  EVAL=(--prompts 2 --num-samples 2 --max-new-tokens 8 --repeats 1)
  SLOTS=1
  BUDGET=${DEVICE_CHECK_BUDGET:-900}
else
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda,cpu}  # cuda first (the default backend); cpu runs the calculator
  MODEL=(--model d20)
  SAMPLER=(--rows 8,256)
  TRAIN=()
  RLSTEP=()
  FLOOR=(--rows 8,256)
  ARITH=(--prompts 16 --num-samples 16 --max-new-tokens 256)
  EVAL=(--prompts 128 --num-samples 8 --max-new-tokens 256)
  SLOTS=256
  BUDGET=${DEVICE_CHECK_BUDGET:-480}
fi
START=$SECONDS
FAILED=0

# step NAME LIMIT_S CMD...: runs CMD under min(LIMIT_S, what is left of BUDGET), logs it, records rc
step() {
  local name=$1 limit=$2 left=$((BUDGET - (SECONDS - START)))
  shift 2
  ((left < limit)) && limit=$left
  if ((limit < 10)); then
    echo "== $name: not run, the ${BUDGET} s budget is spent"
    echo "{\"step\": \"$name\", \"rc\": null, \"seconds\": 0}" >>"$OUT/steps.jsonl"
    FAILED=1
    return
  fi
  echo "== $name (at most $limit s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >>"$OUT/steps.jsonl"
  ((rc == 0)) || FAILED=1
}

"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee "$OUT/devices.log"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$OUT/devices.log"
git rev-parse HEAD 2>/dev/null | tee -a "$OUT/devices.log"

step gpu_tests 150 "$PY" -m pytest -q -rs -m gpu tests/test_gpu.py -p no:cacheprovider
if [[ "$JAX_PLATFORMS" == cuda* ]] && grep -q "skipped" "$OUT/gpu_tests.log"; then
  echo "== gpu_tests: a GPU check was skipped on the GPU machine (see the reason above): counted as a failure"
  FAILED=1
fi
step sampler 150 "$PY" scripts/bench.py sampler "${MODEL[@]}" "${SAMPLER[@]}" --profile "$OUT/prof" --out "$JSONL"
step train 90 "$PY" scripts/bench.py train "${MODEL[@]}" "${TRAIN[@]}" --profile "$OUT/prof" --out "$JSONL"
step rl_step 150 "$PY" scripts/bench.py rl-step "${MODEL[@]}" "${RLSTEP[@]}" --profile "$OUT/prof" --out "$JSONL"
step floor 45 "$PY" scripts/bench.py floor "${MODEL[@]}" "${FLOOR[@]}" --out "$JSONL"
if [[ "$JAX_PLATFORMS" == cuda* ]]; then
  step train_cudnn 60 env JAXRL_ATTENTION=cudnn "$PY" scripts/bench.py train "${MODEL[@]}" "${TRAIN[@]}" --out "$JSONL"
fi
step sampler_arith 90 "$PY" scripts/bench.py sampler --checkpoint "$CK" --data-dir "$DATA" "${ARITH[@]}" --out "$JSONL"
step eval_slots 60 "$PY" scripts/bench.py sampler --checkpoint "$CK" --data-dir "$DATA" "${EVAL[@]}" --slots "$SLOTS" --out "$JSONL"
step eval_all_rows 60 "$PY" scripts/bench.py sampler --checkpoint "$CK" --data-dir "$DATA" "${EVAL[@]}" --slots 0 --out "$JSONL"

"$PY" -m benchmarks.summary "$JSONL" "$OUT/steps.jsonl"
echo "device check: $((SECONDS - START)) s; records in $JSONL"
exit $FAILED
