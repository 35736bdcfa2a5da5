"""AdaBN (Li et al., "Revisiting Batch Normalization for Practical Domain Adaptation"): a trained model's
BatchNorm running statistics re-estimated on target train images, with no gradient step.

  python -m maxsq_jax.main --config=configs/demo.py:adabn --workdir=workdirs/adabn      # source-only, then AdaBN
  python -m maxsq_jax.main --config=configs/gta5_to_cityscapes.py --config.stage=adabn \\
      --config.init_from=workdirs/gta5_source_only --workdir=workdirs/gta5_adabn          # AdaBN of a trained model

The stage "adabn" (`run`) loads `config.init_from` (a run's workdir or converted weights), passes
`config.adabn.num_images` target train images (`data.target_split`, resized to `data.target_size`, no
augmentation, in whole batches of `adabn.batch_size`) through the network in train mode, and replaces
every layer's running mean and variance with what it saw: the average over all batches of the
statistic the layer's running update takes from a batch ("cumulative", the AdaBN estimate), or
that running update itself from the model's statistics ("momentum", what a target pass in training
does). Parameters are not touched. With `adabn.after_adapt` an adaptation stage does the same to its
final model (`apply`) before its final checkpoint and evaluation. The workdir gets a checkpoint at step 0 (so another stage can
start from it with init_from), config.json and the evaluation (results.json), like a training run.
"""

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from maxsq_jax import checkpointing, paths, run_config, train, workdir_lock
from maxsq_jax.data import pipeline
from maxsq_jax.errors import ConfigError
from maxsq_jax.evaluator import Evaluator
from maxsq_jax.metric_writer import MetricWriter
from maxsq_jax.models.layers import BatchNorm

# The step of an AdaBN run's checkpoint and evaluation: no gradient step is taken.
STEP = 0


def batch_statistics(model, params, batch_stats, images):
  """The statistic each BatchNorm layer's running update takes from the batch `images` [B, H, W, 3]:
  a tree like `batch_stats` ({"mean": [C], "var": [C]} per layer; the mean over the layer's groups of
  their mean and unbiased variance). `model` must normalise with batch statistics in train mode.

  The layer's update is running = m·running + (1 − m)·statistic; run from zero statistics it leaves
  (1 − m)·statistic, which is divided back out. The forward pass does not read the running statistics."""
  zeros = jax.tree_util.tree_map(jnp.zeros_like, batch_stats)
  _, updates = model.apply({"params": params, "batch_stats": zeros}, images, train=True, mutable=["batch_stats"])
  return jax.tree_util.tree_map(lambda s: s / (1 - BatchNorm.momentum), updates["batch_stats"])


def statistics_model(config):
  """The model that measures the statistics: the config's, normalising with batch statistics in train
  mode (a "frozen" config's model would use its running statistics and never update them)."""
  model = train.build_model(config)
  return model.clone(bn_mode="train") if model.bn_mode == "frozen" else model


def target_images(config, mesh) -> pipeline.EvalData:
  """The first adabn.num_images images of the target's train split (data.target_split) at data.target_size,
  not augmented, in whole global batches of adabn.batch_size (a last partial batch is left out, so every
  statistic is over real images). Raises ConfigError when fewer images than one batch are given."""
  data, settings = config.data, config.adabn
  examples = pipeline.open_examples(data.target, data.target_dir, data.target_split, config.model.num_classes, data)
  available = len(examples) if settings.num_images < 0 else min(settings.num_images, len(examples))
  batches = available // settings.batch_size
  if batches == 0:
    raise ConfigError(f"config.adabn.num_images={settings.num_images}: {available} target image(s) in "
                      f"{data.target_dir!r} ({data.target_split}), fewer than config.adabn.batch_size="
                      f"{settings.batch_size}; give at least one batch")
  per_host = pipeline.local_batch_size(settings.batch_size, mesh, "config.adabn.batch_size")
  return pipeline.EvalData(examples, batches, per_host, tuple(data.target_size), data.normalization)


def estimate(config, model, mesh, params, batch_stats) -> tuple[dict, int]:
  """(new batch_stats, number of images used): config.adabn's estimate on the target train images.
  `params`/`batch_stats` are the model's, replicated on `mesh`."""
  images = target_images(config, mesh)
  replicated = NamedSharding(mesh, P())
  measure = jax.jit(lambda p, s, x: batch_statistics(model, p, s, x), out_shardings=replicated)
  momentum = BatchNorm.momentum
  total, count = None, 0
  running = batch_stats
  for batch in images.batches(mesh):
    stats = measure(params, batch_stats, batch["image"])
    count += 1
    if config.adabn.accumulation == "cumulative":
      total = stats if total is None else jax.tree_util.tree_map(jnp.add, total, stats)
    else:
      running = jax.tree_util.tree_map(lambda r, s: momentum * r + (1 - momentum) * s, running, stats)
  if config.adabn.accumulation == "cumulative":
    running = jax.tree_util.tree_map(lambda t: t / count, total)
  return running, count * config.adabn.batch_size


