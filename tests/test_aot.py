"""Ahead-of-time compilation for TPU slices (maxsq_jax.aot): slice names, the shapes the programs are
compiled for (equal to what the input pipeline yields), the compiler-figure parsing, the largest-batch
search, the errors; and (integration) real compiles of the tiny demo for single- and multi-host slices."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from maxsq_jax import aot, aot_analysis, tpu_topologies, train
from maxsq_jax.data import pipeline
from maxsq_jax.errors import ConfigError
from tests.helpers import ROOT, run_cli_in_process, tiny_config

GIB = 1024**3


@pytest.mark.parametrize("name, chips, hosts, topology", [
    ("v4-8", 4, 1, "v4:2x2x1"), ("v4-32", 16, 4, "v4:2x2x4"), ("v5p-8", 4, 1, "v5p:2x2x1"),
    ("v5e-1", 1, 1, "v5e:1x1"), ("v5e-4", 4, 1, "v5e:2x2"), ("v5litepod-8", 8, 1, "v5e:2x4"),
    ("v5e-16", 16, 4, "v5e:4x4"), ("v6e-8", 8, 1, "v6e:2x4"), ("v6e-64", 64, 16, "v6e:8x8")])
def test_accelerator_types_map_to_libtpu_topologies(name, chips, hosts, topology):
  tpu_slice = tpu_topologies.parse(name)
  assert (tpu_slice.num_chips, tpu_slice.num_hosts, tpu_slice.topology_name) == (chips, hosts, topology)


def test_cloud_names_of_accelerator_types():
  assert [tpu_topologies.parse(n).cloud_name for n in ("v5e-8", "v5litepod-16", "v4-32", "v6e-8")] == [
      "v5litepod-8", "v5litepod-16", "v4-32", "v6e-8"]


def test_multislice_multiplies_chips_and_hosts():
  tpu_slice = tpu_topologies.parse("v5e-16", num_slices=2)
  assert (tpu_slice.num_chips, tpu_slice.num_hosts) == (32, 8)


@pytest.mark.parametrize("name", ["v7x-8", "tpu", "v5e"])
def test_unknown_topology_lists_the_known_ones(name):
  with pytest.raises(ConfigError, match="unknown TPU accelerator type") as e:
    tpu_topologies.parse(name)
  assert "v4-8" in str(e.value) and "v5e-8" in str(e.value) and "v6e-8" in str(e.value)


@pytest.mark.parametrize("name, says", [("v4-6", r"v4 slices come in v4-8, v4-16, .* 2 per chip"),
                                        ("v5e-3", r"v5e slices come in v5e-1, v5e-4, v5e-8")])
def test_a_slice_size_that_does_not_exist_lists_the_sizes(name, says):
  with pytest.raises(ConfigError, match=says):
    tpu_topologies.parse(name)


def test_chip_table_names_its_sources():
  for chip in tpu_topologies.CHIPS.values():
    assert chip.source.startswith("https://cloud.google.com/tpu/docs/")
  assert tpu_topologies.CHIPS["v5e"].hbm_bytes == 16 * GIB and tpu_topologies.CHIPS["v5p"].hbm_bytes == 95 * GIB


def test_batch_specs_equal_the_pipelines_batches(tiny_data_root):
  """The shapes aot.py compiles for are those training and evaluation feed the steps."""
  config = tiny_config(tiny_data_root, stage="adapt", batch_size=2, **{"eval.batch_size": 2})
  mesh = train.create_mesh()

  def described(batch):
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in batch.items()}

  for domain in ("source", "target"):
    real = next(pipeline.train_stream(config, domain, mesh, seed=0))
    assert described(pipeline.train_batch_spec(config, domain, mesh)) == described(real)
  eval_set = pipeline.eval_data(config, mesh)
  canvas = eval_set.full_canvas()
  real = next(dataclasses.replace(eval_set, full_resolution=True).batches(mesh))
  assert described(pipeline.eval_batch_spec(config, mesh, canvas)) == described(real)
  assert aot.eval_canvas(config) == tuple(config.data.synthetic_size) == canvas


def test_eval_canvas_defaults_to_the_datasets_label_size():
  from maxsq_jax.config_base import base_config
  config = base_config()
  assert aot.eval_canvas(config) == (2048, 1024)  # Cityscapes.
  config.data.target = "folder"
  with pytest.raises(ConfigError, match="config.eval.full_size"):
    aot.eval_canvas(config)
  config.eval.full_size = (640, 480)
  assert aot.eval_canvas(config) == (640, 480)


HLO = """
  %all-reduce.1 = f32[]{:T(128)} all-reduce(%x), channel_id=2, to_apply=%add
  %all-reduce.2 = (f32[]{:T(128)}, f32[7,7,3,4]{3,2,1,0:T(4,128)S(1)}, /*index=2*/bf16[16]{0:T(128)S(1)}) all-reduce(%a, %b, %c), to_apply=%add
  %ags = (f32[4]{0}, f32[16]{0}) all-gather-start(%y), dimensions={0}
  %agd = f32[16]{0} all-gather-done(%ags)
  %max.137 = f32[]{:T(128)S(6)} maximum(%all-reduce.1, %constant.552.clone)
  %gte = f32[4]{0:T(128)S(1)} get-tuple-element(%all-reduce.2), index=1
