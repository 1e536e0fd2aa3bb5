#!/usr/bin/env bash
# Multi-node DDP training on a SLURM cluster: one torchrun per node, torchrun starts one process per GPU.
#
#   sbatch experiments/slurm_train.sh --config experiments/configs/keskar_c2_lb.toml --out runs/c2_lb
#
# Arguments are passed to `python -m minima.train`. The run directory must be on a shared filesystem.
# On preemption SLURM sends SIGTERM: every rank finishes its step, rank 0 writes last.pt, the job exits
# with status 75; requeue it with the same command plus --resume (done below automatically).
#SBATCH --job-name=minima-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --signal=TERM@120
#SBATCH --requeue
set -euo pipefail

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
resume=()
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then resume=(--resume); fi

srun torchrun \
    --nnodes "$SLURM_NNODES" \
    --nproc_per_node "${SLURM_GPUS_PER_NODE:-8}" \
    --rdzv_id "$SLURM_JOB_ID" \
    --rdzv_backend c10d \
    --rdzv_endpoint "$head_node:29500" \
    -m minima.train "$@" "${resume[@]}"
