"""Checksums saved with every checkpoint, and the restore that trusts only a checkpoint that verifies.

Each checkpoint holds `checksums` (JSON): a CRC-32 of every array of the train state, computed from
the values being saved. Each host's data-position file carries a CRC-32 of its positions
(checkpointing.StreamPositions). On restore the state's values are checksummed again; a mismatch, a
file that cannot be read (truncated, garbled, missing) or a position file that fails its CRC makes
the checkpoint unverified, and the newest checkpoint that verifies is used instead, with a warning
naming each bad one. Bad checkpoints are never deleted: they are moved to WORKDIR/unverified_checkpoints/
so that training can write those steps again. If none verifies, the error names each and why.
"""

from __future__ import annotations

import re
import zlib
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from maxsq_jax.errors import CheckpointError, DataError

UNVERIFIED_DIR = "unverified_checkpoints"


class Unverified(Exception):
  """A checkpoint that cannot be trusted; the message says which file and why."""


def crc32(data: bytes) -> int:
  return zlib.crc32(data) & 0xFFFFFFFF


def tree_checksums(tree) -> dict[str, int]:
  """{path: CRC-32 of the array's bytes} of a pytree of (replicated) arrays, from this host's copy."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  out = {}
  for path, leaf in leaves:
    array = leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf
    out[jax.tree_util.keystr(path)] = crc32(np.ascontiguousarray(np.asarray(array)).tobytes())
  return out


def _agree(ok: bool, name: str) -> bool:
  """True only if `ok` on every host (all hosts take the same branch); `name` is unique per call."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  from maxsq_jax import distributed
  distributed.barrier(name)  # Meet first: CPU collectives time out after 30 s.
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _restore_state(mngr: ocp.CheckpointManager, step: int, abstract_state):
  step_dir = epath.Path(mngr.directory) / str(step)
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  except Exception as e:  # A damaged checkpoint fails anywhere in Orbax/TensorStore; say which and how.
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise Unverified(f"{step_dir}/state cannot be read ({type(e).__name__}: {first[:300]})") from e
  state = restored["state"]
  bad = mismatched_arrays(mngr, step, state)
  if bad:
    raise Unverified(f"{step_dir}/state: {len(bad)} array(s) do not match their saved checksums, e.g. {bad[0]}")
  return state


def mismatched_arrays(mngr: ocp.CheckpointManager, step: int, tree) -> list[str]:
  """The arrays of `tree` (the restored TrainState, or its {"params", "batch_stats"}) whose CRC-32
  differs from the one saved with checkpoint `step`, by their state path (".params['conv1']['kernel']");
  [] for a checkpoint written before checksums were stored. Unverified if the checksums cannot be read."""
  step_dir = epath.Path(mngr.directory) / str(step)
  if not (step_dir / "checksums").exists():
    return []
  try:
    expected = mngr.restore(step, args=ocp.args.Composite(checksums=ocp.args.JsonRestore()))["checksums"]
  except Exception as e:
    raise Unverified(f"{step_dir}/checksums cannot be read ({type(e).__name__}: {e})") from e
  # A dict's top-level key ['params'] is the TrainState's attribute .params.
  actual = {re.sub(r"^\['(\w+)'\]", r".\1", path): value for path, value in tree_checksums(tree).items()}
  return [path for path, value in actual.items() if expected.get(path) != value]


