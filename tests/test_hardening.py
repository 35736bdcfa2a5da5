"""A workdir belongs to one run; restarts with another config; damaged checkpoints; exits that wait for
saves; a bounded multi-process start-up. Subprocess tests (integration tier)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import ROOT, load_npz, run_tiny, tiny_command, tiny_env, weights_of

pytestmark = pytest.mark.integration


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def main_command(workdir, *extra) -> list[str]:
  return [sys.executable, "-m", "maxsq_jax.main", "--config=configs/demo.py:tiny", f"--workdir={workdir}", *extra]


def test_multiprocess_startup_wait_is_bounded_and_names_the_missing_process(tmp_path):
  port = free_port()
  workdir = tmp_path / "w"
  proc = subprocess.run(main_command(workdir, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                     "--process_id=0", "--startup_timeout_s=4"),
                        capture_output=True, text=True, cwd=ROOT, env=tiny_env(1), timeout=120)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1, proc.stderr
  assert f"waiting for process ids [1] to join the coordinator at 127.0.0.1:{port}" in proc.stderr
  assert lines[-1].startswith(f"error: process 0 of 2: not every process joined the coordinator at 127.0.0.1:{port} "
                              "within 4 s; still waiting for process ids [1].")
  assert not workdir.exists()
