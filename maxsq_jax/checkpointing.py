"""Orbax checkpoints of the train state plus both data streams' positions.

A checkpoint at step s holds: `state` (TrainState pytree, saved by all hosts together), `data`
(JSON: each host's source/target grain iterator state after the batches of steps < s) and `meta`.
"""

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def manager(directory: str, max_to_keep: int, save_interval_steps: int = 1) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         save_interval_steps=save_interval_steps)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: dict, meta: dict, force: bool = False) -> bool:
  """Saves asynchronously; returns whether a save was started."""
  # Every host's iterator position is stored under its process index.
  data = {str(jax.process_index()): data_state}
  return mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data),
      meta=ocp.args.JsonSave(meta)), force=force)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state) -> tuple[Any, dict | None, dict]:
  """Restores (state, this host's data state or None, meta) at `step`, sharded like `abstract_state`."""
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=ocp.args.JsonRestore(),
      meta=ocp.args.JsonRestore()))
  data = restored["data"] or {}
  return restored["state"], data.get(str(jax.process_index())), restored["meta"]


def abstract_like(state):
  """ShapeDtypeStructs (with shardings) of a state pytree, for restoring into the same layout."""
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)


def restore_variables(path: str, abstract_state) -> dict:
  """Weights {'params', 'batch_stats'} of the latest checkpoint of a run's workdir (`path` or path/checkpoints)."""
  directory = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
  mngr = manager(directory, max_to_keep=1)
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {directory!r}: give a run's workdir or a converted-weights dir "
                            f"(python -m maxsq_jax.tools.convert_torch).")
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  mngr.close()
  state = restored["state"]
  return {"params": state.params, "batch_stats": state.batch_stats}
