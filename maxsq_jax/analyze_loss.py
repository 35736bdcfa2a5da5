"""See a target loss before training with it: the gradient analysis of any loss.

  python -m maxsq_jax.analyze_loss --out=analysis [--loss=entropy --loss=max_square --loss=iw_max_square]
  python -m maxsq_jax.analyze_loss --out=analysis --workdir=workdirs/demo/adapt [--num_images=50]
  python -m maxsq_jax.analyze_loss --out=analysis --loss=mypkg.losses:my_loss --loss=iw_max_square@iw_ratio=0.3

Each --loss is a name `config.loss.target` accepts (a built-in, a reference alias, or
package.module:function), optionally with config.loss options after "@" (iw_ratio, threshold,
normalization; default: the run's config, else the schema's defaults). Every number comes from
`jax.grad` of the loss function itself (maxsq_jax/loss_analysis.py), so a user's loss needs no
change. Writes into --out:

  curves.png, and "curves" in analysis.json   |dL/dp| and ||dL/dlogits|| against the probability p of
                                              the predicted class, 2-class and C-class pixel
  confidence.png, classes.png (with a run)    on the run's predictions of the target's eval split
                                              (--num_images, through the evaluation's data path): the
                                              share of the total gradient per confidence bin and per
                                              predicted class, and the mean per-pixel gradient
  analysis.json, summary.md                   the numbers, and a short summary of them; with a run
                                              also the ratio λ_T × each loss's mean per-pixel
                                              ||dL/dlogits|| on those target images / the source
                                              cross-entropy's on as many labelled source images
                                              (eval.source_split, else data.source_split), with λ_T
                                              from --lambda_target (default: the run's loss.lambda_target)

--workdir is a training run's workdir (its config.json and latest checkpoint, or --step);
--checkpoint is the same or a converted-weights dir, with --config. Batches are split over all devices.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from maxsq_jax import cli, jsonfile, paths
from maxsq_jax.errors import CheckpointError, ConfigError

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags; defined only when run as a program, so that importing this module (tests,
  other tools) defines none."""
  flags.DEFINE_multi_string("loss", ["entropy", "max_square", "iw_max_square"],
                            "A target loss: NAME or NAME@field=value,... (repeat the flag for several).")
  flags.DEFINE_string("out", None, "Output directory (created; files in it are overwritten).")
  flags.DEFINE_integer("num_classes", 19, "C of the C-class pixel of the curves.")
  flags.DEFINE_string("workdir", None, "A training run's workdir: also analyse its predictions.")
  flags.DEFINE_string("checkpoint", None, "A run's workdir or a converted-weights dir (with --config).")
  config_flags.DEFINE_config_file("config", None, "Config of --checkpoint (default: the run's config.json).",
                                  lock_config=True)
  flags.DEFINE_integer("step", -1, "Checkpoint step of the run (-1: the latest).")
  flags.DEFINE_integer("num_images", 50, "Target eval images to analyse (the first N of the split).")
  flags.DEFINE_integer("batch_size", 0, "Global images per batch (0: the config's eval.batch_size); must divide "
                       "by the device count.")
  flags.DEFINE_float("lambda_target", None, "λ_T of the gradient ratio (default: the run's loss.lambda_target).")
  flags.mark_flags_as_required(["out"])


SUMMARY_PROBABILITIES = (0.6, 0.9, 0.99, 0.999)


def curve_numbers(specs, num_classes: int) -> dict:
  """{"two_class": {"p": [N], label: {...}}, "c_class": {...}} (loss_analysis.curves on each grid)."""
  from maxsq_jax import loss_analysis
  out = {}
  for key, c in (("two_class", 2), ("c_class", num_classes)):
    p = loss_analysis.probability_grid(c)
    out[key] = {"p": p.tolist(), "num_classes": c}
    for spec in specs:
      out[key][spec.label] = {k: v.tolist() for k, v in loss_analysis.curves(spec, c, p).items()}
  return out


