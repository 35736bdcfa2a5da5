#!/usr/bin/env bash
# Cloud TPU VM pod slice: create it, install maxsq_jax on every worker, run the same command on
# all workers, stream logs, delete it. See launch/README.md for the step-by-step guide.
#
#   launch/tpu_vm.sh [--dry-run] create
#   launch/tpu_vm.sh [--dry-run] install
#   launch/tpu_vm.sh [--dry-run] run CONFIG [--config.key=value ...]
#   launch/tpu_vm.sh [--dry-run] logs
#   launch/tpu_vm.sh [--dry-run] delete
#
# Settings (environment variables):
#   TPU_NAME         name of the TPU VM                      (default: maxsq)
#   ZONE             GCP zone                                 (default: us-central2-b)
#   ACCELERATOR_TYPE slice type                               (default: v4-32: 4 hosts x 4 chips)
#   RUNTIME_VERSION  TPU VM software version                  (default: tpu-ubuntu2204-base)
#   PROJECT          GCP project (optional; gcloud's default otherwise)
#   BUCKET           gs:// bucket with data/ and workdirs/    (required by install and run; install
#                    mounts it read-only at /mnt/<bucket> on every worker: the data is read there)
#   RUN_NAME         workdir name under $BUCKET/workdirs      (default: the config's name)
#   REPO             git URL or gs:// tarball of maxsq_jax    (default: copy this checkout with scp)
#   SPOT=1           create a spot (preemptible) slice; rerun `run` after a preemption to resume.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=launch/common.sh
source "$here/common.sh"

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || die "usage: launch/tpu_vm.sh [--dry-run] create|install|run|logs|delete"
action="$1"; shift

TPU_NAME="${TPU_NAME:-maxsq}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
project_flag=()
if [ -n "${PROJECT:-}" ]; then project_flag=(--project="$PROJECT"); fi
tpu=(gcloud compute tpus tpu-vm)
on_all=("${tpu[@]}" ssh "$TPU_NAME" --zone="$ZONE" "${project_flag[@]}" --worker=all)
log_file="/tmp/maxsq_${TPU_NAME}.log"

case "$action" in
  create)
    spot=()
    if [ "${SPOT:-0}" = "1" ]; then spot=(--spot); fi
    run "${tpu[@]}" create "$TPU_NAME" --zone="$ZONE" "${project_flag[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${spot[@]}"
    ;;
  install)
    [ -n "${BUCKET:-}" ] || die "set BUCKET=gs://your-bucket: install mounts it read-only at /mnt/<bucket> on every worker"
    if [ -n "${REPO:-}" ]; then
      case "$REPO" in
        gs://*) fetch="gsutil cp $REPO /tmp/maxsq_jax.tar.gz && rm -rf ~/maxsq_jax && mkdir ~/maxsq_jax && tar -xzf /tmp/maxsq_jax.tar.gz -C ~/maxsq_jax" ;;
        *) fetch="rm -rf ~/maxsq_jax && git clone $REPO ~/maxsq_jax" ;;
      esac
      run "${on_all[@]}" --command="$fetch"
    else
      tarball="/tmp/maxsq_jax_src.tar.gz"
      run tar -czf "$tarball" -C "$here/.." --exclude=.git --exclude=data --exclude=workdirs .
      run "${tpu[@]}" scp "$tarball" "$TPU_NAME:/tmp/maxsq_jax_src.tar.gz" --zone="$ZONE" "${project_flag[@]}" --worker=all
      run "${on_all[@]}" --command="rm -rf ~/maxsq_jax && mkdir ~/maxsq_jax && tar -xzf /tmp/maxsq_jax_src.tar.gz -C ~/maxsq_jax"
    fi
    run "${on_all[@]}" --command="cd ~/maxsq_jax && pip install -e . && pip install 'jax[tpu]==0.10.2'"
    # Training data is read from a read-only Cloud Storage FUSE mount of the bucket (decoding, not
    # reading, dominates); workdirs are written to $BUCKET directly (gs:// URLs).
    bucket_name="${BUCKET#gs://}"
    bucket_name="${bucket_name%%/*}"
    mount_dir="/mnt/$bucket_name"
    gcsfuse_apt="deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main"
    install_gcsfuse="command -v gcsfuse >/dev/null || { echo \"$gcsfuse_apt\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; }"
    run "${on_all[@]}" --command="$install_gcsfuse && sudo mkdir -p $mount_dir && sudo chown \$USER $mount_dir && { mountpoint -q $mount_dir || gcsfuse -o ro --implicit-dirs $bucket_name $mount_dir; }"
    ;;
  run)
    [ $# -ge 1 ] || die "usage: launch/tpu_vm.sh run CONFIG [overrides...]"
    [ -n "${BUCKET:-}" ] || die "set BUCKET=gs://your-bucket (data under \$BUCKET/data, runs under \$BUCKET/workdirs)"
    config="$1"; shift
    name="${RUN_NAME:-$(basename "${config%%:*}" .py)${config#"${config%%:*}"}}"
    name="${name//:/_}"
    overrides=""
    for o in "$@"; do overrides+=" $(printf '%q' "$o")"; done
    # Every worker runs the same command; jax.distributed finds the others through the TPU metadata.
    cmd="cd ~/maxsq_jax && nohup python -m maxsq_jax.main --config=$config --workdir=$BUCKET/workdirs/$name$overrides > $log_file 2>&1 &"
    run "${on_all[@]}" --command="$cmd"
    ;;
  logs)
    run "${tpu[@]}" ssh "$TPU_NAME" --zone="$ZONE" "${project_flag[@]}" --worker=0 --command="tail -f $log_file"
    ;;
  delete)
    run "${tpu[@]}" delete "$TPU_NAME" --zone="$ZONE" "${project_flag[@]}" --quiet
    ;;
  *) die "unknown action '$action': use create, install, run, logs or delete" ;;
esac
