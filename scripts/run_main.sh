#!/usr/bin/env bash
# The main job on the embedded default data, from a fresh clone:
#   1. set up .venv (idempotent),  2. generate the offline OC20-style S2EF data (skipped if present),
#   3. train LEIGNN with the plain fairchem CLI,  4. report energy/force MAE on the four val splits.
# Extra arguments go to `fairchem --mode train` (e.g. --optim.max_epochs=2).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup_env.sh
VENV=${LEIGNN_VENV:-$ROOT/.venv}
PY="$VENV/bin/python"
CONFIG=${LEIGNN_CONFIG:-configs/s2ef/default/leignn.yml}
RUN_DIR=${LEIGNN_RUN_DIR:-runs/default}

"$PY" scripts/generate_data.py --out data/default

echo "[main] training: fairchem --mode train --config-yml $CONFIG --cpu --run-dir $RUN_DIR"
"$VENV/bin/fairchem" --mode train --config-yml "$CONFIG" --cpu --run-dir "$RUN_DIR" --identifier leignn "$@"

CKPT=$(ls -t "$RUN_DIR"/checkpoints/*/best_checkpoint.pt 2>/dev/null | head -n 1 || true)
[[ -n "$CKPT" ]] || CKPT=$(ls -t "$RUN_DIR"/checkpoints/*/checkpoint.pt | head -n 1)
echo "[main] evaluating $CKPT on val_id, val_ood_ads, val_ood_cat, val_ood_both"
"$VENV/bin/leignn-evaluate" --checkpoint "$CKPT" --data data/default/s2ef --out results/default

