#!/usr/bin/env bash
# Device check for soljax's Pallas kernels: the kernel tests natively on the GPU (Triton), then
# `soljax bench kernels --json`. Run from the repository root; results go to $OUT (default ./gpu_out).
# Works without installing soljax: kernels/ is exposed as soljax.kernels through a symlink.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
[ -e soljax/kernels ] || ln -s ../kernels soljax/kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.txt" 2>&1
python3 -c "import jax; print(jax.__version__, jax.devices())" >> "$OUT/device.txt" 2>&1
# native GPU kernels (TestQuestAttentionGpu, TestSparseMlpGpu) and the reference checks
JAX_PLATFORMS=cuda timeout 100 python3 -m pytest -q -p no:cacheprovider -k "not Interpret and not Tpu" \
  tests/test_kernels_attention.py tests/test_kernels_mlp.py > "$OUT/tests.txt" 2>&1
echo "tests rc=$?" >> "$OUT/tests.txt"
for b in 1 8; do  # one file per batch size, so a slow half cannot lose the other
  timeout 110 python3 -m soljax.cli bench kernels --batch $b --json > "$OUT/bench_b$b.json" 2> "$OUT/bench_b$b.err"
  echo "bench rc=$?" >> "$OUT/bench_b$b.err"
done
tail -5 "$OUT/tests.txt"; tail -3 "$OUT"/bench_b*.err
