#!/usr/bin/env bash
# IR-101 in bfloat16 on a GPU machine: images/s, MFU, memory and compile time
# of the train and inference steps at 256 and 512 images per device.
#
#   bash bench/gpu.sh            # from the repository root or anywhere
#   WHEELHOUSE=/path/to/wheels bash bench/gpu.sh   # offline install
#
# Needs jax with its CUDA plugin already installed. When the project's other
# dependencies (flax, optax, grain, ...) are missing it runs
# `pip install -e .` first, from WHEELHOUSE only when that is set. Each
# batch size runs in its own process (its own peak memory) under a time
# limit; the whole script stays within about 8 minutes. Output goes to the
# terminal and to ${OUT:-.}/gpu_bench.txt.
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
LOG="${OUT:-.}/gpu_bench.txt"
: > "$LOG"

say() { echo "$@" | tee -a "$LOG"; }

NEEDED="import cv2, flax, grain, ml_collections, optax, orbax.checkpoint"
if ! "$PYTHON" -c "$NEEDED" 2>/dev/null; then
  say "installing the project (pip install -e .)"
  if [ -n "${WHEELHOUSE:-}" ]; then
    "$PYTHON" -m pip install -q --no-index --find-links "$WHEELHOUSE" -e . \
      2>&1 | tail -3 | tee -a "$LOG"
  else
    "$PYTHON" -m pip install -q -e . 2>&1 | tail -3 | tee -a "$LOG"
  fi
fi

"$PYTHON" - <<'EOF' 2>&1 | tee -a "$LOG"
import jax
print("jax", jax.__version__, "devices:", jax.devices())
if jax.devices()[0].platform != "gpu":
  raise SystemExit("no GPU visible to JAX; stopping")
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv \
  2>/dev/null | tee -a "$LOG"

# Per device batch; the global batch is this times the device count.
DEVICES="$("$PYTHON" -c 'import jax; print(jax.device_count())' 2>/dev/null)"
for PER_DEVICE in 256 512; do
  BATCH=$((PER_DEVICE * DEVICES))
  say ""
  say "=== ir_101 bfloat16, ${PER_DEVICE} images per device (global ${BATCH})"
  # 200 s covers both compilations (about a minute each) and the timing.
  timeout 200 "$PYTHON" bench/train_step.py --model ir_101 \
      --dtype bfloat16 --batch "$BATCH" --classes 85742 \
      --frameworks jax --steps 10 --repeats 3 2>&1 \
    | grep -v -i "warning" | tee -a "$LOG"
  status="${PIPESTATUS[0]}"
  if [ "$status" -ne 0 ]; then
    say "(exit status $status; 124 means it ran past 200 s)"
  fi
done
say ""
say "written to $LOG"
