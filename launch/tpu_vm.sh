#!/usr/bin/env bash
# Cloud TPU VM pod slice: create it, install maxsq_jax on every worker, run the same command on
# all workers, read their logs, delete it. See launch/README.md for the step-by-step guide.
#
#   launch/tpu_vm.sh [--dry-run] check CONFIG [--config.key=value ...]  # here, before create: does it fit?
#   launch/tpu_vm.sh [--dry-run] create
#   launch/tpu_vm.sh [--dry-run] install
#   launch/tpu_vm.sh [--dry-run] run CONFIG [--config.key=value ...]
#   launch/tpu_vm.sh [--dry-run] logs [--worker=N] [--follow]   # the latest run's output on the workers
#   launch/tpu_vm.sh [--dry-run] logs [--worker=N] CONFIG       # its hosts' logs in the bucket's workdir
#   launch/tpu_vm.sh [--dry-run] delete
#
# Settings (environment variables):
#   TPU_NAME         name of the TPU VM                      (default: maxsq)
#   ZONE             GCP zone                                 (default: us-central2-b)
#   ACCELERATOR_TYPE slice type                               (default: v4-32: 4 hosts x 4 chips)
#   RUNTIME_VERSION  TPU VM software version                  (default: tpu-ubuntu2204-base)
#   PYTHON_VERSION   Python that install puts on every worker (default: 3.11; uv-managed, in a venv)
#   UV_VERSION       uv release (PyPI) that installs it       (default: 0.13.9)
#   PROJECT          GCP project (optional; gcloud's default otherwise)
#   BUCKET           gs:// bucket with data/ and workdirs/    (required by install, run and logs CONFIG;
#                    install mounts it read-only at /mnt/<bucket> on every worker: the data is read there)
#   RUN_NAME         workdir name under $BUCKET/workdirs      (default: the config's name)
#   REPO             git URL or gs:// tarball of maxsq_jax    (default: copy this checkout with scp)
#   SPOT=1           create a spot (preemptible) slice; rerun `run` after a preemption to resume.
#   SERVICE_ACCOUNT  service account of the slice's VMs (default: the project's Compute Engine default
#                    one); it needs roles/storage.objectUser on the bucket (launch/README.md: Permissions)
#   RUN_WAIT_S       how long `run` waits for the run to start on every worker (default: 900)
#   PYTHON           the Python on this machine that `check` runs (default: python3)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=launch/common.sh
source "$here/common.sh"

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || die "usage: launch/tpu_vm.sh [--dry-run] check|create|install|run|logs|delete"
action="$1"; shift

TPU_NAME="${TPU_NAME:-maxsq}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
UV_VERSION="${UV_VERSION:-0.13.9}"
RUN_WAIT_S="${RUN_WAIT_S:-900}"
project_flag=()
if [ -n "${PROJECT:-}" ]; then project_flag=(--project="$PROJECT"); fi
tpu=(gcloud compute tpus tpu-vm)
ssh_to=("${tpu[@]}" ssh "$TPU_NAME" --zone="$ZONE" "${project_flag[@]}")
on_all=("${ssh_to[@]}" --worker=all)

# On the workers: the venv that install makes and run uses, and one log file per run (latest.log
# links to the newest), so that a rerun does not overwrite the log of the run before it.
# shellcheck disable=SC2088  # The tilde is expanded by the workers' shells.
venv="~/maxsq_venv"
# shellcheck disable=SC2088
log_dir="~/maxsq_logs"
# A worker's number (the TPU metadata's agent-worker-number, which is also its JAX process index).
# shellcheck disable=SC2016  # Expanded by the workers' shells.
worker_id='W=$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || echo "?")'
# The line of train.py's start-up that process 0 prints once every host has joined.
started_marker='host(s), '

