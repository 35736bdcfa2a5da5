"""Ending the process at once with one `error:` line, where waiting longer would only hang: storage
that stays silent past config.storage.deadline_s (train.py's checkpoint saves) and a host that
stopped answering (distributed.py).

Such a stop comes from a watchdog thread or from the distributed runtime's callback, not from the
training's call stack, so what it says and what it cleans up are registered here as the run goes:
the newest committed checkpoint (`note_committed`), and cleanups (`cleanup`: the workdir lock's
release, the host log's last upload), which get at most CLEANUP_S seconds together. The process
then ends with `os._exit`: neither Python's exit handlers nor the distributed runtime's shutdown
barrier, which would wait minutes for a host that is gone, run.

This module holds the process's only shared mutable state: it describes the process, not a run.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Callable, NoReturn

CLEANUP_S = 20.0
EXIT_CODE = 1

_committed: list[str] = []  # The newest committed checkpoint, described ("step 4 in gs://b/run/checkpoints").
_cleanups: list[Callable[[], None]] = []
_listeners: list[Callable[[str], None]] = []  # Told "committed TEXT", "log LOCAL [REMOTE]" and "done".
_stopping = threading.Lock()


def listen(function: Callable[[str], None]) -> None:
  """`function(line)` is told of each committed checkpoint, of the host log's paths and, as the process
  stops with its own error line, "done" (distributed.py's sentinel, which speaks for a process that JAX's
  runtime ends)."""
  _listeners.append(function)


def tell(line: str) -> None:
  for function in list(_listeners):
    try:
      function(line)
    except Exception:  # A listener that is gone (its pipe closed) is no reason to fail.
      pass


def note_committed(directory, step: int | None) -> None:
  """Records checkpoint `step` of `directory` as committed (None: the directory has none yet)."""
  _committed[:] = [f"step {step} in {directory}" if step is not None else f"none yet in {directory}"]
  tell(f"committed {_committed[0]}")


def last_committed() -> str:
  """The newest checkpoint known to be committed ('step N in DIR'; a save in flight may have
  committed a later one, which a rerun then resumes from), or 'none yet'."""
  return _committed[0] if _committed else "none yet"


@contextlib.contextmanager
def cleanup(function: Callable[[], None] | None):
  """Registers `function` (if any) to run if the process is stopped inside the block."""
  if function is None:
    yield
    return
  _cleanups.append(function)
  try:
    yield
  finally:
    _cleanups.remove(function)


def _run_quietly(function: Callable[[], None]) -> None:
  try:
    function()
  except Exception:  # Best effort: storage may be what failed.
    pass


def stop(message: str, exit_code: int = EXIT_CODE) -> NoReturn:
  """Prints `error: MESSAGE` on stderr, runs the cleanups (at most CLEANUP_S s) and ends the process.

  Called from any thread; a second caller waits for the first one's exit."""
  if not _stopping.acquire(blocking=False):
    while True:
      time.sleep(3600)
  tell("done")
  from maxsq_jax import storage
  storage.say(f"error: {' '.join(message.splitlines())}", last=True)  # Not followed by a progress bar.
  threads = [threading.Thread(target=_run_quietly, args=(f,), daemon=True) for f in reversed(_cleanups)]
  for thread in threads:
    thread.start()
  deadline = time.monotonic() + CLEANUP_S
  for thread in threads:
    thread.join(max(deadline - time.monotonic(), 0.0))
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:
      pass
  os._exit(exit_code)
