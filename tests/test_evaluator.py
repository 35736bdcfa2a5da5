"""Evaluation protocols with a model whose output is known (reference / full resolution, with and
without flip, checked against NumPy + PyTorch's F.interpolate), the 16 -> 13 report, the results
files and pictures, and `python -m maxsq_jax.evaluate` on converted weights and on a trained run."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from maxsq_jax import evaluator as evaluator_lib, jsonfile, metrics, run_config, train
from maxsq_jax.config_base import base_config
from maxsq_jax.data import classes, pipeline, transforms
from maxsq_jax.errors import CheckpointError
from tests.helpers import ROOT, before_eval_section, import_torch, tiny_config

torch, requires_torch = import_torch()


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def torch_upsample(probs_hwc, size_hw):
  """PyTorch's F.interpolate(bilinear, align_corners=True), HWC in and out."""
  t = torch.from_numpy(np.ascontiguousarray(probs_hwc.transpose(2, 0, 1)))[None]
  return torch.nn.functional.interpolate(t, size=size_hw, mode="bilinear", align_corners=True)[0].numpy().transpose(1, 2, 0)


class KnownModel:
  """logits = image @ A + B[column]: known, and not mirror-symmetric (so flip changes results)."""

  def __init__(self, num_classes, width, seed=0):
    rng = np.random.default_rng(seed)
    self.a = (rng.normal(size=(3, num_classes)) * 0.05).astype(np.float32)
    self.b = rng.normal(size=(width, num_classes)).astype(np.float32)

  def logits(self, image):
    return image @ self.a + self.b[None]

  def apply(self, variables, images, train=False):
    logits = jnp.asarray(images) @ self.a + self.b[None, None]
    return logits, logits


def make_examples(num_classes, sizes, seed=0):
  """Examples at their 'original' sizes, labels with blobs (so resizing matters) and ignored pixels."""
  rng = np.random.default_rng(seed)
  out = []
  for i, (w, h) in enumerate(sizes):
    coarse = rng.integers(0, num_classes, (h // 4 + 1, w // 4 + 1))
    label = np.kron(coarse, np.ones((4, 4), np.int64))[:h, :w]
    label = np.where(rng.uniform(size=(h, w)) < 0.1, -1, label).astype(np.int32)
    image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    out.append({"image": image, "label": label, "index": np.int32(i)})
  return out


def expected_confusions(model, examples, eval_size, num_classes):
  """Every protocol's confusion computed independently: numpy softmax, PyTorch upsampling."""
  conf = {name: np.zeros((num_classes, num_classes), np.int64) for name in evaluator_lib.PROTOCOL_NAMES}
  for ex in examples:
    small = transforms.finalize(transforms.resize(ex, eval_size), "bgr_mean")
    probs = softmax(model.logits(small["image"]))
    mirrored = softmax(model.logits(small["image"][:, ::-1]))[:, ::-1]
    for name, p in (("reference", probs), ("reference_flip", 0.5 * (probs + mirrored))):
      conf[name] += metrics.confusion_matrix_np(p.argmax(-1), small["label"], num_classes)
      full = torch_upsample(p.astype(np.float32), ex["label"].shape)
      conf[name.replace("reference", "full")] += metrics.confusion_matrix_np(full.argmax(-1), ex["label"], num_classes)
  return conf


def make_config(num_classes=19, protocols=evaluator_lib.PROTOCOL_NAMES, **fields):
  c = base_config()
  c.model.num_classes = num_classes
  c.eval.protocols = tuple(protocols)
  c.eval.num_vis_images = 2
  for k, v in fields.items():
    c[k] = v
  return c


class RecordingWriter:
  def __init__(self):
    self.scalar_calls, self.images, self.texts = [], {}, {}
    self.flushes = 0

  def scalars(self, step, values, prefix="", echo=None):
    self.scalar_calls.append({prefix + k: v for k, v in values.items()})

  def image(self, step, tag, image):
    self.images[tag] = image

  def text(self, step, tag, text):
    self.texts[tag] = text

  def flush(self):
    self.flushes += 1


@requires_torch
def test_upsample_matches_pytorch_align_corners():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 5, 7, 4)).astype(np.float32)
  sizes = np.array([[11, 13], [9, 7], [1, 20]], np.int32)
  out = np.asarray(evaluator_lib.upsample_bilinear_align_corners(jnp.asarray(x), jnp.asarray(sizes), (12, 21)))
  assert out.shape == (3, 12, 21, 4)
  for i, (h, w) in enumerate(sizes):
    np.testing.assert_allclose(out[i, :h, :w], torch_upsample(x[i], (int(h), int(w))), rtol=1e-5, atol=1e-6)


