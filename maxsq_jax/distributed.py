"""Multi-controller start-up: one process per host (or per GPU), all joined by `jax.distributed`.

How a process learns its place, in order:
1. explicit flags `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or the
   environment variables MAXSQ_COORDINATOR_ADDRESS, MAXSQ_NUM_PROCESSES, MAXSQ_PROCESS_ID);
2. a Cloud TPU VM pod slice or a SLURM job with more than one task: `jax.distributed.initialize()`
   with no arguments, which reads the TPU metadata server / the SLURM variables itself;
3. otherwise a single process, and nothing is initialised.
"""

import os
import sys
import threading
import time

import jax

from maxsq_jax.errors import ConfigError


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


def _join(timeout_s: float, described: tuple[str, int, int], **kwargs) -> None:
  """jax.distributed.initialize(**kwargs), watched; `described`: (address, num_processes, process_id)."""
  joined = threading.Event()
  watcher = threading.Thread(target=_report_missing, args=(*described, timeout_s, joined), daemon=True)
  watcher.start()
  try:
    # jax's own deadline comes later, so that the watcher's error line is what the user sees.
    jax.distributed.initialize(initialization_timeout=int(timeout_s) + 60, **kwargs)
  finally:
    joined.set()


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               environ=None, startup_timeout_s: float = 0) -> str:
  """Joins the job's processes; returns how ("explicit", "tpu_pod", "slurm" or "single").

  Waits at most `startup_timeout_s` (default: MAXSQ_STARTUP_TIMEOUT_S or 300) for all processes to
  join, saying every 30 s which ones it waits for; then exits with an error naming them.
  """
  environ = os.environ if environ is None else environ
  startup_timeout_s = startup_timeout_s or float(environ.get("MAXSQ_STARTUP_TIMEOUT_S", "300"))
  coordinator_address = coordinator_address or environ.get("MAXSQ_COORDINATOR_ADDRESS", "")
  num_processes = num_processes or int(environ.get("MAXSQ_NUM_PROCESSES", "0"))
  process_id = process_id if process_id >= 0 else int(environ.get("MAXSQ_PROCESS_ID", "-1"))
  if coordinator_address:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ConfigError(f"--coordinator_address={coordinator_address} needs --num_processes >= 1 and "
                       f"0 <= --process_id < num_processes (got {num_processes}, {process_id}).")
    # CPU devices (tests, laptops) talk to each other through gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    _join(startup_timeout_s, (coordinator_address, num_processes, process_id),
          coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    return "explicit"
  cluster = detect_cluster(environ)
  if cluster is not None:
    _join(startup_timeout_s, (f"the {cluster} coordinator", 0, -1))
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
