"""The paper's table in miniature: every adaptation row of `configs/demo.py`, from one source-only model per seed.

  python -m maxsq_jax.demo_table --workdir=workdirs/table [--num_seeds=4] [--methods=minent,maxsquare,...]

For each seed S (0 .. num_seeds-1) it trains the demo's source-only stage once into
WORKDIR/seed<S>/source_only (and, for the multi-level row, the multi-level source-only stage into
WORKDIR/seed<S>/source_only_multi), then adapts from it with each method into WORKDIR/seed<S>/<method>.
Every stage is exactly the one `python -m maxsq_jax.main --config=configs/demo.py:<method>
--config.seed=S` runs (the same `train.source_stage_config` / `train.adapt_stage_config`), so the
`maxsquare` rows are the main job's numbers. Finished runs are skipped and an interrupted one resumes
from its checkpoint, so rerunning the command completes a table. At the end it prints the report
(`python -m maxsq_jax.report`: mean ± std per row, the paper's GTA5 → Cityscapes numbers beside it)
and writes it to WORKDIR/table.md, with the wall time of every run in WORKDIR/timing.json.
"""

import importlib.util
import os
import time

from absl import app, flags, logging

from maxsq_jax import cli, jsonfile, paths
from maxsq_jax.errors import ConfigError

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags; defined only when run as a program, so that importing this module (tests,
  other tools) defines none."""
  flags.DEFINE_string("workdir", None, "Directory receiving seed<S>/<run> workdirs, table.md and timing.json.")
  flags.DEFINE_integer("num_seeds", 4, "Seeds 0 .. num_seeds-1 (config.seed; the dataset is always seed 0's).")
  flags.DEFINE_list("methods", None, "Adaptation rows to run (default: all of configs/demo.py's METHODS).")
  flags.DEFINE_string("config", "configs/demo.py", "The demo config file; its get_config(\"<method>[,tiny]\") "
                      "gives each row.")
  flags.DEFINE_bool("tiny", False, "Run the rows' tiny forms (seconds; for tests).")
  flags.DEFINE_string("data_root", "", "Read the synthetic datasets from DATA_ROOT/synthetic_{source,target} "
                      "instead of the config's data dirs.")
  flags.mark_flags_as_required(["workdir"])


def load_config_module(path: str):
  if not os.path.isfile(path):
    raise ConfigError(f"--config={path}: no such file (give the demo config, e.g. configs/demo.py)")
  spec = importlib.util.spec_from_file_location("demo_table_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def row_config(module, method: str, seed: int, tiny: bool = False, data_root: str = ""):
  """The "source_then_adapt" config of one row and seed."""
  config = module.get_config(",".join([method] + (["tiny"] if tiny else [])))
  config.seed = seed
  if data_root:
    config.data.source_dir = os.path.join(data_root, "synthetic_source")
    config.data.target_dir = os.path.join(data_root, "synthetic_target")
  return config


def source_run_name(config) -> str:
  return "source_only_multi" if config.loss.multi_level else "source_only"


def plan(module, workdir, seeds, methods, tiny: bool = False, data_root: str = "") -> list[tuple[str, object]]:
  """[(run workdir, stage config)] in order: per seed, each source-only stage once, then the methods.
  `workdir` is a local path or a gs:// URL; the run workdirs are strings of the same kind."""
  workdir = paths.resolve(workdir, "--workdir")
  from maxsq_jax import train
  runs = []
  for seed in seeds:
    seed_dir = workdir / f"seed{seed}"
    sources, adaptations = {}, {}
    # The main job's row first: the plain source-only stage is then literally the main job's.
    for method in sorted(methods, key=lambda m: m != module.DEFAULT_METHOD):
      config = row_config(module, method, seed, tiny, data_root)
      source_dir = str(seed_dir / source_run_name(config))
      sources.setdefault(source_dir, train.source_stage_config(config))
      adaptations[method] = (str(seed_dir / method), train.adapt_stage_config(config, source_dir))
    runs += list(sources.items()) + [adaptations[m] for m in methods]
  return runs


def finished(run_dir: str, num_steps: int) -> bool:
  """Whether the run's final evaluation (results.json at its last step) exists."""
  path = paths.resolve(run_dir) / "results.json"
  return path.is_file() and jsonfile.read(path).get("step") == num_steps


def run_all(runs, timing_path, log=print) -> dict:
  """Trains every planned run that is not finished yet. After each, `timing_path` (JSON) gets
  {"runs": {run dir: wall seconds}, "total_seconds", "devices", "cpu_count"} of the runs trained so far,
  so an interrupted table keeps its timings. Returns that dict."""
  import jax

  from maxsq_jax import train
  timing = {"runs": {}, "total_seconds": 0.0, "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count()}
  start = time.time()
  for i, (run_dir, config) in enumerate(runs):
    if finished(run_dir, config.num_steps):
      log(f"[{i + 1}/{len(runs)}] {run_dir}: finished earlier, skipped")
      continue
    log(f"[{i + 1}/{len(runs)}] {run_dir}: {config.stage} ({config.loss.target if config.stage == 'adapt' else 'CE'})")
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
  module = load_config_module(FLAGS.config)
  methods = FLAGS.methods or list(module.METHODS)
  unknown = [m for m in methods if m not in module.METHODS]
  if unknown:
    raise ConfigError(f"--methods: unknown {', '.join(unknown)}; {FLAGS.config} has {', '.join(module.METHODS)}")
  if FLAGS.num_seeds < 1:
    raise ConfigError(f"--num_seeds={FLAGS.num_seeds}: give at least 1")
  runs = plan(module, workdir, range(FLAGS.num_seeds), methods, FLAGS.tiny, FLAGS.data_root)
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