def run_statistics(config, checkpoint: str, specs, step: int | None, lambda_target: float | None = None) -> dict:
  """loss_analysis.summarize of `specs` on the target eval images config.eval.num_images, in global
  batches of config.eval.batch_size, plus "run" info and "ratios" (loss_analysis.gradient_ratios against
  the source cross-entropy on as many labelled source images; λ_T default config.loss.lambda_target)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from maxsq_jax import evaluate, loss_analysis, train
  from maxsq_jax.data import classes, pipeline

  train.prepare_data(config, f"{checkpoint}:analyze_loss:prepare_data")
  mesh = train.create_mesh()
  model = train.build_model(config)
  params, batch_stats, step, info = evaluate.load_variables(config, model, checkpoint, step)
  replicated = NamedSharding(mesh, P())
  put = lambda tree: jax.tree_util.tree_map(lambda x: jax.device_put(jnp.asarray(x), replicated), tree)
  variables = {"params": put(params), "batch_stats": put(batch_stats)}
  eval_set = pipeline.eval_data(config, mesh)
  statistics = loss_analysis.make_run_statistics(specs, config.model.num_classes)

  def batch_statistics(variables, batch):
    main, _ = model.apply(variables, batch["image"], train=False)  # As evaluation: running BN statistics.
    return statistics(main, batch["mask"])

  compiled = jax.jit(batch_statistics, out_shardings=replicated)
  gradient = np.zeros((len(specs), config.model.num_classes, len(loss_analysis.CONFIDENCE_EDGES) - 1))
  pixels = np.zeros(gradient.shape[1:], np.int64)
  for batch in eval_set.batches(mesh):
    result = jax.device_get(compiled(variables, batch))
    gradient += np.asarray(result["gradient"], np.float64)
    pixels += np.asarray(result["pixels"], np.int64)
  summary = loss_analysis.summarize(gradient, pixels, [s.label for s in specs],
                                    classes.class_names(config.model.num_classes))

  source_config = config.copy_and_resolve_references()
  source_config.eval.source_split = config.eval.source_split or config.data.source_split
  source_statistics = loss_analysis.make_source_statistics()

  def source_batch_statistics(variables, batch):
    main, _ = model.apply(variables, batch["image"], train=False)
    return source_statistics(main, batch["label"], batch["mask"])

  source_compiled = jax.jit(source_batch_statistics, out_shardings=replicated)
  source_gradient, source_pixels = 0.0, 0
  for batch in pipeline.eval_data(source_config, mesh, "source").batches(mesh):
    result = jax.device_get(source_compiled(variables, batch))
    source_gradient += float(result["gradient"])
    source_pixels += int(result["pixels"])
  lambda_target = config.loss.lambda_target if lambda_target is None else lambda_target
  summary["ratios"] = loss_analysis.gradient_ratios(summary, source_gradient, source_pixels, lambda_target)
  summary["ratios"]["source_split"] = source_config.eval.source_split
  summary["run"] = {**info, "step": step, "num_images": len(eval_set.examples), "eval_size": list(eval_set.size),
                    "split": config.eval.split, "devices": jax.device_count(),
                    "global_batch": config.eval.batch_size}
  return summary


def _fmt(x) -> str:
  return "–" if x is None else f"{x:.3g}"


def summary_markdown(specs, curves: dict, num_classes: int, run: dict | None) -> str:
  from maxsq_jax import loss_analysis
  lines = ["# Gradient analysis of target losses", "",
           "All numbers are `jax.grad` of the loss functions, before λ_T. Curves: one pixel (an image of one "
           "pixel), the predicted class at probability p, the rest spread evenly; dL/dp is the derivative along "
           "that path.", "",
           f"## |dL/dp| on a {num_classes}-class pixel", "",
           "| loss | " + " | ".join(f"p={p}" for p in SUMMARY_PROBABILITIES) + " | ratio p=0.999 / p=0.9 |",
           "|---|" + "---|" * (len(SUMMARY_PROBABILITIES) + 1)]
  for spec in specs:
    values = abs(loss_analysis.curves(spec, num_classes, SUMMARY_PROBABILITIES)["dloss_dp"])
    ratio = values[-1] / values[1] if values[1] > 0 else None
    lines.append(f"| {spec.label} | " + " | ".join(_fmt(v) for v in values) + f" | {_fmt(ratio)} |")
  lines += ["", "Plots: `curves.png` (2-class and C-class, w.r.t. p and w.r.t. the logits).", ""]
  if run is not None:
    info = run["run"]
    lines += [f"## On a model's predictions: {info['num_images']} images of the target's `{info['split']}` split",
              "", f"Checkpoint `{info['checkpoint']}` at step {info['step']}; eval size {info['eval_size'][0]}x"
              f"{info['eval_size'][1]}; per-pixel ||dL/dlogits|| of each loss on each image alone.", "",
              "| | share of pixels | " + " | ".join(s.label for s in specs) + " |",
              "|---|---|" + "---|" * len(specs)]
    for t in loss_analysis.HIGH_CONFIDENCE:
      lines.append(f"| share of the gradient from max p ≥ {t} | {run['pixel_share_above'][str(t)]:.3f} | "
                   + " | ".join(f"{run['losses'][s.label]['share_above'][str(t)]:.3f}" for s in specs) + " |")
    names = sorted(run["pixel_share_per_class"], key=lambda n: -run["pixel_share_per_class"][n])
    for name in names:
      lines.append(f"| share of the gradient from pixels predicted {name} | "
                   f"{run['pixel_share_per_class'][name]:.3f} | "
                   + " | ".join(f"{run['losses'][s.label]['share_per_class'][name]:.3f}" for s in specs) + " |")
    lines += ["", "Plots: `confidence.png` (per confidence bin), `classes.png` (per predicted class).", ""]
    ratios = run["ratios"]
    lines += ["## The target term's pull next to the source cross-entropy", "",
              f"Mean per-pixel ||dL/dlogits|| of each loss on these target images, and λ_T × it / the source "
              f"cross-entropy's ({ratios['source_ce_mean_norm']:.3g}, on as many labelled images of the source's "
              f"`{ratios['source_split']}` split); λ_T = {ratios['lambda_target']:g}. Both per image alone.", "",
              "| loss | mean per-pixel gradient | λ_T × it / source CE's |", "|---|---|---|"]
    for spec in specs:
      entry = ratios["losses"][spec.label]
      lines.append(f"| {spec.label} | {entry['mean_norm']:.3g} | {_fmt(entry['ratio'])} |")
    lines.append("")
  return "\n".join(lines)


def analyze(out: str, loss_names, num_classes: int = 19, config=None, checkpoint: str | None = None,
            num_images: int = 50, batch_size: int = 0, step: int | None = None,
            lambda_target: float | None = None) -> dict:
  """Writes curves.png, analysis.json and summary.md (and, with `checkpoint`, confidence.png and
  classes.png) into `out`; returns the analysis dict. Raises ConfigError / CheckpointError for bad input."""
  from maxsq_jax import evaluate, loss_analysis, loss_plots
  from maxsq_jax.config_base import base_config
  if paths.is_remote(out):
    raise ConfigError(f"--out={out}: give a local directory (copy it to the bucket afterwards)")
  if num_classes < 2:
    raise ConfigError(f"--num_classes={num_classes}: give at least 2")
  if checkpoint is not None:
    checkpoint = str(paths.resolve(checkpoint, "--workdir"))
    paths.check_reachable(checkpoint, "--workdir")
    if not paths.resolve(checkpoint).is_dir():
      raise CheckpointError(f"{checkpoint}: no such directory (give a training run's workdir)")
    if config is None:
      if not (paths.resolve(checkpoint) / "config.json").is_file():
        raise CheckpointError(f"{checkpoint}: not a training run's workdir (no config.json); give a run's workdir, "
                              "or --checkpoint=DIR with --config=CONFIG for converted weights")
      config = evaluate.config_from_run(checkpoint)
  defaults = {k: (config or base_config()).loss[k] for k in loss_analysis.OPTION_TYPES}
  specs = [loss_analysis.parse_loss_spec(name, defaults) for name in loss_names]
  if len({s.label for s in specs}) != len(specs):
    raise ConfigError(f"--loss: the same loss twice ({', '.join(loss_names)})")
  for spec in specs:
    loss_analysis.check_scalar(spec, num_classes)
  run = None
  if checkpoint is not None:
    import jax

    from maxsq_jax import config_validation
    if num_images < 1:
      raise ConfigError(f"--num_images={num_images}: give at least 1")
    config.eval.num_images = num_images
    if batch_size:
      config.eval.batch_size = batch_size
    config_validation.validate(config, jax.device_count(), training=False)
    if lambda_target is not None and not lambda_target >= 0:
      raise ConfigError(f"--lambda_target={lambda_target}: give a weight >= 0")
    run = run_statistics(config, checkpoint, specs, step, lambda_target)
  curves = curve_numbers(specs, num_classes)
  import jax
  analysis = {"losses": {s.label: {"name": s.name, "options": s.options} for s in specs}, "curves": curves}
  if run is not None:
    analysis["run"] = run
  if jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    loss_plots.plot_curves(os.path.join(out, "curves.png"), curves, num_classes)
    if run is not None:
      where = f"{run['run']['num_images']} target images, step {run['run']['step']}"
      loss_plots.plot_confidence(os.path.join(out, "confidence.png"), run, f"Per-pixel gradients by confidence ({where})")
      loss_plots.plot_classes(os.path.join(out, "classes.png"), run, f"Gradient share per predicted class ({where})")
    jsonfile.write(os.path.join(out, "analysis.json"), analysis, indent=1)
    jsonfile.write_text_atomic(os.path.join(out, "summary.md"), summary_markdown(specs, curves, num_classes, run))
  return analysis


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.ERROR)  # Orbax warns at every read-only restore.
  if FLAGS.workdir and FLAGS.checkpoint:
    raise ConfigError("give --workdir (a training run) or --checkpoint, not both")
  from maxsq_jax import distributed
  distributed.initialize()
  out = os.path.abspath(FLAGS.out)
  analyze(out, FLAGS.loss, FLAGS.num_classes, FLAGS.config, FLAGS.workdir or FLAGS.checkpoint, FLAGS.num_images,
          FLAGS.batch_size, None if FLAGS.step < 0 else FLAGS.step, FLAGS.lambda_target)
  import jax
  if jax.process_index() == 0:
    with open(os.path.join(out, "summary.md")) as f:
      print(f.read(), flush=True)
    print(f"written: {out}/summary.md, {out}/analysis.json, {out}/*.png", flush=True)


def command() -> None:
  """`maxsq-analyze-loss` (pyproject.toml), the same as `python -m maxsq_jax.analyze_loss`."""
  cli.run(main, define_flags)


if __name__ == "__main__":
  command()
