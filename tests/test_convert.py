"""Conversion of the reference's PyTorch weights (three layouts) and output equality with PyTorch."""

import functools
import json
import os
import shutil
import subprocess
import sys
import zlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from maxsq_jax.models import DeepLabV2, load_converted_variables, merge_into
from maxsq_jax.models.convert import (
  TOP_LEVEL,
  ConversionError,
  expected_shapes,
  torch_key,
  torch_state_dict_to_variables,
)
from maxsq_jax.tools import convert_torch
from tests.helpers import import_torch, run_cli_in_process

torch, requires_torch = import_torch()
if torch is not None:  # The reference model in PyTorch, for the comparisons.
  from tests.torch_deeplab import DeeplabMulti, randomize_

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL = (3, 4, 23, 3)
NC = 5
WIDTH = 4


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@functools.lru_cache(maxsize=None)
def jitted_apply(num_classes, blocks, width):
  model = DeepLabV2(num_classes, blocks=blocks, width=width)
  return jax.jit(lambda v, x: model.apply(v, x, train=False))


def run_jax(variables, x_nchw, num_classes=NC, blocks=FULL, width=WIDTH):
  main, aux = jitted_apply(num_classes, blocks, width)(variables, jnp.asarray(
      x_nchw.transpose(0, 2, 3, 1)))
  return np.asarray(main).transpose(0, 3, 1, 2), np.asarray(aux).transpose(0, 3, 1, 2)


def fresh_init_like(num_classes, blocks, width, seed=0):
  """Stand-in for `model.init` (same structure/shapes, random values; init is slow on XLA:CPU)."""
  shapes = jax.eval_shape(DeepLabV2(num_classes, blocks=blocks, width=width).init,
                          jax.random.key(0), jax.ShapeDtypeStruct((1, 17, 17, 3), jnp.float32))
  rng = np.random.RandomState(seed)
  flat = {p: jnp.asarray(rng.randn(*s.shape) * 0.01, s.dtype) for p, s in flatten_dict(shapes).items()}
  return flax.traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module")
def full_depth():
  """A randomised full-depth (ResNet-101) width-4 torch model, an odd-sized input and its outputs."""
  tm = randomize_(DeeplabMulti(NC, blocks=FULL, width=WIDTH), seed=0).eval()
  x = (np.random.RandomState(0).randn(3, 3, 37, 45) * 50).astype(np.float32)
  with torch.no_grad():
    main, aux = tm(torch.from_numpy(x))
  return tm, x, main.numpy(), aux.numpy()


def check_outputs(variables, full_depth):
  _, x, t_main, t_aux = full_depth
  main, aux = run_jax(variables, x)
  assert main.shape == t_main.shape == (3, NC, 37, 45)
  assert rel_err(main, t_main) < 1e-4
  assert rel_err(aux, t_aux) < 1e-4


# ----------------------------------------------------------------------------------------------
# The three layouts.


@requires_torch
def test_checkpoint_layout_via_file_and_cli(full_depth, tmp_path, capsys):
  tm = full_depth[0]
  # The reference's layout, with the numpy scalar its training loop stores as best_MIou.
  ckpt = {"epoch": 3, "iteration": 100, "best_MIou": np.float64(0.4), "optimizer": {"state": {}},
          "state_dict": {"module." + k: v for k, v in tm.state_dict().items()}}
  pth = tmp_path / "gta5final.pth"
  torch.save(ckpt, pth)
  out = tmp_path / "converted"
  run_cli_in_process(convert_torch, pth, out, "--num_classes", NC)
  printed = capsys.readouterr().out
  assert "layout: checkpoint" in printed and "missing (fresh init when training starts): 0" in printed
  report = json.loads((out / "conversion_report.json").read_text())
  assert report["num_classes"] == NC and report["blocks"] == list(FULL) and report["width"] == WIDTH
  assert report["missing"] == []
  assert len(report["used"]) == len([k for k in tm.state_dict() if "num_batches" not in k])
  assert all("num_batches_tracked" in k for k in report["skipped"])
  variables = load_converted_variables(str(out))
  check_outputs(variables, full_depth)
  # With a fresh init given, the result is the complete tree (here nothing to fill).
  init = fresh_init_like(NC, FULL, WIDTH)
  merged = load_converted_variables(str(out), init_variables=init)
  assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(init)
  check_outputs(merged, full_depth)

  # A non-empty output dir is refused, --overwrite replaces it.
  with pytest.raises(SystemExit) as exit_info:
    run_cli_in_process(convert_torch, pth, out, "--num_classes", NC)
  assert exit_info.value.code == 2 and "not empty; pass --overwrite" in capsys.readouterr().err
  run_cli_in_process(convert_torch, pth, out, "--num_classes", NC, "--overwrite")
  check_outputs(load_converted_variables(str(out)), full_depth)


