"""Multi-controller start-up: one process per host (or per GPU), all joined by `jax.distributed`.

How a process learns its place, in order:
1. explicit flags `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or the
   environment variables MAXSQ_COORDINATOR_ADDRESS, MAXSQ_NUM_PROCESSES, MAXSQ_PROCESS_ID);
2. a Cloud TPU VM pod slice or a SLURM job with more than one task: `jax.distributed.initialize()`
   with no arguments, which reads the TPU metadata server / the SLURM variables itself;
3. otherwise a single process, and nothing is initialised.

A host that stops (killed, crashed, its VM gone) is reported by the others in one line (`watch_peers`):
every process sets a counter in the coordination service's key-value store every few seconds, and
stops with an error naming a process whose counter has not moved for `heartbeat_timeout_s`. JAX's own
heartbeat timeout, after which its runtime aborts the survivors with a fatal log, is set later
(JAX_HEARTBEAT_MARGIN_S), so that this line comes first.
"""

import atexit
import os
import sys
import threading
import time

import jax

from maxsq_jax import abort
from maxsq_jax.errors import ConfigError

DEFAULT_HEARTBEAT_TIMEOUT_S = 45.0
JAX_HEARTBEAT_MARGIN_S = 30
ALIVE_KEY = "maxsq/alive/"
DONE = "done"


def detect_cluster(environ=None) -> str | None:
  """"tpu_pod", "slurm" or None, from the environment of this process."""
  environ = os.environ if environ is None else environ
  hostnames = environ.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hostnames.split(",") if h]) > 1:
    return "tpu_pod"
  if "SLURM_JOB_ID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"
  return None


def _report_missing(address: str, num_processes: int, process_id: int, timeout_s: float,
                    joined: threading.Event, interval_s: float = 30.0) -> None:
  """Runs while `jax.distributed.initialize` waits: says which processes it waits for, and ends the
  process with one error line after `timeout_s` (jax would abort later with a fatal log)."""
  start = time.monotonic()
  others = [i for i in range(num_processes) if i != process_id] if num_processes else "the others"
  interval_s = min(interval_s, timeout_s / 2)
  while not joined.wait(min(interval_s, max(timeout_s - (time.monotonic() - start), 0.0))):
    waited = time.monotonic() - start
    if waited >= timeout_s:
      print(f"error: process {process_id} of {num_processes}: not every process joined the coordinator at "
            f"{address} within {timeout_s:.0f} s; still waiting for process ids {others}. Start every process "
            f"with the same --coordinator_address and --num_processes, check that {address} is reachable from each host, or raise --startup_timeout_s.", file=sys.stderr, flush=True)
      os._exit(1)
    print(f"waiting for process ids {others} to join the coordinator at {address} ({waited:.0f} s of "
          f"{timeout_s:.0f} s)", file=sys.stderr, flush=True)


def _join(timeout_s: float, heartbeat_timeout_s: float, described: tuple[str, int, int], **kwargs) -> None:
  """jax.distributed.initialize(**kwargs), watched; `described`: (address, num_processes, process_id).
  Then the processes watch each other (`watch_peers`)."""
  joined = threading.Event()
  watcher = threading.Thread(target=_report_missing, args=(*described, timeout_s, joined), daemon=True)
  watcher.start()
  try:
    # jax's own deadlines come later, so that this module's error lines are what the user sees.
    jax.distributed.initialize(initialization_timeout=int(timeout_s) + 60,
                               heartbeat_timeout_seconds=int(heartbeat_timeout_s) + JAX_HEARTBEAT_MARGIN_S, **kwargs)
  finally:
    joined.set()
  watch_peers(heartbeat_timeout_s)


def _client():
  """The coordination service's client of this process (no public accessor; Orbax reads it the same way)."""
  from jax._src import distributed as jax_distributed
  return jax_distributed.global_state.client


def lost_host_message(process: int, silent_s: float, timeout_s: float) -> str:
  return (f"process {process} of {jax.process_count()} stopped answering (no sign of life for {silent_s:.0f} s, "
          f"--heartbeat_timeout_s={timeout_s:g}); process {jax.process_index()} stops too. The last checkpoint "
          f"known to be committed is {abort.last_committed()}; rerun the same command on every host to resume.")


