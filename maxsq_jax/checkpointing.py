"""Orbax checkpoints of the train state plus both data streams' positions.

A checkpoint at step s holds: `state` (the TrainState pytree, saved by all hosts together), `data`
(one JSON file per host: its source/target stream positions after the batches of steps < s) and
`meta` (JSON).
"""

import json
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from maxsq_jax import paths


def manager(directory, max_to_keep: int, save_interval_steps: int = 1) -> ocp.CheckpointManager:
  """A CheckpointManager of `directory` (a local path or gs:// URL, created if missing)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         save_interval_steps=save_interval_steps)
  return ocp.CheckpointManager(paths.resolve(directory), options=options)


class StreamPositions:
  """Adapts the data streams to grain's Orbax handler, which writes one JSON file per process
  (`process_<i>-of-<n>.json`): each host saves and restores its own streams' positions."""

  def __init__(self, streams: dict):
    self.streams = {name: s for name, s in streams.items() if s is not None}

  def get_state(self) -> bytes:
    return json.dumps({name: s.get_state() for name, s in self.streams.items()}).encode()

  def set_state(self, state: bytes) -> None:
    saved = json.loads(state.decode())
    for name, stream in self.streams.items():
      if name not in saved:
        raise KeyError(f"checkpoint has no position for data stream {name!r} (saved: {sorted(saved)})")
      stream.set_state(saved[name])

  def start_prefetch(self) -> None:  # Called by grain's handler after set_state.
    pass


def save(mngr: ocp.CheckpointManager, step: int, state, streams: dict, meta: dict, force: bool = False) -> bool:
  """Saves state (all hosts together), each host's stream positions and `meta` at `step`; async."""
  return mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(StreamPositions(streams)),
      meta=ocp.args.JsonSave(meta)), force=force)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, streams: dict) -> tuple[Any, bool]:
  """Restores the state at `step` (sharded like `abstract_state`) and, where this host's file exists,
  the streams' positions. Returns (state, whether the positions were restored): they are not when the
  checkpoint was written by a different number of hosts, whose shards differed."""
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  try:
    mngr.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(StreamPositions(streams))))
    positions_restored = True
  except (ValueError, FileNotFoundError, KeyError):
    positions_restored = False
  return restored["state"], positions_restored


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  """The `meta` JSON saved with checkpoint `step`."""
  return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])


def abstract_like(state):
  """ShapeDtypeStructs (with shardings) of a state pytree, for restoring into the same layout."""
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)


def run_checkpoints(path):
  """The checkpoint directory of a run's workdir `path` (local or gs://): path/checkpoints, or path itself."""
  path = paths.resolve(path)
  return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def restore_variables(path, abstract_state) -> dict:
  """Weights {'params', 'batch_stats'} of the latest checkpoint of a run's workdir (`path` or path/checkpoints)."""
  directory = run_checkpoints(path)
  mngr = manager(directory, max_to_keep=1)
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {str(directory)!r}: give a run's workdir or a converted-weights dir "
                            f"(python -m maxsq_jax.tools.convert_torch).")
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  mngr.close()
  state = restored["state"]
  return {"params": state.params, "batch_stats": state.batch_stats}
