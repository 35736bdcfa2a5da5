"""The paper's table in miniature: every adaptation row of `configs/demo.py`, from one source-only model per seed.

  python -m maxsq_jax.demo_table --workdir=workdirs/table [--num_seeds=4] [--methods=minent,maxsquare,...]
  python -m maxsq_jax.demo_table --workdir=workdirs/losses --config=configs/demo.py:losses \
      --methods=adabn,bn_only,maxsquare,mypkg.losses:my_loss

For each seed S (0 .. num_seeds-1) it trains the demo's source-only stage once into
WORKDIR/seed<S>/source_only (and, for the multi-level row, the multi-level source-only stage into
WORKDIR/seed<S>/source_only_multi), then adapts from it with each method into WORKDIR/seed<S>/<method>.
The `adabn` row is AdaBN of the source-only model (WORKDIR/seed<S>/adabn). A method `package.module:function`
is the main job's row with that target loss (run in seed<S>/package.module-function).
Every stage is exactly the one `python -m maxsq_jax.main --config=configs/demo.py:<method>
--config.seed=S` runs (the same `train.source_stage_config` / `adabn.stage_config` /
`train.adapt_stage_config`), so the `maxsquare` rows are the main job's numbers. Finished runs are skipped and an interrupted one resumes
from its checkpoint, so rerunning the command completes a table. At the end it prints the report
(`python -m maxsq_jax.report`: mean ± std per row, the paper's GTA5 → Cityscapes numbers beside it)
and writes it to WORKDIR/table.md, with the wall time of every run in WORKDIR/timing.json.
"""

import importlib.util
import os
import time

from absl import app, flags, logging

from maxsq_jax import adabn, cli, jsonfile, paths
from maxsq_jax.errors import ConfigError

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags; defined only when run as a program, so that importing this module (tests,
  other tools) defines none."""
  flags.DEFINE_string("workdir", None, "Directory receiving seed<S>/<run> workdirs, table.md and timing.json.")
  flags.DEFINE_integer("num_seeds", 4, "Seeds 0 .. num_seeds-1 (config.seed; the dataset is always seed 0's).")
  flags.DEFINE_list("methods", None, "Rows to run: names of configs/demo.py's METHODS (default: all of them) "
                    "or package.module:function target losses.")
  flags.DEFINE_string("config", "configs/demo.py", "The demo config file, optionally with variant words "
                      "(configs/demo.py:losses); its get_config(\"[<words>,]<method>[,tiny]\") gives each row.")
  flags.DEFINE_bool("tiny", False, "Run the rows' tiny forms (seconds; for tests).")
  flags.DEFINE_string("data_root", "", "Read the synthetic datasets from DATA_ROOT/synthetic_{source,target} "
                      "instead of the config's data dirs.")
  flags.mark_flags_as_required(["workdir"])


def split_config_arg(arg: str) -> tuple[str, str]:
  """(file, variant words) of --config: "configs/demo.py:losses" -> ("configs/demo.py", "losses")."""
  path, _, words = arg.partition(":")
  return path, words


def load_config_module(path: str):
  if not os.path.isfile(path):
    raise ConfigError(f"--config={path}: no such file (give the demo config, e.g. configs/demo.py)")
  spec = importlib.util.spec_from_file_location("demo_table_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def is_loss_function(method: str) -> bool:
  """Whether a --methods entry is a user's target loss ("package.module:function")."""
  return ":" in method


def run_name(method: str) -> str:
  """The run directory name of a method: the name itself, "package.module-function" for a loss function."""
  return method.replace(":", "-")


def row_config(module, method: str, seed: int, tiny: bool = False, data_root: str = "", variant: str = ""):
  """The "source_then_adapt" (or, for adabn, "source_then_adabn") config of one row and seed; a
  "package.module:function" method is the main job's row with that target loss."""
  words = [w for w in variant.split(",") if w]
  if is_loss_function(method):
    config = module.get_config(",".join(words + [module.DEFAULT_METHOD] + (["tiny"] if tiny else [])))
    config.loss.target = method
  else:
    config = module.get_config(",".join(words + [method] + (["tiny"] if tiny else [])))
  config.seed = seed
  if data_root:
    config.data.source_dir = os.path.join(data_root, "synthetic_source")
    config.data.target_dir = os.path.join(data_root, "synthetic_target")
  return config


def source_run_name(config) -> str:
  return "source_only_multi" if config.loss.multi_level else "source_only"


