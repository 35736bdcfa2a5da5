"""A full disk, wherever it is met (Orbax's background writers, TensorStore, a JSON file, a log),
as one DiskFullError naming the disk and the path (`error`), with the reports it causes in other
threads hidden while a tool runs (`Quiet`, used by errors.guarded)."""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import sys
import threading
from typing import Sequence

from maxsq_jax.errors import DiskFullError

_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded")
# Where TensorStore and Orbax name the file they failed to write.
_PATH_IN_TEXT = re.compile(r'(?:Failed writing: |local file |directory: )"?(/[^"\s\']+)')


def _chain(error: BaseException | None):
  """`error` and the exceptions it was raised from or while handling."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def _is_disk_full(error: BaseException | None) -> bool:
  return any((isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS)
             or any(text in str(e) for text in _DISK_FULL_TEXTS) for e in _chain(error))


def _written_path(error: BaseException | None, text: str = "") -> str | None:
  """The file or directory that a disk-full `error` (or log `text`) names, if any."""
  for e in _chain(error):
    if isinstance(e, OSError) and e.filename:
      return os.fspath(e.filename)
    text += " " + str(e)
  match = _PATH_IN_TEXT.search(text)
  return match.group(1) if match else None


def error(exception: BaseException, seen_path: str | None = None,
          argv: Sequence[str] | None = None) -> DiskFullError | None:
  """A DiskFullError naming the disk and the path when `exception` comes from a full disk, else None.
  The path is the one the exception names, else `seen_path` (from hidden reports), else --workdir."""
  if not _is_disk_full(exception):
    return None
  path = _written_path(exception) or seen_path
  if path is None:
    workdirs = [a.split("=", 1)[1] for a in (sys.argv if argv is None else argv) if a.startswith("--workdir=")]
    path = os.path.abspath(workdirs[-1]) if workdirs else None
  where = f"writing {path}: {_disk_of(path)}" if path else "writing a file"
  return DiskFullError(f"the disk is full ({where}). What was saved before is intact: free space on that disk "
                       "(or use another one) and rerun the same command; a training run resumes from its newest "
                       "checkpoint")


def _disk_of(path: str) -> str:
  """'DEVICE (TYPE) mounted at MOUNT has F free of T' for the file system holding local `path`."""
  if "://" in path:
    return "a remote file system"
  mount = os.path.abspath(path)
  while not os.path.exists(mount):
    mount = os.path.dirname(mount)
  while not os.path.ismount(mount):
    mount = os.path.dirname(mount)
  device = ""
  try:
    with open("/proc/mounts") as f:
      for line in f:
        fields = line.split()
        if len(fields) > 2 and fields[1] == mount:
          device = f"{fields[0]} ({fields[2]}) "
  except OSError:
    pass
  usage = shutil.disk_usage(mount)
  return f"{device}mounted at {mount} has {_size(usage.free)} free of {_size(usage.total)}"


def _size(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} TiB"


class Quiet(logging.Filter):
  """While a tool runs: hides the reports of a full disk made elsewhere than in the main thread
  (Orbax's writer threads log one per failed file, with a traceback; TensorStore's callbacks report
  through sys.excepthook or sys.unraisablehook), counting them and keeping the first path they name
  for the one `error:` line. The 'Event loop is closed' that Orbax's writers raise after a full disk (or at exit after
  another error) is held back, and shown at the end unless an error line ended the run (`ending`); then the
  shutdown is kept quiet too:
  threads that still write and exit handlers that flush (TensorBoard's writer) fail the same way."""

  def __init__(self):
    super().__init__()
    self.count = 0
    self.path: str | None = None
    self.held: list = []
    self.ending = False

  def __enter__(self):
    for handler in logging.root.handlers:
      handler.addFilter(self)
    self.excepthook, self.unraisablehook = sys.excepthook, sys.unraisablehook
    sys.excepthook = self._hook
    sys.unraisablehook = self._unraisable_hook
    return self

  def __exit__(self, *exc_info):
    for handler in logging.root.handlers:
      handler.removeFilter(self)
    if self.ending:
      logging.disable(logging.CRITICAL)
      sys.excepthook = threading.excepthook = sys.unraisablehook = lambda *args: None
      return
    sys.excepthook, sys.unraisablehook = self.excepthook, self.unraisablehook
    for show, report in self.held:
      show(*report)
    if self.count:
      print(f"warning: {self.count} reports of a full disk ({self.path or 'path unknown'}) were hidden; rerun with "
            "--verbose to see them", file=sys.stderr, flush=True)

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    try:
      text = record.getMessage()
    except Exception:  # A record whose arguments do not fit its format: keep it.
      return True
    if not (_is_disk_full(error) or any(t in text for t in _DISK_FULL_TEXTS)):
      return True
    self.count += 1
    self.path = self.path or _written_path(error, text)
    return False

  def _hook(self, kind, value, tb) -> None:
    if not self._hidden(value, (self.excepthook, (kind, value, tb))):
      self.excepthook(kind, value, tb)

  def _unraisable_hook(self, unraisable) -> None:
    if not self._hidden(unraisable.exc_value, (self.unraisablehook, (unraisable,))):
      self.unraisablehook(unraisable)

  def _hidden(self, value, report) -> bool:
    """Whether the exception `value` is a full disk (counted) or 'Event loop is closed' (its `report`,
    (hook, arguments), is held)."""
    if _is_disk_full(value):
      self.count += 1
      self.path = self.path or _written_path(value)
      return True
    if isinstance(value, RuntimeError) and "Event loop is closed" in str(value):
      self.held.append(report)
      return True
    return False