"""


def test_collectives_counted_with_their_result_bytes():
  assert aot_analysis.collectives(HLO) == {
      "all-reduce": {"count": 2, "bytes": 4 + (4 + 7 * 7 * 3 * 4 * 4 + 16 * 2)},
      "all-gather": {"count": 1, "bytes": 4 * 4 + 16 * 4}}


def test_out_of_memory_message_is_read():
  message = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
             "Used 20.51G of 15.48G hbm. Exceeded hbm capacity by 5.03G.")
  assert aot_analysis.out_of_memory_bytes(message) == (int(20.51 * GIB), int(15.48 * GIB))
  assert aot_analysis.out_of_memory_bytes("INVALID_ARGUMENT: something else") is None


def test_roofline_is_the_slower_of_compute_and_memory():
  assert aot_analysis.roofline_s(2e12, 1e9, 1e12, 1e12) == 2.0  # Compute-bound.
  assert aot_analysis.roofline_s(1e9, 3e12, 1e12, 1e12) == 3.0  # Memory-bound.


class _Linear:
  """fits_at for the search: bytes = base + per_image * b, against `hbm_bytes`; counts the compiles."""

  def __init__(self, base, per_image, hbm_bytes, bend_at=None):
    self.base, self.per_image, self.hbm_bytes, self.bend_at = base, per_image, hbm_bytes, bend_at
    self.calls = []

  def __call__(self, b):
    self.calls.append(b)
    total = self.base + self.per_image * b + (5 * self.per_image if self.bend_at and b >= self.bend_at else 0)
    return total <= self.hbm_bytes, total


def test_largest_fitting_batch_from_two_compiles_and_two_confirmations():
  fits_at = _Linear(base=3, per_image=2, hbm_bytes=16)  # 3 + 2b <= 16: b <= 6.
  assert aot.largest_fitting(fits_at, cap=64)[:2] == (6, 7)
  assert fits_at.calls == [1, 2, 6, 7]


def test_largest_fitting_batch_steps_down_where_the_line_was_off():
  fits_at = _Linear(base=3, per_image=2, hbm_bytes=16, bend_at=5)  # A jump at 5: b <= 4 fit.
  assert aot.largest_fitting(fits_at, cap=64)[:2] == (4, 5)
  assert fits_at.calls == [1, 2, 6, 5, 4]


def test_largest_fitting_batch_at_the_cap_and_at_none():
  assert aot.largest_fitting(_Linear(1, 1, 100), cap=8)[:2] == (8, None)
  assert aot.largest_fitting(_Linear(20, 1, 16), cap=8)[:2] == (0, 1)


def test_compiler_rejection_names_config_and_topology(tiny_data_root):
  config = tiny_config(tiny_data_root)
  tpu_slice = tpu_topologies.parse("v5e-4")
  rejected = _Compiles(RuntimeError("INVALID_ARGUMENT: unsupported thing\nmore detail"))
  with pytest.raises(aot.CompileError, match=r"rejected the train step of configs/demo.py:tiny for v5e-4 .*"
                                             r"INVALID_ARGUMENT: unsupported thing$"):
    aot.compile_program(lambda c, m: (rejected, ()), config, train.create_mesh(), tpu_slice, "train",
                        "configs/demo.py:tiny")


class _Compiles:
  """A jitted step whose compile raises `error`."""

  def __init__(self, error):
    self.error = error

  def lower(self, *args):
    return self

  def compile(self):
    raise self.error


def test_a_program_that_does_not_fit_is_reported_not_raised(tiny_data_root):
  message = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 21.95G "
             "of 15.48G hbm. Exceeded hbm capacity by 6.47G.\n\nTotal hbm usage >= 22.47G:\n    program  21.95G")
  config = tiny_config(tiny_data_root)
  entry = aot.compile_program(lambda c, m: (_Compiles(RuntimeError(message)), ()), config, train.create_mesh(),
                              tpu_topologies.parse("v5e-4"), "train", "configs/demo.py:tiny")
  assert entry["fits"] is False and entry["bytes_per_chip"]["total"] == int(21.95 * GIB)
  assert entry["headroom_bytes"] == 16 * GIB - int(21.95 * GIB)
  assert entry["what_would_fit"][:2] == ["--config.model.dtype=bfloat16", "--config.model.remat=True"]
  assert entry["compiler_out_of_memory_report"][-1].strip() == "program  21.95G"
  results = {"config": "c", "slice": "s", "chip_source": "x", "train": entry}
  assert "what would fit" in aot.markdown(results) and "program  21.95G" in aot.markdown(results)


def test_the_train_step_of_each_stage(tiny_data_root):
  """A two-stage config compiles its larger stage: adaptation's two batches, AdaBN's source-only step; AdaBN
  alone has no train step."""
  mesh = train.create_mesh()
  for stage, batches in (("source_then_adapt", 2), ("source_then_adabn", 1), ("source_only", 1)):
    _, args = aot.train_program(tiny_config(tiny_data_root, stage=stage), mesh)
    assert len(args) == 1 + batches and "label" in args[1]
  with pytest.raises(ConfigError, match=r"config.stage='adabn' takes no gradient step.*--programs=eval"):
    aot.train_program(tiny_config(tiny_data_root, stage="adabn"), mesh)


def test_missing_libtpu_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "libtpu", None)  # `import libtpu` raises ImportError.
  with pytest.raises(ConfigError, match=r"pip install -e '\.\[tpu\]'"):
    aot.require_libtpu()


@pytest.mark.parametrize("args, says", [
    (["--topology=v9-8"], "unknown TPU accelerator type"),
    (["--topology=v5e-8"], r"batch_size=4: .* divisible by the number of devices \(8\) \(on v5e-8"),
    (["--topology=v5e-4", "--programs=train,test"], "--programs"),
])
def test_errors_before_any_compile(args, says, capsys, monkeypatch):
  for key in ("TPU_SKIP_MDS_QUERY", "ALLOW_MULTIPLE_LIBTPU_LOAD", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(key, raising=False)  # Restored after the test: aot sets them for its own process.
  with pytest.raises(SystemExit) as e:
    run_cli_in_process(aot, f"--config={ROOT}/configs/demo.py:tiny", *args)
  assert e.value.code == 2
  assert said(capsys, says)


def said(capsys, pattern) -> bool:
  import re
  err = capsys.readouterr().err.strip().splitlines()
  return bool(err) and err[-1].startswith("error: ") and re.search(pattern, err[-1]) is not None


def _aot(tmp_path, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  proc = subprocess.run([sys.executable, "-m", "maxsq_jax.aot", f"--config={ROOT}/configs/demo.py:tiny",
                         f"--out={tmp_path}", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(tmp_path / "aot.json") as f:
    return json.load(f), proc.stdout


KEYS = {"topology", "device_kind", "num_chips", "num_hosts", "num_devices", "global_batch", "bytes_per_chip",
        "hbm_bytes_per_chip", "fits", "flops_per_step", "bytes_accessed_per_step", "roofline_step_s",
        "estimated_step_s", "collectives", "compile_s"}


@pytest.mark.integration
def test_tiny_demo_compiles_for_a_single_host_slice(tmp_path):
  results, stdout = _aot(tmp_path, "--topology=v5e-4", "--batch_per_chip=2")
  for name in ("train", "eval"):
    entry = results[name]
    assert KEYS <= set(entry)
    assert (entry["topology"], entry["num_chips"], entry["num_hosts"], entry["num_devices"]) == ("v5e-4", 4, 1, 4)
    assert entry["device_kind"].startswith("TPU v5")
    assert entry["global_batch"] == 8 and entry["fits"] is True
    sizes = entry["bytes_per_chip"]
    assert set(sizes) == {"arguments", "temporaries", "outputs", "code", "total"}
    assert 0 < sizes["total"] <= sizes["arguments"] + sizes["outputs"] + sizes["temporaries"] + sizes["code"]
    assert entry["flops_per_step"] > 0 and entry["bytes_accessed_per_step"] > 0
    assert entry["roofline_step_s"] == pytest.approx(max(
        entry["flops_per_step"] / 4 / tpu_topologies.CHIPS["v5e"].peak_flops,
        entry["bytes_accessed_per_step"] / 4 / tpu_topologies.CHIPS["v5e"].hbm_bytes_per_s))
    assert entry["estimated_step_s"] is None or entry["estimated_step_s"] > 0
  assert results["train"]["collectives"]["all-reduce"]["bytes"] > 0  # The gradients, summed over the chips.
  alone, _ = _aot(tmp_path / "one_chip", "--topology=v5e-1", "--batch_per_chip=2", "--programs=train")
  assert alone["train"]["collectives"] == {}  # One chip: nothing to exchange.
  assert alone["train"]["flops_per_chip"] == pytest.approx(results["train"]["flops_per_chip"], rel=0.1)  # Same batch per chip.
  assert "roofline bound" in stdout and "a bound, not a speed" in stdout
  assert (tmp_path / "aot.md").read_text().startswith("# `")
  assert "all-reduce" in (tmp_path / "train.hlo.txt").read_text()  # The compiled program, for reading by hand.


@pytest.mark.integration
def test_multi_host_slice_and_the_largest_batch(tmp_path):
  results, stdout = _aot(tmp_path, "--topology=v5e-16", "--batch_per_chip=1", "--programs=train", "--max_batch",
                         "--max_batch_cap=2")
  entry = results["train"]
  assert (entry["num_chips"], entry["num_hosts"], entry["global_batch"]) == (16, 4, 16)
  search = results["max_batch"]
  assert (search["largest_fitting"], search["first_failing"]) == (2, None)  # The tiny model fits up to the cap.
  assert [c["batch_per_chip"] for c in search["compiles"]] == [1, 2]  # Batch 1 is the train entry's compile.
  assert search["compiles"][0]["compile_s"] == entry["compile_s"]
  assert all(c["fits"] for c in search["compiles"])
  assert "largest that fits: 2" in stdout