@requires_torch
def test_bare_layout_numpy_arrays(full_depth):
  sd = {k: v.numpy() for k, v in full_depth[0].state_dict().items()}
  variables, report = torch_state_dict_to_variables(sd, NC, return_report=True)
  assert report["layout"] == "bare" and report["prefix"] == ""
  check_outputs(variables, full_depth)
  # blocks given explicitly must agree with the keys.
  torch_state_dict_to_variables(sd, NC, blocks=FULL)
  with pytest.raises(ConversionError, match=r"blocks \(3, 4, 6, 3\) requested"):
    torch_state_dict_to_variables(sd, NC, blocks=(3, 4, 6, 3))


@requires_torch
def test_scale_init_layout_skips_pascal_head(full_depth, tmp_path):
  """The DeepLab-v2 init: `Scale.` keys, a 21-class PASCAL layer5 on layer4, no layer6."""
  tm, x, _, _ = full_depth
  sd = {"Scale." + k: v for k, v in tm.state_dict().items() if not k.startswith(("layer5", "layer6"))}
  g = torch.Generator().manual_seed(0)
  for i in range(4):
    sd[f"Scale.layer5.conv2d_list.{i}.weight"] = torch.randn(21, 32 * WIDTH, 3, 3, generator=g)
    sd[f"Scale.layer5.conv2d_list.{i}.bias"] = torch.randn(21, generator=g)
  pth = tmp_path / "DeepLab_resnet_pretrained_init-f81d91e8.pth"
  torch.save(sd, pth)
  loaded = torch.load(pth, map_location="cpu", weights_only=False)
  converted, report = torch_state_dict_to_variables(loaded, NC, return_report=True)
  assert report["layout"] == "scale_init" and report["prefix"] == "Scale."
  head_skips = {k: v for k, v in report["skipped"].items() if "layer5" in k}
  assert len(head_skips) == 8 and all("PASCAL" in v for v in head_skips.values())
  assert set(report["missing"]) == {f"params/{h}/conv2d_list_{i}/{p}" for h in ("layer5", "layer6")
                                    for i in range(4) for p in ("kernel", "bias")}
  assert "layer5" not in converted["params"] and "layer6" not in converted["params"]

  # Heads come from a fresh init; the backbone from the file.
  init = fresh_init_like(NC, FULL, WIDTH)
  merged, filled = merge_into(init, converted, return_filled=True)
  assert sorted(filled) == sorted(report["missing"])
  np.testing.assert_array_equal(merged["params"]["layer6"]["conv2d_list_1"]["kernel"],
                                init["params"]["layer6"]["conv2d_list_1"]["kernel"])
  np.testing.assert_array_equal(merged["params"]["conv1"]["kernel"],
                                converted["params"]["conv1"]["kernel"])
  # Put the same (fresh) heads into torch and compare the whole model.
  with torch.no_grad():
    for h in ("layer5", "layer6"):
      for i in range(4):
        p = merged["params"][h][f"conv2d_list_{i}"]
        conv = getattr(tm, h).conv2d_list[i]
        conv.weight.copy_(torch.from_numpy(np.asarray(p["kernel"]).transpose(3, 2, 0, 1).copy()))
        conv.bias.copy_(torch.from_numpy(np.array(p["bias"])))
    t_main, t_aux = tm(torch.from_numpy(x))
  check_outputs(merged, (tm, x, t_main.numpy(), t_aux.numpy()))

  # A 21-class model (e.g. PASCAL) still skips the init's layer5, as the reference loader does.
  _, report21 = torch_state_dict_to_variables(loaded, 21, return_report=True)
  assert len([k for k in report21["skipped"] if "layer5" in k]) == 8


