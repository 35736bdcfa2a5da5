"""Shared fixtures: the repository root on sys.path (so `tests.*` user-loss modules import) and a
tiny synthetic dataset generated once per session."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory):
  """A 16-train / 4-val image synthetic benchmark at 48x32, in both layouts."""
  from maxsq_jax.data import synthetic
  root = str(tmp_path_factory.mktemp("data"))
  synthetic.generate(root, num_train=16, num_val=4, size=(48, 32), seed=0, verbose=False)
  return root


def tiny_config(data_root: str, **overrides):
  """configs/demo.py:tiny pointed at `data_root`, with dotted-key overrides."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("demo_config", os.path.join(ROOT, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.data.source_dir = os.path.join(data_root, "synthetic_source")
  config.data.target_dir = os.path.join(data_root, "synthetic_target")
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  config.lock()
  return config


TRAIN_TINY = os.path.join(ROOT, "tests", "train_tiny.py")


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory):
  """A persistent XLA compilation cache shared by the training subprocesses: each program compiles once."""
  return str(tmp_path_factory.mktemp("jax_cache"))


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


@pytest.fixture(scope="session")
def reference_run(tiny_data_root, compilation_cache, tmp_path_factory):
  """(workdir, final outputs) of the uninterrupted 1-device reference run."""
  base = tmp_path_factory.mktemp("reference")
  run_tiny(tiny_data_root, base / "run", base / "final.npz", cache_dir=compilation_cache, **REFERENCE_OVERRIDES)
  return base / "run", load_npz(base / "final.npz")


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


@pytest.fixture(scope="session")
def four_device_run(tiny_data_root, compilation_cache, tmp_path_factory):
  """(workdir, outputs) of the reference config run for 3 steps on 4 forced CPU devices."""
  base = tmp_path_factory.mktemp("four_devices")
  run_tiny(tiny_data_root, base / "run", base / "four.npz", devices=4, cache_dir=compilation_cache,
           **{**REFERENCE_OVERRIDES, "num_steps": 3})
  return base / "run", load_npz(base / "four.npz")


@pytest.fixture(scope="session")
def tiny_demo_table(tiny_data_root, compilation_cache, tmp_path_factory):
  """(workdir, CompletedProcess) of `python -m maxsq_jax.demo_table --tiny` over every method, one seed."""
  import subprocess
  workdir = tmp_path_factory.mktemp("demo_table") / "table"
  proc = subprocess.run([sys.executable, "-m", "maxsq_jax.demo_table", f"--workdir={workdir}", "--num_seeds=1",
                         "--tiny", f"--data_root={tiny_data_root}"],
                        env=tiny_env(1, compilation_cache), capture_output=True, text=True, cwd=ROOT, timeout=900)
  if proc.returncode != 0:
    raise AssertionError(f"demo_table failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
  return workdir, proc


@pytest.fixture(scope="session")
def gcs_bucket(tmp_path_factory):
  """The URL of a bucket ("gs://maxsq-test") on a Cloud Storage server started once per session
  (tests/gcs_server.py). While the session lasts, this process's environment points gcsfs and
  tensorstore at the server; subprocesses inherit it."""
  from tests import gcs_server
  server = gcs_server.Server(str(tmp_path_factory.mktemp("gcs")))
  env = gcs_server.client_env(server.url)
  saved = {key: os.environ.get(key) for key in env}
  os.environ.update(env)
  try:
    yield server.create_bucket("maxsq-test")
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
    server.stop()
