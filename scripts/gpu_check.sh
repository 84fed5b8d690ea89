#!/usr/bin/env bash
# The accelerator checks of soljax's decode path in one prepared run, from the repository root:
#   scripts/gpu_check.sh [all|kernels|decode]      results in $OUT (default ./gpu_out)
# kernels: the Pallas kernel tests natively, then `soljax bench kernels --json` at batch 1 and 8;
# decode: `soljax bench decode --shape ...` (random weights, so no model files are needed): the
# embedded model's shape at 1,024-8,000 tokens, then a Llama-3.1-8B-shaped model at 32,768 tokens,
# dense against token keep 0.1 on the fast path, with the XLA ops and with the kernels.
# Each step writes its own file under its own timeout, so a slow step cannot lose the others
# (about 9 minutes in all); the device, the exit codes and every step's stderr go to log.txt (the
# results are 7 files: a device tool brings back at most 8). SOLJAX_DRY_RUN=1 runs the same steps on the CPU at tiny sizes, with
# the kernels interpreted: a check of the script itself. Needs only the packages soljax imports
# (soljax itself is read from this checkout).
set -u
PART=${1:-all}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
if [ "${SOLJAX_DRY_RUN:-0}" = 1 ]; then
  export JAX_PLATFORMS=cpu
  KERNELS="--context 256 --repeats 1"
  SMALL="--shape llama-tiny --context 64 128 --tokens 16"
  LARGE="--shape llama-tiny --context 256 --tokens 16"
else
  export JAX_PLATFORMS=cuda
  KERNELS=""
  SMALL="--shape smollm2-135m --context 1024 4096 8000 --tokens 32"
  LARGE="--shape llama-3.1-8b --context 32768 --tokens 32"
fi
SOLJAX="python3 -m soljax.cli"
LOG=$OUT/log.txt
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import jax; print(jax.__version__, jax.devices())" 2>&1; } > "$LOG"
step() {  # step NAME OUTFILE TIMEOUT COMMAND...: stdout to OUTFILE, stderr and the exit code to the log
  local name=$1 out=$2 limit=$3; shift 3
  echo "== $name" >> "$LOG"
  timeout "$limit" "$@" > "$out" 2>> "$LOG"
  echo "== $name rc=$?" >> "$LOG"
}

if [ "$PART" = all ] || [ "$PART" = kernels ]; then
  step tests "$OUT/tests.txt" 90 python3 -m pytest -q -p no:cacheprovider -k "not Interpret and not Tpu" tests/kernels
  for b in 1 8; do
    step "kernels batch $b" "$OUT/kernels_b$b.json" 90 $SOLJAX bench kernels --batch $b $KERNELS --json
  done
fi
if [ "$PART" = all ] || [ "$PART" = decode ]; then
  step "decode small" "$OUT/decode_small.json" 120 \
    $SOLJAX bench decode $SMALL --impl xla pallas --no-replay --targets "0.1,1,16;0.2,0.7,16" --json
  for impl in xla pallas; do
    step "decode large $impl" "$OUT/decode_large_$impl.json" 100 \
      $SOLJAX bench decode $LARGE --impl $impl --no-replay --targets "0.1,1,16;0.1,0.5,16" --json
  done
fi
grep -E "^== .* rc=|passed|failed" "$LOG" "$OUT/tests.txt"
