"""`tensorboard --logdir gs://... --load_fast=false` (the `tensorboard` extra) reads a run's event
files from Cloud Storage (the test server) through gcsfs: the README's command, checked where the
extra is installed (`pip install -e '.[tensorboard]'`); skipped elsewhere."""

import json
import os
import shutil
import subprocess
import time
import urllib.request

import pytest

from maxsq_jax.metric_writer import MetricWriter

pytestmark = pytest.mark.integration

TENSORBOARD = shutil.which("tensorboard")


@pytest.mark.skipif(TENSORBOARD is None, reason="the tensorboard extra is not installed "
                    "(pip install -e '.[tensorboard]')")
def test_tensorboard_reads_a_gs_workdir_with_load_fast_false(gcs_bucket, tmp_path):
  from tests import gcs_server
  workdir = f"{gcs_bucket}/workdirs/tb_run"
  writer = MetricWriter(workdir, enabled=True, echo=False)
  losses = [1.5, 0.75, 0.5]
  for step, loss in enumerate(losses):
    writer.scalars(step, {"loss": loss}, prefix="train/")
  writer.close()
  port = gcs_server.free_port()
  with open(tmp_path / "tensorboard.log", "w") as log:
    server = subprocess.Popen([TENSORBOARD, f"--logdir={gcs_bucket}/workdirs", "--load_fast=false",
                               "--host=127.0.0.1", f"--port={port}"], stdout=log, stderr=subprocess.STDOUT,
                              env=dict(os.environ))
  try:
    deadline, tags = time.monotonic() + 120, None
    while time.monotonic() < deadline and not tags:  # Until the server is up and has read the files.
      time.sleep(1)
      try:
        tags = get(port, "/data/plugin/scalars/tags")
      except OSError:
        pass
    assert tags == {"tb_run/tensorboard": {"train/loss": {"displayName": "train/loss", "description": ""}}}, (
        (tmp_path / "tensorboard.log").read_text()[-3000:])
    values = get(port, "/data/plugin/scalars/scalars?run=tb_run/tensorboard&tag=train/loss")
    assert [(step, value) for _, step, value in values] == list(enumerate(losses))
  finally:
    server.terminate()
    server.wait(timeout=30)


def get(port: int, path: str):
  with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
    return json.loads(response.read())
