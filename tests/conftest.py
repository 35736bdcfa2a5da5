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
