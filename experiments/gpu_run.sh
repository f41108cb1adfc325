#!/usr/bin/env bash
# One GPU session in one command: install jaxmp into the machine's own jax/flax, measure
# the ceilings, train GPT-2 small and medium (bf16, T=1024) with scanned and unrolled
# layers, profile, decode. Each measurement runs in its own process under a time limit,
# so a hang or an unknown XLA flag costs one row, not the session.
#   OUT=/tmp/gpu bash experiments/gpu_run.sh   # $OUT: env.txt, runs.log, *.json, hlo.tgz
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT/hlo"
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

run() {  # run NAME SECONDS EXTRA-XLA-FLAGS BENCH-FLAGS...
  local name=$1 limit=$2 xla=$3
  shift 3
  local t0=$SECONDS
  echo "===== $name (XLA_FLAGS+='$xla') $*" >> "$OUT/runs.log"
  XLA_FLAGS="${XLA_FLAGS:-} $xla" timeout --kill-after=15 "$limit" $PY -m experiments.bench \
    --suite=gpu --output="$OUT/$name.json" "$@" >> "$OUT/runs.log" 2>&1
  echo "$name: exit $? after $((SECONDS - t0)) s" >> "$OUT/env.txt"
}
H="--gpu_hlo_dir=$OUT/hlo"
# small: scanned + unrolled, with the fused loss (default) and --nofused_loss, bf16 and
# fp8, decoding, the head + loss rows; medium: bf16 and fp8
run small "${SMALL_LIMIT:-330}" "" --gpu_models=small --gpu_profile $H \
  --gpu_fp8_models=small --gpu_unfused_models=small
run medium "${MEDIUM_LIMIT:-240}" "" --gpu_models=medium --gpu_generate= --gpu_profile $H \
  --gpu_fp8_models=medium --gpu_unfused_models= --gpu_head_batch=0
run small_b64 "${B64_LIMIT:-120}" "" --gpu_models=small --gpu_batches=small:64 \
  --gpu_scan_layers=false --gpu_generate= --gpu_fp8_models= --gpu_unfused_models= \
  --gpu_head_batch=0
tar czf "$OUT/hlo.tgz" -C "$OUT" hlo && rm -r "$OUT/hlo"
cat "$OUT/env.txt"
grep -v "^WARNING\|^I0000\|^W0000\|^ \{5\}" "$OUT/runs.log" | grep -v "^\s*[0-9.]* ms .*x[0-9]" | tail -n 60