def apply(config, mesh, state):
  """`state` (a TrainState on `mesh`) with its batch_stats replaced by the AdaBN estimate (config.adabn)."""
  stats, used = estimate(config, statistics_model(config), mesh, state.params, state.batch_stats)
  train.log(f"AdaBN: BatchNorm statistics re-estimated on {used} target train images ({config.adabn.accumulation})")
  return state.replace(batch_stats=stats)


def stage_config(config, source_workdir) -> ml_collections.ConfigDict:
  """The "adabn" stage of a demo config: AdaBN of the model in `source_workdir` (local or gs://)."""
  adabn_config = ml_collections.ConfigDict(config.to_dict())
  adabn_config.stage = "adabn"
  adabn_config.init_from = str(paths.resolve(source_workdir))
  return adabn_config


def run(config, workdir) -> dict:
  """AdaBN of config.init_from into `workdir` (local or gs://); returns the target evaluation's results
  (+ "source_miou" with config.eval.source_split, "adabn": {"num_images", "accumulation"}, "state")."""
  workdir = paths.resolve(workdir, "--workdir")
  paths.check_reachable(workdir, "--workdir")
  if not config.init_from:
    raise ConfigError("config.stage=adabn: set config.init_from to the trained model (a run's workdir or "
                      "converted weights)")
  with workdir_lock.hold(workdir):
    changes = run_config.changes(config, workdir)
    init_from = paths.resolve(config.init_from, "config.init_from")
    paths.check_reachable(init_from, "config.init_from")
    train.prepare_data(config, f"{workdir}:adabn:prepare_data")
    mesh = train.create_mesh()
    model = train.build_model(config)
    width, height = config.data.target_size
    state, _, _, _ = train.initial_state(config, model, mesh, (1, height, width, 3))
    mngr = checkpointing.manager(workdir / "checkpoints", config.max_to_keep)
    adabn_info = {"accumulation": config.adabn.accumulation}
    if mngr.all_steps():  # Estimated before: the checkpoint holds the result.
      variables, _ = checkpointing.load_weights(workdir, {"params": state.params, "batch_stats": state.batch_stats},
                                                what="--workdir")
      state = state.replace(**variables)
      train.log(f"AdaBN statistics read from {workdir}/checkpoints")
    else:
      state = train.load_init_weights(state, init_from)
      stats, used = estimate(config, statistics_model(config), mesh, state.params, state.batch_stats)
      state = state.replace(batch_stats=stats)
      adabn_info["num_images"] = used
      train.log(f"AdaBN: BatchNorm statistics of {init_from} re-estimated on {used} target train images "
                f"({config.adabn.accumulation})")
      checkpointing.save(mngr, STEP, state, {}, {"step": STEP, "stage": "adabn", "optim_rule": config.optim.rule},
                         force=True)
    if jax.process_index() == 0:
      run_config.record_start(config, workdir, STEP, changes)
    mngr.wait_until_finished()
    mngr.close()
    writer = MetricWriter(workdir)
    evaluator = Evaluator(config, model, mesh, pipeline.eval_data(config, mesh))
    results = evaluator(state.params, state.batch_stats, workdir, STEP, writer, extra={"adabn": adabn_info})
    if config.eval.source_split:
      source_evaluator = Evaluator(config, model, mesh, pipeline.eval_data(config, mesh, "source"))
      results["source_miou"] = source_evaluator(state.params, state.batch_stats, workdir / "source_eval", STEP,
                                                writer, tag="source")["miou"]
    writer.close()
  return {**results, "state": state}


def source_then_adabn(config, workdir) -> dict:
  """Source-only into WORKDIR/source_only, then AdaBN of it into WORKDIR/adabn; the demo's summary."""
  workdir = paths.resolve(workdir, "--workdir")
  paths.check_reachable(workdir, "--workdir")
  train.log("=== stage 1/2: source only ===")
  source_results = train.train_and_evaluate(train.source_stage_config(config), workdir / "source_only")
  train.log("=== stage 2/2: AdaBN ===")
  adabn_results = run(stage_config(config, workdir / "source_only"), workdir / "adabn")
  return train.write_summary(workdir, source_results, adabn_results)
