"""Metrics to stdout, a JSON-lines file and TensorBoard event files (tensorboardX; no TensorFlow).

Only process 0 writes; other hosts get a writer that does nothing. For a gs:// workdir both are
written in a local staging directory and copied up by a background thread (storage.Uploader), so
that a slow or unanswering bucket never holds up training: metrics.jsonl (downloaded first and
continued, as objects cannot be appended to) is copied whole after each flush; the TensorBoard
writer starts a new event file at each flush, so that each event file (pictures included) is
uploaded once, then deleted from the staging directory. TensorBoard reads a run's event files in
the order of their names, which begin with their creation time.
"""

import json
import shutil
import tempfile

import jax
import numpy as np
from etils import epath

from maxsq_jax import paths, storage


class MetricWriter:
  """Writes scalars (and images) at a step to WORKDIR/metrics.jsonl and WORKDIR/tensorboard/.

  For a gs:// workdir, uploads wait at most `deadline_s` at `close` (then StorageError, the files
  kept in the staging directory it names); a stall of `stall_warn_s` is reported on stderr."""

  def __init__(self, workdir, enabled: bool | None = None, echo: bool = True, stall_warn_s: float = 30.0,
               deadline_s: float = 600.0):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.echo = echo
    if not self.enabled:
      return
    self._workdir = paths.resolve(workdir)
    self._deadline_s = deadline_s
    self._staging = self._uploader = None
    self._part = 0  # Event files started by this writer.
    local = self._workdir
    if paths.is_remote(self._workdir):
      self._staging = epath.Path(tempfile.mkdtemp(prefix="maxsq_metrics_"))
      local = self._staging
      remote_jsonl = self._workdir / "metrics.jsonl"
      if remote_jsonl.exists():
        (local / "metrics.jsonl").write_bytes(remote_jsonl.read_bytes())
      self._uploader = storage.Uploader(self._workdir, stall_warn_s, name="metrics")
    local.mkdir(parents=True, exist_ok=True)
    self._local = local
    self._jsonl = open(local / "metrics.jsonl", "a")
    self._tb_writer = None  # The open event file's writer; started by the first event after a flush.

  @property
  def _tb(self):
    if self._tb_writer is None:
      from tensorboardX import SummaryWriter
      self._part += 1
      # The suffix orders the files one writer starts within the same second.
      self._tb_writer = SummaryWriter(str(self._local / "tensorboard"), filename_suffix=f".{self._part:06d}")
    return self._tb_writer

  def _close_event_file(self) -> None:
    if self._tb_writer is not None:
      self._tb_writer.close()
      self._tb_writer = None

  def scalars(self, step: int, values: dict, prefix: str = "", echo: bool | None = None) -> None:
    if not self.enabled:
      return
    values = {f"{prefix}{k}": float(np.asarray(v)) for k, v in values.items()}
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    self._jsonl.flush()
    for key, value in values.items():
      self._tb.add_scalar(key, value, int(step))
    if self.echo if echo is None else echo:
      shown = "  ".join(f"{k}={v:.4g}" for k, v in values.items())
      print(f"[step {int(step)}] {shown}", flush=True)
    if self._staging is not None:
      self.flush()

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    """image: uint8 [H, W, 3]."""
    if self.enabled:
      self._tb.add_image(tag, image, int(step), dataformats="HWC")

  def text(self, step: int, tag: str, text: str) -> None:
    if self.enabled:
      self._tb.add_text(tag, f"<pre>{text}</pre>", int(step))

  def flush(self) -> None:
    """Writes out what is buffered; for a gs:// workdir, hands the files to the background uploads."""
    if not self.enabled:
      return
    self._jsonl.flush()
    if self._staging is None:
      if self._tb_writer is not None:
        self._tb_writer.flush()
      return
    self._close_event_file()
    self._queue_uploads()

  def _queue_uploads(self) -> None:
    self._uploader.put(self._staging / "metrics.jsonl", self._workdir / "metrics.jsonl")
    for file in sorted((self._staging / "tensorboard").glob("events.*")):  # Closed: uploaded once.
      self._uploader.put(file, self._workdir / "tensorboard" / file.name, delete_local=True)

  def close(self) -> None:
    """Closes the files; for a gs:// workdir, waits for the uploads (StorageError after deadline_s)."""
    if not self.enabled:
      return
    self._close_event_file()
    self._jsonl.close()
    if self._staging is None:
      return
    self._queue_uploads()
    left = self._uploader.close(self._deadline_s)
    if left:
      raise storage.StorageError(
          f"storage {self._workdir} did not take {len(left)} metrics file(s) within config.storage.deadline_s="
          f"{self._deadline_s:g} s; they are kept in {self._staging}: copy them to {self._workdir} "
          "(gcloud storage cp -r) when it answers")
    shutil.rmtree(self._staging, ignore_errors=True)
