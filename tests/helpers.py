"""Helpers shared by the tests: the repository root, the tiny demo config, tiny training subprocesses,
reading their outputs and checkpoints, and running a command-line tool in this process. Fixtures stay
in conftest.py."""

import os
import sys

import pytest
from absl import flags

from maxsq_jax import cli, errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_root: str, variant: str = "tiny", **overrides):
  """configs/demo.py:`variant` (a tiny one) pointed at `data_root`, with dotted-key overrides."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("demo_config", os.path.join(ROOT, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant)
  config.data.source_dir = os.path.join(data_root, "synthetic_source")
  config.data.target_dir = os.path.join(data_root, "synthetic_target")
  with_overrides(config, **overrides)
  config.lock()
  return config


def with_overrides(config, **overrides):
  """`config` with dotted-key overrides applied in place (e.g. `**{"optim.lr": 0.1}`); returns it."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def before_eval_section(config: dict) -> dict:
  """A config dict (config.json's "config") as runs wrote it before the evaluation settings were grouped
  in `config.eval`: flat `eval_*` and `num_vis_images` keys, and `data.eval_*` ones (written out here,
  not derived from config_base.RENAMED)."""
  old = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
  ev = old.pop("eval")
  old.update(eval_every=ev["every"], eval_batch_size=ev["batch_size"], num_vis_images=ev["num_vis_images"],
             eval_flip=ev["flip"], eval_protocols=ev["protocols"], eval_full_size=ev["full_size"])
  old["data"].update(eval_split=ev["split"], source_eval_split=ev["source_split"], eval_size=ev["size"],
                     num_eval_images=ev["num_images"])
  return old


TRAIN_TINY = os.path.join(ROOT, "tests", "train_tiny.py")


def tiny_env(devices: int = 1, cache_dir: str = "", **extra) -> dict:
  """Environment of a training subprocess with `devices` forced CPU devices."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  if cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  env.update({k: str(v) for k, v in extra.items()})
  return env


def tiny_command(data_root, workdir, out, **overrides) -> list[str]:
  """The command line of tests/train_tiny.py with dotted-key config overrides."""
  args = [f"{k}={v!r}" for k, v in overrides.items()]
  return [sys.executable, TRAIN_TINY, str(data_root), str(workdir), str(out), *args]


def run_tiny(data_root, workdir, out, devices=1, check=True, cache_dir="", timeout=600, **overrides):
  """Runs tests/train_tiny.py to completion; returns the CompletedProcess."""
  import subprocess
  proc = subprocess.run(tiny_command(data_root, workdir, out, **overrides), env=tiny_env(devices, cache_dir),
                        capture_output=True, text=True, cwd=ROOT, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"train_tiny failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
  return proc


def load_npz(path) -> dict:
  import numpy as np
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def weights_of(run: dict) -> dict:
  """The params/ and batch_stats/ entries of a train_tiny output."""
  return {k: v for k, v in run.items() if k.startswith(("params/", "batch_stats/"))}


# The shared reference: 1 device, stage adapt, 5 steps, a checkpoint after every step (all kept).
REFERENCE_OVERRIDES = dict(stage="adapt", num_steps=5, checkpoint_every=1, max_to_keep=10, init_from="")



def checkpoint_weights(workdir, step: int) -> dict:
  """params/ and batch_stats/ of checkpoint `step` in a run's workdir (local or gs://), read without a model."""
  import flax
  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  from maxsq_jax import paths
  path = paths.resolve(str(workdir)) / "checkpoints" / str(step) / "state"
  ckptr = ocp.PyTreeCheckpointer()
  metadata = ckptr.metadata(path).item_metadata.tree
  restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
  state = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  ckptr.close()
  flat = flax.traverse_util.flatten_dict({"params": state["params"], "batch_stats": state["batch_stats"]}, sep="/")
  return {k: np.asarray(v) for k, v in flat.items()}


def import_torch():
  """(torch, requires_torch): PyTorch, or None where it is not installed, and the mark for the tests
  that compare with it, which then skip; every other test of the module still runs."""
  try:
    import torch
  except ImportError:
    torch = None
  mark = pytest.mark.skipif(torch is None, reason="compares with PyTorch, which is not installed "
                            "(pip install torch==2.13.0)")
  return torch, mark


def run_cli_in_process(module, *args):
  """`module.main` with its flags parsed from `args`, in this process, as `python -m MODULE ARGS` runs it:
  a project error raises SystemExit with the tool's exit code after printing one `error:` line. The
  tool's flags are defined for the call only (tools share flag names such as --config, and main's
  required flags would bind every later tool)."""
  before = set(flags.FLAGS)
  module.define_flags()
  cli.define_common_flags()
  try:
    flags.FLAGS.unparse_flags()
    argv = errors.parse_flags([module.__name__, *map(str, args)])
    return errors.guarded(module.main)(argv)
  finally:
    for name in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, name)