def _restore_positions(mngr: ocp.CheckpointManager, step: int, positions, restart_streams: bool,
                       warn: Callable[[str], None]) -> bool:
  """Restores this host's stream positions of checkpoint `step` into `positions` (a StreamPositions).
  Returns False (streams restart) only when the checkpoint was written by another number of hosts."""
  data_dir = epath.Path(mngr.directory) / str(step) / "data"
  count, index = jax.process_count(), jax.process_index()
  path = data_dir / f"process_{index}-of-{count}.json"
  if not path.exists():
    written = [p.name for p in data_dir.iterdir()] if data_dir.exists() else []
    counts = {m.group(1) for m in (re.match(r"process_\d+-of-(\d+)\.json$", n) for n in written) if m}
    if counts and str(count) not in counts:
      warn(f"warning: checkpoint step {step} was written by {', '.join(sorted(counts))} host(s), this run has "
           f"{count}: the data streams restart from their first batch (the run is no longer identical to an "
           "uninterrupted one).")
      return False
    raise Unverified(f"data-position file {path} is missing")
  try:
    payload = path.read_bytes()
    streams = positions.verified_streams(payload)
  except (OSError, ValueError) as e:
    raise Unverified(f"data-position file {path} is empty, truncated or garbled ({e})") from e
  try:
    positions.restore_streams(streams)
  except Exception as e:  # grain raises e.g. KeyError('exhausted') for another worker/thread layout.
    if restart_streams:
      warn(f"warning: the data positions in {path} do not fit this pipeline ({type(e).__name__}: {e}); the data "
           "streams restart from their first batch (config.data.restart_streams=True).")
      return False
    raise DataError(f"the data positions in {path} cannot be restored into this pipeline ({type(e).__name__}: "
                    f"{e}); was config.data.workers or data.threads changed? Go back to the values the run used, "
                    "or pass --config.data.restart_streams=True to restart the data streams from their first "
                    "batch.") from e
  return True


def restore_newest_verified(mngr: ocp.CheckpointManager, abstract_state, positions, restart_streams: bool,
                            warn: Callable[[str], None]) -> tuple[Any, int, list[int]]:
  """(state, step, unverified newer steps) of the newest checkpoint that verifies, its data positions
  restored into `positions` (a checkpointing.StreamPositions)."""
  failures, bad_steps = [], []
  for step in sorted(mngr.all_steps(), reverse=True):
    reason, state = None, None
    try:
      state = _restore_state(mngr, step, abstract_state)
      _restore_positions(mngr, step, positions, restart_streams, warn)
    except Unverified as e:
      reason = str(e)
    if _agree(reason is None, f"{mngr.directory}:verified:{step}"):
      return state, step, bad_steps
    reason = reason or "another host could not verify its part of it"
    warn(f"warning: checkpoint step {step} does not verify: {reason}; trying the previous one.")
    failures.append(f"step {step}: {reason}")
    bad_steps.append(step)
  raise CheckpointError(f"no checkpoint in {mngr.directory} verifies: " + "; ".join(failures) +
                        ". Nothing was deleted; move the workdir aside to start afresh.")


def set_aside(mngr: ocp.CheckpointManager, workdir, steps: list[int]) -> str:
  """Moves unverified checkpoints to WORKDIR/unverified_checkpoints/<step> (primary host); returns that dir."""
  destination = epath.Path(workdir) / UNVERIFIED_DIR
  if jax.process_index() == 0:
    destination.mkdir(parents=True, exist_ok=True)
    for step in steps:
      target = destination / str(step)
      suffix = 1
      while target.exists():
        target, suffix = destination / f"{step}.{suffix}", suffix + 1
      _move(epath.Path(mngr.directory) / str(step), target)
  return str(destination)


def _move(source: epath.Path, target: epath.Path) -> None:
  """Renames a directory; on an object store (no directories to rename) copies each file, then removes
  the source."""
  if "://" not in str(source):
    source.rename(target)
    return
  root = str(source).split("://", 1)[1].rstrip("/")
  for directory, _, files in source.walk():  # Yields bucket paths without the scheme.
    relative = str(directory).split("://", 1)[-1][len(root):].strip("/")
    for name in files:
      (source / relative / name).copy(target / relative / name)
  source.rmtree()


def resume(mngr: ocp.CheckpointManager, workdir, abstract_state, positions, restart_streams: bool,
           log: Callable[[str], None]):
  """The state of the newest checkpoint of `mngr` that verifies, with `positions`' streams restored.
  Newer unverified checkpoints are moved aside (warning naming each)."""
  state, step, bad_steps = restore_newest_verified(mngr, abstract_state, positions, restart_streams, log)
  if bad_steps:
    kept = set_aside(mngr, workdir, bad_steps)
    if jax.process_count() > 1:
      from maxsq_jax import distributed
      distributed.barrier(f"{workdir}:set_aside:{step}")
    mngr.reload()
    log(f"warning: resumed from step {step}, the newest checkpoint that verifies; the unverified step(s) "
        f"{', '.join(map(str, bad_steps))} were moved to {kept} (kept, not deleted).")
  else:
    log(f"Resumed from {mngr.directory} at step {step}")
  return state
