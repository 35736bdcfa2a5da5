"""Checksums saved with every checkpoint, and the restore that trusts only a checkpoint that verifies.

Each checkpoint holds `checksums` (JSON): a CRC-32 of every array of the train state, computed from
the values being saved. Each host's data-position file carries a CRC-32 of its positions
(checkpointing.StreamPositions). On restore the state's values are checksummed again; a mismatch, a
file that cannot be read (truncated, garbled, missing) or a position file that fails its CRC makes
the checkpoint unverified, and the newest checkpoint that verifies is used instead, with a warning
naming each bad one. Bad checkpoints are never deleted: they are moved to WORKDIR/unverified_checkpoints/
so that training can write those steps again. If none verifies, the error names each and why.

A checkpoint without `checksums` is unverified too when a version that stores them wrote it, as its
meta (CHECKSUMS_META_KEY) or its workdir's config.json / config_history.jsonl say
(checksums_expected); only an older one is read unverified, with a warning. Before any of this,
check_model_fits compares the saved variable shapes with the config's model.
"""

from __future__ import annotations

import json
import re
import zlib
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from maxsq_jax import errors
from maxsq_jax.errors import CheckpointError, ConfigError, DataError

UNVERIFIED_DIR = "unverified_checkpoints"
# A key of every checkpoint's meta (checkpointing.save): true, so that a checkpoint whose checksums/
# went missing is not taken for one written before checksums existed.
CHECKSUMS_META_KEY = "checksums_stored"


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


def _restore_state(mngr: ocp.CheckpointManager, step: int, abstract_state, warn: Callable[[str], None]):
  step_dir = epath.Path(mngr.directory) / str(step)
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  except Exception as e:  # A damaged checkpoint fails anywhere in Orbax/TensorStore; say which and how.
    raise Unverified(f"{step_dir}/state cannot be read ({errors.brief(e)})") from e
  state = restored["state"]
  bad = mismatched_arrays(mngr, step, state, warn)
  if bad:
    raise Unverified(f"{step_dir}/state: {len(bad)} array(s) do not match their saved checksums, e.g. {bad[0]}")
  return state


def _first_recorded_start(workdir: epath.Path) -> int | None:
  """The step of the first start in WORKDIR/config_history.jsonl (every start it records stored
  checksums), None when the history is missing or unreadable."""
  from maxsq_jax import run_config
  try:
    for line in (workdir / run_config.HISTORY_FILE).read_text().splitlines():
      if line.strip():
        step = json.loads(line).get("step")
        return step if isinstance(step, int) and not isinstance(step, bool) else None
  except (OSError, ValueError, AttributeError):
    return None
  return None


def checksums_expected(mngr: ocp.CheckpointManager, step: int) -> str | None:
  """Why checkpoint `step` must hold `checksums/` (a version that stores them wrote it, as its meta
  or its workdir's history says), or None if it may have been written before checksums existed."""
  from maxsq_jax import checkpointing, run_config
  directory = epath.Path(mngr.directory)
  try:
    if checkpointing.read_meta(mngr, step).get(CHECKSUMS_META_KEY):
      return f"{directory / str(step) / 'meta'} says they were stored with it"
  except Exception:  # A missing or damaged meta says nothing; the workdir's history may.
    pass
  if directory.name != "checkpoints":
    return None
  workdir = directory.parent
  first = _first_recorded_start(workdir)
  if first is not None:
    if step > first:
      return (f"{workdir / run_config.HISTORY_FILE} records that the run started at step {first} under a version "
              "that stores checksums")
    return None
  if (workdir / run_config.CONFIG_FILE).exists() or (workdir / run_config.HISTORY_FILE).exists():
    return (f"{workdir} has a {run_config.CONFIG_FILE} or {run_config.HISTORY_FILE}, written only by versions that "
            "store checksums")
  return None


def mismatched_arrays(mngr: ocp.CheckpointManager, step: int, tree, warn: Callable[[str], None]) -> list[str]:
  """The arrays of `tree` (the restored TrainState, or its {"params", "batch_stats"}) whose CRC-32
  differs from the one saved with checkpoint `step`, by their state path (".params['conv1']['kernel']").

  Unverified if the checksums cannot be read, or are missing from a checkpoint that a version storing
  them wrote (checksums_expected); [] with a warning for one written before checksums were stored."""
  step_dir = epath.Path(mngr.directory) / str(step)
  if not (step_dir / "checksums").exists():
    why = checksums_expected(mngr, step)
    if why is not None:
      raise Unverified(f"{step_dir}/checksums is missing, and {why}")
    warn(f"warning: {step_dir} has no checksums/ (written before checksums were stored, as far as its meta and "
         "workdir tell): its arrays cannot be verified.")
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
      state = _restore_state(mngr, step, abstract_state, warn)
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


def check_model_fits(mngr: ocp.CheckpointManager, workdir, abstract_state) -> None:
  """ConfigError when the variable shapes saved with the checkpoints (their metadata, read without
  the arrays) fit none of them to this config's model, naming the variable, both shapes and the
  model fields (model.width, ...) that differ: a workdir that lost its config.json, restarted with
  another model. Checkpoints whose metadata cannot be read are left to the verification."""
  from maxsq_jax import checkpointing, run_config
  like = {"params": abstract_state.params, "batch_stats": abstract_state.batch_stats}
  mismatches = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      mismatch = checkpointing.weight_shape_mismatch(epath.Path(mngr.directory) / str(step) / "state", like,
                                                     exact=True)
    except Exception:  # Unreadable metadata: a damaged checkpoint, which the verification names.
      continue
    if mismatch is None:
      return
    mismatches.append(mismatch)
  if not mismatches:
    return
  first, fields = mismatches[0]
  first = first.replace("its checkpoint has", "the checkpoints have")
  cause = "; ".join(f"config.{key}: {there} there, {here} in this config" for key, (there, here) in fields.items())
  cause = f" ({cause})" if cause else ""
  lost = (f" {epath.Path(workdir) / run_config.CONFIG_FILE}, which records the config they were trained with, is "
          "missing." if not (epath.Path(workdir) / run_config.CONFIG_FILE).exists() else "")
  fix = " ".join(f"--config.{key}={str(there).replace(' ', '')}" for key, (there, _) in fields.items())
  raise ConfigError(f"the checkpoints in {mngr.directory} were trained with another model than this config's: "
                    f"{first}{cause}.{lost} Pass the config they were trained with{f' ({fix})' if fix else ''}, or "
                    "use a new --workdir.")


def resume(mngr: ocp.CheckpointManager, workdir, abstract_state, positions, restart_streams: bool,
           log: Callable[[str], None]):
  """The state of the newest checkpoint of `mngr` that verifies, with `positions`' streams restored.
  Newer unverified checkpoints are moved aside (warning naming each). ConfigError when the
  checkpoints hold another model than the config's (check_model_fits)."""
  check_model_fits(mngr, workdir, abstract_state)
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
