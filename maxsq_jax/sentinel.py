"""The line for a lost coordinator: `python -m maxsq_jax.sentinel ADDRESS N I`, started by
distributed.watch_peers on every process but process 0, with a pipe from that process as its stdin.

When process 0, which hosts JAX's coordination service, stops, JAX's runtime ends the other processes
at once with its own fatal log, before they can say anything. This small process outlives its parent:
when the pipe closes without a `done` line (the parent was ended) and the coordinator at ADDRESS no
longer accepts connections, it prints the error line that names process 0 (on the stderr it shares
with its parent), appends it to the host log and uploads that. The parent sends (abort.tell)
`committed TEXT` (the last checkpoint known to be committed), `log LOCAL [REMOTE]` (its host log) and
`done` when it ends by itself (normally, or with its own error line).
"""

import socket
import sys

CONNECT_TIMEOUT_S = 5.0


def coordinator_answers(address: str) -> bool:
  host, _, port = address.rpartition(":")
  try:
    socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    return True
  except OSError:
    return False


def main(argv) -> None:
  address, num_processes, process_id = argv[:3]
  committed, log, remote_log = "none yet", "", ""
  for line in sys.stdin:
    command, _, text = line.rstrip("\n").partition(" ")
    if command == "done":
      return
    if command == "committed":
      committed = text
    elif command == "log":
      log, _, remote_log = text.partition(" ")
  if coordinator_answers(address):
    return  # The parent ended for another reason (it was killed itself): nothing to add.
  message = (f"error: process 0 of {num_processes} (the coordinator, {address}) stopped answering; process "
             f"{process_id} was ended by JAX's runtime (the fatal log above). The last checkpoint known to be "
             f"committed is {committed}; rerun the same command on every host to resume.")
  print(message, file=sys.stderr, flush=True)
  if log:
    with open(log, "a") as f:
      f.write(message + "\n")
    if remote_log:
      from etils import epath
      try:
        epath.Path(remote_log).write_bytes(open(log, "rb").read())
      except Exception:  # Best effort: the line is on the console anyway.
        pass


if __name__ == "__main__":
  main(sys.argv[1:])
