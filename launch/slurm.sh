#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node (all its GPUs) or one per GPU.
#
#   launch/slurm.sh [--dry-run] [--nodes N] [--gpus_per_node G] [--per_gpu] [--partition P] [--time T] \
#       CONFIG WORKDIR [--config.key=value ...]
#
# Submits launch/slurm_job.sbatch; inside, `srun` starts the processes and jax.distributed reads
# SLURM's variables to join them (no coordinator flags needed). After a preemption or a time-out,
# submitting the same command resumes from WORKDIR's latest checkpoint (WORKDIR on a shared file
# system). SLURM sends SIGTERM before killing a job: maxsq_jax saves a checkpoint then.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=launch/common.sh
source "$here/common.sh"

nodes=2
gpus_per_node=8
per_gpu=0
partition=""
time_limit="24:00:00"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --nodes) nodes="$2"; shift 2 ;;
    --gpus_per_node) gpus_per_node="$2"; shift 2 ;;
    --per_gpu) per_gpu=1; shift ;;
    --partition) partition="$2"; shift 2 ;;
    --time) time_limit="$2"; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
[ $# -ge 2 ] || die "usage: launch/slurm.sh [options] CONFIG WORKDIR [overrides...]"

if [ "$per_gpu" = "1" ]; then
  tasks_per_node="$gpus_per_node"  # One process per GPU, each sees one device.
else
  tasks_per_node=1  # One process per node, each sees all the node's GPUs.
fi
args=(sbatch --nodes="$nodes" --ntasks-per-node="$tasks_per_node" --gpus-per-node="$gpus_per_node"
      --time="$time_limit" --signal=TERM@120 --job-name=maxsq)
if [ -n "$partition" ]; then args+=(--partition="$partition"); fi
run "${args[@]}" "$here/slurm_job.sbatch" "$@"
