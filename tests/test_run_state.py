"""The workdir lock, config changes on restart, data-position checksums, init_from shapes and the
wait for in-flight saves, in-process (the subprocess tests are in test_hardening.py)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from maxsq_jax import checkpointing, jsonfile, run_config, train, workdir_lock
from maxsq_jax.config_base import base_config
from maxsq_jax.errors import CheckpointError, ConfigError, WeightsError
from tests.helpers import before_eval_section, tiny_config, with_overrides

# ----------------------------------------------------------------------------------------------
# One run per workdir.


def dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()  # Reaped: the pid no longer exists.
  return proc.pid


def write_lock(workdir, **holder):
  (workdir / workdir_lock.LOCK_NAME).write_text(json.dumps(holder))


def test_a_live_run_holds_the_workdir_and_the_refusal_names_it(tmp_path):
  lock = workdir_lock.WorkdirLock(tmp_path).acquire()
  held = json.loads((tmp_path / "run.lock").read_text())
  assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
  with pytest.raises(CheckpointError) as e:
    workdir_lock.WorkdirLock(tmp_path).acquire()
  message = str(e.value)
  assert message.startswith(f"workdir {tmp_path} is in use by another run (host {socket.gethostname()}, "
                            f"pid {os.getpid()}, started {held['start_time']}, last alive ")
  lock.release()
  assert not (tmp_path / "run.lock").exists()
  workdir_lock.WorkdirLock(tmp_path).acquire().release()  # Free again.


def test_a_stale_lock_is_taken_over_with_a_note(tmp_path, capsys):
  host = socket.gethostname()
  gone = dead_pid()
  write_lock(tmp_path, host=host, pid=gone, start_time="earlier", heartbeat=time.time(), token="old")
  with workdir_lock.WorkdirLock(tmp_path).acquire() as lock:  # The killed run's pid is gone.
    assert json.loads((tmp_path / "run.lock").read_text())["token"] == lock.holder["token"]
  note = capsys.readouterr().err
  assert note.startswith(f"note: took over {tmp_path}/run.lock from a run that is gone (host {host}, pid {gone}, "
                         "started earlier, last alive ") and note.endswith(f"pid {gone} no longer runs on this host.\n")
  # Our own pid, but another process start time: the pid was reused by another process.
  write_lock(tmp_path, host=host, pid=os.getpid(), process_start="1", heartbeat=time.time(), token="old")
  workdir_lock.WorkdirLock(tmp_path).acquire().release()
  assert "is another process now" in capsys.readouterr().err
  # Another host: judged by its heartbeat.
  write_lock(tmp_path, host="elsewhere", pid=1, heartbeat=time.time() - workdir_lock.STALE_S - 1, token="old")
  workdir_lock.WorkdirLock(tmp_path).acquire().release()
  assert f"no heartbeat from host elsewhere for {int(workdir_lock.STALE_S) + 1} s" in capsys.readouterr().err
  write_lock(tmp_path, host="elsewhere", pid=1, start_time="now", heartbeat=time.time(), token="old")
  with pytest.raises(CheckpointError, match="in use by another run \\(host elsewhere, pid 1, started now"):
    workdir_lock.WorkdirLock(tmp_path).acquire()
  assert not list(tmp_path.glob(".run.lock*"))  # No temporary file left behind.


@pytest.mark.parametrize("content, why", [
    ("{garbled", "is not a lock this project wrote (not JSON: '{garbled')"),
    ("", "is not a lock this project wrote (not JSON: '')"),
    ("[1, 2]", "is not a lock this project wrote (it holds a JSON list, not an object)"),
    ('{"host": "h", "pid": "abc", "token": "t", "heartbeat": 1}',
     "is not a lock this project wrote (it has 'pid' = \"abc\", not a whole number)"),
    ('{"host": "h", "pid": 1, "token": "t", "heartbeat": "yesterday"}',
     "is not a lock this project wrote (it has 'heartbeat' = \"yesterday\", not a number)"),
    ('{"host": "h", "pid": true, "token": "t", "heartbeat": 1}',
     "is not a lock this project wrote (it has 'pid' = true, not a whole number)"),
    ('{"host": "h", "token": "t", "heartbeat": 1}', "is not a lock this project wrote (it lacks the field 'pid')"),
    ('{"host": "h", "pid": 1e400, "token": "t", "heartbeat": 1}',
     "is not a lock this project wrote (it has 'pid' = Infinity, not a whole number)"),
    ('{"host": "h", "pid": 99999999999999999999, "token": "t", "heartbeat": 1e300}',
     "is not a lock this project wrote (it has an impossible pid 99999999999999999999 or heartbeat 1e+300)"),
    (None, "cannot be read (IsADirectoryError: Is a directory)"),
])
def test_a_lock_that_cannot_be_checked_is_never_taken_over(tmp_path, content, why):
  lock = tmp_path / "run.lock"
  if content is None:
    lock.mkdir()
  else:
    lock.write_text(content)
  with pytest.raises(CheckpointError) as e:
    workdir_lock.WorkdirLock(tmp_path).acquire()
  assert str(e.value) == (f"the lock {lock} {why}, so whether a run still trains in {tmp_path} cannot be told; if "
                          f"no run is alive there (on any host), delete {lock} and start again.")
  assert lock.is_dir() if content is None else lock.read_text() == content  # Left as it was.


def test_an_unreadable_lock_is_never_taken_over(tmp_path, monkeypatch):
  (tmp_path / "run.lock").write_text(json.dumps({"host": "h", "pid": 1, "token": "t", "heartbeat": 0}))

  def denied(self, *args, **kwargs):  # chmod 000 as root cannot be tested: root reads it anyway.
    raise PermissionError(13, "Permission denied")

  monkeypatch.setattr(workdir_lock.epath.Path, "read_text", denied)
  with pytest.raises(CheckpointError, match=f"^the lock {tmp_path}/run.lock cannot be read \\(PermissionError: "
                                            "Permission denied\\), so whether a run still trains in"):
    workdir_lock.WorkdirLock(tmp_path).acquire()
  assert (tmp_path / "run.lock").exists()


def test_the_heartbeat_replaces_the_lock_whole_and_release_keeps_a_lock_it_does_not_hold(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.01)
  lock = workdir_lock.WorkdirLock(tmp_path).acquire()
  first = json.loads((tmp_path / "run.lock").read_text())["heartbeat"]
  deadline = time.time() + 30
  while json.loads((tmp_path / "run.lock").read_text())["heartbeat"] == first:  # Never read half-written.
    assert time.time() < deadline
  (tmp_path / "run.lock").write_text("{garbled")  # Someone else's now: neither renewed nor deleted.
  time.sleep(0.1)
  lock.release()
  assert (tmp_path / "run.lock").read_text() == "{garbled"


# ----------------------------------------------------------------------------------------------
# Config changes on restart.


def config_with(**overrides):
  return with_overrides(base_config(), **overrides)


def test_restart_config_changes(tmp_path):
  first = config_with()
  assert run_config.changes(first, tmp_path) == {}  # A new workdir.
  run_config.record_start(first, tmp_path, 0, {})
  stored = (tmp_path / "config.json").read_bytes()
  assert run_config.changes(first, tmp_path) == {}

  with pytest.raises(ConfigError) as e:
    run_config.changes(config_with(**{"model.width": 8, "model.num_classes": 16, "optim.lr": 0.5}), tmp_path)
  assert str(e.value).startswith(f"the workdir's checkpoints were trained with another model or optimiser: "
                                 f"config.model.num_classes: 19 in {tmp_path} -> 16 now; config.model.width: 64 in "
                                 f"{tmp_path} -> 8 now.")
  with pytest.raises(ConfigError) as e:  # Not shaping the state, but not what the earlier steps used.
    run_config.changes(config_with(**{"optim.lr": 0.5, "loss.target": "entropy"}), tmp_path)
  assert (f"config.loss.target: 'max_square' in {tmp_path} -> 'entropy' now; config.optim.lr: 0.00025 in {tmp_path} "
          "-> 0.5 now") in str(e.value) and "--config.allow_config_change=True" in str(e.value)

  allowed = config_with(**{"optim.lr": 0.5, "allow_config_change": True})
  diff = run_config.changes(allowed, tmp_path)
  assert diff == {"optim.lr": [0.00025, 0.5]}
  run_config.record_start(allowed, tmp_path, 1000, diff)
  assert (tmp_path / "config.json").read_bytes() == stored  # What the first 1000 steps used, untouched.
  history = [json.loads(line) for line in (tmp_path / "config_history.jsonl").read_text().splitlines()]
  assert [(h["step"], h["changes"]) for h in history] == [(0, {}), (1000, {"optim.lr": [0.00025, 0.5]})]
  # The next restart is compared with the config in effect (lr 0.5), so it needs no flag; how long
  # to run may change freely (and is recorded).
  assert run_config.changes(config_with(**{"optim.lr": 0.5}), tmp_path) == {}
  assert run_config.changes(config_with(**{"optim.lr": 0.5, "num_steps": 40000}), tmp_path) == {
      "num_steps": [base_config().num_steps, 40000]}
  with pytest.raises(ConfigError, match=r"config.optim.lr: 0.5 in .* -> 0.00025 now"):
    run_config.changes(config_with(), tmp_path)


def test_a_workdir_written_before_the_eval_section_resumes_with_its_settings(tmp_path):
  # config.json and a history line as a run written before `config.eval` stored them (flat eval keys).
  trained = config_with(**{"eval.every": 100, "eval.size": (512, 256), "eval.protocols": ("full",)})
  jsonfile.write(tmp_path / "config.json", {"config": before_eval_section(run_config.config_dict(trained))})
  old_change = {"step": 500, "changes": {"data.eval_split": ["val", "test"], "num_vis_images": [4, 1]}}
  (tmp_path / "config_history.jsonl").write_text(json.dumps(old_change) + "\n")
  resumed = config_with(**{"eval.every": 100, "eval.size": (512, 256), "eval.protocols": ("full",),
                           "eval.split": "test", "eval.num_vis_images": 1})
  assert run_config.changes(resumed, tmp_path) == {}  # The same config: no change.
  with_overrides(resumed, **{"eval.every": 50})
  assert run_config.changes(resumed, tmp_path) == {"eval.every": [100, 50]}  # How often: free, recorded.
  with pytest.raises(ConfigError) as e:
    run_config.changes(with_overrides(resumed, **{"eval.size": (1024, 512)}), tmp_path)
  assert f"config.eval.size: [512, 256] in {tmp_path} -> [1024, 512] now" in str(e.value)
  assert "eval_size" not in str(e.value)


def test_corrupt_config_json_is_named_before_anything_is_written(tmp_path):
  (tmp_path / "config.json").write_text('{"config": {"seed"')
  with pytest.raises(CheckpointError, match=f"{tmp_path / 'config.json'} is truncated or corrupt"):
    run_config.changes(config_with(), tmp_path)
  assert sorted(os.listdir(tmp_path)) == ["config.json"]


# ----------------------------------------------------------------------------------------------
# Checkpoint contents.


class _Stream:
  def __init__(self, position):
    self.position = position

  def get_state(self):
    return {"next_index": self.position}

  def set_state(self, state):
    self.position = state["next_index"]


def test_data_positions_carry_a_checksum():
  saved = checkpointing.StreamPositions({"source": _Stream(7), "target": _Stream(3)}).get_state()
  restored = {"source": _Stream(0), "target": _Stream(0)}
  checkpointing.StreamPositions(restored).set_state(saved)
  assert restored["source"].position == 7 and restored["target"].position == 3
  tampered = saved.replace(b'"next_index": 7', b'"next_index": 8')
  assert tampered != saved
  for bad in (tampered, b"", b'{"streams": {"sou'):
    with pytest.raises(ValueError):
      checkpointing.StreamPositions.verified_streams(bad)


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_data_root, tmp_path_factory):
  """(workdir, config) with one checkpoint of an untrained tiny (width 4) model."""
  workdir = tmp_path_factory.mktemp("tiny_checkpoint")
  config = tiny_config(tiny_data_root, stage="adapt")
  model = train.build_model(config)
  state, *_ = train.initial_state(config, model, train.create_mesh(), (1, 32, 48, 3))
  mngr = checkpointing.manager(workdir / "checkpoints", max_to_keep=2)
  checkpointing.save(mngr, 0, state, {}, {"step": 0})
  mngr.wait_until_finished()
  mngr.close()
  return workdir, state


def test_checksums_saved_with_the_state_match_its_arrays(tiny_checkpoint):
  workdir, state = tiny_checkpoint
  saved = json.loads((workdir / "checkpoints" / "0" / "checksums" / "metadata").read_text())
  import zlib
  kernel = np.asarray(state.params["conv1"]["kernel"])
  assert saved[".params['conv1']['kernel']"] == zlib.crc32(kernel.tobytes())
  assert len(saved) == len(jax.tree_util.tree_leaves(state))


def test_init_from_with_other_shapes_names_variable_shapes_and_path(tiny_checkpoint, tiny_data_root):
  workdir, _ = tiny_checkpoint
  config = tiny_config(tiny_data_root, stage="adapt", **{"model.width": 8})
  state, *_ = train.initial_state(config, train.build_model(config), train.create_mesh(), (1, 32, 48, 3))
  with pytest.raises(WeightsError) as e:
    train.load_init_weights(state, str(workdir))
  assert str(e.value).startswith(f"config.init_from={workdir}: variable params/bn1/")
  assert "has shape (4,) there, the model of this config needs (8,)" in str(e.value)


def test_a_workdir_without_config_json_restarted_with_another_width_names_the_width(tiny_checkpoint, tiny_data_root,
                                                                                     tmp_path):
  from maxsq_jax import checkpoint_integrity
  workdir, _ = tiny_checkpoint  # Checkpoints of a width-4 model, no config.json.
  config = tiny_config(tiny_data_root, stage="adapt", **{"model.width": 8})
  state, *_ = train.initial_state(config, train.build_model(config), train.create_mesh(), (1, 32, 48, 3))
  mngr = checkpointing.manager(workdir / "checkpoints", max_to_keep=2)
  with pytest.raises(ConfigError) as e:
    checkpoint_integrity.resume(mngr, workdir, checkpointing.abstract_like(state), checkpointing.StreamPositions({}),
                                False, print)
  assert str(e.value) == (
      f"the checkpoints in {workdir}/checkpoints were trained with another model than this config's: variable "
      "params/bn1/bias has shape (4,) there, the model of this config needs (8,) (config.model.width: 4 there, 8 in "
      f"this config). {workdir}/config.json, which records the config they were trained with, is missing. Pass the "
      "config they were trained with (--config.model.width=4), or use a new --workdir.")
  assert sorted(os.listdir(workdir / "checkpoints")) == ["0"]  # Nothing moved aside.


def test_an_error_in_the_loop_waits_for_the_save_in_flight(tmp_path):
  mngr = checkpointing.manager(tmp_path / "checkpoints", max_to_keep=2)
  big = {"w": np.arange(2**22, dtype=np.float32)}  # 16 MB: the async write outlives the raise below.
  with pytest.raises(RuntimeError, match="a data error"):
    with train._saves_finished_on_error(mngr):
      mngr.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(big)))
      raise RuntimeError("a data error just after a periodic save")
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]  # Committed, no 2.orbax-checkpoint-tmp.
  assert (tmp_path / "checkpoints" / "2" / "commit_success.txt").exists()
  mngr.close()


def test_only_a_real_change_of_host_count_restarts_the_streams(tmp_path):
  from types import SimpleNamespace

  from maxsq_jax import checkpoint_integrity
  mngr = SimpleNamespace(directory=tmp_path)
  data = tmp_path / "7" / "data"
  data.mkdir(parents=True)
  stream = _Stream(0)
  positions = checkpointing.StreamPositions({"source": stream})
  saved = checkpointing.StreamPositions({"source": _Stream(5)}).get_state()
  warnings = []
  for name in ("process_0-of-2.json", "process_1-of-2.json"):  # Written by 2 hosts; this run has 1.
    (data / name).write_bytes(saved)
  assert not checkpoint_integrity._restore_positions(mngr, 7, positions, False, warnings.append)
  assert "written by 2 host(s), this run has 1" in warnings[0] and stream.position == 0
  (data / "process_1-of-1.json").write_bytes(saved)  # This host count, but not this host's file.
  with pytest.raises(checkpoint_integrity.Unverified, match=f"data-position file {data}/process_0-of-1.json is missing"):
    checkpoint_integrity._restore_positions(mngr, 7, positions, False, warnings.append)
  (data / "process_0-of-1.json").write_bytes(saved)
  assert checkpoint_integrity._restore_positions(mngr, 7, positions, False, warnings.append)
  assert stream.position == 5 and len(warnings) == 1


def test_load_weights_reads_a_runs_checkpoint_onto_the_given_layout(tiny_checkpoint):
  workdir, state = tiny_checkpoint
  like = {"params": state.params, "batch_stats": state.batch_stats}
  variables, info = checkpointing.load_weights(str(workdir), like)
  assert info == {"checkpoint": str(workdir), "checkpoint_kind": "run", "checkpoint_step": 0}
  want = jax.tree_util.tree_leaves(like)
  got = jax.tree_util.tree_leaves(variables)
  assert len(got) == len(want)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert g.sharding == w.sharding
  # Given only shapes (the evaluate CLI), the weights come back as NumPy arrays.
  shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
  host, _ = checkpointing.load_weights(str(workdir), shapes)
  assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(host))
  with pytest.raises(CheckpointError, match=r"no checkpoint at step 7 in .*; steps: \[0\]"):
    checkpointing.load_weights(str(workdir), like, step=7)
  nowhere = workdir.parent / "nowhere"
  with pytest.raises(CheckpointError) as e:
    checkpointing.load_weights(str(nowhere), like, what="config.init_from")
  assert str(e.value) == (f"config.init_from={nowhere}: no such directory (give a run's workdir or a "
                          "converted-weights dir)")


def test_a_checkpoint_without_checksums_is_trusted_only_if_it_predates_them(tiny_checkpoint, tmp_path, capsys):
  workdir, state = tiny_checkpoint
  like = {"params": state.params, "batch_stats": state.batch_stats}
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  ckpt = copy / "checkpoints"
  shutil.rmtree(ckpt / "0" / "checksums")
  load = lambda step=None: checkpointing.load_weights(str(copy), like, step, what="config.init_from")
  refused = lambda why, step=0: (f"config.init_from={copy}: {ckpt}/{step}/checksums is missing, and {why}; the "
                                 "checkpoint was damaged; give another checkpoint (steps in ")
  with pytest.raises(CheckpointError) as e:  # This version wrote it: its meta says so.
    load()
  assert str(e.value).startswith(refused(f"{ckpt}/0/meta says they were stored with it"))
  assert json.loads((ckpt / "0" / "meta" / "metadata").read_text()) == {"step": 0, "checksums_stored": True}
  (ckpt / "0" / "meta" / "metadata").write_text(json.dumps({"step": 0}))  # As an older version wrote it.
  variables, _ = load()  # Nothing in the workdir says otherwise: a warning.
  np.testing.assert_array_equal(variables["params"]["conv1"]["kernel"], state.params["conv1"]["kernel"])
  assert capsys.readouterr().err == (f"warning: {ckpt}/0 has no checksums/ (written before checksums were stored, "
                                     "as far as its meta and workdir tell): its arrays cannot be verified.\n")
  jsonfile.write(copy / "config.json", {"config": {}})
  with pytest.raises(CheckpointError) as e:
    load()
  assert str(e.value).startswith(refused(f"{copy} has a config.json or config_history.jsonl, written only by "
                                         "versions that store checksums"))
  # The history: the first start that stored checksums began at step 0, so step 3 was written by it.
  (copy / "config.json").unlink()
  (copy / "config_history.jsonl").write_text(json.dumps({"step": 0, "changes": {}}) + "\n")
  shutil.copytree(ckpt / "0", ckpt / "3")
  with pytest.raises(CheckpointError) as e:
    load(3)
  assert str(e.value).startswith(refused(f"{copy}/config_history.jsonl records that the run started at step 0 under "
                                         "a version that stores checksums", step=3))
  load(0)
  assert capsys.readouterr().err.startswith(f"warning: {ckpt}/0 has no checksums/")


def test_load_weights_refuses_nan_weights(tiny_checkpoint, tmp_path):
  workdir, state = tiny_checkpoint
  run = tmp_path / "nan"
  mngr = checkpointing.manager(run / "checkpoints", max_to_keep=1)
  params = jax.tree_util.tree_map(lambda x: x, state.params)
  params["conv1"]["kernel"] = params["conv1"]["kernel"].at[0, 0, 0, 0].set(np.nan)
  checkpointing.save(mngr, 2, state.replace(params=params), {}, {"step": 2})  # Checksums of the NaN values.
  mngr.wait_until_finished()
  mngr.close()
  with pytest.raises(CheckpointError) as e:
    checkpointing.load_weights(str(run), {"params": state.params, "batch_stats": state.batch_stats},
                               what="config.init_from")
  assert str(e.value) == (f"config.init_from={run}: checkpoint step 2: 1 array(s) hold NaN or infinite values, e.g. "
                          "params/conv1/kernel; give another checkpoint")


def test_load_weights_refuses_an_array_that_does_not_match_its_checksum(tiny_checkpoint, tmp_path):
  workdir, state = tiny_checkpoint
  damaged = tmp_path / "damaged"
  shutil.copytree(workdir, damaged)
  checksums = damaged / "checkpoints" / "0" / "checksums" / "metadata"
  saved = json.loads(checksums.read_text())
  saved[".params['conv1']['kernel']"] ^= 1  # As if the kernel's bytes had changed on disk.
  checksums.write_text(json.dumps(saved))
  with pytest.raises(CheckpointError) as e:
    checkpointing.load_weights(str(damaged), {"params": state.params, "batch_stats": state.batch_stats},
                               what="config.init_from")
  assert str(e.value).startswith(f"config.init_from={damaged}: checkpoint step 0: .params['conv1']['kernel'] "
                                 "does not match its saved checksum")