@requires_torch
def test_protocols_match_independent_computation(tmp_path):
  num_classes, eval_size = 13, (20, 12)
  # Five examples in batches of 2 (the last one padding), two original sizes on a 40x24 canvas.
  examples = make_examples(num_classes, [(40, 24), (36, 20), (40, 24), (36, 20), (40, 24)])
  model = KnownModel(num_classes, eval_size[0])
  config = make_config(num_classes)
  eval_set = pipeline.EvalData(examples, batches_per_host=3, per_host_batch=2, size=eval_size, normalization="bgr_mean")
  evaluator = evaluator_lib.Evaluator(config, model, train.create_mesh(), eval_set)
  assert evaluator.canvas == (40, 24)
  writer = RecordingWriter()
  results = evaluator({}, {}, str(tmp_path), 7, writer)
  expected = expected_confusions(model, examples, eval_size, num_classes)
  for name in evaluator_lib.PROTOCOL_NAMES:
    np.testing.assert_array_equal(np.array(results["protocols"][name]["confusion"]), expected[name], err_msg=name)
    assert results["protocols"][name]["miou"] == pytest.approx(metrics.mean_iou(expected[name]))
  # Each example exactly once: the padding example does not count.
  assert np.sum(expected["full"]) == sum(int((e["label"] >= 0).sum()) for e in examples)
  # Flip and full resolution really change the numbers here (the protocols are distinguishable).
  assert not np.array_equal(expected["reference"], expected["reference_flip"])
  assert not np.array_equal(expected["reference"], expected["full"])
  assert results["miou"] == results["target_miou"] == results["protocols"]["reference"]["miou"]
  assert results["protocol"] == "reference" and results["full_size"] == [40, 24]

  # Files: JSON + markdown (per step and latest), confusions, pictures.
  step_dir = tmp_path / "eval" / "step_7"
  saved = json.loads((step_dir / "results.json").read_text())
  assert saved == json.loads((tmp_path / "results.json").read_text())
  assert saved["protocols"]["full_flip"]["miou"] == pytest.approx(metrics.mean_iou(expected["full_flip"]))
  np.testing.assert_array_equal(np.load(step_dir / "confusion.npy"), expected["reference"])
  for name in evaluator_lib.PROTOCOL_NAMES:
    np.testing.assert_array_equal(np.load(step_dir / f"confusion_{name}.npy"), expected[name])
    assert (step_dir / f"confusion_{name}.png").exists()
  markdown = (tmp_path / "results.md").read_text()
  assert "| protocol |" in markdown and "| full_flip |" in markdown and "## Per-class IoU" in markdown
  assert f"{100 * metrics.mean_iou(expected['full']):.1f}" in markdown
  from PIL import Image
  for kind in ("pred", "errors", "class_errors"):
    assert (step_dir / f"{kind}_0.png").exists() and (step_dir / f"{kind}_1.png").exists()
    assert not (step_dir / f"{kind}_2.png").exists()
  # Panels of 12x20 images, enlarged 9x (image | label | prediction) and 13x (two error maps) to >= 512 wide.
  assert np.asarray(Image.open(step_dir / "pred_0.png")).shape == (9 * 12, 9 * 60, 3)
  assert np.asarray(Image.open(step_dir / "errors_0.png")).shape == (13 * 12, 13 * 40, 3)
  assert np.asarray(Image.open(step_dir / "confusion_reference.png")).shape[1] >= 600

  # TensorBoard: headline and per-protocol scalars, tables, pictures.
  scalars = writer.scalar_calls[0]
  assert scalars["eval_target/miou"] == results["miou"]
  assert scalars["eval_target/full_flip/miou"] == results["protocols"]["full_flip"]["miou"]
  assert any(k.startswith("eval_target/full/iou/") for k in scalars)
  assert all(v is not None and np.isfinite(v) for v in scalars.values())
  assert {"eval_target/prediction_0", "eval_target/errors_0", "eval_target/class_errors_0",
          "eval_target/confusion_full_flip"} <= set(writer.images)
  assert "eval_target/iou_table" in writer.texts
  assert writer.flushes == 1  # Pictures reach a gs:// workdir before the next training step.


