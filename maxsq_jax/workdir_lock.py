"""One run per workdir: `WORKDIR/run.lock`, held by the primary host while a run trains there.

The lock file (JSON) names its holder: host, pid, process start time, start time, a random token
and a heartbeat time that a background thread renews every HEARTBEAT_S seconds. A second run refuses
to start and names the holder. The lock is taken over only from a run that is provably gone, with a
note saying so: on the same host when its pid no longer runs, is a zombie or is another process now
(another start time); from another host, which cannot be asked, when its heartbeat is older than
STALE_S. A lock that cannot be read, is not JSON or holds fields of other types is never taken over:
it is an error naming the file, to delete if no run is alive.

Local workdirs: the lock is written complete under a temporary name and hard-linked to run.lock
(an exclusive create that never shows a half-written lock; O_EXCL where links are not supported);
heartbeats replace it atomically; a stale lock is renamed aside and deleted only if it is still the
one judged stale. Object stores (gs://) have no exclusive create through etils.epath: there the lock
is written with a fresh token and read back after SETTLE_S seconds; of two runs that started
together only the one whose token is read back proceeds.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid

from etils import epath

from maxsq_jax.errors import CheckpointError

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0
SETTLE_S = 2.0
# The holder's fields: their JSON types and what they are called in an error (the last two may be absent).
_FIELDS = {"host": (str, "a string"), "pid": (int, "a whole number"), "token": (str, "a string"),
           "heartbeat": ((int, float), "a number"), "start_time": (str, "a string"),
           "process_start": ((str, type(None)), "a string or null")}
_OPTIONAL = ("start_time", "process_start")


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


def _gone(holder: dict) -> str | None:
  """Why the run that wrote `holder` (a checked lock) is provably gone, or None if it may be alive."""
  if holder["host"] == socket.gethostname():
    pid = holder["pid"]
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return f"pid {pid} no longer runs on this host"
    except OSError:
      return None  # EPERM: another user's live process.
    if _process_state(pid) == "Z":
      return f"pid {pid} has exited (a zombie)"
    start, now = holder.get("process_start"), _process_start(pid)
    if start is not None and now is not None and now != start:
      return f"pid {pid} is another process now (started at another time)"
    return None
  silent = time.time() - holder["heartbeat"]
  return f"no heartbeat from host {holder['host']} for {int(silent)} s" if silent >= STALE_S else None


def _describe(holder: dict) -> str:
  started = holder.get("start_time", "?")
  beat = datetime.datetime.fromtimestamp(holder["heartbeat"], datetime.timezone.utc)
  return (f"host {holder['host']}, pid {holder['pid']}, started {started}, "
          f"last alive {beat.isoformat(timespec='seconds')}")


def _type_error(holder) -> str | None:
  """What is wrong with a parsed lock's structure or types, or None."""
  if not isinstance(holder, dict):
    return f"holds a JSON {type(holder).__name__}, not an object"
  for key, (kinds, called) in _FIELDS.items():
    if key not in holder:
      if key in _OPTIONAL:
        continue
      return f"lacks the field {key!r}"
    value = holder[key]
    if isinstance(value, bool) or not isinstance(value, kinds):
      return f"has {key!r} = {json.dumps(value)[:60]}, not {called}"
  if not 0 < holder["pid"] < 2**31 or not 0 <= holder["heartbeat"] < 1e11:  # Process ids; seconds since 1970.
    return f"has an impossible pid {holder['pid']} or heartbeat {holder['heartbeat']}"
  return None


