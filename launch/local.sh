#!/usr/bin/env bash
# Train on this machine: every local accelerator (or N forced CPU devices) in one process.
#
#   launch/local.sh [--dry-run] [--cpu_devices N] CONFIG WORKDIR [--config.key=value ...]
#   launch/local.sh configs/demo.py workdirs/demo
#   launch/local.sh --cpu_devices 4 configs/demo.py:tiny /tmp/tiny --config.batch_size=8
#
# Rerunning the same command resumes from WORKDIR's latest checkpoint.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=launch/common.sh
source "$here/common.sh"

cpu_devices=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --cpu_devices) cpu_devices="$2"; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
[ $# -ge 2 ] || die "usage: launch/local.sh [--dry-run] [--cpu_devices N] CONFIG WORKDIR [overrides...]"
config="$1"; workdir="$2"; shift 2

if [ -n "$cpu_devices" ]; then
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="--xla_force_host_platform_device_count=$cpu_devices"
  echo "+ export JAX_PLATFORMS=cpu XLA_FLAGS=$XLA_FLAGS"
fi
cd "$here/.."
run python -m maxsq_jax.main --config="$config" --workdir="$workdir" "$@"