@requires_torch
def test_head_with_other_class_count_is_skipped(full_depth):
  sd = {"module." + k: v for k, v in full_depth[0].state_dict().items()}
  converted, report = torch_state_dict_to_variables({"state_dict": sd}, 19, return_report=True)
  assert {k for k in report["skipped"] if "conv2d_list" in k} == {
      f"module.{h}.conv2d_list.{i}.{p}" for h in ("layer5", "layer6") for i in range(4)
      for p in ("weight", "bias")}
  assert all("classes" in report["skipped"][f"module.layer6.conv2d_list.0.{p}"]
             for p in ("weight", "bias"))
  assert len(report["missing"]) == 16
  # The outer checkpoint dict and its state_dict convert identically.
  again = torch_state_dict_to_variables(sd, 19)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, converted, again))


@requires_torch
def test_default_width_full_depth_matches_torch(tmp_path):
  """The real ResNet-101 (width 64), one small odd-sized image, via a saved checkpoint file."""
  tm = randomize_(DeeplabMulti(NC), seed=7).eval()
  x = (np.random.RandomState(1).randn(1, 3, 33, 41) * 50).astype(np.float32)
  with torch.no_grad():
    t_main, t_aux = tm(torch.from_numpy(x))
  pth = tmp_path / "ckpt.pth"
  torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in tm.state_dict().items()}}, pth)
  del tm
  converted, report = torch_state_dict_to_variables(
      torch.load(pth, map_location="cpu", weights_only=False), NC, return_report=True)
  assert report["width"] == 64 and report["blocks"] == list(FULL) and report["missing"] == []
  shapes = {k: v.shape for k, v in flatten_dict(converted).items()}
  assert shapes == expected_shapes(NC, FULL, 64)
  main, aux = run_jax(converted, x, width=64)
  assert rel_err(main, t_main.numpy()) < 1e-4
  assert rel_err(aux, t_aux.numpy()) < 1e-4


# ----------------------------------------------------------------------------------------------
# Errors.


@pytest.fixture(scope="module")
def small_sd():
  """A bare state dict of a (1, 2, 1, 1)-block width-4 model: PyTorch's keys and layouts (OIHW), NumPy
  values, random; built without PyTorch."""
  running = {"mean": "running_mean", "var": "running_var"}
  sd = {}
  flat = flatten_dict(fresh_init_like(3, (1, 2, 1, 1), 4, seed=1))
  for (collection, *path), value in sorted(flat.items(), key=lambda item: item[0][0] != "params"):
    value = np.array(value)
    if collection == "batch_stats":
      key = torch_key(tuple(path[:-1]) + ("scale",)).removesuffix("weight") + running[path[-1]]
    else:
      key = torch_key(tuple(path))
    sd[key] = value.transpose(3, 2, 0, 1) if path[-1] == "kernel" else value
  return dict(sorted(sd.items(), key=lambda item: TOP_LEVEL.index(item[0].split(".")[0])))  # PyTorch's order.


def test_shape_mismatch_names_the_key(small_sd):
  sd = dict(small_sd)
  sd["layer2.1.conv2.weight"] = np.zeros((8, 8, 1, 3), np.float32)
  with pytest.raises(ConversionError, match=r"shape mismatch for key 'layer2\.1\.conv2\.weight'"):
    torch_state_dict_to_variables(sd, 3)
  sd = dict(small_sd)
  sd["layer3.0.bn1.running_var"] = np.ones((17,), np.float32)
  with pytest.raises(ConversionError, match=r"'layer3\.0\.bn1\.running_var'.*\(17,\).*\(16,\)"):
    torch_state_dict_to_variables(sd, 3)
  # A head with the right class count but the wrong input channels is an error, not a skip.
  sd = {"module." + k: v for k, v in small_sd.items()}
  sd["module.layer6.conv2d_list.2.weight"] = np.zeros((3, 64, 3, 3), np.float32)
  with pytest.raises(ConversionError, match=r"'module\.layer6\.conv2d_list\.2\.weight'"):
    torch_state_dict_to_variables(sd, 3)


