"""Evaluates weights under every configured protocol and writes the results files.

  python -m maxsq_jax.evaluate --config=configs/gta5_to_cityscapes.py:maxsquare --checkpoint=DIR \
      [--workdir=OUT] [--domain=target|source] [--step=N] [--config.eval.protocols="('reference','full')"]

DIR is either a converted-weights directory (`python -m maxsq_jax.tools.convert_torch` output, e.g.
a released `gta52cityscapes_maxsquarebest.pth` converted) or a training run's workdir (its latest
checkpoint, or --step). For a run's workdir --config may be left out: the run's own config.json
is used, with any --config.data.* / --config.eval.* overrides (e.g. the data folders on this machine:
a data folder the stored config names that does not exist here is an error naming the override to
give; a synthetic dataset is generated only where a flag or --config points). A two-stage run's
workdir (source_only/ and adapt/) evaluates its final stage. OUT (default DIR/evaluation, of the
stage evaluated) receives results.json, results.md, eval/step_<N>/ (confusion matrices, pictures)
and TensorBoard events, as evaluations during training do (both use evaluator.py). Nothing else in
DIR is touched. DIR and OUT may be local paths or gs://BUCKET/PATH URLs.
"""

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from maxsq_jax import cli, errors, paths
from maxsq_jax.errors import CheckpointError, ConfigError

FLAGS = flags.FLAGS


# The config sections that may override a run's stored config (where the data is, how to evaluate);
# the rest describes the trained model and stays as stored.
STORED_CONFIG_OVERRIDES = ("data.", "eval.")


def config_file_given(argv) -> bool:
  """True if `argv` names a config file (`--config=FILE` or `--config FILE`), as config_flags finds it."""
  return any(re.match(r"^--?config(=|$)", arg) for arg in argv)


def define_flags() -> None:
  """The command line's flags (cli.run defines them when this module runs as a program). Without a
  config file, `config` is the config schema (config_base), so that --config.* overrides parse and
  are applied onto the run's stored config (stored_config_with_overrides)."""
  help_text = ("Config file (configs/*.py[:variant]); optional for a run's workdir, whose config.json is used "
               "then (with --config.data.* / --config.eval.* overrides).")
  if config_file_given(sys.argv):
    config_flags.DEFINE_config_file("config", None, help_text, lock_config=True)
  else:
    from maxsq_jax.config_base import base_config
    try:  # The overrides are parsed here, when the flag is defined with its default.
      config_flags.DEFINE_config_dict("config", base_config(), help_text, lock_config=True)
    except (KeyError, AttributeError, TypeError, ValueError, flags.Error) as e:
      errors.exit_with(ConfigError(errors.unknown_config_key(sys.argv) or f"{e}"), argv=sys.argv)
    FLAGS["config"].default_as_str = None  # --help would print the whole schema as the default.
  flags.DEFINE_string("checkpoint", None, "A converted-weights dir or a training run's workdir.")
  flags.DEFINE_string("workdir", None, "Output directory (default: CHECKPOINT/evaluation).")
  flags.DEFINE_enum("domain", "target", ["target", "source"], "Evaluate the target's eval split, or the "
                    "source's config.eval.source_split (the domain gap).")
  flags.DEFINE_integer("step", -1, "Checkpoint step of a run's workdir (-1: the latest).")
  flags.mark_flags_as_required(["checkpoint"])


def config_from_run(workdir):
  """The config a run was trained with, rebuilt from WORKDIR/config.json onto the current schema
  (keys an older schema named otherwise are renamed: config_base.RENAMED)."""
  from maxsq_jax.config_base import base_config, upgrade_flat
  from maxsq_jax.run_config import flatten, stored_config
  from maxsq_jax.train import STAGE_DIRS
  path = paths.resolve(workdir, "--checkpoint") / "config.json"
  if not path.is_file():
    raise ConfigError(f"{path} does not exist: {workdir} is neither a run's workdir nor a two-stage run's (with "
                      f"{' and '.join(f'{stage}/' for stage in STAGE_DIRS)}); for converted weights pass --config=...")
  config = base_config()
  for key, value in upgrade_flat(flatten(stored_config(path))).items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node.get(part) if hasattr(node, "items") else None
    if not hasattr(node, "items") or leaf not in node or hasattr(node[leaf], "items"):
      logging.warning("config.json field %s is not in the current schema; ignored", key)
      continue
    node[leaf] = tuple(value) if isinstance(node[leaf], tuple) and isinstance(value, list) else value
  config.lock()
  return config


def final_stage(checkpoint):
  """`checkpoint` (an epath), or for a two-stage run's workdir (train.STAGE_DIRS as subfolders and no
  config.json of its own) its latest stage that has a config.json (the final one once it started),
  with a note saying which."""
  from maxsq_jax.train import STAGE_DIRS, log
  if (checkpoint / "config.json").exists():
    return checkpoint
  started = [stage for stage in STAGE_DIRS if (checkpoint / stage / "config.json").exists()]
  if not started:
    return checkpoint
  chosen = checkpoint / started[-1]
  later = STAGE_DIRS[STAGE_DIRS.index(started[-1]) + 1:]
  why = f"its {', '.join(later)} stage has not started" if later else "its final stage"
  others = " or ".join(f"--checkpoint={checkpoint / stage}" for stage in started[:-1])
  log(f"note: {checkpoint} is a two-stage run ({', '.join(STAGE_DIRS)}); evaluating {chosen} ({why})"
      + (f"; give {others} for the other stage" if others else ""))
  return chosen


