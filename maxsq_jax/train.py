"""`train_and_evaluate(config, workdir)`: training in a workdir, in three parts.

`_set_up`: data preparation, mesh, model & objective, state (initial, init_from or resumed), input
streams, jitted step, checkpoint manager, evaluator. `_loop`: the steps (metrics, NaN guard,
checkpoints up to the final one, evaluations, SIGTERM). `_finish`: the final evaluation.
"""

import contextlib
import dataclasses
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
import tqdm
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maxsq_jax import (
  abort,
  checkpoint_integrity,
  checkpointing,
  compilation_cache,
  distributed,
  jsonfile,
  objective as objective_lib,
  optim,
  paths,
  profiling,
  run_config,
  storage,
  train_step as step_lib,
  workdir_lock,
)
from maxsq_jax.data import pipeline, synthetic
from maxsq_jax.errors import ConfigError, MaxsqError
from maxsq_jax.evaluator import Evaluator
from maxsq_jax.metric_writer import MetricWriter
from maxsq_jax.models import DeepLabV2


class NonFiniteLossError(MaxsqError, RuntimeError):
  """The loss became NaN/inf; the state was not updated and earlier checkpoints are intact."""


def log(message: str) -> None:
  """Prints `message` on the primary host: a "warning: ..." on stderr, progress on stdout."""
  if jax.process_index() == 0:
    print(message, file=sys.stderr if message.startswith("warning:") else sys.stdout, flush=True)


def create_mesh(devices=None) -> Mesh:
  """A 1-D data-parallel mesh over `devices`: by default every device of every host; aot.py passes the
  devices of a TPU topology description."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def build_model(config) -> DeepLabV2:
  """`DeepLabV2(**config.model)`; sequences become tuples (a config read back from JSON holds lists)."""
  fields = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in config.model.items()}
  return DeepLabV2(**fields)


def prepare_data(config, barrier_name: str, domains=("source", "target")) -> None:
  """Refuses data directories given as URLs; creates the embedded synthetic datasets of `domains` if
  the config uses them and they are missing. All hosts then meet at the barrier `barrier_name`."""
  data = config.data
  paths.require_local(data.source_dir, "config.data.source_dir")
  paths.require_local(data.target_dir, "config.data.target_dir")
  for domain in domains:
    name, root = data[domain], data[f"{domain}_dir"]
    if name not in (synthetic.SOURCE_NAME, synthetic.TARGET_NAME) or synthetic.is_complete(root):
      continue
    if not data.generate_synthetic:
      continue  # open_examples raises an error that names the generate command.
    data_root = os.path.dirname(os.path.normpath(root)) or "."
    if os.path.normpath(root) != os.path.normpath(os.path.join(data_root, name)):
      raise ValueError(f"config.data dir {root!r} for {name} must end in /{name} to be generated")
    if jax.process_index() == 0:
      log(f"Generating the synthetic benchmark under {data_root} ...")
      synthetic.generate(data_root, data.synthetic_num_train, data.synthetic_num_val,
                         tuple(data.synthetic_size), seed=0, verbose=False,
                         class_hue_deg=data.synthetic_class_hue_deg)
  distributed.barrier(barrier_name)


def state_program(config, model, mesh: Mesh, image_shape):
  """(init, state sharding, optimiser, lr schedule), nothing allocated: `init` is the jitted
  rng key -> TrainState, replicated on the mesh; `image_shape` [1, H, W, 3] is what the variables are
  initialised for."""
  replicated = NamedSharding(mesh, P())
  rng = jax.random.key(config.seed)
  params_shape = jax.eval_shape(lambda: model.init(rng, jnp.zeros(image_shape), train=False))["params"]
  tx, schedule = optim.make_optimizer(config.optim, schedule_steps=config.optim.schedule_steps, params=params_shape,
                                      multi_level=config.loss.multi_level,
                                      aspp_branches=config.model.aspp_branches)
  init = jax.jit(lambda r: step_lib.init_state(model, tx, r, image_shape), out_shardings=replicated)
  return init, replicated, tx, schedule


def initial_state(config, model, mesh: Mesh, image_shape):
  """(state, its sharding, optimiser, lr schedule): `state_program`'s init run for config.seed."""
  init, sharding, tx, schedule = state_program(config, model, mesh, image_shape)
  return init(jax.random.key(config.seed)), sharding, tx, schedule