def test_error_pictures_mark_the_right_pixels():
  from maxsq_jax import visualize
  label = np.array([[0, 0, 1, -1]])
  pred = np.array([[0, 1, 1, 1]])
  panel = visualize.error_panel(label, pred, 19)
  missed, predicted = panel[:, :4], panel[:, 4:]
  np.testing.assert_array_equal(missed[0, 0], visualize.CORRECT_GREY)
  np.testing.assert_array_equal(missed[0, 1], classes.PALETTE_19[0])  # road missed
  np.testing.assert_array_equal(predicted[0, 1], classes.PALETTE_19[1])  # predicted as sidewalk
  np.testing.assert_array_equal(missed[0, 3], [0, 0, 0])  # ignored
  grid = visualize.class_error_grid(np.repeat(label, 4, 0), np.repeat(pred, 4, 0), 19)
  colours = {tuple(c) for c in grid.reshape(-1, 3)}
  assert {tuple(visualize.TP_COLOUR), tuple(visualize.FN_COLOUR), tuple(visualize.FP_COLOUR)} <= colours


def test_pictures_are_enlarged_to_a_viewable_width_by_nearest_neighbour():
  from maxsq_jax import visualize
  panel = np.random.RandomState(0).randint(0, 256, (64, 3 * 128, 3)).astype(np.uint8)  # The demo's 128x64.
  big = visualize.enlarge(panel)
  assert big.shape == (2 * 64, 2 * 384, 3) and big.dtype == np.uint8
  for dy in range(2):
    for dx in range(2):
      np.testing.assert_array_equal(big[dy::2, dx::2], panel)  # Every pixel became a 2x2 block.
  narrow = panel[:, :100]
  assert visualize.enlarge(narrow).shape == (6 * 64, 6 * 100, 3)  # ceil(512 / 100) = 6.
  assert visualize.enlarge(big).shape == big.shape  # Already wide enough: unchanged.


def test_confusion_heat_map_has_class_names_on_both_axes_and_a_colour_scale():
  from maxsq_jax import visualize
  names = ["road", "sidewalk", "building"]
  confusion = np.array([[6, 2, 0], [0, 0, 0], [1, 0, 3]])  # No ground-truth sidewalk pixels.
  fig = visualize.confusion_figure(confusion, names)
  heat_axes, colour_axes = fig.axes
  assert [t.get_text() for t in heat_axes.get_xticklabels()] == names
  assert [t.get_text() for t in heat_axes.get_yticklabels()] == names
  assert heat_axes.get_xlabel() == "predicted class" and heat_axes.get_ylabel() == "ground-truth class"
  assert colour_axes.get_ylabel() == "fraction of the ground-truth class's pixels"
  shown = heat_axes.images[0].get_array()
  np.testing.assert_allclose(shown[0], [0.75, 0.25, 0.0])
  np.testing.assert_allclose(shown[2], [0.25, 0.0, 0.75])
  assert shown.mask[1].all() and not shown.mask[[0, 2]].any()  # The row without pixels is blank.
  assert heat_axes.images[0].norm(0.25) == pytest.approx(0.5)  # Square-root colour spacing.
  image = visualize.confusion_image(confusion, names)
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.shape[1] >= 600
  many = visualize.confusion_image(np.eye(19, dtype=np.int64), [f"class {i}" for i in range(19)])
  assert many.shape[1] > image.shape[1]  # 19 names get more room.


def test_flip_all_and_protocol_names():
  names = lambda ps: [p.name for p in ps]
  assert names(evaluator_lib.parse_protocols(("reference", "full"))) == ["reference", "full"]
  assert names(evaluator_lib.parse_protocols(("reference", "full"), flip_all=True)) == ["reference_flip", "full_flip"]
  assert names(evaluator_lib.parse_protocols("full_flip, reference")) == ["full_flip", "reference"]
  with pytest.raises(ValueError, match="unknown evaluation protocol 'fulres'"):
    evaluator_lib.parse_protocols(("fulres",))


def test_16_class_run_reports_miou_13(tmp_path):
  num_classes, eval_size = 16, (16, 8)
  examples = make_examples(num_classes, [(16, 8)] * 3, seed=4)
  model = KnownModel(num_classes, eval_size[0], seed=4)
  config = make_config(num_classes, protocols=("full", "reference"))
  eval_set = pipeline.EvalData(examples, batches_per_host=2, per_host_batch=2, size=eval_size, normalization="bgr_mean")
  results = evaluator_lib.Evaluator(config, model, train.create_mesh(), eval_set)({}, {}, str(tmp_path), 1, tag="source")
  confusion = np.array(results["protocols"]["full"]["confusion"])
  assert results["protocol"] == "full"
  assert results["source_miou"] == pytest.approx(metrics.mean_iou(confusion))
  assert results["source_miou_13"] == results["miou_13"] == pytest.approx(
      metrics.subset_mean_iou(confusion, metrics.SUBSET_16_TO_13))
  assert list(results["per_class_iou"]) == list(classes.class_names(16))
  assert "mIoU-13" in (tmp_path / "results.md").read_text()


