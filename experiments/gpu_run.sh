#!/usr/bin/env bash
# One GPU session in one command: install jaxmp into the machine's own jax/flax, measure
# the ceilings, train GPT-2 small and medium (bf16, T=1024), profile, decode. Each model
# runs in its own process under a time limit, so a hang costs one row, not the session.
#   OUT=/tmp/gpu bash experiments/gpu_run.sh        # results: $OUT/*.json, *.log, hlo_*.gz
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # works even if the install fails
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit \
    --format=csv
  $PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
  $PY -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', \
flax.__version__, 'optax', optax.__version__, jax.devices())"
} > "$OUT/env.txt" 2>&1

run() {  # run NAME SECONDS BENCH-FLAGS...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout --kill-after=15 "$limit" $PY -m experiments.bench --suite=gpu \
    --output="$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? after $((SECONDS - t0)) s" >> "$OUT/env.txt"
}
run small "${SMALL_LIMIT:-240}" --gpu_models=small --gpu_profile --gpu_hlo_dir="$OUT" ${SMALL_FLAGS:-}
run medium "${MEDIUM_LIMIT:-180}" --gpu_models=medium --gpu_generate= --gpu_profile ${MEDIUM_FLAGS:-}
cat "$OUT/env.txt"
for f in small medium; do echo "== $f"; grep -v "^WARNING\|^I0000\|^W0000" "$OUT/$f.log" | tail -n 40; done
