"""Metrics to stdout, a JSON-lines file and TensorBoard event files (tensorboardX; no TensorFlow).

Only process 0 writes; other hosts get a writer that does nothing. Cloud Storage objects cannot be
appended to, so for a gs:// workdir both files are written in a local temporary directory and
copied up whole after every flush (each `scalars` call, `flush`, `close`); an existing
metrics.jsonl in the bucket is downloaded first and continued.
"""

import json
import shutil
import tempfile

import jax
import numpy as np
from etils import epath

from maxsq_jax import paths


class MetricWriter:
  """Writes scalars (and images) at a step to WORKDIR/metrics.jsonl and WORKDIR/tensorboard/."""

  def __init__(self, workdir, enabled: bool | None = None, echo: bool = True):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.echo = echo
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter
    self._workdir = paths.resolve(workdir)
    self._staging = None
    local = self._workdir
    if paths.is_remote(self._workdir):
      self._staging = epath.Path(tempfile.mkdtemp(prefix="maxsq_metrics_"))
      local = self._staging
      remote_jsonl = self._workdir / "metrics.jsonl"
      if remote_jsonl.exists():
        (local / "metrics.jsonl").write_bytes(remote_jsonl.read_bytes())
    local.mkdir(parents=True, exist_ok=True)
    self._jsonl = open(local / "metrics.jsonl", "a")
    self._tb = SummaryWriter(str(local / "tensorboard"))

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
    """Writes out what is buffered; for a gs:// workdir, copies both files up."""
    if self.enabled:
      self._jsonl.flush()
      self._tb.flush()
      self._upload()

  def _upload(self) -> None:
    if self._staging is None:
      return
    for file in [self._staging / "metrics.jsonl", *sorted((self._staging / "tensorboard").glob("*"))]:
      (self._workdir / file.relative_to(self._staging)).write_bytes(file.read_bytes())

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
      self._upload()
      if self._staging is not None:
        shutil.rmtree(self._staging, ignore_errors=True)
