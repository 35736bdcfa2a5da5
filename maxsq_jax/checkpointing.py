"""Orbax checkpoints of the train state plus both data streams' positions.

A checkpoint at step s holds: `state` (the TrainState pytree, saved by all hosts together),
`checksums` (JSON: a CRC-32 per array of the state), `data` (one JSON file per host: its
source/target stream positions after the batches of steps < s, with their CRC-32) and `meta` (JSON;
it says that checksums were stored: checkpoint_integrity.CHECKSUMS_META_KEY).
"""

import json
import sys
import threading
import time

import flax
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from maxsq_jax import abort, checkpoint_integrity, paths, storage
from maxsq_jax.checkpoint_integrity import crc32, tree_checksums
from maxsq_jax.errors import CheckpointError, WeightsError


def manager(directory, max_to_keep: int, save_interval_steps: int = 1) -> ocp.CheckpointManager:
  """A CheckpointManager of `directory` (a local path or gs:// URL, created if missing)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         save_interval_steps=save_interval_steps)
  return ocp.CheckpointManager(paths.resolve(directory), options=options)


class StreamPositions:
  """Adapts the data streams to grain's Orbax handler, which writes one JSON file per process
  (`process_<i>-of-<n>.json`): each host saves and restores its own streams' positions."""

  def __init__(self, streams: dict):
    self.streams = dict(streams)

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
      meta=ocp.args.JsonSave({**meta, checkpoint_integrity.CHECKSUMS_META_KEY: True})), force=force)


class Saver:
  """The checkpoint saves of a run, riding out storage outages of a gs:// workdir.

  `save` starts a save (async; it first waits for the previous one), `commit` saves if needed and
  waits until the step is committed. A save that raises (on gs://: storage did not answer, gcsfs
  gives up after about half a minute) is tried again, for the step at hand, with backoff. While the
  training waits on a save, a warning goes to stderr after `stall_warn_s` seconds and a line when it
  is done; after `deadline_s` seconds the process stops (abort.stop) with one error line naming the
  URL, how long it waited and the newest committed checkpoint. On a pod every host waits at the same
  save, so every host stops within seconds of the others. A local directory is not retried.
  """

  def __init__(self, mngr: ocp.CheckpointManager, stall_warn_s: float = 30.0, deadline_s: float = 600.0):
    self.mngr = mngr
    self.remote = paths.is_remote(mngr.directory)
    self.stall_warn_s, self.deadline_s = stall_warn_s, deadline_s
    self._in_flight = None  # The step of the save started last, not yet known committed.
    self._lock = threading.Lock()
    self._newest = mngr.latest_step()  # The newest step known committed.
    abort.note_committed(mngr.directory, self._newest)

  def save(self, step: int, state, streams: dict, meta: dict, force: bool = False) -> bool:
    """Starts saving `step` (see `save`); whether a save was started."""
    with _Patience(self, f"saving checkpoint step {step}") as patience:
      while True:
        try:
          saved = save(self.mngr, step, state, streams, meta, force=force or patience.attempts > 0)
          break
        except Exception as e:  # On gs://, gcsfs and tensorstore raise many types for one outage.
          if not self.remote:
            raise
          self._in_flight = None
          patience.failed(e)
    self._committed(self._in_flight)  # mngr.save waited for it.
    if saved:
      self._in_flight = step
      threading.Thread(target=self._confirm, args=(step,), name="maxsq-checkpoint-commit", daemon=True).start()
    return saved

  def _confirm(self, step: int) -> None:
    """Notes `step` committed once the async save has finished (an error stays for the next save,
    which raises it: Orbax raises a save's error once in each thread that waits for it)."""
    try:
      self.mngr.wait_until_finished()
    except Exception:
      return
    self._committed(step)

  def commit(self, step: int, state, streams: dict, meta: dict) -> None:
    """Saves `step` unless it is saved or being saved, and waits until it is committed."""
    with _Patience(self, f"committing checkpoint step {step}") as patience:
      while True:
        try:
          if self.mngr.latest_step() != step:  # A failed save is no longer listed.
            save(self.mngr, step, state, streams, meta, force=True)
          self.mngr.wait_until_finished()
          break
        except Exception as e:
          if not self.remote:
            raise
          patience.failed(e)
    self._in_flight = None
    self._committed(step)

  def _committed(self, step: int | None) -> None:
    with self._lock:
      if step is not None and (self._newest is None or step > self._newest):
        self._newest = step
        abort.note_committed(self.mngr.directory, step)


