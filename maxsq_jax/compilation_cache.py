"""The persistent XLA compilation cache (jax's), on for every training run: a restarted or preempted run
finds its compiled steps there instead of compiling ResNet-101 again."""

from __future__ import annotations

import os

import jax

from maxsq_jax import paths

ENV = "JAX_COMPILATION_CACHE_DIR"


def enable(directory: str) -> str | None:
  """Turns the cache on in `directory` (config.compilation_cache_dir: a local path, "~" expanded, or a gs://
  URL that every host and restart shares); "" leaves it off. jax's own variable JAX_COMPILATION_CACHE_DIR,
  when set, wins. Returns the directory in use, or None. Programs that compile in under a second are
  not stored (jax's default)."""
  if os.environ.get(ENV):
    return os.environ[ENV]
  if not directory:
    return None
  directory = directory if paths.is_remote(directory) else os.path.expanduser(directory)
  jax.config.update("jax_compilation_cache_dir", directory)
  return directory