def watch_peers(timeout_s: float, beat_s: float | None = None) -> None:
  """Starts this process's heartbeat and its watch of the others (a daemon thread): a process whose
  heartbeat has not moved for `timeout_s` seconds ends this one with one error line (abort.stop),
  unless it ended normally (it then marks its heartbeat done at exit). The coordinator (process 0)
  hosts the store: when it is the one that stops, the others stop with that line too once the store
  has not answered for `timeout_s` (or when JAX's runtime ends them first)."""
  client, me = _client(), jax.process_index()
  peers = [i for i in range(jax.process_count()) if i != me]
  beat_s = beat_s or min(2.0, timeout_s / 5)
  finished = threading.Event()

  def beat_and_watch():
    start = last_answer = time.monotonic()
    seen = {peer: (None, start) for peer in peers}  # peer -> (its counter, when it last moved).
    count = 0
    while True:
      time.sleep(beat_s)
      now = time.monotonic()
      try:
        if not finished.is_set():
          count += 1
          client.key_value_set(f"{ALIVE_KEY}{me}", str(count), allow_overwrite=True)
        values = dict(client.key_value_dir_get(ALIVE_KEY))
      except Exception:  # The store (process 0) does not answer.
        if now - last_answer > timeout_s:
          abort.stop(lost_host_message(0, now - last_answer, timeout_s))
        continue
      last_answer = now
      for peer in peers:
        value = values.get(f"{ALIVE_KEY}{peer}")
        if value == DONE:
          continue
        if value != seen[peer][0]:
          seen[peer] = (value, now)
        elif now - seen[peer][1] > timeout_s:
          abort.stop(lost_host_message(peer, now - seen[peer][1], timeout_s))

  def done():  # At exit: the others no longer expect this process's heartbeat; it still watches them.
    abort.tell("done")
    finished.set()
    try:
      client.key_value_set(f"{ALIVE_KEY}{me}", DONE, allow_overwrite=True)
    except Exception:
      pass

  _watch["timeout_s"] = timeout_s + 2 * beat_s
  threading.Thread(target=beat_and_watch, name="maxsq-heartbeat", daemon=True).start()
  if me != 0:
    _start_sentinel()
  atexit.register(done)  # Runs before jax's own shutdown (registered at import, so later in exit order).


def _start_sentinel() -> None:
  """Starts `maxsq_jax.sentinel`, which prints the line naming process 0 if JAX's runtime ends this
  process because the coordinator is gone; it learns what to say through abort.tell."""
  import subprocess

  from jax._src import distributed as jax_distributed
  address = jax_distributed.global_state.coordinator_address
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sentinel.py")  # Standard library only.
  sentinel = subprocess.Popen([sys.executable, script, address, str(jax.process_count()),
                               str(jax.process_index())], stdin=subprocess.PIPE, text=True,
                              start_new_session=True)  # Signals to the job's process group are not its business.

  def tell(line: str) -> None:
    sentinel.stdin.write(line + "\n")
    sentinel.stdin.flush()

  abort.listen(tell)


_watch: dict = {}  # This process's watch of the others: {"timeout_s": how long it takes to tell a host is lost}.


def wait_for_lost_host() -> None:
  """After an error in a multi-process run: waits as long as the watch takes to tell whether another
  process is gone (a collective fails when a host dies); if one is, the watch ends this process with
  the line that names it, else this returns and the error stands."""
  if jax.process_count() > 1 and _watch:
    time.sleep(_watch["timeout_s"])


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               environ=None, startup_timeout_s: float = 0, heartbeat_timeout_s: float = 0) -> str:
  """Joins the job's processes; returns how ("explicit", "tpu_pod", "slurm" or "single").

  Waits at most `startup_timeout_s` (default: MAXSQ_STARTUP_TIMEOUT_S or 300) for all processes to
  join, saying every 30 s which ones it waits for; then exits with an error naming them. Afterwards a
  process silent for `heartbeat_timeout_s` (default: MAXSQ_HEARTBEAT_TIMEOUT_S or 45) is reported
  by the others, which stop (`watch_peers`).
  """
  environ = os.environ if environ is None else environ
  startup_timeout_s = startup_timeout_s or float(environ.get("MAXSQ_STARTUP_TIMEOUT_S", "300"))
  heartbeat_timeout_s = heartbeat_timeout_s or float(environ.get("MAXSQ_HEARTBEAT_TIMEOUT_S",
                                                                 str(DEFAULT_HEARTBEAT_TIMEOUT_S)))
  coordinator_address = coordinator_address or environ.get("MAXSQ_COORDINATOR_ADDRESS", "")
  num_processes = num_processes or int(environ.get("MAXSQ_NUM_PROCESSES", "0"))
  process_id = process_id if process_id >= 0 else int(environ.get("MAXSQ_PROCESS_ID", "-1"))
  if coordinator_address:
    host, colon, port = coordinator_address.rpartition(":")
    if not (colon and host and port.isdigit() and 0 < int(port) < 65536):
      raise ConfigError(f"--coordinator_address={coordinator_address}: not HOST:PORT; give process 0's host name or "
                        "address and a free port, e.g. 10.0.0.2:8476 (the same on every process)")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ConfigError(f"--coordinator_address={coordinator_address} needs --num_processes >= 1 and "
                       f"0 <= --process_id < num_processes (got {num_processes}, {process_id}).")
    # CPU devices (tests, laptops) talk to each other through gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    _join(startup_timeout_s, heartbeat_timeout_s, (coordinator_address, num_processes, process_id),
          coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    return "explicit"
  cluster = detect_cluster(environ)
  if cluster is not None:
    _join(startup_timeout_s, heartbeat_timeout_s, (f"the {cluster} coordinator", 0, -1))
    return cluster
  return "single"


def barrier(name: str, timeout_s: int = 3600) -> None:
  """Waits until every process reaches the barrier `name` (unique per call site and step).

  Uses the coordination service (Orbax's public barrier over the `jax.distributed` client), not a
  device collective. Processes that compile a program at different speeds meet here before its
  first run, so that no process waits inside a collective, where CPU (gloo) collectives give up
  after 30 s.
  """
  if jax.process_count() == 1:
    return
  from orbax.checkpoint import multihost
  multihost.sync_global_processes(name, timeout=timeout_s, barrier_sync_fn=multihost.get_barrier_sync_fn())