class _Patience:
  """The deadline of one wait on checkpoint storage (Saver): tries, backoff, the warning, the stop."""

  def __init__(self, saver: Saver, what: str):
    self.saver, self.what = saver, what
    self.attempts, self.error = 0, None
    self._warned = False

  def __enter__(self) -> "_Patience":
    self._start = time.monotonic()
    self._timers = [threading.Timer(self.saver.stall_warn_s, self._warn), threading.Timer(self.saver.deadline_s, self._stop)]
    for timer in self._timers:
      timer.daemon = True
      timer.start()
    return self

  def _waited(self) -> str:
    return f"{time.monotonic() - self._start:.0f} s"

  def _reason(self) -> str:
    return storage.describe(self.error) if self.error is not None else "no answer yet"

  def _warn(self) -> None:
    self._warned = True
    storage.say(f"warning: storage {self.saver.mngr.directory} has not completed {self.what} for "
                f"{self._waited()} ({self._reason()}); retrying until config.storage.deadline_s="
                f"{self.saver.deadline_s:g} s")

  def _stop(self) -> None:
    import jax
    hosts = " on every host" if jax.process_count() > 1 else ""
    abort.stop(f"storage {self.saver.mngr.directory} has not answered for {self._waited()} while {self.what} "
               f"({self._reason()}; config.storage.deadline_s={self.saver.deadline_s:g}); the last checkpoint "
               f"known to be committed is {abort.last_committed()}. Rerun the same command{hosts} when storage "
               "answers: it resumes from the newest committed checkpoint.")

  def failed(self, error: BaseException) -> None:
    """Records a failed try and waits before the next one."""
    self.error, self.attempts = error, self.attempts + 1
    left = self.saver.deadline_s - (time.monotonic() - self._start)
    time.sleep(max(min(2.0 ** self.attempts, storage.MAX_BACKOFF_S, left), 0.0))

  def __exit__(self, *exc) -> None:
    for timer in self._timers:
      timer.cancel()
    if self._warned and exc[0] is None:
      storage.say(f"storage {self.saver.mngr.directory} answers again: {self.what} done after {self._waited()}")


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


def _model_fields(shapes: dict) -> dict:
  """{"model.width", "model.num_classes", "model.blocks": value} as far as the variable shapes of a
  DeepLabV2 ({"params/conv1/kernel": shape}) tell them."""
  fields = {}
  if "params/conv1/kernel" in shapes:
    fields["model.width"] = shapes["params/conv1/kernel"][-1]
  if "params/layer6/conv2d_list_0/bias" in shapes:
    fields["model.num_classes"] = shapes["params/layer6/conv2d_list_0/bias"][0]
  blocks = tuple(len({key.split("/")[2] for key in shapes if key.startswith(f"params/layer{k}/block_")})
                 for k in range(1, 5))
  if all(blocks):
    fields["model.blocks"] = blocks
  return fields


def weight_shape_mismatch(state_dir, like, exact: bool = False) -> tuple[str, dict] | None:
  """How the params/batch_stats saved in the checkpoint item `state_dir` differ from `like`'s: (the
  first variable that the checkpoint lacks or holds in another shape, or with `exact` holds and `like`
  lacks; {config field: [value there, value in `like`]} of the model fields that explain it, as far as
  the shapes tell), or None if they fit."""
  handler = ocp.PyTreeCheckpointHandler()  # Not a Checkpointer: no log line about a step-level metadata file.
  try:
    saved = handler.metadata(epath.Path(state_dir)).tree
  finally:
    handler.close()
  have, want = {}, {}
  for collection in ("params", "batch_stats"):
    for key, spec in flax.traverse_util.flatten_dict(dict(saved.get(collection, {})), sep="/").items():
      have[f"{collection}/{key}"] = tuple(spec.shape)
    for key, spec in flax.traverse_util.flatten_dict(flax.core.unfreeze(like[collection]), sep="/").items():
      want[f"{collection}/{key}"] = tuple(spec.shape)
  first = None
  for key, shape in want.items():
    if key not in have:
      first = f"its checkpoint has no variable {key}, which the model of this config has"
    elif have[key] != shape:
      first = f"variable {key} has shape {have[key]} there, the model of this config needs {shape}"
    if first:
      break
  extra = [key for key in have if key not in want] if exact else []
  if first is None and extra:
    first = f"its checkpoint has a variable {extra[0]}, which the model of this config lacks"
  if first is None:
    return None
  there, here = _model_fields(have), _model_fields(want)
  return first, {key: [there[key], here[key]] for key in here if key in there and there[key] != here[key]}


def check_weight_shapes(state_dir, like, what: str) -> None:
  """WeightsError naming the first variable of params/batch_stats whose saved shape (in the checkpoint
  item `state_dir`) differs from `like`'s, or that the checkpoint lacks, and the model fields that
  differ; `what` is "flag=path"."""
  mismatch = weight_shape_mismatch(state_dir, like)
  if mismatch is not None:
    first, fields = mismatch
    cause = "; ".join(f"config.{k}: {v[0]} there, {v[1]} in this config" for k, v in fields.items())
    raise WeightsError(f"{what}: {first} ({cause or 'another model.width, blocks or num_classes?'})")


def _placed_like(value, like):
  """`value` as `like`'s dtype: on `like`'s sharding if it has one, else a NumPy array."""
  sharding = getattr(like, "sharding", None)
  value = np.asarray(value, like.dtype)
  return jax.device_put(value, sharding) if sharding is not None else value