@pytest.mark.parametrize("key", ["layer1.0.conv4.weight", "layer2.0.downsample.2.weight",
                                 "layer6.conv2d_list.4.weight", "fc.weight", "layer1.0.bn1.foo",
                                 "layer1.0.conv1.bias"])
def test_unknown_key_names_the_key(small_sd, key):
  sd = dict(small_sd)
  sd[key] = np.zeros((3,), np.float32)
  with pytest.raises(ConversionError, match=f"unknown key '{key}'"):
    torch_state_dict_to_variables(sd, 3)


def test_other_conversion_errors(small_sd, tmp_path):
  sd = {"Scale." + k: v for k, v in small_sd.items()}
  sd["other.conv1.weight"] = small_sd["conv1.weight"]
  with pytest.raises(ConversionError, match="cannot recognise the state-dict layout"):
    torch_state_dict_to_variables(sd, 3)
  sd = {k: v for k, v in small_sd.items() if k != "layer2.1.bn3.running_mean"}
  with pytest.raises(ConversionError, match="backbone variables are missing"):
    torch_state_dict_to_variables(sd, 3)
  _, report = torch_state_dict_to_variables(sd, 3, strict=False, return_report=True)
  assert report["missing"] == ["batch_stats/layer2/block_1/bn3/mean"]
  sd = {k: v for k, v in small_sd.items() if not k.startswith("layer2.1.")}
  sd.update({k.replace("layer2.1.", "layer2.2."): v for k, v in small_sd.items()
             if k.startswith("layer2.1.")})
  with pytest.raises(ConversionError, match="not contiguous"):
    torch_state_dict_to_variables(sd, 3)
  with pytest.raises(ConversionError, match="mapping"):
    torch_state_dict_to_variables([1, 2], 3)

  # merge_into: shape mismatch and variables the model lacks.
  converted = torch_state_dict_to_variables(small_sd, 3)
  init = fresh_init_like(3, (1, 2, 1, 1), 8)
  with pytest.raises(ConversionError, match="shape mismatch for params/conv1/kernel"):
    merge_into(init, converted)
  init = fresh_init_like(3, (1, 1, 1, 1), 4)
  with pytest.raises(ConversionError, match="layer2/block_1.* does not exist in the model"):
    merge_into(init, converted)

  # load_converted_variables on something else names the path.
  (tmp_path / "notconverted").mkdir()
  with pytest.raises(FileNotFoundError, match="notconverted is not a converted-weights directory"):
    load_converted_variables(str(tmp_path / "notconverted"))


def cli_error(capsys, argv) -> tuple[int, str]:
  """(exit code, stderr) of the command line `convert_torch ARGV`, which must fail."""
  with pytest.raises(SystemExit) as exit_info:
    run_cli_in_process(convert_torch, *argv)
  return exit_info.value.code, capsys.readouterr().err


@requires_torch
def test_cli_errors(tmp_path, monkeypatch, small_sd, capsys):
  pth = tmp_path / "w.pth"
  torch.save({k: torch.from_numpy(v) for k, v in small_sd.items()}, pth)
  code, err = cli_error(capsys, [str(tmp_path / "missing.pth"), str(tmp_path / "o1")])
  assert code == 1 and err.startswith("error: no such file") and err.count("\n") == 1
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  (elsewhere / "keep.txt").write_text("keep")
  (tmp_path / "o0").mkdir()
  (tmp_path / "o0" / "variables").symlink_to(elsewhere)
  code, err = cli_error(capsys, [str(pth), str(tmp_path / "o0"), "--num_classes", "3", "--overwrite"])
  assert code == 2 and err == (f"error: {tmp_path}/o0/variables is a symbolic link or a file, not a folder the "
                               "converter wrote: --overwrite replaces only such a folder and never deletes through a "
                               "link; move it away, or choose another OUTPUT_DIR\n")
  assert os.listdir(elsewhere) == ["keep.txt"]
  monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
  code, err = cli_error(capsys, [str(pth), str(tmp_path / "o2")])
  assert code == 1 and "pip install torch==2.13.0" in err