# ----------------------------------------------------------------------------------------------
# The evaluate CLI.


@requires_torch
@pytest.mark.integration
def test_evaluate_cli_on_converted_weights(tiny_data_root, tmp_path):
  from maxsq_jax.models import convert
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  from torch_deeplab import DeeplabMulti
  torch.manual_seed(0)
  net = DeeplabMulti(19, blocks=(1, 1, 1, 1), width=4)
  # A checkpoint-layout file: {state_dict: {module.*}}, as the reference saves them.
  state = {"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}, "epoch": 0}
  variables, report = convert.torch_state_dict_to_variables(state, 19, return_report=True)
  weights = tmp_path / "weights"
  convert.save_converted_variables(str(weights), variables, report)
  out = tmp_path / "out"
  overrides = [f"--config.data.source_dir={tiny_data_root}/synthetic_source",
               f"--config.data.target_dir={tiny_data_root}/synthetic_target", "--config.eval.size=(24,16)"]
  proc = subprocess.run([sys.executable, "-m", "maxsq_jax.evaluate", "--config=configs/demo.py:tiny", *overrides,
                         f"--checkpoint={weights}", f"--workdir={out}"], capture_output=True, text=True, cwd=ROOT,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = json.loads((out / "results.json").read_text())
  assert results["checkpoint_kind"] == "converted" and results["step"] == 0
  assert set(results["protocols"]) == set(evaluator_lib.PROTOCOL_NAMES)
  assert "target mIoU at step 0: reference" in proc.stdout
  assert (out / "results.md").exists() and (out / "eval" / "step_0" / "pred_0.png").exists()
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tensorboard"))
  # The same numbers as evaluating the converted variables in this process.
  config = tiny_config(tiny_data_root, **{"eval.size": (24, 16)})
  mesh = train.create_mesh()
  model = train.build_model(config)
  loaded = convert.load_converted_variables(str(weights))
  confusions, _ = evaluator_lib.Evaluator(config, model, mesh, pipeline.eval_data(config, mesh)).confusions(
      loaded["params"], loaded["batch_stats"])
  for name, confusion in confusions.items():
    np.testing.assert_array_equal(results["protocols"][name]["confusion"], confusion, err_msg=name)


def test_config_of_a_run_written_before_the_eval_section_keeps_its_eval_settings(tmp_path):
  from maxsq_jax import evaluate
  config = tiny_config("data", **{"eval.size": (24, 16), "eval.split": "test", "eval.protocols": ("full",),
                                  "eval.flip": True, "eval.num_images": 3, "eval.full_size": (64, 32)})
  stored = before_eval_section(run_config.config_dict(config))
  stored["no_such_field"] = 1  # A field of no schema: ignored (with a warning).
  jsonfile.write(tmp_path / "config.json", {"config": stored})
  rebuilt = evaluate.config_from_run(str(tmp_path))
  assert rebuilt.to_dict() == config.to_dict()
  assert rebuilt.eval.size == (24, 16) and rebuilt.eval.protocols == ("full",) and rebuilt.eval.num_images == 3


@pytest.mark.integration
def test_evaluate_trained_run_reproduces_its_final_evaluation(tiny_data_root, tmp_path):
  from maxsq_jax import evaluate
  config = tiny_config(tiny_data_root, stage="source_only", num_steps=2, checkpoint_every=100,
                       **{"eval.size": (24, 16), "eval.source_split": ""})
  run_dir = tmp_path / "run"
  trained = train.train_and_evaluate(config, str(run_dir))
  assert (run_dir / "results.json").exists() and (run_dir / "results.md").exists()
  # The run's own config.json rebuilds the config (no --config needed).
  rebuilt = evaluate.config_from_run(str(run_dir))
  assert rebuilt.to_dict() == config.to_dict()
  results = evaluate.run(rebuilt, str(run_dir))
  assert results["step"] == 2 and results["checkpoint_kind"] == "run"
  for name in evaluator_lib.PROTOCOL_NAMES:
    assert results["protocols"][name]["confusion"] == trained["protocols"][name]["confusion"], name
  assert (run_dir / "evaluation" / "results.json").exists()
  with pytest.raises(CheckpointError, match="no checkpoint at step 5"):
    evaluate.run(rebuilt, str(run_dir), step=5)
