"""Fixtures only (helpers are in tests/helpers.py): the repository root on sys.path (so `tests.*`
modules import), a tiny synthetic dataset generated once per session, the shared tiny training runs,
a compilation cache and a Cloud Storage server."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from tests.helpers import REFERENCE_OVERRIDES, load_npz, run_tiny, tiny_env  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory):
  """A 16-train / 4-val image synthetic benchmark at 48x32, in both layouts."""
  from maxsq_jax.data import synthetic
  root = str(tmp_path_factory.mktemp("data"))
  synthetic.generate(root, num_train=16, num_val=4, size=(48, 32), seed=0, verbose=False)
  return root


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory):
  """A persistent XLA compilation cache shared by the training subprocesses: each program compiles once."""
  return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="session")
def reference_run(tiny_data_root, compilation_cache, tmp_path_factory):
  """(workdir, final outputs) of the uninterrupted 1-device reference run."""
  base = tmp_path_factory.mktemp("reference")
  run_tiny(tiny_data_root, base / "run", base / "final.npz", cache_dir=compilation_cache, **REFERENCE_OVERRIDES)
  return base / "run", load_npz(base / "final.npz")


@pytest.fixture(scope="session")
def four_device_run(tiny_data_root, compilation_cache, tmp_path_factory):
  """(workdir, outputs) of the reference config run for 3 steps on 4 forced CPU devices."""
  base = tmp_path_factory.mktemp("four_devices")
  run_tiny(tiny_data_root, base / "run", base / "four.npz", devices=4, cache_dir=compilation_cache,
           **{**REFERENCE_OVERRIDES, "num_steps": 3})
  return base / "run", load_npz(base / "four.npz")


@pytest.fixture(scope="session")
def tiny_demo_table(tiny_data_root, compilation_cache, tmp_path_factory):
  """(workdir, CompletedProcess) of `python -m maxsq_jax.demo_table --tiny` over every method and a user's
  loss (tests.user_losses:my_loss), one seed."""
  import importlib.util
  import subprocess
  spec = importlib.util.spec_from_file_location("demo_for_fixture", os.path.join(ROOT, "configs", "demo.py"))
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  workdir = tmp_path_factory.mktemp("demo_table") / "table"
  proc = subprocess.run([sys.executable, "-m", "maxsq_jax.demo_table", f"--workdir={workdir}", "--num_seeds=1",
                         "--tiny", f"--data_root={tiny_data_root}",
                         "--methods=" + ",".join(demo.METHODS + ("tests.user_losses:my_loss",))],
                        env=tiny_env(1, compilation_cache), capture_output=True, text=True, cwd=ROOT, timeout=1800)
  if proc.returncode != 0:
    raise AssertionError(f"demo_table failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
  return workdir, proc


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
  """The Cloud Storage server (tests/gcs_server.Server) behind `gcs_bucket`; a test that stops it
  starts it again."""
  from tests import gcs_server as server_lib
  server = server_lib.Server(str(tmp_path_factory.mktemp("gcs")))
  yield server
  server.stop()


@pytest.fixture(scope="session")
def gcs_bucket(gcs_server):
  """The URL of a bucket ("gs://maxsq-test") on a Cloud Storage server started once per session
  (tests/gcs_server.py). While the session lasts, this process's environment points gcsfs and
  tensorstore at the server; subprocesses inherit it."""
  from tests import gcs_server as server_lib
  server = gcs_server
  env = server_lib.client_env(server.url)
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
