"""Two options of every training run: the persistent compilation cache (config.compilation_cache_dir) and a
profiler trace of some steps (config.profile_steps)."""

import os

import jax
import pytest

from maxsq_jax import compilation_cache, profiling
from maxsq_jax.errors import ConfigError
from tests.helpers import REFERENCE_OVERRIDES, run_tiny


@pytest.mark.parametrize("value, steps", [("", None), ("10:15", (10, 15)), ("3", (3, 3)), ("1:1", (1, 1))])
def test_profile_steps_parse(value, steps):
  assert profiling.parse_steps(value) == steps


@pytest.mark.parametrize("value", ["0:3", "5:2", "a:b", "10-15", ":"])
def test_bad_profile_steps_name_the_key(value):
  with pytest.raises(ConfigError, match=r"config.profile_steps=.*FIRST:LAST"):
    profiling.parse_steps(value)


def test_cache_directory_from_config_env_or_off(monkeypatch, tmp_path):
  monkeypatch.delenv(compilation_cache.ENV, raising=False)
  before = jax.config.jax_compilation_cache_dir
  try:
    assert compilation_cache.enable("") is None
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compilation_cache.enable("~/cache") == str(tmp_path / "cache")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")
    monkeypatch.setenv(compilation_cache.ENV, "/elsewhere")
    assert compilation_cache.enable("~/cache") == "/elsewhere"  # jax's own variable wins.
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


@pytest.mark.integration
def test_a_run_fills_the_cache_and_writes_the_trace(tiny_data_root, tmp_path, monkeypatch):
  """The cache directory of the config receives the compiled programs, and steps 2-3 are traced into the
  TensorBoard folder in the profile plugin's layout (plugins/profile/<run>/<host>.xplane.pb)."""
  monkeypatch.delenv(compilation_cache.ENV, raising=False)
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # Store even the tiny programs.
  cache = tmp_path / "cache"
  run_tiny(tiny_data_root, tmp_path / "run", tmp_path / "out.npz", **{**REFERENCE_OVERRIDES, "num_steps": 4, "compilation_cache_dir": str(cache), "profile_steps": "2:3"})
  assert len(os.listdir(cache)) >= 2  # At least the init and the train step.
  traces = list((tmp_path / "run" / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