def jit_train_step(config, model, objective, tx, schedule, mesh: Mesh, state_sharding):
  """The jitted train step of `config.stage` on the mesh: (state, source_batch[, target_batch]) ->
  (state, metrics); the state is donated, batches are split over the mesh's "data" axis."""
  step_fn = step_lib.make_train_step(model, objective, tx, schedule, config.stage)
  num_batches = 2 if config.stage == "adapt" else 1
  return jax.jit(step_fn, donate_argnums=(0,),
                 in_shardings=(state_sharding,) + (NamedSharding(mesh, P("data")),) * num_batches,
                 out_shardings=(state_sharding, NamedSharding(mesh, P())))


def load_init_weights(state, path):
  """`state` with the params and batch stats of a converted-weights dir or another run's workdir
  (local or gs://; checkpointing.load_weights), on the state's shardings."""
  like = {"params": state.params, "batch_stats": state.batch_stats}
  variables, _ = checkpointing.load_weights(path, like, what="config.init_from")
  return state.replace(**variables)


def itstime(step: int, every: int, total: int, at_end: bool = False) -> bool:
  """Whether something done every `every` steps (0: never) is due after `step` steps of `total`.

  The last step is due only with `at_end`: the loop's final save and evaluation follow it anyway."""
  if step == total:
    return at_end
  return every > 0 and step % every == 0


class MetricWindow:
  """Running sums of the step metrics since the last log line; `mean()` averages them and adds
  steps_per_sec over the window, then starts a new window."""

  def __init__(self):
    self._reset()

  def _reset(self) -> None:
    self._sums, self._count, self._start = {}, 0, time.time()

  def add(self, values: dict) -> None:
    for key, value in values.items():
      self._sums[key] = self._sums.get(key, 0.0) + float(value)
    self._count += 1

  def mean(self) -> dict:
    elapsed = time.time() - self._start
    averaged = {k: v / self._count for k, v in self._sums.items() if k != "nonfinite"}
    averaged["steps_per_sec"] = self._count / max(elapsed, 1e-9)
    self._reset()
    return averaged


class _Preemption:
  """Tells the loop after each step whether to save a checkpoint there and stop: SIGTERM (a preempted VM).

  One process: a SIGTERM handler sets a flag. Several processes: the notice reaches the hosts at
  different times, so they must agree on the step, or some would enter the collective save while
  others train on. JAX's preemption service (started by `jax.distributed.initialize`) catches SIGTERM
  on whichever host gets it and sets the step max(steps reached by any host) + 1, which Orbax's
  `CheckpointManager.reached_preemption` reports on every host. No Python handler is installed
  then: it would replace the service's own.
  """

  def __init__(self, mngr):
    self._mngr = mngr
    self._received = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # Not the main thread: no handler.
        self._previous = None
    return self

  def _handle(self, signum, frame):
    self._received = True

  def reached(self, step: int) -> bool:
    """Called by every host after every step, with the number of steps done."""
    if jax.process_count() == 1:
      return self._received
    return self._mngr.reached_preemption(step)

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


@contextlib.contextmanager
def _saves_finished_on_error(mngr):
  """Waits for in-flight checkpoint saves when the block is left by an error, so that no checkpoint
  stays half-written as N.orbax-checkpoint-tmp (the loop's normal end is followed by `Run.commit`)."""
  try:
    yield
  except BaseException:
    try:
      mngr.wait_until_finished()
    except Exception:  # The save failed too (storage): the error already raised is the one to report.
      pass
    raise