run_name() {
  # The workdir name under $BUCKET/workdirs of config $1 (configs/x.py:variant -> x_variant), or $RUN_NAME.
  local config="$1" name
  name="${RUN_NAME:-$(basename "${config%%:*}" .py)${config#"${config%%:*}"}}"
  echo "${name//:/_}"
}

require_bucket() {
  [ -n "${BUCKET:-}" ] || die "set BUCKET=gs://your-bucket ($1)"
}

wait_for_start() {
  # Polls every worker until process 0 printed its start line (all hosts joined), a worker's run stopped
  # (its last lines are shown) or RUN_WAIT_S passed. Returns 1 if a run stopped with an error.
  local status="$worker_id; L=$log_dir/latest.log; S=\$(grep -a '^exit status ' \$L 2>/dev/null | tail -n 1); "
  status+="if [ -n \"\$S\" ]; then echo \"worker \$W: stopped (\$S)\"; "
  status+="tr '\\r' '\\n' < \$L | grep -av '^exit status ' | tail -n 12 | sed \"s/^/worker \$W| /\"; "
  status+="elif grep -aqF '$started_marker' \$L 2>/dev/null; then echo \"worker \$W: started\"; else echo \"worker \$W: starting\"; fi"
  if [ "$DRY_RUN" = "1" ]; then
    run "${on_all[@]}" --command="$status"
    return 0
  fi
  echo "waiting until the run has started on every worker (up to ${RUN_WAIT_S} s) ..."
  local start=$SECONDS out
  while :; do
    out="$("${on_all[@]}" --command="$status" 2>/dev/null)" || true
    if grep -q '^worker [0-9?]*: stopped (exit status [1-9]' <<<"$out"; then
      grep -E '^worker [0-9?]*(: stopped|\|)' <<<"$out" >&2
      echo "error: the run stopped on $(grep -c ': stopped (exit status [1-9]' <<<"$out") worker(s) (above: the last lines of each); fix the cause and rerun the same command (it resumes from the last checkpoint)" >&2
      return 1
    fi
    if grep -q '^worker [0-9?]*: stopped (exit status 0)' <<<"$out" && ! grep -q ': start' <<<"$out"; then
      grep -E '^worker 0(: |\|)' <<<"$out"
      echo "the run finished on all $(grep -c '^worker [0-9?]*: ' <<<"$out") workers"
      return 0
    fi
    if grep -q '^worker 0: started' <<<"$out"; then
      echo "the run has started on all $(grep -c '^worker [0-9?]*: ' <<<"$out") workers; follow it with: launch/tpu_vm.sh logs --follow"
      return 0
    fi
    if [ $((SECONDS - start)) -ge "$RUN_WAIT_S" ]; then
      echo "no start line from worker 0 after ${RUN_WAIT_S} s (still starting?); watch it with: launch/tpu_vm.sh logs --follow"
      return 0
    fi
    sleep 10
  done
}

