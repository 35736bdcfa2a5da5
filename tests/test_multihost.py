"""Multi-host and preemption: 2 processes x 2 CPU devices on loopback equal 1 process x 4 devices;
when a host is killed the other names it in one line within the heartbeat timeout (after JAX's fatal
log when it is the coordinator), and the rerun pair resumes bit-identically; the start-up timeout from the environment; SIGKILL at a random step and restart gives
bit-identical parameters; SIGTERM saves a checkpoint at the current step; SIGTERM to one of two
processes sharing a gs:// workdir makes both save the same step, and both resume from it bit-identically;
a checkpoint written with 4 devices restores on 1 and 2."""

import os
import random
import re
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from tests.helpers import (
  REFERENCE_OVERRIDES,
  ROOT,
  load_npz,
  run_tiny,
  tiny_command,
  tiny_env,
  weights_of,
)

pytestmark = pytest.mark.integration


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_pair(data_root, workdir, out, cache_dir, log_dir, extra_env=None, **overrides):
  """Starts 2 processes with 2 CPU devices each, joined through a localhost coordinator; `extra_env`:
  more environment variables."""
  port = free_port()
  procs = []
  for process_id in range(2):
    env = tiny_env(2, cache_dir, MAXSQ_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", MAXSQ_NUM_PROCESSES=2,
                   MAXSQ_PROCESS_ID=process_id, **(extra_env or {}))
    log = open(os.path.join(log_dir, f"process_{process_id}.log"), "a")
    procs.append(subprocess.Popen(tiny_command(data_root, workdir, out, **overrides), env=env, cwd=ROOT,
                                  stdout=log, stderr=subprocess.STDOUT))
  return procs


def wait_all(procs, timeout=600):
  deadline = time.time() + timeout
  for p in procs:
    p.wait(timeout=max(deadline - time.time(), 1))
  return [p.returncode for p in procs]


def committed_steps(workdir) -> list[int]:
  """Steps of the finished checkpoints in a workdir (local, or gs:// read fresh from the server)."""
  workdir = str(workdir)
  if workdir.startswith("gs://"):
    from tests.gcs_server import list_files
    files = list_files(workdir)
    return sorted(int(f.split("/")[1]) for f in files
                  if f.startswith("checkpoints/") and f.split("/")[1].isdigit() and f.endswith("/commit_success.txt")
                  and f.count("/") == 2)
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory)
                if d.isdigit() and os.path.exists(os.path.join(directory, d, "commit_success.txt")))


def wait_for_checkpoint(workdir, step: int, procs, timeout=600):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if any(s >= step for s in committed_steps(workdir)):
      return
    if all(p.poll() is not None for p in procs):
      raise AssertionError(f"runs ended before checkpoint {step} appeared: {committed_steps(workdir)}")
    time.sleep(0.2)
  raise AssertionError(f"no checkpoint {step} after {timeout}s")


