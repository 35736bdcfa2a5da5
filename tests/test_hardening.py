"""A workdir belongs to one run; restarts with another config; damaged checkpoints; exits that wait for
saves; a bounded multi-process start-up. Subprocess tests (integration tier)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import REFERENCE_OVERRIDES, ROOT, load_npz, run_tiny, tiny_command, tiny_env, weights_of

pytestmark = pytest.mark.integration


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def main_command(workdir, *extra) -> list[str]:
  return [sys.executable, "-m", "maxsq_jax.main", "--config=configs/demo.py:tiny", f"--workdir={workdir}", *extra]


def test_multiprocess_startup_wait_is_bounded_and_names_the_missing_process(tmp_path):
  port = free_port()
  workdir = tmp_path / "w"
  proc = subprocess.run(main_command(workdir, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                     "--process_id=0", "--startup_timeout_s=4"),
                        capture_output=True, text=True, cwd=ROOT, env=tiny_env(1), timeout=120)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1, proc.stderr
  assert f"waiting for process ids [1] to join the coordinator at 127.0.0.1:{port}" in proc.stderr
  assert lines[-1].startswith(f"error: process 0 of 2: not every process joined the coordinator at 127.0.0.1:{port} "
                              "within 4 s; still waiting for process ids [1].")
  assert not workdir.exists()


def wait_for(path, proc, timeout=600):
  deadline = time.time() + timeout
  while not os.path.exists(path):
    if proc.poll() is not None:
      raise AssertionError(f"the run ended (rc {proc.returncode}) before {path} appeared:\n{proc.stdout.read()[-3000:]}")
    if time.time() > deadline:
      raise AssertionError(f"no {path} after {timeout} s")
    time.sleep(0.2)


def test_a_workdir_belongs_to_one_run_and_a_restart_keeps_its_config(tiny_data_root, compilation_cache, tmp_path):
  workdir = tmp_path / "run"
  base = main_command(workdir, f"--config.data.source_dir={tiny_data_root}/synthetic_source",
                      f"--config.data.target_dir={tiny_data_root}/synthetic_target", "--config.stage=source_only",
                      "--config.optim.schedule_steps=100000", "--config.checkpoint_every=1000")
  env = tiny_env(1, compilation_cache)
  run = lambda *extra: subprocess.run([*base, *extra], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  first = subprocess.Popen([*base, "--config.num_steps=100000"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  try:
    wait_for(workdir / "config_history.jsonl", first)  # Written while holding the lock, before compiling.
    second = run("--config.num_steps=100000")
    assert second.returncode == 1 and second.stderr.count("\n") == 1, second.stderr
    assert second.stderr.startswith(f"error: workdir {workdir} is in use by another run (host {socket.gethostname()}, "
                                    f"pid {first.pid}, started ")
    held = (workdir / "run.lock").read_text()
    (workdir / "run.lock").write_text("garbage{")  # A garbled lock is never taken from the live run.
    third = run("--config.num_steps=100000")
    assert third.returncode == 1 and third.stderr.count("\n") == 1, third.stderr
    assert third.stderr == (f"error: the lock {workdir}/run.lock is not a lock this project wrote (not JSON: "
                            f"'garbage{{'), so whether a run still trains in {workdir} cannot be told; if no run is "
                            f"alive there (on any host), delete {workdir}/run.lock and start again.\n")
    assert first.poll() is None and (workdir / "run.lock").read_text() == "garbage{"
    (workdir / "run.lock").write_text(held)
  finally:
    first.kill()
    first.wait()
  config_json = (workdir / "config.json").read_bytes()
  # The killed run's lock is stale. A restart may shorten the run; another lr needs the opt-in. Both recorded.
  refused = run("--config.num_steps=2", "--config.optim.lr=0.02")
  note, error = refused.stderr.splitlines()
  assert note.startswith(f"note: took over {workdir}/run.lock from a run that is gone (host {socket.gethostname()}, "
                         f"pid {first.pid}, ") and note.endswith(f"pid {first.pid} no longer runs on this host.")
  assert refused.returncode == 2 and error.startswith(
      f"error: the config differs from the one {workdir} was trained with: config.optim.lr: 0.01 in {workdir} -> "
      "0.02 now. Go back to the stored values, or pass --config.allow_config_change=True")
  restarted = run("--config.num_steps=2", "--config.optim.lr=0.02", "--config.allow_config_change=True")
  assert restarted.returncode == 0, restarted.stderr[-3000:]
  history = [json.loads(line) for line in (workdir / "config_history.jsonl").read_text().splitlines()]
  assert [h["changes"] for h in history] == [{}, {"num_steps": [100000, 2], "optim.lr": [0.01, 0.02]}]
  assert (workdir / "config.json").read_bytes() == config_json
  # A finished run resumed with another model: refused before anything is written, naming the field.
  for extra, message in ((["--config.model.width=8"], f"config.model.width: 4 in {workdir} -> 8 now"),
                         (["--config.optim.lr=0.5", "--config.loss.target=entropy"],
                          f"config.loss.target: 'max_square' in {workdir} -> 'entropy' now; config.optim.lr: 0.02 in "
                          f"{workdir} -> 0.5 now")):
    proc = run("--config.num_steps=2", "--config.optim.lr=0.02", *extra)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
  assert (workdir / "config.json").read_bytes() == config_json
  assert len((workdir / "config_history.jsonl").read_text().splitlines()) == 2
  assert not (workdir / "run.lock").exists()


def flip_bytes(step_dir, count=400):
  """Inverts `count` bytes in the middle of the largest array-data file of `step_dir`/state: the
  arrays still read, with other values."""
  data_files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
  largest = max(data_files, key=lambda p: p.stat().st_size)
  data = bytearray(largest.read_bytes())
  middle = len(data) // 2
  data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
  largest.write_bytes(bytes(data))


def damage_checkpoints(workdir):
  """Steps 5..2 of a 5-step run damaged four ways; step 1 intact. Returns {step: expected reason}."""
  ckpt = workdir / "checkpoints"
  (ckpt / "5" / "data" / "process_0-of-1.json").write_text("")
  # Flipped bytes and no checksums/: not taken for a checkpoint written before checksums existed.
  flip_bytes(ckpt / "4")
  shutil.rmtree(ckpt / "4" / "checksums")
  metadata = ckpt / "3" / "state" / "_METADATA"
  metadata.write_bytes(metadata.read_bytes()[:100])
  # Readable arrays that are not what was saved.
  shutil.copy(ckpt / "1" / "checksums" / "metadata", ckpt / "2" / "checksums" / "metadata")
  return {5: f"data-position file {ckpt}/5/data/process_0-of-1.json is empty, truncated or garbled",
          4: f"{ckpt}/4/checksums is missing, and {ckpt}/4/meta says they were stored with it",
          3: f"{ckpt}/3/state cannot be read", 2: f"{ckpt}/2/state: "}


def test_damaged_checkpoints_fall_back_to_the_newest_that_verifies(tiny_data_root, compilation_cache, reference_run,
                                                                  tmp_path):
  reference_dir, reference_final = reference_run
  workdir = tmp_path / "damaged"
  shutil.copytree(reference_dir, workdir)
  reasons = damage_checkpoints(workdir)
  # evaluate refuses the flipped checkpoint without checksums, in one line.
  proc = subprocess.run([sys.executable, "-m", "maxsq_jax.evaluate", "--config=configs/demo.py:tiny",
                         f"--config.data.source_dir={tiny_data_root}/synthetic_source",
                         f"--config.data.target_dir={tiny_data_root}/synthetic_target", f"--checkpoint={workdir}",
                         "--step=4", f"--workdir={tmp_path / 'evaluated'}"], capture_output=True, text=True, cwd=ROOT,
                        env=tiny_env(1, compilation_cache), timeout=600)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr.splitlines()[-1] == (  # After Orbax's logged notes (W... lines).
      f"error: --checkpoint={workdir}: {reasons[4]}; the checkpoint was damaged; give another checkpoint (steps in "
      f"{workdir}/checkpoints: 1, 2, 3, 4, 5)")
  proc = run_tiny(tiny_data_root, workdir, tmp_path / "out.npz", cache_dir=compilation_cache, **REFERENCE_OVERRIDES)
  for step, reason in reasons.items():  # Warnings go to stderr.
    assert f"warning: checkpoint step {step} does not verify: {reason}" in proc.stderr, proc.stderr[-3000:]
  assert "do not match their saved checksums" in proc.stderr and "warning:" not in proc.stdout
  assert "TensorStore(" not in proc.stderr  # Readable: no JSON spec of an array store.
  assert (f"warning: resumed from step 1, the newest checkpoint that verifies; the unverified step(s) 5, 4, 3, 2 "
          f"were moved to {workdir}/unverified_checkpoints (kept, not deleted).") in proc.stderr
  assert sorted(os.listdir(workdir / "unverified_checkpoints")) == ["2", "3", "4", "5"]
  out = load_npz(tmp_path / "out.npz")
  assert int(out["step"]) == 5
  for key, value in weights_of(reference_final).items():  # As if nothing had been damaged.
    np.testing.assert_array_equal(value, out[key], err_msg=key)

  # No checkpoint verifies: an error naming each, nothing deleted.
  workdir = tmp_path / "all_damaged"
  shutil.copytree(reference_dir, workdir)
  for step in range(1, 6):
    (workdir / "checkpoints" / str(step) / "data" / "process_0-of-1.json").write_text("{garbled")
  proc = run_tiny(tiny_data_root, workdir, tmp_path / "x.npz", check=False, cache_dir=compilation_cache,
                  **REFERENCE_OVERRIDES)
  assert proc.returncode != 0
  error = proc.stderr.strip().splitlines()[-1]
  assert error.startswith(f"maxsq_jax.errors.CheckpointError: no checkpoint in {workdir}/checkpoints verifies: "
                          f"step 5: data-position file {workdir}/checkpoints/5/data/process_0-of-1.json is empty")
  assert all(f"step {s}: data-position file" in error for s in range(1, 6))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2", "3", "4", "5"]


def test_data_positions_that_do_not_fit_the_pipeline_are_an_error(tiny_data_root, compilation_cache, reference_run,
                                                                  tmp_path):
  workdir = tmp_path / "workers"
  shutil.copytree(reference_run[0], workdir)
  reference = [f"--config.{key}={value}" for key, value in REFERENCE_OVERRIDES.items()]
  proc = subprocess.run(main_command(workdir, *reference, f"--config.data.source_dir={tiny_data_root}/synthetic_source",
                                     f"--config.data.target_dir={tiny_data_root}/synthetic_target",
                                     "--config.optim.schedule_steps=5", "--config.data.workers=2",
                                     "--config.allow_config_change=True"),
                        capture_output=True, text=True, cwd=ROOT, env=tiny_env(1, compilation_cache), timeout=600)
  assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
  assert proc.stderr.startswith(f"error: the data positions in {workdir}/checkpoints/5/data/process_0-of-1.json cannot "
                                "be restored into this pipeline (KeyError: 'exhausted')")
  assert "--config.data.restart_streams=True" in proc.stderr


def test_sigterm_on_a_checkpoint_step_exits_143(tiny_data_root, compilation_cache, tmp_path):
  workdir = tmp_path / "terminated"
  overrides = {**REFERENCE_OVERRIDES, "num_steps": 100000, "optim.schedule_steps": 100000, "checkpoint_every": 1,
               "log_every": 1}
  proc = subprocess.Popen(tiny_command(tiny_data_root, workdir, tmp_path / "x.npz", **overrides),
                          env=tiny_env(1, compilation_cache), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith("[step 2]"):
      break
  proc.send_signal(signal.SIGTERM)  # Every step is a checkpoint step: it has saved this one already.
  output, _ = proc.communicate(timeout=300)
  text = "".join(lines) + output
  assert proc.returncode == 143, text[-3000:]
  assert "StepAlreadyExistsError" not in text
  saved = int(text.split("SIGTERM: saved a checkpoint at step ")[1].split()[0])
  steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints"))
  assert steps[-1] == saved and all((workdir / "checkpoints" / str(s) / "commit_success.txt").exists() for s in steps)


def test_lock_and_set_aside_on_a_bucket(gcs_bucket):
  from types import SimpleNamespace

  from etils import epath

  from maxsq_jax import checkpoint_integrity, workdir_lock
  from maxsq_jax.errors import CheckpointError
  workdir = epath.Path(f"{gcs_bucket}/locked")
  with workdir_lock.WorkdirLock(workdir).acquire():
    with pytest.raises(CheckpointError, match=f"workdir {workdir} is in use by another run \\(host "
                                              f"{socket.gethostname()}, pid {os.getpid()}"):
      workdir_lock.WorkdirLock(workdir).acquire()
  assert not (workdir / "run.lock").exists()
  (workdir / "run.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "old",
                                                "heartbeat": time.time() - workdir_lock.STALE_S - 1}))
  workdir_lock.WorkdirLock(workdir).acquire().release()  # A dead pod's lock is taken over.
  step_dir = workdir / "checkpoints" / "3"
  (step_dir / "state").mkdir(parents=True)
  (step_dir / "state" / "array").write_text("bad bytes")
  (step_dir / "commit_success.txt").write_text("done")
  kept = checkpoint_integrity.set_aside(SimpleNamespace(directory=workdir / "checkpoints"), workdir, [3])
  assert kept == f"{workdir}/unverified_checkpoints"
  assert (workdir / "unverified_checkpoints" / "3" / "state" / "array").read_text() == "bad bytes"
  assert (workdir / "unverified_checkpoints" / "3" / "commit_success.txt").read_text() == "done"
  assert not step_dir.exists()
