"""Orbax checkpoints of the train state plus both data streams' positions.

A checkpoint at step s holds: `state` (the TrainState pytree, saved by all hosts together),
`checksums` (JSON: a CRC-32 per array of the state), `data` (one JSON file per host: its
source/target stream positions after the batches of steps < s, with their CRC-32) and `meta` (JSON).
"""

import json

import grain
import jax
import orbax.checkpoint as ocp

from maxsq_jax import paths
from maxsq_jax.checkpoint_integrity import crc32, tree_checksums
from maxsq_jax.errors import WeightsError


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
    positions = {name: s.get_state() for name, s in self.streams.items()}
    return json.dumps({"streams": positions, "crc32": _crc32_of(positions)}).encode()

  def set_state(self, state: bytes) -> None:
    self.restore_streams(self.verified_streams(state))

  @staticmethod
  def verified_streams(state: bytes) -> dict:
    """The positions in a saved payload; ValueError if it is not JSON or fails its CRC-32."""
    saved = json.loads(state.decode())
    if not isinstance(saved, dict):
      raise ValueError(f"expected a JSON object, got {type(saved).__name__}")
    if "crc32" not in saved:
      return saved  # Written before positions carried a checksum.
    if _crc32_of(saved.get("streams")) != saved["crc32"]:
      raise ValueError("the positions do not match their saved CRC-32")
    return saved["streams"]

  def restore_streams(self, saved: dict) -> None:
    for name, stream in self.streams.items():
      if name not in saved:
        raise KeyError(f"checkpoint has no position for data stream {name!r} (saved: {sorted(saved)})")
      stream.set_state(saved[name])

  def start_prefetch(self) -> None:  # Called by grain's handler after set_state.
    pass


def _crc32_of(positions) -> int:
  return crc32(json.dumps(positions, sort_keys=True).encode())


def save(mngr: ocp.CheckpointManager, step: int, state, streams: dict, meta: dict, force: bool = False) -> bool:
  """Saves state (all hosts together), its checksums, each host's stream positions and `meta` at
  `step`; async. Restoring is checkpoint_integrity.resume, which verifies the checksums."""
  return mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      checksums=ocp.args.JsonSave(tree_checksums(state)),
      data=grain.checkpoint.CheckpointSave(StreamPositions(streams)),
      meta=ocp.args.JsonSave(meta)), force=force)


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


def check_weight_shapes(state_dir, abstract_state, init_from) -> None:
  """WeightsError naming the first variable of params/batch_stats whose saved shape (in the checkpoint
  item `state_dir`) differs from the model's, or that the checkpoint lacks."""
  import flax
  saved = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree
  for collection in ("params", "batch_stats"):
    have = flax.traverse_util.flatten_dict(dict(saved.get(collection, {})), sep="/")
    want = flax.traverse_util.flatten_dict(flax.core.unfreeze(getattr(abstract_state, collection)), sep="/")
    for key, spec in want.items():
      if key not in have:
        raise WeightsError(f"config.init_from={init_from}: its checkpoint has no variable {collection}/{key}, "
                           "which the model of this config has (another architecture?)")
      if tuple(have[key].shape) != tuple(spec.shape):
        raise WeightsError(f"config.init_from={init_from}: variable {collection}/{key} has shape "
                           f"{tuple(have[key].shape)} there, the model of this config needs {tuple(spec.shape)} "
                           "(another model.width, blocks or num_classes?)")


def restore_variables(path, abstract_state) -> dict:
  """Weights {'params', 'batch_stats'} of the latest checkpoint of a run's workdir (`path` or path/checkpoints)."""
  directory = run_checkpoints(path)
  mngr = manager(directory, max_to_keep=1)
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {str(directory)!r}: give a run's workdir or a converted-weights dir "
                            f"(python -m maxsq_jax.tools.convert_torch).")
  check_weight_shapes(directory / str(step) / "state", abstract_state, path)
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  mngr.close()
  state = restored["state"]
  return {"params": state.params, "batch_stats": state.batch_stats}