def sigkill_after_a_random_checkpoint(data_root, workdir, cache_dir, out_dir, cwd) -> int:
  """Starts the reference run in `workdir` (local or gs://), SIGKILLs it once a random checkpoint in
  1..4 is committed (before the run ends) and returns that step."""
  kill_after = random.Random(os.getpid()).randint(1, 4)
  proc = subprocess.Popen(tiny_command(data_root, workdir, out_dir / "x.npz", **REFERENCE_OVERRIDES),
                          env=tiny_env(1, cache_dir), cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  wait_for_checkpoint(workdir, kill_after, [proc])
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert committed_steps(workdir)[-1] < 5
  return kill_after


def assert_close_weights(expected: dict, actual: dict):
  assert set(expected) == set(weights_of(actual))
  for key in expected:
    np.testing.assert_allclose(expected[key], actual[key], rtol=2e-4, atol=2e-5, err_msg=key)


def test_two_processes_equal_one_process_and_a_lost_host_is_named_and_the_rerun_is_bit_identical(
    tiny_data_root, compilation_cache, four_device_run, tmp_path):
  # 1. Two hosts x 2 devices == one process with 4 devices, after 3 steps; the pair goes on to 5.
  first, lost, rerun = (tmp_path / name for name in ("first", "lost", "rerun"))
  for d in (first, lost, rerun):
    d.mkdir()
  procs = start_pair(tiny_data_root, tmp_path / "pair", tmp_path / "pair.npz", compilation_cache, first,
                     **REFERENCE_OVERRIDES)
  codes = wait_all(procs)
  assert codes == [0, 0], (first / "process_0.log").read_text()[-3000:]
  from tests.helpers import checkpoint_weights
  assert_close_weights(weights_of(four_device_run[1]), checkpoint_weights(tmp_path / "pair", 3))
  uninterrupted = load_npz(tmp_path / "pair.npz")
  assert int(uninterrupted["devices"]) == 4 and int(uninterrupted["step"]) == 5
  # Each host saved its own data-stream positions.
  data_dir = tmp_path / "pair" / "checkpoints" / "3" / "data"
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(data_dir))

  # 2. A pair that loses host 1 mid-run: host 0 says so in one line within the heartbeat timeout and stops.
  workdir = tmp_path / "lost_host"
  procs = start_pair(tiny_data_root, workdir, tmp_path / "unused.npz", compilation_cache, lost,
                     extra_env={"MAXSQ_HEARTBEAT_TIMEOUT_S": 10}, **REFERENCE_OVERRIDES)
  try:
    wait_for_checkpoint(workdir, 2, procs)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    procs[0].wait(timeout=10 + 50)
    took = time.monotonic() - killed
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  log = (lost / "process_0.log").read_text()
  last = committed_steps(workdir)[-1]
  assert last < 5, "the kill came too late to test anything"
  assert procs[0].returncode == 1, log[-3000:]
  lines = [line for line in log.splitlines() if line.strip()]
  assert re.fullmatch(
      r"error: process 1 of 2 stopped answering \(no sign of life for \d+ s, --heartbeat_timeout_s=10\); process 0 "
      rf"stops too\. The last checkpoint known to be committed is step \d in {re.escape(str(workdir))}/checkpoints; "
      r"rerun the same command on every host to resume\.", lines[-1]), lines[-3:]
  assert int(lines[-1].split("committed is step ")[1].split()[0]) <= last
  assert "Traceback" not in log and took < 10 + 50
  # 3. The rerun resumes from the last checkpoint and ends with the uninterrupted pair's parameters.
  procs = start_pair(tiny_data_root, workdir, tmp_path / "resumed.npz", compilation_cache, rerun,
                     **REFERENCE_OVERRIDES)
  assert wait_all(procs) == [0, 0], (rerun / "process_0.log").read_text()[-3000:]
  assert f"Resumed from {workdir}/checkpoints at step {last}" in (rerun / "process_0.log").read_text()
  resumed = load_npz(tmp_path / "resumed.npz")
  assert int(resumed["step"]) == 5
  for key, value in weights_of(uninterrupted).items():
    np.testing.assert_array_equal(value, resumed[key], err_msg=f"{key} (host 1 lost after step {last})")

  # 4. The coordinator (process 0) is lost: JAX's runtime ends process 1 at once with its fatal log; the
  # line naming process 0 follows it, from process 1's sentinel (maxsq_jax/sentinel.py).
  coordinator_lost = tmp_path / "coordinator_lost"
  coordinator_lost.mkdir()
  workdir = tmp_path / "lost_coordinator"
  procs = start_pair(tiny_data_root, workdir, tmp_path / "unused.npz", compilation_cache, coordinator_lost,
                     **REFERENCE_OVERRIDES)
  try:
    wait_for_checkpoint(workdir, 1, procs)
    procs[0].send_signal(signal.SIGKILL)
    procs[1].wait(timeout=60)
    wait_for_text(coordinator_lost / "process_1.log", "error: process 0 of 2", [], timeout=30)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  lines = [line for line in (coordinator_lost / "process_1.log").read_text().splitlines() if line.strip()]
  assert committed_steps(workdir)[-1] < 5, "the kill came too late to test anything"
  assert re.fullmatch(
      r"error: process 0 of 2 \(the coordinator, 127\.0\.0\.1:\d+\) stopped answering; process 1 was ended by "
      r"JAX's runtime \(the fatal log above\)\. The last checkpoint known to be committed is (step \d|none yet) in "
      rf"{re.escape(str(workdir))}/checkpoints; rerun the same command on every host to resume\.", lines[-1]), lines[-3:]


