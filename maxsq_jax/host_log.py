"""Each host's console output (stdout and stderr) also in `WORKDIR/logs/host_<i>.log`, so that every
host's messages, errors included, outlive the machine that printed them.

A rerun appends to the same file after a header line. For a gs:// workdir the log is written to a
local file and uploaded by a background thread (storage.Uploader) every UPLOAD_EVERY_S seconds when
it grew, and at the end; an abort (abort.stop) uploads it with its error line before the process ends.
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import sys
import tempfile
import threading
import traceback

from maxsq_jax import abort, paths, storage
from maxsq_jax.errors import MaxsqError

UPLOAD_EVERY_S = 30.0
LOGS_DIR = "logs"


def log_path(workdir, process_index: int):
  """WORKDIR/logs/host_<i>.log (local path or gs:// URL, an epath)."""
  return paths.resolve(workdir) / LOGS_DIR / f"host_{process_index}.log"


class _Tee:
  """A text stream writing to `stream` and to the log file."""

  def __init__(self, stream, log_file):
    self._stream, self._log_file = stream, log_file

  def write(self, text: str) -> int:
    self._log_file.write(text)
    return self._stream.write(text)

  def flush(self) -> None:
    self._log_file.flush()
    self._stream.flush()

  def __getattr__(self, name):  # isatty, fileno, encoding, ...: the console stream's.
    return getattr(self._stream, name)


class HostLog:
  """Context manager: while in it, sys.stdout and sys.stderr also go to this host's log in `workdir`.

  An error that leaves the block is written to the log (its `error:` line, or the traceback of a bug)."""

  def __init__(self, workdir, process_index: int, stall_warn_s: float = 30.0, deadline_s: float = 600.0):
    self.remote = log_path(workdir, process_index)
    self._deadline_s = deadline_s
    self._stall_warn_s = stall_warn_s
    self._staging = self._uploader = None
    self._stop = threading.Event()

  def __enter__(self) -> "HostLog":
    if paths.is_remote(self.remote):
      self._staging = tempfile.mkdtemp(prefix="maxsq_log_")
      self.local = os.path.join(self._staging, self.remote.name)
      if self.remote.exists():
        with open(self.local, "wb") as f:
          f.write(self.remote.read_bytes())
      self._uploader = storage.Uploader(self.remote, self._stall_warn_s, name="host-log")
    else:
      self.remote.parent.mkdir(parents=True, exist_ok=True)
      self.local = os.fspath(self.remote)
    self._file = open(self.local, "a", buffering=1)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    self._file.write(f"=== {now} {socket.gethostname()} pid {os.getpid()}: {' '.join(sys.argv)}\n")
    self._streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(sys.stdout, self._file), _Tee(sys.stderr, self._file)
    if self._uploader is not None:
      self._ticker = threading.Thread(target=self._upload_while_running, name="maxsq-host-log-ticker", daemon=True)
      self._ticker.start()
    abort.tell(f"log {self.local}" + (f" {self.remote}" if self._uploader is not None else ""))
    self._abort_cleanup = abort.cleanup(lambda: self._upload(abort.CLEANUP_S - 2))
    self._abort_cleanup.__enter__()
    return self

  def _upload_while_running(self) -> None:
    uploaded = -1
    while not self._stop.wait(UPLOAD_EVERY_S):
      size = os.path.getsize(self.local)
      if size != uploaded:
        self._uploader.put(self.local, self.remote)
        uploaded = size

  def _upload(self, timeout_s: float) -> bool:
    """Flushes the log and waits (at most `timeout_s`) for its upload; whether it is up."""
    self._file.flush()
    if self._uploader is None:
      return True
    self._uploader.put(self.local, self.remote)
    return self._uploader.flush(timeout_s)

  def __exit__(self, exc_type, exc, tb) -> None:
    self._abort_cleanup.__exit__(None, None, None)
    sys.stdout, sys.stderr = self._streams
    if isinstance(exc, MaxsqError):
      self._file.write(f"error: {' '.join(str(exc).splitlines())}\n")
    elif exc is not None and not isinstance(exc, (SystemExit, KeyboardInterrupt)):
      self._file.write("".join(traceback.format_exception(exc_type, exc, tb)))
    self._stop.set()
    self._file.close()
    if self._uploader is None:
      return
    self._uploader.put(self.local, self.remote)
    if self._uploader.close(self._deadline_s):
      print(f"warning: this host's log could not be uploaded to {self.remote} within config.storage.deadline_s="
            f"{self._deadline_s:g} s; it is kept in {self.local}", file=sys.stderr, flush=True)
    else:
      shutil.rmtree(self._staging, ignore_errors=True)
