"""Uploads to a gs:// workdir that never hold up training: metrics, TensorBoard event files and host
logs are staged in a local file and copied up by a background thread, retried with backoff for as
long as storage does not answer.

`Uploader.put(local, remote)` marks a file to be copied (its content at upload time; a file put
again while waiting is copied once). A warning line goes to stderr when storage has not answered for
`stall_warn_s` seconds, and a line when it answers again. `close(timeout_s)` waits for what is left.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

from etils import epath

from maxsq_jax.errors import MaxsqError

MAX_BACKOFF_S = 60.0


# What the storage clients log that the project reports itself in one line (storage outages:
# Uploader, checkpointing.Saver) or that is harmless (Orbax reading a gs:// checkpoint).
QUIET_MESSAGES = (
    "_SignalingThread.run() raised an exception",  # Orbax: a save's thread failed (storage).
    "Save Finalize thread",
    "Handler Commit operations or the Commit callback",
    "Waiting for previous save to complete took",
    "Metadata file does not exist",  # Orbax: a checkpoint without _CHECKPOINT_METADATA (read anyway).
    "read_only=True",  # Orbax: a read-only manager does not create or delete anything.
)


class _Quiet(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(quiet in message for quiet in QUIET_MESSAGES)


def quiet_client_logs() -> None:
  """Drops the QUIET_MESSAGES of Orbax (absl's logger), gcsfs's log of each request that ran out of
  retries and asyncio's of a failed request nobody waits for any more (both with a traceback; the
  project uses no asyncio itself); called once by the command-line start-up."""
  logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _Quiet) for f in absl_logger.filters):
    absl_logger.addFilter(_Quiet())


class StorageError(MaxsqError):
  """Storage did not answer within config.storage.deadline_s; the message names the URL."""


def say(line: str, last: bool = False) -> None:
  """Prints `line` on stderr from any thread, on a line of its own: a progress bar is cleared first and
  drawn again after it (tqdm.write), or, when it is the `last` line of the process, no more."""
  import tqdm
  if not last:
    tqdm.tqdm.write(line, file=sys.stderr)
  else:
    for bar in list(getattr(tqdm.tqdm, "_instances", ())):
      bar.clear()
      bar.disable = True
    print(line, file=sys.stderr)
  sys.stderr.flush()


def describe(error: BaseException) -> str:
  """`Type: first line of the message`, for one-line reports of a storage error."""
  text = str(error).splitlines()[0] if str(error) else ""
  return f"{type(error).__name__}: {text}"[:200] if text else type(error).__name__


class Uploader:
  """A background thread copying local files to remote paths (epath), retrying until they are up."""

  def __init__(self, url, stall_warn_s: float = 30.0, name: str = "uploads"):
    self.url = str(url)  # Named in the messages.
    self.stall_warn_s = stall_warn_s
    # remote -> (local path, delete the local file once up, the number of the put).
    self._pending: dict[str, tuple[str, bool, int]] = {}
    self._puts = 0
    self._lock = threading.Condition()
    self._stopping = False
    self._failing_since = None  # time.monotonic() of the first failed attempt of the current outage.
    self._warned = False
    self._thread = threading.Thread(target=self._run, name=f"maxsq-{name}", daemon=True)
    self._thread.start()

  def put(self, local, remote, delete_local: bool = False) -> None:
    """Copies `local` to `remote` (an epath or URL) in the background."""
    with self._lock:
      self._puts += 1
      self._pending[os.fspath(remote)] = (os.fspath(local), delete_local, self._puts)
      self._lock.notify_all()

  def _run(self) -> None:
    attempt = 0
    while True:
      with self._lock:
        while not self._pending and not self._stopping:
          self._lock.wait()
        if not self._pending:
          return
        remote, entry = next(iter(self._pending.items()))
      local = entry[0]
      try:
        data = open(local, "rb").read()
        epath.Path(remote).write_bytes(data)
      except FileNotFoundError as e:
        if e.filename == local:  # Nothing (left) to copy.
          self._done(remote, entry)
          continue
        error = e
      except Exception as e:  # gcsfs/aiohttp raise many types for one outage.
        error = e
      else:
        self._done(remote, entry)
        attempt = 0
        continue
      attempt += 1
      self._failed(error)
      with self._lock:
        self._lock.wait(min(2.0 ** attempt, MAX_BACKOFF_S))

  def _done(self, remote: str, entry: tuple[str, bool, int]) -> None:
    local, delete_local, _ = entry
    with self._lock:
      again = self._pending.get(remote) != entry  # Put again while uploading: that copy is still to go.
      if not again:
        del self._pending[remote]
      if self._failing_since is not None:
        if self._warned:
          say(f"storage {self.url} answers again after {time.monotonic() - self._failing_since:.0f} s; "
              "the delayed uploads are being copied")
        self._failing_since, self._warned = None, False
      self._lock.notify_all()
    if delete_local and not again:
      try:
        os.remove(local)
      except FileNotFoundError:
        pass

  def _failed(self, error: BaseException) -> None:
    now = time.monotonic()
    if self._failing_since is None:
      self._failing_since = now
    if not self._warned and now - self._failing_since >= self.stall_warn_s:
      self._warned = True
      say(f"warning: storage {self.url} has not answered for {now - self._failing_since:.0f} s "
          f"({describe(error)}); training goes on, and uploads are retried")

  def pending(self) -> list[str]:
    with self._lock:
      return list(self._pending)

  def flush(self, timeout_s: float) -> bool:
    """Waits until everything put so far is up, at most `timeout_s`; whether it is."""
    deadline = time.monotonic() + timeout_s
    with self._lock:
      while self._pending:
        left = deadline - time.monotonic()
        if left <= 0:
          return False
        self._lock.wait(left)
      return True

  def close(self, timeout_s: float) -> list[str]:
    """Waits for the pending uploads (at most `timeout_s`) and stops; the remote paths still not up."""
    self.flush(timeout_s)
    with self._lock:
      self._stopping = True
      left = list(self._pending)
      self._pending.clear()
      self._lock.notify_all()
    return left