def stored_config_with_overrides(checkpoint, overrides: dict, domain: str = "target"):
  """The run's config (config_from_run) with `overrides` ({"data.target_dir": ...}: --config.data.* and
  --config.eval.* only). The data folder evaluated must exist here or be overridden: a path stored on
  another machine is never created (not even for a synthetic dataset)."""
  other = sorted(key for key in overrides if not key.startswith(STORED_CONFIG_OVERRIDES))
  if other:
    raise ConfigError(f"--config.{other[0]}: a run's stored config takes only --config.data.* and --config.eval.* "
                      f"overrides; to evaluate under another config pass --config=FILE as well")
  config = config_from_run(checkpoint)
  config.update_from_flattened_dict(overrides)
  key = f"data.{domain}_dir"
  folder = config.data[f"{domain}_dir"]
  if key not in overrides and not os.path.isdir(folder):
    raise ConfigError(f"{folder} ({key} of {checkpoint}/config.json) does not exist on this machine: give "
                      f"--config.{key}=DIR with the {config.data[domain]} dataset (a synthetic one is generated "
                      f"there if missing)")
  return config


def load_variables(config, model, checkpoint, step: int | None = None):
  """(params, batch_stats, step, info) of a converted-weights dir or a run's workdir, local or gs://
  (NumPy arrays; checkpointing.load_weights)."""
  import jax
  import jax.numpy as jnp

  from maxsq_jax import checkpointing
  # Only the shapes are needed (variables the conversion skipped, e.g. an unused aux head, are zeros),
  # and model.init of a ResNet-101 is slow to compile on CPU.
  like = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 64, 64, 3)), train=False), jax.random.key(0))
  variables, info = checkpointing.load_weights(checkpoint, like, step, "--checkpoint")
  missing = sorted({p.rsplit("/", 2)[0] for p in info.pop("missing", []) if "layer6" in p})
  if missing:
    print(f"warning: the converted weights have no main head ({', '.join(missing)}): it is randomly "
          "initialised and the evaluation is meaningless (convert a trained checkpoint with "
          f"--num_classes {config.model.num_classes}).", file=sys.stderr, flush=True)
    info["warning"] = "main head (layer6) randomly initialised"
  return variables["params"], variables["batch_stats"], info.get("checkpoint_step", 0), info


def output_dir(checkpoint, workdir=None):
  """Where the results go: `workdir`, or CHECKPOINT/evaluation (local or gs://)."""
  return paths.resolve(workdir, "--workdir") if workdir else paths.resolve(checkpoint, "--checkpoint") / "evaluation"


def run(config, checkpoint, workdir=None, domain: str = "target", step: int | None = None) -> dict:
  """Evaluates `checkpoint` with `config` under config.eval.protocols; returns the results dict.
  `checkpoint` and `workdir` are local paths or gs:// URLs."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from maxsq_jax import train
  from maxsq_jax.data import pipeline
  from maxsq_jax.evaluator import Evaluator
  from maxsq_jax.metric_writer import MetricWriter

  workdir = output_dir(checkpoint, workdir)
  paths.check_reachable(workdir, "--workdir")
  if domain == "source" and not config.eval.source_split:
    raise ConfigError("--domain=source needs config.eval.source_split (e.g. --config.eval.source_split=val)")
  train.prepare_data(config, f"{workdir}:evaluate:prepare_data", domains=(domain,))
  mesh = train.create_mesh()
  model = train.build_model(config)
  params, batch_stats, step, info = load_variables(config, model, checkpoint, step)
  replicated = NamedSharding(mesh, P())
  put = lambda tree: jax.tree_util.tree_map(lambda x: jax.device_put(jnp.asarray(x), replicated), tree)
  params, batch_stats = put(params), put(batch_stats)
  evaluator = Evaluator(config, model, mesh, pipeline.eval_data(config, mesh, domain))
  writer = MetricWriter(workdir)
  try:
    return evaluator(params, batch_stats, workdir, step, writer, tag=domain, extra=info)
  finally:
    writer.close()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from maxsq_jax import distributed
  distributed.initialize()  # Multi-host evaluation: see maxsq_jax/distributed.py (a no-op on one host).
  checkpoint = paths.resolve(FLAGS.checkpoint, "--checkpoint")
  paths.check_reachable(checkpoint, "--checkpoint")
  if not checkpoint.is_dir():
    raise CheckpointError(f"--checkpoint={FLAGS.checkpoint}: no such directory (give a run's workdir or a "
                          "converted-weights directory)")
  checkpoint = final_stage(checkpoint)
  if config_file_given(sys.argv):
    config = FLAGS.config
  else:
    config = stored_config_with_overrides(checkpoint, config_flags.get_override_values(FLAGS["config"]), FLAGS.domain)

  import jax

  from maxsq_jax import config_validation
  config_validation.validate(config, jax.device_count(), training=False)
  results = run(config, str(checkpoint), FLAGS.workdir, FLAGS.domain, None if FLAGS.step < 0 else FLAGS.step)
  if jax.process_index() == 0:
    out = output_dir(str(checkpoint), FLAGS.workdir)
    line = "  ".join(f"{name} {100 * r['miou']:.1f}" + (f" (13: {100 * r['miou_13']:.1f})" if r.get("miou_13") is not None else "")
                     for name, r in results["protocols"].items() if r["miou"] is not None)
    print(f"{FLAGS.domain} mIoU at step {results['step']}: {line}", flush=True)
    print(f"results: {out}/results.md, {out}/results.json", flush=True)


def command() -> None:
  """`maxsq-evaluate` (pyproject.toml), the same as `python -m maxsq_jax.evaluate`."""
  cli.run(main, define_flags)


if __name__ == "__main__":
  command()