def train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> dict:
  """Trains (stage "source_only" or "adapt") in `workdir` (a local path or a gs:// URL), resuming from its
  checkpoints; returns results.

  Results: {"step", "target_miou" (fraction), "per_class_iou", "confusion", ...} of the final
  evaluation, and "state": the final TrainState.
  """
  if not os.fspath(workdir).strip():
    raise ConfigError("the workdir is empty: name the run's directory (it would be the current directory)")
  if config.stage == "source_then_adapt":
    return source_then_adapt(config, workdir)
  if config.stage in ("adabn", "source_then_adabn"):
    from maxsq_jax import adabn
    return adabn.run(config, workdir) if config.stage == "adabn" else adabn.source_then_adabn(config, workdir)
  workdir = paths.resolve(workdir, "--workdir")
  paths.check_reachable(workdir, "--workdir")
  paths.make_dir(workdir, "--workdir")
  with workdir_lock.hold(workdir) as lock, abort.cleanup(getattr(lock, "release", None)):
    # Compared before anything is written: a refused restart leaves the workdir as it was.
    changes = run_config.changes(config, workdir)
    try:
      return _train(config, workdir, changes)
    except MaxsqError:
      raise
    except Exception:
      distributed.wait_for_lost_host()  # Ends the process with one line if the error is a host gone.
      raise


@dataclasses.dataclass
class _Run:
  """What the training loop works with, built by `_set_up`."""

  config: ml_collections.ConfigDict
  workdir: epath.Path
  model: DeepLabV2
  mesh: Mesh
  state: step_lib.TrainState  # Restored from the workdir's newest verified checkpoint, or initial.
  streams: dict  # {"source": batches, "target": batches}; no "target" for the source-only stage.
  train_step: Callable  # jax.jit of (state, source_batch[, target_batch]) -> (state, metrics).
  saver: checkpointing.Saver  # Of `mngr`: saves that ride out storage outages.
  mngr: ocp.CheckpointManager
  evaluator: Evaluator
  writer: MetricWriter
  # Primary host of a gs:// workdir: the evaluations during training, written to `eval_staging` and
  # uploaded in the background; None otherwise.
  eval_uploads: storage.Uploader | None = None
  eval_staging: epath.Path | None = None

  def _meta(self, step: int) -> dict:
    return {"step": step, "stage": self.config.stage, "optim_rule": self.config.optim.rule}

  def save(self, step: int) -> bool:
    """Starts saving the state at `step` (async)."""
    return self.saver.save(step, self.state, self.streams, self._meta(step))

  def commit(self, step: int) -> None:
    """Saves the state at `step` unless it is already saved, and waits until it is committed."""
    self.saver.commit(step, self.state, self.streams, self._meta(step))


def _set_up(config: ml_collections.ConfigDict, workdir, config_changes: dict) -> _Run:
  """Everything before the first step: data, mesh, model, state (initial, init_from or resumed), the
  input streams, the jitted step, the checkpoint manager, the evaluator; records the start."""
  objective = objective_lib.make_objective(config.loss)  # A mistyped loss fails before any work.
  cache = compilation_cache.enable(config.compilation_cache_dir)
  init_from = paths.resolve(config.init_from, "config.init_from") if config.init_from else None
  if init_from is not None:
    paths.check_reachable(init_from, "config.init_from")
  prepare_data(config, f"{workdir}:{config.stage}:prepare_data")
  writer = MetricWriter(workdir, stall_warn_s=config.storage.stall_warn_s, deadline_s=config.storage.deadline_s)

  mesh = create_mesh()
  model = build_model(config)
  per_host = pipeline.local_batch_size(config.batch_size, mesh)
  log(f"{jax.process_count()} host(s), {jax.device_count()} device(s); global batch {config.batch_size} per domain "
      f"= {per_host} per host = {config.batch_size // jax.device_count()} per device; compilation cache: "
      f"{cache or 'off'}")
  width, height = config.data.source_size
  state, state_sharding, tx, schedule = initial_state(config, model, mesh, (1, height, width, 3))

  streams = {"source": pipeline.train_stream(config, "source", mesh, seed=config.seed)}
  if config.stage == "adapt":
    streams["target"] = pipeline.train_stream(config, "target", mesh, seed=config.seed + 1000)
  evaluator = Evaluator(config, model, mesh, pipeline.eval_data(config, mesh))

  mngr = checkpointing.manager(workdir / "checkpoints", config.max_to_keep)
  if mngr.all_steps():
    state = checkpoint_integrity.resume(mngr, workdir, checkpointing.abstract_like(state),
                                        checkpointing.StreamPositions(streams), config.data.restart_streams, log)
    resumed = int(jax.device_get(state.step))
    # Checkpoints from before optim.rule existed were written by the nominal optimiser.
    written_rule = checkpointing.read_meta(mngr, resumed).get("optim_rule", "nominal")
    if written_rule != config.optim.rule:  # Same optimiser state under both rules (optim.listed_sgd).
      log(f"note: the checkpoint was written under config.optim.rule={written_rule!r}; continuing under "
          f"{config.optim.rule!r}.")
  elif init_from is not None:
    state = load_init_weights(state, init_from)
    log(f"Initialised weights from {init_from}")

  if jax.process_index() == 0:
    run_config.record_start(config, workdir, int(jax.device_get(state.step)), config_changes)

  train_step = jit_train_step(config, model, objective, tx, schedule, mesh, state_sharding)
  saver = checkpointing.Saver(mngr, config.storage.stall_warn_s, config.storage.deadline_s)
  run = _Run(config=config, workdir=workdir, model=model, mesh=mesh, state=state, streams=streams,
             train_step=train_step, saver=saver, mngr=mngr, evaluator=evaluator, writer=writer)
  if paths.is_remote(workdir) and jax.process_index() == 0:
    run.eval_uploads = storage.Uploader(workdir, config.storage.stall_warn_s, name="eval-uploads")
    run.eval_staging = epath.Path(tempfile.mkdtemp(prefix="maxsq_eval_"))
  return run