def plan(module, workdir, seeds, methods, tiny: bool = False, data_root: str = "",
         variant: str = "") -> list[tuple[str, object]]:
  """[(run workdir, stage config)] in order: per seed, each source-only stage once, each AdaBN stage
  once, then the methods. `workdir` is a local path or a gs:// URL; the run workdirs are strings of
  the same kind."""
  workdir = paths.resolve(workdir, "--workdir")
  from maxsq_jax import train
  runs = []
  for seed in seeds:
    seed_dir = workdir / f"seed{seed}"
    sources, adabns, adaptations = {}, {}, {}
    # The main job's row first: the plain source-only stage is then literally the main job's.
    for method in sorted(methods, key=lambda m: m != module.DEFAULT_METHOD):
      config = row_config(module, method, seed, tiny, data_root, variant)
      source_dir = str(seed_dir / source_run_name(config))
      sources.setdefault(source_dir, train.source_stage_config(config))
      if config.stage == "source_then_adabn":
        adabn_dir = str(seed_dir / source_run_name(config).replace("source_only", "adabn"))
        adabns.setdefault(adabn_dir, adabn.stage_config(config, source_dir))
      else:
        adaptations[method] = (str(seed_dir / run_name(method)), train.adapt_stage_config(config, source_dir))
    runs += list(sources.items()) + list(adabns.items()) + [adaptations[m] for m in methods if m in adaptations]
  return runs


def final_step(config) -> int:
  """The step of a stage's final evaluation: config.num_steps, or adabn.STEP for an AdaBN stage."""
  return adabn.STEP if config.stage == "adabn" else config.num_steps


def finished(run_dir: str, step: int) -> bool:
  """Whether the run's final evaluation (results.json at `step`, final_step) exists."""
  path = paths.resolve(run_dir) / "results.json"
  return path.is_file() and jsonfile.read(path).get("step") == step


def run_all(runs, timing_path, log=print) -> dict:
  """Trains every planned run that is not finished yet. After each, `timing_path` (JSON) gets
  {"runs": {run dir: wall seconds}, "total_seconds", "devices", "cpu_count"} of the runs trained so far,
  so an interrupted table keeps its timings. Returns that dict."""
  import jax

  from maxsq_jax import train
  timing = {"runs": {}, "total_seconds": 0.0, "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count()}
  start = time.time()
  for i, (run_dir, config) in enumerate(runs):
    if finished(run_dir, final_step(config)):
      log(f"[{i + 1}/{len(runs)}] {run_dir}: finished earlier, skipped")
      continue
    what = {"adapt": config.loss.target, "source_only": "CE", "adabn": "target BN statistics"}[config.stage]
    log(f"[{i + 1}/{len(runs)}] {run_dir}: {config.stage} ({what})")
    run_start = time.time()
    train.train_and_evaluate(config, run_dir)
    timing["runs"][run_dir] = time.time() - run_start
    timing["total_seconds"] = time.time() - start
    jsonfile.write(timing_path, timing)
  return timing


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  import jax

  from maxsq_jax import config_validation, report
  workdir = paths.resolve(FLAGS.workdir, "--workdir")
  paths.check_reachable(workdir, "--workdir")
  config_path, variant = split_config_arg(FLAGS.config)
  module = load_config_module(config_path)
  methods = FLAGS.methods or list(module.METHODS)
  unknown = [m for m in methods if m not in module.METHODS and not is_loss_function(m)]
  if unknown:
    raise ConfigError(f"--methods: unknown {', '.join(unknown)}; {config_path} has {', '.join(module.METHODS)}, "
                      "or give a target loss as package.module:function")
  if FLAGS.num_seeds < 1:
    raise ConfigError(f"--num_seeds={FLAGS.num_seeds}: give at least 1")
  try:
    module.get_config(variant)
  except ValueError as e:
    raise ConfigError(f"--config={FLAGS.config}: {e}") from e
  runs = plan(module, workdir, range(FLAGS.num_seeds), methods, FLAGS.tiny, FLAGS.data_root, variant)
  for _, config in runs:  # Every run checked before the first one starts.
    config_validation.validate(config, jax.device_count())
  if not jax.config.jax_compilation_cache_dir and not paths.is_remote(workdir):
    # Every seed compiles the same programs: compile them once.
    jax.config.update("jax_compilation_cache_dir", str(workdir / "jax_cache"))
  timing = run_all(runs, workdir / "timing.json")
  text = report.render(report.find_runs([run_dir for run_dir, _ in runs]))
  print(text, flush=True)
  jsonfile.write_text_atomic(workdir / "table.md", text)
  print(f"{len(timing['runs'])} run(s) trained in {timing['total_seconds']:.0f} s; table: {workdir}/table.md",
        flush=True)


def command() -> None:
  """`maxsq-demo-table` (pyproject.toml), the same as `python -m maxsq_jax.demo_table`."""
  cli.run(main, define_flags)


if __name__ == "__main__":
  command()