def test_the_startup_timeout_is_read_from_the_environment(tmp_path):
  import sys
  port = free_port()
  start = time.monotonic()
  proc = subprocess.run([sys.executable, "-m", "maxsq_jax.main", "--config=configs/demo.py:tiny",
                         f"--workdir={tmp_path / 'w'}", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                         "--process_id=0"], env=tiny_env(1, MAXSQ_STARTUP_TIMEOUT_S=3), cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(
      f"error: process 0 of 2: not every process joined the coordinator at 127.0.0.1:{port} within 3 s; still "
      "waiting for process ids [1].")
  assert time.monotonic() - start < 120  # Not the 300 s default.


def test_sigkill_at_a_random_step_then_restart_is_bit_identical(tiny_data_root, compilation_cache, reference_run,
                                                                tmp_path):
  _, reference_final = reference_run
  workdir = tmp_path / "killed"
  kill_after = sigkill_after_a_random_checkpoint(tiny_data_root, workdir, compilation_cache, tmp_path, ROOT)
  run_tiny(tiny_data_root, workdir, tmp_path / "restarted.npz", cache_dir=compilation_cache, **REFERENCE_OVERRIDES)
  restarted = load_npz(tmp_path / "restarted.npz")
  assert int(restarted["step"]) == 5
  for key, value in weights_of(reference_final).items():
    np.testing.assert_array_equal(value, restarted[key], err_msg=f"{key} (killed after step {kill_after})")


def test_sigterm_saves_a_checkpoint_at_the_current_step(tiny_data_root, compilation_cache, tmp_path):
  workdir = tmp_path / "terminated"
  overrides = {**REFERENCE_OVERRIDES, "num_steps": 100000, "optim.schedule_steps": 100000,
               "checkpoint_every": 1000, "log_every": 1}
  proc = subprocess.Popen(tiny_command(tiny_data_root, workdir, tmp_path / "x.npz", **overrides),
                          env=tiny_env(1, compilation_cache), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in proc.stdout:  # Wait until training is under way (metrics are logged every step).
    lines.append(line)
    if line.startswith("[step 3]"):
      break
  proc.send_signal(signal.SIGTERM)
  output, _ = proc.communicate(timeout=300)
  lines.append(output)
  text = "".join(lines)
  assert proc.returncode == 143, text[-3000:]
  saved = int(text.split("SIGTERM: saved a checkpoint at step ")[1].split()[0])
  assert saved >= 3
  assert committed_steps(workdir) == [saved]


@pytest.mark.parametrize("devices", [1, 2])
def test_checkpoint_saved_on_four_devices_restores_on_fewer(devices, tiny_data_root, compilation_cache,
                                                            reference_run, four_device_run, tmp_path_factory):
  _, reference_final = reference_run
  workdir = tmp_path_factory.mktemp(f"restore_on_{devices}")
  import shutil
  shutil.copytree(four_device_run[0] / "checkpoints", workdir / "checkpoints")
  proc = run_tiny(tiny_data_root, workdir, workdir / "out.npz", devices=devices, cache_dir=compilation_cache,
                  **REFERENCE_OVERRIDES)
  assert "at step 3" in proc.stdout
  out = load_npz(workdir / "out.npz")
  assert int(out["devices"]) == devices and int(out["step"]) == 5
  assert_close_weights(weights_of(reference_final), out)


def wait_for_text(log_path, text: str, procs, timeout=600):
  """Waits until the log file contains `text` (progress-bar redraws share its lines)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.exists(log_path) and text in open(log_path).read():
      return
    if any(p.poll() is not None for p in procs):
      raise AssertionError(f"a process ended before {text!r}:\n{open(log_path).read()[-3000:]}")
    time.sleep(0.2)
  raise AssertionError(f"no {text!r} after {timeout}s")


@pytest.mark.integration
def test_sigterm_to_one_of_two_processes_on_a_bucket_saves_one_step_on_both_and_resumes(
    tiny_data_root, compilation_cache, gcs_bucket, tmp_path):
  """The pod agrees on preemption: only process 1 gets SIGTERM, both save the same step of the shared
  gs:// workdir and exit 143; both rerun from it and end bit-identical to an uninterrupted pair."""
  from tests.gcs_server import list_files
  url = f"{gcs_bucket}/preempted_pair_{os.getpid()}"
  overrides = {**REFERENCE_OVERRIDES, "num_steps": 100000, "optim.schedule_steps": 100000, "checkpoint_every": 1000,
               "log_every": 1}
  first, resumed, fresh = (tmp_path / name for name in ("first", "resumed", "fresh"))
  for d in (first, resumed, fresh):
    d.mkdir()
  procs = start_pair(tiny_data_root, url, tmp_path / "unused.npz", compilation_cache, first, **overrides)
  try:
    wait_for_text(first / "process_0.log", "[step 3]", procs)
    procs[1].send_signal(signal.SIGTERM)
    codes = wait_all(procs, timeout=60)  # No host is left waiting in a collective.
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  logs = [(first / f"process_{i}.log").read_text() for i in range(2)]
  assert codes == [143, 143], logs[0][-3000:] + logs[1][-3000:]
  saved = [int(log.split(f"SIGTERM: process {i}: saved a checkpoint at step ")[1].split()[0])
           for i, log in enumerate(logs)]
  assert saved[0] == saved[1] >= 3, saved
  step = saved[0]
  assert committed_steps(url) == [step]
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= list_files(f"{url}/checkpoints/{step}/data")

  final = {**overrides, "num_steps": step + 2}
  procs = start_pair(tiny_data_root, url, resumed / "out.npz", compilation_cache, resumed, **final)
  assert wait_all(procs) == [0, 0], (resumed / "process_0.log").read_text()[-3000:]
  assert f"Resumed from {url}/checkpoints at step {step}" in (resumed / "process_0.log").read_text()
  procs = start_pair(tiny_data_root, fresh / "run", fresh / "out.npz", compilation_cache, fresh, **final)
  assert wait_all(procs) == [0, 0], (fresh / "process_0.log").read_text()[-3000:]
  restarted, uninterrupted = load_npz(resumed / "out.npz"), load_npz(fresh / "out.npz")
  assert int(restarted["step"]) == int(uninterrupted["step"]) == step + 2
  for key, value in weights_of(uninterrupted).items():
    np.testing.assert_array_equal(value, restarted[key], err_msg=f"{key} (SIGTERM at step {step})")