class _RunsACommand:
  """Unpickling this runs `touch MARKER`: what a crafted .pth could do with a full unpickler."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


@requires_torch
def test_hostile_pth_runs_no_code_and_writes_nothing(tmp_path, small_sd, capsys):
  marker = tmp_path / "pwned"
  pth = tmp_path / "hostile.pth"
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in small_sd.items()}, "x": _RunsACommand(marker)}, pth)
  out = tmp_path / "out"
  code, err = cli_error(capsys, [str(pth), str(out), "--num_classes", "3"])
  assert code == 1 and err.count("\n") == 1
  assert err.startswith(f"error: {pth} is not a PyTorch weights file that can be loaded safely")
  assert not marker.exists() and not out.exists()
  torch.load(pth, weights_only=False)  # The file is really hostile: a full unpickler runs its command.
  assert marker.exists()


@requires_torch
def test_text_file_as_pth_names_the_file(tmp_path, capsys):
  pth = tmp_path / "notes.pth"
  pth.write_text("these are not weights\n")
  code, err = cli_error(capsys, [str(pth), str(tmp_path / "out")])
  assert code == 1 and err.startswith(f"error: {pth} is not a PyTorch weights file") and err.count("\n") == 1
  assert "UnpicklingError" not in err and not (tmp_path / "out").exists()


@requires_torch
@pytest.mark.integration
def test_cli_subprocess(tmp_path, small_sd):
  """`python -m maxsq_jax.tools.convert_torch` end to end in a fresh interpreter."""
  pth = tmp_path / "w.pth"
  torch.save({"state_dict": {"module." + k: torch.from_numpy(v) for k, v in small_sd.items()}}, pth)
  out = tmp_path / "out"
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  r = subprocess.run([sys.executable, "-m", "maxsq_jax.tools.convert_torch", str(pth), str(out),
                      "--num_classes", "3"], capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "wrote" in r.stdout
  converted = load_converted_variables(str(out))
  direct = torch_state_dict_to_variables(small_sd, 3)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, converted, direct))
  r = subprocess.run([sys.executable, "-m", "maxsq_jax.tools.convert_torch", str(pth), str(out)],
                     capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode != 0 and "not empty" in r.stderr


# ----------------------------------------------------------------------------------------------
# Converted weights are finite and verified when read.


def test_nan_weights_are_refused_at_conversion(small_sd, tmp_path, capsys):
  sd = {k: v.copy() for k, v in small_sd.items()}
  sd["layer1.0.conv2.weight"][0, 0, 0, :2] = np.nan
  sd["bn1.running_var"][1] = np.inf
  message = ("2 tensor(s) hold NaN or infinite values: bn1.running_var (1 of 4 values), layer1.0.conv2.weight (2 of "
             "144 values). The weights are damaged or come from a run that diverged: convert another file")
  with pytest.raises(ConversionError) as e:
    torch_state_dict_to_variables(sd, 3)
  assert str(e.value) == message
  if torch is not None:  # The command line: one line, nothing written.
    pth = tmp_path / "nan.pth"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, pth)
    code, err = cli_error(capsys, [str(pth), str(tmp_path / "out"), "--num_classes", "3"])
    assert code == 1 and err == f"error: {pth}: {message}\n" and not (tmp_path / "out").exists()


def flip_bytes(folder, count=400):
  """Inverts `count` bytes in the middle of the largest array-data file under `folder` (the arrays still read)."""
  data_files = [p for p in folder.rglob("*") if p.is_file() and "/d/" in str(p)]
  largest = max(data_files, key=lambda p: p.stat().st_size)
  data = bytearray(largest.read_bytes())
  middle = len(data) // 2
  data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
  largest.write_bytes(bytes(data))
  return largest


def test_converted_weights_carry_checksums_and_are_verified_when_read(small_sd, tmp_path):
  from maxsq_jax import checkpointing
  from maxsq_jax.errors import WeightsError
  from maxsq_jax.models import convert
  variables, report = torch_state_dict_to_variables(small_sd, 3, return_report=True)
  good = tmp_path / "good"
  convert.save_converted_variables(str(good), variables, report)
  saved = json.loads((good / "conversion_report.json").read_text())["checksums"]
  kernel = variables["params"]["conv1"]["kernel"]
  assert saved["params/conv1/kernel"] == zlib.crc32(np.ascontiguousarray(kernel).tobytes())
  assert len(saved) == len(flatten_dict(variables))

  damaged = tmp_path / "damaged"
  shutil.copytree(good, damaged)
  flip_bytes(damaged / "variables")
  import orbax.checkpoint as ocp
  raw = flatten_dict(ocp.StandardCheckpointer().restore(damaged / "variables"), sep="/")  # Read unchecked.
  changed = [name for name, value in flatten_dict(variables, sep="/").items() if not np.array_equal(raw[name], value)]
  assert len(changed) == 1
  with pytest.raises(ConversionError) as e:
    load_converted_variables(str(damaged))
  message = (f"{damaged}/variables: 1 array(s) do not match the checksums in conversion_report.json: {changed[0]}; "
             f"the folder is damaged: convert the .pth again (python -m maxsq_jax.tools.convert_torch INPUT.pth "
             f"{damaged} --overwrite)")
  assert str(e.value) == message
  like = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  with pytest.raises(WeightsError) as e:
    checkpointing.load_weights(str(damaged), like, what="config.init_from")
  assert str(e.value) == f"config.init_from={damaged}: {message}"

  truncated = tmp_path / "truncated"
  shutil.copytree(good, truncated)
  largest = flip_bytes(truncated / "variables", count=0)
  largest.write_bytes(largest.read_bytes()[:largest.stat().st_size // 2])
  with pytest.raises(ConversionError) as e:
    load_converted_variables(str(truncated))
  assert str(e.value).startswith(f"{truncated}/variables cannot be read (ValueError: OUT_OF_RANGE: ")
  assert str(e.value).endswith(f"the folder is damaged; convert the .pth again (python -m "
                               f"maxsq_jax.tools.convert_torch INPUT.pth {truncated} --overwrite)")

  # A folder converted before reports carried checksums: read, with a warning.
  older = tmp_path / "older"
  shutil.copytree(good, older)
  (older / "conversion_report.json").write_text(json.dumps(report))
  warnings = []
  loaded = load_converted_variables(str(older), warn=warnings.append)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, loaded, variables))
  assert warnings == [f"warning: {older} was converted before converted weights carried checksums: its arrays are "
                      f"not verified; convert the .pth again (python -m maxsq_jax.tools.convert_torch INPUT.pth "
                      f"{older} --overwrite) to add them."]


@pytest.mark.integration
def test_a_damaged_converted_init_from_is_one_error_line(tiny_data_root, tmp_path):
  from maxsq_jax.models import convert
  variables = jax.tree_util.tree_map(np.asarray, fresh_init_like(19, (1, 1, 1, 1), 4))  # The tiny demo's model.
  weights = tmp_path / "weights"
  convert.save_converted_variables(str(weights), dict(variables), {"layout": "bare", "missing": []})
  largest = flip_bytes(weights / "variables", count=0)
  largest.write_bytes(largest.read_bytes()[:largest.stat().st_size // 2])
  proc = subprocess.run([sys.executable, "-m", "maxsq_jax.main", "--config=configs/demo.py:tiny",
                         f"--config.data.source_dir={tiny_data_root}/synthetic_source",
                         f"--config.data.target_dir={tiny_data_root}/synthetic_target",
                         f"--config.init_from={weights}", f"--workdir={tmp_path / 'run'}"],
                        capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  error = proc.stderr.splitlines()[-1]
  assert error.startswith(f"error: config.init_from={weights}: {weights}/variables cannot be read (ValueError: "
                          "OUT_OF_RANGE: ")
  assert error.endswith(f"convert the .pth again (python -m maxsq_jax.tools.convert_torch INPUT.pth {weights} "
                        "--overwrite)")
