"""A workdir on a full or read-only disk: one `error:` line naming the disk and the path, and what was
saved before stays intact (a resume is bit-identical). Each case runs `python -m maxsq_jax.main` on a
small tmpfs mounted in a private mount namespace (`unshare -m`, root only; skipped elsewhere), so no
real disk fills. Integration tier."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import ROOT, checkpoint_weights, tiny_env

pytestmark = pytest.mark.integration


def _private_mounts_work() -> bool:
  if os.geteuid() != 0 or shutil.which("unshare") is None:
    return False
  probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                         capture_output=True, timeout=30)
  return probe.returncode == 0


needs_private_mounts = pytest.mark.skipif(not _private_mounts_work(),
                                          reason="needs root and `unshare -m` to mount a small tmpfs privately")


def _in_private_tmpfs(mount_point, options: str, script: str, env: dict, timeout: int = 900):
  """Runs the shell `script` with a tmpfs (mount `options`) on `mount_point`, visible to this script only."""
  os.makedirs(mount_point, exist_ok=True)
  return subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o {options} tmpfs {mount_point} && {script}"],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def _main(tiny_data_root, workdir, *extra) -> str:
  args = [sys.executable, "-m", "maxsq_jax.main", "--config=configs/demo.py:tiny", f"--workdir={workdir}",
          "--config.stage=adapt", "--config.num_steps=3", "--config.checkpoint_every=1", "--config.max_to_keep=10",
          f"--config.data.source_dir={tiny_data_root}/synthetic_source",
          f"--config.data.target_dir={tiny_data_root}/synthetic_target", *extra]
  return " ".join(f"'{a}'" for a in args)


@needs_private_mounts
def test_a_full_disk_is_one_error_line_and_the_saved_checkpoints_resume_bit_identically(
    tiny_data_root, compilation_cache, reference_run, tmp_path):
  mount, kept = tmp_path / "disk", tmp_path / "kept"
  workdir = mount / "run"
  # 2 MB holds the first checkpoint (about 1.2 MB of the tiny model's state) but not the second.
  script = (f"{_main(tiny_data_root, workdir)} > {tmp_path}/out1 2> {tmp_path}/err1; echo $? > {tmp_path}/rc1; "
            f"ls {workdir}/checkpoints > {tmp_path}/listing1; "
            f"mount -o remount,size=64m {mount} && {_main(tiny_data_root, workdir)} > {tmp_path}/out2 2> {tmp_path}/err2; "
            f"echo $? > {tmp_path}/rc2; cp -a {workdir} {kept}")
  proc = _in_private_tmpfs(mount, "size=2000k", script, tiny_env(1, compilation_cache))
  assert proc.returncode == 0, proc.stderr
  read = lambda name: (tmp_path / name).read_text()
  err = read("err1").splitlines()
  # Besides the progress bar, one line: no traceback and no log record of Orbax's writer threads.
  errors = [line for line in err if line.strip() and not line.startswith("adapt:")]
  assert read("rc1").strip() == "1" and len(errors) == 1, read("err1")[-5000:]
  assert errors[0].startswith(f"error: the disk is full (writing {workdir}/checkpoints/")
  assert f"tmpfs (tmpfs) mounted at {mount} has " in errors[0] and "free of 2.0 MiB" in errors[0]
  assert "What was saved before is intact" in errors[0]
  saved = [s for s in read("listing1").split() if s.isdigit()]
  assert saved and int(saved[-1]) < 3  # The disk filled before the last checkpoint.
  assert read("rc2").strip() == "0", read("err2")[-5000:]
  # Steps 1-3 of the reference run (5 steps, the same schedule) are those of this 3-step run.
  ours, reference = checkpoint_weights(kept, 3), checkpoint_weights(reference_run[0], 3)
  assert ours.keys() == reference.keys()
  for key in ours:
    np.testing.assert_array_equal(ours[key], reference[key], err_msg=key)


@needs_private_mounts
def test_a_read_only_workdir_is_one_error_line(tiny_data_root, tmp_path):
  mount = tmp_path / "readonly"
  script = (f"{_main(tiny_data_root, mount)} 2> {tmp_path}/err1; echo $? > {tmp_path}/rc1; "
            f"{_main(tiny_data_root, mount / 'run')} 2> {tmp_path}/err2; echo $? > {tmp_path}/rc2")
  proc = _in_private_tmpfs(mount, "size=64k,ro", script, tiny_env(1))
  assert proc.returncode == 0, proc.stderr
  assert (tmp_path / "rc1").read_text().strip() == "1" and (tmp_path / "err1").read_text() == (
      f"error: --workdir={mount}: it is on a read-only file system; give a directory you can write to\n")
  assert (tmp_path / "rc2").read_text().strip() == "1" and (tmp_path / "err2").read_text() == (
      f"error: --workdir={mount}/run: cannot create it: {mount}/run is on a read-only file system; give a "
      "directory on a writable one\n")
