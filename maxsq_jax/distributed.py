"""Multi-controller start-up: one process per host (or per GPU), all joined by `jax.distributed`.

How a process learns its place, in order:
1. explicit flags `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or the
   environment variables MAXSQ_COORDINATOR_ADDRESS, MAXSQ_NUM_PROCESSES, MAXSQ_PROCESS_ID);
2. a Cloud TPU VM pod slice or a SLURM job with more than one task: `jax.distributed.initialize()`
   with no arguments, which reads the TPU metadata server / the SLURM variables itself;
3. otherwise a single process, and nothing is initialised.
"""

import os

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


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               environ=None) -> str:
  """Joins the job's processes; returns how ("explicit", "tpu_pod", "slurm" or "single")."""
  environ = os.environ if environ is None else environ
  coordinator_address = coordinator_address or environ.get("MAXSQ_COORDINATOR_ADDRESS", "")
  num_processes = num_processes or int(environ.get("MAXSQ_NUM_PROCESSES", "0"))
  process_id = process_id if process_id >= 0 else int(environ.get("MAXSQ_PROCESS_ID", "-1"))
  if coordinator_address:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ConfigError(f"--coordinator_address={coordinator_address} needs --num_processes >= 1 and "
                       f"0 <= --process_id < num_processes (got {num_processes}, {process_id}).")
    # CPU devices (tests, laptops) talk to each other through gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return "explicit"
  cluster = detect_cluster(environ)
  if cluster is not None:
    jax.distributed.initialize()
    return cluster
  return "single"


def barrier(name: str, timeout_s: int = 3600) -> None:
  """Waits until every process reaches the barrier `name` (unique per call site and step).

  Uses the coordination service, not a device collective. Processes that compile a program at
  different speeds meet here before its first run, so that no process waits inside a collective,
  where CPU (gloo) collectives give up after 30 s.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # The public API has no named barrier.
  jax_distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)
