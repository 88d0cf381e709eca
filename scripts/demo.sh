#!/usr/bin/env bash
# Trains AdaFace on the generated synthetic identities, then evaluates it on
# held-out synthetic pairs. Extra arguments go to train.py, e.g.
#   scripts/demo.sh --config.schedule.total_epochs=2
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"

WORKDIR="${WORKDIR:-runs/synthetic}"
python train.py --config configs/synthetic.py --workdir "$WORKDIR" \
  --config.eval.after_training=false "$@"
python eval.py --config configs/synthetic.py --workdir "$WORKDIR"
