#!/usr/bin/env bash
# Train LEIGNN on OC20 S2EF-200K on a Slurm cluster through fairchem's submitit path.
# Run on the login node from the repo root, with the project venv (scripts/setup_env.sh) on a
# filesystem the compute nodes share: submitit pickles the job and the node re-imports
# leignn_ocp from that venv (it is installed there, editable), so nothing else is needed on the node.
#
#   bash scripts/slurm_example.sh                       # one job: 1 node x 8 GPUs, DDP over 8 ranks
#   SWEEP=1 bash scripts/slurm_example.sh               # the Table 2 ablation as a job array
#   PARTITION=gpu NODES=2 GPUS=4 bash scripts/slurm_example.sh --optim.batch_size=16
#   SCALE=1 NODES=2 GPUS=8 bash scripts/slurm_example.sh   # keep the 1-GPU recipe's meaning on 16 ranks
#
# Extra arguments go to fairchem (config overrides). Environment knobs:
#   PARTITION (default: $SLURM_PARTITION or "gpu")  NODES (1)  GPUS per node (8)  HOURS (72)
#   MEM_GB per node (80)  CONFIG (configs/s2ef/200k/leignn.yml)  LOGDIR (logs)  RUN_DIR (runs/200k)
#   ACCOUNT / QOS (optional)  CHECKPOINT_EVERY (500 steps)
#   SCALE=1: --scale-recipe-to-world-size   SCALE_LR (none | linear | sqrt, with SCALE=1)
#
# Every recipe in configs/s2ef/{50k,200k,2M,all}/ is written for ONE GPU: optim.eval_every,
# SchNet's and DimeNet++'s warmup_steps / lr_milestones, and ema_decay count optimizer steps of one
# rank, and optim.batch_size is per rank. On W = NODES x GPUS ranks an epoch has W times fewer steps:
# 200K LEIGNN on 16 ranks validates 5 times in 80 epochs instead of 80 (so its ReduceLROnPlateau,
# patience 5 validations, never fires), and SchNet/DimeNet++ end before their warm-up does. With
# SCALE=1 the launcher divides those step counts by W (eval_every 5000 -> 312 on 16 ranks; the
# CHECKPOINT_EVERY above too), raises ema_decay to the power W and logs each change; the effective
# batch is still batch_size x W (512 for LEIGNN on 16 ranks), at the recipe's learning rate unless
# SCALE_LR=linear (x W) or sqrt (x sqrt W). Off by default: without it the recipe runs as written.
# configs/s2ef/default/ validates once per epoch (no eval_every), which does not depend on W.
#
# Preemption / time-out: Slurm sends SIGUSR2 90 s before the end; the job saves checkpoint.pt at the
# next step boundary and requeues itself (at most 3 time-outs, fairchem's slurm_max_num_timeout).
# optim.checkpoint_every bounds the work lost if a node dies without that signal; the requeued job
# or a rerun with the same --timestamp-id picks up <run_dir>/checkpoints/<timestamp_id>/checkpoint.pt.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${LEIGNN_VENV:-$ROOT/.venv}/bin/python
CONFIG=${CONFIG:-configs/s2ef/200k/leignn.yml}

ARGS=(--mode train --config-yml "$CONFIG" --submit
      --slurm-partition "${PARTITION:-${SLURM_PARTITION:-gpu}}"
      --num-nodes "${NODES:-1}" --num-gpus "${GPUS:-8}"
      --slurm-timeout "${HOURS:-72}" --slurm-mem "${MEM_GB:-80}"
      --logdir "${LOGDIR:-logs}" --run-dir "${RUN_DIR:-runs/200k}"
      --identifier "${IDENTIFIER:-leignn200k}"
      --optim.checkpoint_every="${CHECKPOINT_EVERY:-500}")
[[ -n "${ACCOUNT:-}" ]] && ARGS+=(--slurm-account "$ACCOUNT")
[[ -n "${QOS:-}" ]] && ARGS+=(--slurm-qos "$QOS")
[[ -n "${SWEEP:-}" ]] && ARGS+=(--sweep-yml configs/sweeps/ablations.yml)
[[ -n "${SCALE:-}" ]] && ARGS+=(--scale-recipe-to-world-size --scale-lr "${SCALE_LR:-none}")

# `python -m leignn_ocp.launch` (= `leignn-launch`) is the `fairchem` CLI (same flags, same code) with
# the fixes of leignn_ocp/launch/: --sweep-yml on Python >= 3.10, step-boundary preemption, atomic
# checkpoints. Plain `"$ROOT/.venv/bin/fairchem" "${ARGS[@]}"` also works, without --sweep-yml and
# without SCALE (--scale-recipe-to-world-size is the launcher's own flag).
set -x
exec "$PY" -m leignn_ocp.launch "${ARGS[@]}" "$@"