class WorkdirLock:
  """Context manager holding `WORKDIR/run.lock` (create it with `acquire`)."""

  def __init__(self, workdir):
    self.workdir = epath.Path(workdir)
    self.path = self.workdir / LOCK_NAME
    self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
                   "start_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "token": uuid.uuid4().hex, "heartbeat": time.time()}
    self._local = "://" not in os.fspath(self.workdir)
    self._stop = threading.Event()
    self._thread = None

  def _unusable(self, why: str) -> CheckpointError:
    return CheckpointError(
        f"the lock {self.path} {why}, so whether a run still trains in {self.workdir} cannot be told; if no run "
        f"is alive there (on any host), delete {self.path} and start again.")

  def _parse(self, text: str) -> dict:
    try:
      holder = json.loads(text)
    except ValueError:
      raise self._unusable(f"is not a lock this project wrote (not JSON: {text[:40]!r})") from None
    wrong = _type_error(holder)
    if wrong:
      raise self._unusable(f"is not a lock this project wrote (it {wrong})")
    return holder

  def _read(self, path=None) -> dict | None:
    """The holder in the lock (None if there is none); CheckpointError if it cannot be read or checked."""
    try:
      text = epath.Path(path or self.path).read_text()
    except FileNotFoundError:
      return None
    except (OSError, UnicodeDecodeError) as e:
      raise self._unusable(f"cannot be read ({type(e).__name__}: {getattr(e, 'strerror', None) or e})") from None
    return self._parse(text)

  def _refuse(self, holder: dict):
    raise CheckpointError(
        f"workdir {self.workdir} is in use by another run ({_describe(holder)}); wait for it to end or use "
        f"another --workdir. If that run is dead on another host, its lock ({self.path}) is taken over "
        f"{int(STALE_S)} s after its last heartbeat, or delete that file.")

  def _write_local(self, exclusive: bool) -> bool:
    """Writes the lock whole under a temporary name, then links it to run.lock (exclusive: fails if
    one exists) or renames it over run.lock."""
    temporary = os.fspath(self.workdir / f".{LOCK_NAME}.{self.holder['token']}")
    with open(temporary, "w") as f:
      f.write(json.dumps(self.holder))
    try:
      if not exclusive:
        os.replace(temporary, os.fspath(self.path))
        return True
      try:
        os.link(temporary, os.fspath(self.path))
      except FileExistsError:
        return False
      except OSError:  # No hard links on this file system: an exclusive create, written in one call.
        try:
          fd = os.open(os.fspath(self.path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
          return False
        with os.fdopen(fd, "w") as f:
          f.write(json.dumps(self.holder))
      return True
    finally:
      if os.path.exists(temporary):
        os.unlink(temporary)

  def _take(self) -> bool:
    if self._local:
      return self._write_local(exclusive=True)
    self.path.write_text(json.dumps(self.holder))
    time.sleep(SETTLE_S)
    return (self._read() or {}).get("token") == self.holder["token"]

  def _remove_stale(self, stale: dict) -> None:
    """Deletes a local lock judged stale, only if it is still that one: it is renamed aside first (a
    lock another run wrote in between is put back)."""
    aside = self.workdir / f".{LOCK_NAME}.stale-{self.holder['token']}"
    try:
      os.rename(os.fspath(self.path), os.fspath(aside))
    except FileNotFoundError:
      return  # Another run removed it first.
    try:
      same = self._read(aside) == stale
    except CheckpointError:
      same = False
    if not same:
      try:
        os.link(os.fspath(aside), os.fspath(self.path))
      except FileExistsError:
        pass
    aside.unlink(missing_ok=True)

  def acquire(self) -> "WorkdirLock":
    self.workdir.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
      holder = self._read()
      if holder is not None:
        why = _gone(holder)
        if why is None:
          self._refuse(holder)
        if self._local:
          self._remove_stale(holder)
      if self._take():
        if holder is not None:
          print(f"note: took over {self.path} from a run that is gone ({_describe(holder)}): {why}.",
                file=sys.stderr, flush=True)
        self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
        self._thread.start()
        return self
    holder = self._read()
    if holder is not None:
      self._refuse(holder)
    raise CheckpointError(f"could not take the lock {self.path} in 3 attempts (other runs starting in {self.workdir} "
                          "at the same time?); try again")

  def _held(self) -> bool:
    """Whether the lock file is still this run's (False when it cannot be read)."""
    try:
      return (self._read() or {}).get("token") == self.holder["token"]
    except CheckpointError:
      return False

  def _beat(self):
    while not self._stop.wait(HEARTBEAT_S):
      self.holder["heartbeat"] = time.time()
      try:
        if self._held():
          if self._local:
            self._write_local(exclusive=False)
          else:
            self.path.write_text(json.dumps(self.holder))
      except Exception:  # A storage outage (gcsfs raises many types); the next beat retries.
        pass

  def release(self) -> None:
    """Stops the heartbeat and deletes the lock if it is still this run's; never raises for storage
    errors (a lock left behind is taken over by the next start once this process is gone)."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    try:
      if self._held():
        self.path.unlink(missing_ok=True)
    except OSError:
      pass

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
