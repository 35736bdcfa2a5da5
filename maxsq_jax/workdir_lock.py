"""One run per workdir: `WORKDIR/run.lock`, held by the primary host while a run trains there.

The lock file (JSON) names its holder: host, pid, start time, a random token and a heartbeat time
that a background thread renews every HEARTBEAT_S seconds. A second run refuses to start and names
the holder. A lock is stale, and is taken over, when its process is gone (same host: the pid no
longer runs, or is a zombie, or is another process now) or when its heartbeat is older than
STALE_S (another host, which cannot be asked), so a killed run never blocks its restart for long.

Local workdirs are locked with an exclusive create (O_EXCL). Object stores (gs://) have no exclusive
create through etils.epath: there the lock is written with a fresh token and read back after
SETTLE_S seconds; of two runs that started together only the one whose token is read back proceeds.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
import uuid

from etils import epath

from maxsq_jax.errors import CheckpointError

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0
SETTLE_S = 2.0


def _stat_fields(pid: int) -> list[str] | None:
  """The fields of /proc/PID/stat after the command name (Linux), None where unknown."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()
  except (OSError, IndexError):
    return None


def _process_start(pid: int) -> str | None:
  """Start time of process `pid` in clock ticks since boot, None where unknown."""
  fields = _stat_fields(pid)
  return fields[19] if fields and len(fields) > 19 else None


def _process_state(pid: int) -> str | None:
  """The state letter of process `pid` (R, S, Z, ...), None where unknown."""
  fields = _stat_fields(pid)
  return fields[0] if fields else None


def _alive(holder: dict) -> bool:
  """Whether the run that wrote `holder` may still be running."""
  if holder.get("host") == socket.gethostname():
    pid = int(holder.get("pid", -1))
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return False
    except PermissionError:
      return True
    except (OSError, ValueError):
      return False
    if _process_state(pid) == "Z":
      return False
    start = holder.get("process_start")
    return start is None or _process_start(pid) in (None, start)
  return time.time() - float(holder.get("heartbeat", 0)) < STALE_S


def _describe(holder: dict) -> str:
  started = holder.get("start_time", "?")
  beat = datetime.datetime.fromtimestamp(float(holder.get("heartbeat", 0)), datetime.timezone.utc)
  return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {started}, "
          f"last alive {beat.isoformat(timespec='seconds')}")


class WorkdirLock:
  """Context manager holding `WORKDIR/run.lock` (create it with `acquire`)."""

  def __init__(self, workdir):
    self.workdir = epath.Path(workdir)
    self.path = self.workdir / LOCK_NAME
    self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
                   "start_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "token": uuid.uuid4().hex, "heartbeat": time.time()}
    self._stop = threading.Event()
    self._thread = None

  def _read(self) -> dict | None:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (ValueError, OSError):
      return {}  # Empty or garbled (a writer killed mid-write): no live holder can be named.

  def _refuse(self, holder: dict):
    raise CheckpointError(
        f"workdir {self.workdir} is in use by another run ({_describe(holder)}); wait for it to end or use "
        f"another --workdir. If that run is dead on another host, its lock ({self.path}) is taken over "
        f"{int(STALE_S)} s after its last heartbeat, or delete that file.")

  def _take(self, exclusive: bool) -> bool:
    text = json.dumps(self.holder)
    if exclusive:
      try:
        fd = os.open(os.fspath(self.path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, "w") as f:
        f.write(text)
      return True
    self.path.write_text(text)
    time.sleep(SETTLE_S)
    return (self._read() or {}).get("token") == self.holder["token"]

  def acquire(self) -> "WorkdirLock":
    self.workdir.mkdir(parents=True, exist_ok=True)
    local = "://" not in os.fspath(self.workdir)
    for _ in range(3):
      holder = self._read()
      if holder and _alive(holder):
        self._refuse(holder)
      if holder is not None and local:
        self.path.unlink(missing_ok=True)  # A stale or garbled lock: its run is gone.
      if self._take(exclusive=local):
        self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
        self._thread.start()
        return self
    holder = self._read() or {}
    self._refuse(holder)

  def _beat(self):
    while not self._stop.wait(HEARTBEAT_S):
      self.holder["heartbeat"] = time.time()
      try:
        if (self._read() or {}).get("token") == self.holder["token"]:
          self.path.write_text(json.dumps(self.holder))
      except OSError:
        pass  # A transient storage error; the next beat retries.

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if (self._read() or {}).get("token") == self.holder["token"]:
      self.path.unlink(missing_ok=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def hold(workdir):
  """The lock of `workdir` for this run: taken by the primary host, the outcome shared with all hosts.
  Returns a context manager that releases it (a no-op on the other hosts)."""
  import contextlib

  import jax
  import numpy as np
  error, lock = None, None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir).acquire()
    except CheckpointError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    from maxsq_jax import distributed
    distributed.barrier(f"{workdir}:workdir_lock")  # Meet first: CPU collectives time out after 30 s.
    taken = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not taken and error is None:
      raise CheckpointError(f"workdir {workdir} is in use by another run (the primary host's error names it)")
  if error is not None:
    raise error
  return lock if lock is not None else contextlib.nullcontext()