def _initial_value(like):
  """The value to keep for a variable the converted weights lack: `like`'s own, or zeros for a shape."""
  return np.asarray(jax.device_get(like)) if isinstance(like, jax.Array) else np.zeros(like.shape, like.dtype)


def _warn(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _nonfinite(variables) -> list[str]:
  """The "collection/.../name" of every array of `variables` (jax arrays: this host's copy) holding NaN or inf."""
  flat = flax.traverse_util.flatten_dict(variables, sep="/")
  local = lambda v: np.asarray(v.addressable_data(0) if isinstance(v, jax.Array) else v)
  return [name for name, value in flat.items() if not np.isfinite(local(value)).all()]


def load_weights(path, like: dict, step: int | None = None, what: str = "--checkpoint") -> tuple[dict, dict]:
  """The weights {"params", "batch_stats"} in `path` (local or gs://), for training's init_from, the
  evaluate CLI and the loss analysis.

  `path` is a converted-weights dir (tools.convert_torch; its arrays are checked against the CRC-32s
  of its report: models.convert.load_converted_variables) or a training run's workdir (or its
  checkpoints/ dir): then its checkpoint `step` (default: the latest), whose arrays are checked against
  the CRC-32 saved with them (checkpoint_integrity.mismatched_arrays: a checkpoint without them is
  refused unless it was written before checksums existed, which is a warning). Arrays holding NaN or
  inf are refused. `like` is {"params", "batch_stats"} of this model's arrays or
  jax.ShapeDtypeStructs: the weights come back in its dtypes, as jax arrays on its leaves' shardings
  where they have one, else as NumPy arrays. A variable the converted weights lack (e.g. an aux head
  not converted) keeps `like`'s value (zeros where `like` gives only a shape). `what` names the flag
  or config field that gave `path`, for the errors. Warnings go to stderr.

  Returns (variables, info); info: {"checkpoint", "checkpoint_kind": "converted" | "run", and
  "checkpoint_step" (run) or "conversion_layout" and "missing" (converted: variables not converted)}.
  """
  from maxsq_jax.models import convert
  path = paths.resolve(path, what)
  paths.check_reachable(path, what)
  what = f"{what}={path}"
  like = {"params": like["params"], "batch_stats": like.get("batch_stats", {})}
  if convert.is_converted_dir(path):
    try:
      variables = convert.load_converted_variables(path, jax.tree_util.tree_map(_initial_value, like), _warn)
    except convert.ConversionError as e:
      raise WeightsError(f"{what}: {e}") from e
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    report = convert.read_conversion_report(path)
    info = {"checkpoint": str(path), "checkpoint_kind": "converted", "conversion_layout": report.get("layout"),
            "missing": list(report.get("missing", []))}
    return jax.tree_util.tree_map(_placed_like, variables, like), info
  if not path.is_dir():
    raise CheckpointError(f"{what}: no such directory (give a run's workdir or a converted-weights dir)")
  directory = run_checkpoints(path)
  mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    steps = mngr.all_steps()
    if not steps:
      raise CheckpointError(f"no checkpoint in {str(directory)!r} ({what}): give a run's workdir or a "
                            "converted-weights dir (python -m maxsq_jax.tools.convert_torch)")
    step = max(steps) if step is None else step
    if step not in steps:
      raise CheckpointError(f"no checkpoint at step {step} in {str(directory)!r}; steps: {sorted(steps)}")
    damaged = (f"the checkpoint was damaged; give another checkpoint (steps in {directory}: "
               f"{', '.join(map(str, sorted(steps)))})")
    check_weight_shapes(directory / str(step) / "state", like, what)
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
    restore_args = jax.tree_util.tree_map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding) if getattr(x, "sharding", None) is not None
        else ocp.RestoreArgs(restore_type=np.ndarray), like)
    try:
      variables = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=abstract, restore_args=restore_args, partial_restore=True)))["state"]
    except Exception as e:  # Damaged files fail anywhere in Orbax/TensorStore.
      first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
      raise CheckpointError(f"{what}: {directory / str(step)}/state cannot be read ({type(e).__name__}: {first}); "
                            f"{damaged}") from None
    try:
      bad = checkpoint_integrity.mismatched_arrays(mngr, step, variables, _warn)
    except checkpoint_integrity.Unverified as e:
      raise CheckpointError(f"{what}: {e}; {damaged}") from e
    if bad:
      raise CheckpointError(f"{what}: checkpoint step {step}: {bad[0]} does not match its saved checksum; {damaged}")
  finally:
    mngr.close()
  nonfinite = _nonfinite(variables)
  if nonfinite:
    raise CheckpointError(f"{what}: checkpoint step {step}: {len(nonfinite)} array(s) hold NaN or infinite values, "
                          f"e.g. {', '.join(nonfinite[:5])}; give another checkpoint")
  return variables, {"checkpoint": str(path), "checkpoint_kind": "run", "checkpoint_step": int(step)}