def _loop(run: _Run) -> None:
  """Trains `run.state` from its step to config.num_steps: metrics, the NaN guard, checkpoints (the
  final one included), evaluations during training, SIGTERM (saves and exits 143)."""
  config, workdir, mngr = run.config, run.workdir, run.mngr
  start, num_steps = int(jax.device_get(run.state.step)), config.num_steps
  compiled_step = None
  pending = None  # (step, metrics) of the previous step: checked one step late to keep the device busy.
  window = MetricWindow()
  bar = tqdm.tqdm(total=num_steps, initial=start, disable=jax.process_index() != 0, desc=config.stage,
                  unit="step", mininterval=2.0, dynamic_ncols=True)
  trace = profiling.StepTrace(config.profile_steps, workdir / "tensorboard", log)

  def check(step, metrics):
    values = jax.device_get(metrics)
    if values["nonfinite"]:
      mngr.wait_until_finished()
      kept = mngr.latest_step()
      terms = {k: float(v) for k, v in values.items() if k != "nonfinite"}
      raise NonFiniteLossError(
          f"non-finite loss at step {step} ({terms}); the update was not applied. The last good checkpoint is "
          f"step {kept} in {workdir}/checkpoints. Lower config.optim.lr, or check the input data, then rerun "
          f"the same command to resume from it.")
    window.add(values)

  with _Preemption(mngr) as preemption, _saves_finished_on_error(mngr):
    for step in range(start, num_steps):
      batches = [next(stream) for stream in run.streams.values()]  # Source, then target when adapting.
      if compiled_step is None:  # Compiled ahead of its first run so that all hosts start it together.
        compiled_step = run.train_step.lower(run.state, *batches).compile()
        distributed.barrier(f"{workdir}:{config.stage}:compiled:{step}")
      trace.before(step + 1)
      run.state, metrics = compiled_step(run.state, *batches)
      trace.after(step + 1, metrics)
      if pending is not None:
        check(*pending)
      pending = (step + 1, metrics)
      bar.update(1)
      done = step + 1
      if itstime(done, config.log_every, num_steps, at_end=True):
        check(*pending)
        pending = None
        averaged = window.mean()
        bar.clear()
        run.writer.scalars(done, averaged, prefix="train/")
      if itstime(done, config.checkpoint_every, num_steps):
        if pending is not None:
          check(*pending)
          pending = None
        run.save(done)
      if itstime(done, config.eval.every, num_steps):
        distributed.barrier(f"{workdir}:eval:{done}")
        _evaluate_during_training(run, done)
      if preemption.reached(done):
        if pending is not None:
          check(*pending)
        _exit_preempted(run, done)
    if pending is not None:
      check(*pending)
    # The final checkpoint, saved while SIGTERM is still caught: one that arrives during the save (or
    # after the last step's check) ends the run with 143 once it is written, and a rerun only evaluates.
    final_step = int(jax.device_get(run.state.step))
    if config.stage == "adapt" and config.adabn.after_adapt and mngr.latest_step() != final_step:
      from maxsq_jax import adabn  # The final model's statistics, in its checkpoint and its evaluation.
      run.state = adabn.apply(config, run.mesh, run.state)
    run.commit(final_step)
    if preemption.reached(final_step):
      _exit_preempted(run, final_step)
  trace.close()
  bar.close()


