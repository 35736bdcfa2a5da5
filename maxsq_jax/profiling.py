"""`config.profile_steps`: a jax.profiler trace of some training steps, for TensorBoard's profile plugin.

"FIRST:LAST" traces steps FIRST to LAST (1-based, both included: step N is the update that makes
state.step N) into WORKDIR/tensorboard/plugins/profile/, where `tensorboard --logdir WORKDIR/tensorboard`
with tensorboard-plugin-profile shows it. The primary host traces; for a gs:// workdir the trace is
written locally and copied up when it ends.
"""

from __future__ import annotations

import shutil
import tempfile

import jax

from maxsq_jax import paths
from maxsq_jax.errors import ConfigError


def parse_steps(value: str) -> tuple[int, int] | None:
  """(first, last) of a "FIRST:LAST" string ("" -> None); a ConfigError names config.profile_steps otherwise."""
  if not value:
    return None
  first, sep, last = str(value).partition(":")
  try:
    steps = (int(first), int(last if sep else first))
  except ValueError:
    steps = None
  if steps is None or not 1 <= steps[0] <= steps[1]:
    raise ConfigError(f"config.profile_steps={value!r}: use FIRST:LAST with 1 <= FIRST <= LAST (e.g. 10:15), "
                      "or '' for no trace")
  return steps


class StepTrace:
  """Starts a trace before step FIRST and stops it after step LAST (or at `close`); a no-op without steps,
  on other hosts than the primary, and for steps a resumed run has already done."""

  def __init__(self, profile_steps: str, tensorboard_dir, log=print):
    self._steps = parse_steps(profile_steps) if jax.process_index() == 0 else None
    self._destination = paths.resolve(tensorboard_dir)
    self._local = None
    self._log = log

  def before(self, step: int) -> None:
    """Called before running step `step` (1-based)."""
    if self._steps is None or self._local is not None or not self._steps[0] <= step <= self._steps[1]:
      return
    remote = paths.is_remote(self._destination)
    self._local = tempfile.mkdtemp(prefix="maxsq_profile_") if remote else str(self._destination)
    jax.profiler.start_trace(self._local)

  def after(self, step: int, outputs) -> None:
    """Called after step `step` was dispatched, with its outputs (waited for before the trace ends)."""
    if self._local is not None and step >= self._steps[1]:
      jax.block_until_ready(outputs)
      self.close()

  def close(self) -> None:
    if self._local is None:
      return
    jax.profiler.stop_trace()
    if paths.is_remote(self._destination):
      _copy_tree(paths.resolve(self._local), self._destination)
      shutil.rmtree(self._local, ignore_errors=True)
    self._log(f"Profile of steps {self._steps[0]}-{self._steps[1]} written to {self._destination}/plugins/profile "
              f"(tensorboard --logdir {self._destination}, with the profile plugin)")
    self._local, self._steps = None, None


def _copy_tree(source, destination) -> None:
  for path in source.rglob("*"):
    if path.is_file():
      target = destination / path.relative_to(source)
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(path.read_bytes())
