"""Metrics to stdout, a JSON-lines file and TensorBoard event files (tensorboardX; no TensorFlow).

Only process 0 writes; other hosts get a writer that does nothing.
"""

import json
import os

import jax
import numpy as np


class MetricWriter:
  """Writes scalars (and images) at a step to WORKDIR/metrics.jsonl and WORKDIR/tensorboard/."""

  def __init__(self, workdir: str, enabled: bool | None = None, echo: bool = True):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.echo = echo
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

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

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    """image: uint8 [H, W, 3]."""
    if self.enabled:
      self._tb.add_image(tag, image, int(step), dataformats="HWC")

  def text(self, step: int, tag: str, text: str) -> None:
    if self.enabled:
      self._tb.add_text(tag, f"<pre>{text}</pre>", int(step))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