case "$action" in
  check)
    # On this machine, before paying for the slice: compile the run's train and eval steps for
    # $ACCELERATOR_TYPE (python -m maxsq_jax.aot, with the tpu extra) and report what fits.
    [ $# -ge 1 ] || die "usage: launch/tpu_vm.sh check CONFIG [overrides...]"
    config="$1"; shift
    run "${PYTHON:-python3}" -m maxsq_jax.aot --config="$config" --topology="$ACCELERATOR_TYPE" \
      --out="workdirs/aot/$(run_name "$config")_$ACCELERATOR_TYPE" "$@"
    ;;
  create)
    extra=()
    if [ "${SPOT:-0}" = "1" ]; then extra+=(--spot); fi
    # With the cloud-platform scope, the account's IAM roles alone decide what it may do.
    if [ -n "${SERVICE_ACCOUNT:-}" ]; then extra+=(--service-account="$SERVICE_ACCOUNT" --scopes=cloud-platform); fi
    run "${tpu[@]}" create "$TPU_NAME" --zone="$ZONE" "${project_flag[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${extra[@]}"
    ;;
  install)
    require_bucket "install mounts it read-only at /mnt/<bucket> on every worker"
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
    # The runtime image's Python (3.10 on tpu-ubuntu2204-base, no `python` command) is older than
    # pyproject's requires-python: uv (from PyPI, through the image's pip) installs its own build of
    # PYTHON_VERSION into ~/.local/share/uv and a venv from it, and maxsq_jax with its tpu extra (the
    # libtpu that matches the jax pin) goes into the venv; the system Python is left as it is.
    get_pip="python3 -m pip --version >/dev/null 2>&1 || { sudo apt-get update -q && sudo apt-get install -y -q python3-pip; }"
    run "${on_all[@]}" --command="$get_pip && python3 -m pip install --user -q uv==$UV_VERSION && python3 -m uv python install $PYTHON_VERSION && python3 -m uv venv --clear --python $PYTHON_VERSION $venv && python3 -m uv pip install --python $venv/bin/python -e \"\$HOME/maxsq_jax[tpu]\" && $venv/bin/python --version"
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
    require_bucket "data under \$BUCKET/data, runs under \$BUCKET/workdirs"
    config="$1"; shift
    name="$(run_name "$config")"
    args=""
    for a in -m maxsq_jax.main --config="$config" --workdir="$BUCKET/workdirs/$name" "$@"; do args+=" $(printf '%q' "$a")"; done
    log="${name}_$(date -u +%Y%m%d-%H%M%S).log"
    # Every worker runs the same command; jax.distributed finds the others through the TPU metadata.
    # The log ends with "exit status N" when the process does. Only the run goes to the background
    # (the braces), with every output redirected, so that the ssh session ends at once.
    cmd="mkdir -p $log_dir && cd ~/maxsq_jax && ln -sfn $log $log_dir/latest.log && { nohup bash -c '\"\$@\"; echo \"exit status \$?\"' maxsq $venv/bin/python$args > $log_dir/$log 2>&1 < /dev/null & }"
    run "${on_all[@]}" --command="$cmd"
    wait_for_start
    ;;
  logs)
    worker=all
    follow=0
    of_run=""
    for a in "$@"; do
      case "$a" in
        --worker=*) worker="${a#--worker=}" ;;
        -f|--follow) follow=1 ;;
        -*) die "logs: unknown option '$a' (use --worker=N, --follow)" ;;
        *) of_run="$a" ;;
      esac
    done
    if [ -n "$of_run" ]; then
      # The hosts' own logs, which each host writes into the workdir (they outlive the slice).
      require_bucket "the run's workdir is \$BUCKET/workdirs/<name>"
      logs_url="$BUCKET/workdirs/$(run_name "$of_run")/logs"
      if [ "$worker" != "all" ]; then
        run gcloud storage cat "$logs_url/host_$worker.log"
      elif [ "$DRY_RUN" = "1" ]; then
        run gcloud storage ls "$logs_url/host_*.log"
      else
        for url in $(gcloud storage ls "$logs_url/host_*.log"); do
          echo "== $url"
          gcloud storage cat "$url"
        done
      fi
    else
      # The output of the latest `run` on each worker (earlier runs' logs stay in ~/maxsq_logs), each
      # line prefixed with the worker's number; tqdm's carriage returns become line breaks.
      lines="tr '\\r' '\\n' < $log_dir/latest.log | tail -n 100"
      if [ "$follow" = "1" ]; then lines="tail -n 20 -f $log_dir/latest.log | stdbuf -oL tr '\\r' '\\n'"; fi
      run "${ssh_to[@]}" --worker="$worker" --command="$worker_id; $lines | sed -u \"s/^/worker \$W| /\""
    fi
    ;;
  delete)
    run "${tpu[@]}" delete "$TPU_NAME" --zone="$ZONE" "${project_flag[@]}" --quiet
    ;;
  *) die "unknown action '$action': use create, install, run, logs or delete" ;;
esac
