"""maxsq_jax/sentinel.py: after its parent ends without saying `done`, it prints the line naming the
coordinator only if the coordinator no longer accepts connections, and appends it to the host log."""

import io
import socket

from maxsq_jax import sentinel


def run_sentinel(monkeypatch, capsys, address, lines):
  monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
  sentinel.main([address, "4", "2"])
  return capsys.readouterr().err


def closed_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]  # Nothing listens there once the socket is closed.


def test_a_gone_coordinator_is_named_with_the_last_committed_checkpoint(monkeypatch, capsys, tmp_path):
  address = f"127.0.0.1:{closed_port()}"
  log = tmp_path / "host_2.log"
  log.write_text("[step 1] loss=2\n")
  err = run_sentinel(monkeypatch, capsys, address, ["committed step 1 in /w/checkpoints",
                                                    "committed step 2 in /w/checkpoints", f"log {log}"])
  expected = (f"error: process 0 of 4 (the coordinator, {address}) stopped answering; process 2 was ended by JAX's "
              "runtime (the fatal log above). The last checkpoint known to be committed is step 2 in /w/checkpoints; "
              "rerun the same command on every host to resume.\n")
  assert err == expected
  assert log.read_text() == "[step 1] loss=2\n" + expected


def test_nothing_is_said_after_done_or_while_the_coordinator_answers(monkeypatch, capsys):
  assert run_sentinel(monkeypatch, capsys, f"127.0.0.1:{closed_port()}", ["committed step 1 in /w", "done"]) == ""
  with socket.socket() as listener:  # The parent was killed itself; the coordinator is alive.
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    assert run_sentinel(monkeypatch, capsys, address, ["committed step 1 in /w"]) == ""