def _exit_preempted(run: _Run, step: int) -> None:
  """After SIGTERM: saves a checkpoint at `step` unless there is one, waits until it is committed, exits 143."""
  run.commit(step)
  _finish_eval_uploads(run)
  print(f"SIGTERM: {'' if jax.process_count() == 1 else f'process {jax.process_index()}: '}saved a "
        f"checkpoint at step {step} in {run.workdir}/checkpoints; rerun to resume.", flush=True)
  raise SystemExit(143)


def _evaluate_during_training(run: _Run, step: int) -> None:
  """An evaluation at `step`; for a gs:// workdir its files are written to a local folder and uploaded
  in the background (run.eval_uploads), so that the training does not wait for storage."""
  staging = run.eval_staging
  run.evaluator(run.state.params, run.state.batch_stats, staging or run.workdir, step, run.writer)
  if staging is not None:
    for folder, _, names in os.walk(os.fspath(staging)):
      for name in sorted(names):
        file = os.path.join(folder, name)
        run.eval_uploads.put(file, run.workdir / os.path.relpath(file, staging), delete_local=True)


def _finish_eval_uploads(run: _Run) -> None:
  """Waits (at most config.storage.deadline_s) for the uploads of the evaluations during training."""
  if run.eval_uploads is None:
    return
  deadline_s = run.config.storage.deadline_s
  if run.eval_uploads.close(deadline_s):
    raise storage.StorageError(f"storage {run.workdir} did not take the files of the evaluations during training "
                               f"within config.storage.deadline_s={deadline_s:g} s; they are kept in "
                               f"{run.eval_staging}: copy them to {run.workdir} (gcloud storage cp -r) when it answers")
  shutil.rmtree(run.eval_staging, ignore_errors=True)
  run.eval_uploads = None


def _finish(run: _Run, evaluate: bool = True) -> dict:
  """The final evaluation (target, and source when config.eval.source_split) once the final checkpoint
  (saved by `_loop`) is committed; without `evaluate`, the results of the final evaluation already in
  the workdir (`stored_results`)."""
  config, workdir, state = run.config, run.workdir, run.state
  final_step = int(jax.device_get(state.step))
  run.commit(final_step)
  run.mngr.close()
  _finish_eval_uploads(run)
  if not evaluate:
    log(f"{workdir} is finished: step {final_step} was evaluated before, its results are in {workdir}/results.json "
        f"(python -m maxsq_jax.evaluate --checkpoint={workdir} evaluates it again)")
    run.writer.close()
    return {**stored_results(config, workdir, final_step), "state": state}
  distributed.barrier(f"{workdir}:final_eval:{final_step}")
  results = run.evaluator(state.params, state.batch_stats, workdir, final_step, run.writer)
  if config.eval.source_split:
    source_evaluator = Evaluator(config, run.model, run.mesh, pipeline.eval_data(config, run.mesh, "source"))
    distributed.barrier(f"{workdir}:source_eval:{final_step}")
    source_results = source_evaluator(state.params, state.batch_stats, workdir / "source_eval",
                                      final_step, run.writer, tag="source")
    results["source_miou"] = source_results["miou"]
  run.writer.close()
  return {**results, "state": state}


def stored_results(config, workdir, step: int) -> dict | None:
  """The final evaluation's results as `_finish` returns them, read from the workdir's results.json
  (and source_eval/results.json when config.eval.source_split), if they are those of `step`; else None."""
  files = [workdir / "results.json"] + ([workdir / "source_eval" / "results.json"] if config.eval.source_split else [])
  if not all(f.exists() for f in files):
    return None
  stored = [jsonfile.read(f) for f in files]
  if any(r.get("step") != step for r in stored):
    return None
  results = stored[0]
  if config.eval.source_split:
    results["source_miou"] = stored[1]["miou"]
  return results


def _evaluated_before(config, workdir, step: int, config_changes: dict) -> bool:
  """Whether a rerun that trained no step may skip the final evaluation: its results are in the workdir
  and no config.eval setting changed. Decided by the primary host for all (a collective)."""
  decided = (jax.process_index() == 0 and not any(key.startswith("eval.") for key in config_changes)
             and stored_results(config, workdir, step) is not None)
  if jax.process_count() == 1:
    return decided
  import numpy as np
  from jax.experimental import multihost_utils
  distributed.barrier(f"{workdir}:evaluated_before:{step}")  # Meet first: CPU collectives time out after 30 s.
  return bool(multihost_utils.broadcast_one_to_all(np.int32(decided)))


def _train(config: ml_collections.ConfigDict, workdir, config_changes: dict) -> dict:
  """train_and_evaluate's body, run while holding the workdir; `config_changes` are those of a restart."""
  run = _set_up(config, workdir, config_changes)
  start = int(jax.device_get(run.state.step))
  _loop(run)
  if start >= config.num_steps and _evaluated_before(config, workdir, start, config_changes):
    return _finish(run, evaluate=False)
  return _finish(run)


def source_stage_config(config) -> ml_collections.ConfigDict:
  """Stage 1 of a "source_then_adapt" config: source-only for `pretrain.num_steps` (multi-level if
  the adaptation is, so that its aux head is trained)."""
  source_config = ml_collections.ConfigDict(config.to_dict())
  source_config.stage = "source_only"
  source_config.num_steps = config.pretrain.num_steps
  source_config.optim.schedule_steps = config.pretrain.schedule_steps
  source_config.loss.multi_level = config.loss.multi_level
  return source_config


def adapt_stage_config(config, source_workdir) -> ml_collections.ConfigDict:
  """Stage 2 of a "source_then_adapt" config: adaptation starting from the weights in `source_workdir`
  (local or gs://)."""
  adapt_config = ml_collections.ConfigDict(config.to_dict())
  adapt_config.stage = "adapt"
  adapt_config.init_from = str(paths.resolve(source_workdir))
  return adapt_config


# The stage folders of a "source_then_adapt" workdir, in training order.
STAGE_DIRS = ("source_only", "adapt")


def source_then_adapt(config, workdir) -> dict:
  """The demo: source-only into WORKDIR/source_only, then adaptation from it into WORKDIR/adapt."""
  workdir = paths.resolve(workdir, "--workdir")
  paths.check_reachable(workdir, "--workdir")
  source_dir, adapt_dir = (workdir / stage for stage in STAGE_DIRS)
  log("=== stage 1/2: source only ===")
  source_results = train_and_evaluate(source_stage_config(config), source_dir)
  log(f"=== stage 2/2: adaptation with {config.loss.target} ===")
  adapt_results = train_and_evaluate(adapt_stage_config(config, source_dir), adapt_dir)
  return write_summary(workdir, source_results, adapt_results)


def write_summary(workdir, source_results, adapt_results) -> dict:
  """WORKDIR/summary.json of a demo (the source-only and the adapted results): both target mIoUs; returns
  them with both stages' results."""
  summary = {"source_only_target_miou": source_results["target_miou"],
             "adapted_target_miou": adapt_results["target_miou"],
             "source_only": source_results, "adapt": adapt_results}
  if jax.process_index() == 0:
    jsonfile.write(workdir / "summary.json", {k: v for k, v in summary.items() if k.endswith("miou")})
  return summary
