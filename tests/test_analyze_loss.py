"""Gradient analysis of target losses (maxsq_jax.loss_analysis, python -m maxsq_jax.analyze_loss): curves
against closed forms, the paper's bounded/unbounded argument, user losses, shares on a run's predictions."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from maxsq_jax import analyze_loss, loss_analysis
from maxsq_jax.errors import ConfigError
from tests.helpers import ROOT

DEFAULTS = {"iw_ratio": 0.2, "threshold": 0.95, "normalization": "reference"}
P = np.array([0.6, 0.9, 0.99, 0.999])


def spec(name, **defaults):
  return loss_analysis.parse_loss_spec(name, {**DEFAULTS, **defaults})


def closed_form_dloss_dp(name, p, c, normalization="reference"):
  """d/dp of the loss on one pixel with probabilities (p, (1-p)/(C-1), ...), worked by hand:
  max_square  L = -(p² + (1-p)²/(C-1)) / (2K)
  iw          L = -(p² + (1-p)²/(C-1)) · w / K with w = 1/max(1^α·1^(1-α), 1) = 1 (one pixel, no ½)
  entropy     L = -(p log p + (1-p) log((1-p)/(C-1))) / K,   K = C (reference) or 1 (pixel)."""
  k = c if normalization == "reference" else 1.0
  square = p - (1 - p) / (c - 1)
  return {"max_square": -square / k, "iw_max_square": -2 * square / k,
          "entropy": -(np.log(p) - np.log((1 - p) / (c - 1))) / k}[name]


def closed_form_logit_norm(name, p, c):
  """||dL/dz|| from dL/dz_j = p_j (g_j − Σ_k p_k g_k), g = ∂L/∂p (softmax Jacobian), reference constants."""
  probs = np.array([p] + [(1 - p) / (c - 1)] * (c - 1))
  g = {"max_square": -probs / c, "entropy": -(np.log(probs) + 1) / c}[name]
  return np.linalg.norm(probs * (g - np.sum(probs * g)))


@pytest.mark.parametrize("c", [2, 19])
@pytest.mark.parametrize("normalization", ["reference", "pixel"])
def test_curves_match_closed_forms(c, normalization):
  for name in ("entropy", "max_square", "iw_max_square"):
    got = loss_analysis.curves(spec(name, normalization=normalization), c, P)
    np.testing.assert_allclose(got["dloss_dp"], closed_form_dloss_dp(name, P, c, normalization), rtol=2e-3, atol=1e-7)
  for name in ("entropy", "max_square"):
    got = loss_analysis.curves(spec(name), c, P)["dloss_dlogits_norm"]
    np.testing.assert_allclose(got, [closed_form_logit_norm(name, p, c) for p in P], rtol=2e-3, atol=1e-8)


def test_entropy_gradient_unbounded_max_square_bounded():
  for c in (2, 19):
    p = 1 - np.array([1e-2, 1e-3, 1e-4, 1e-5])
    entropy = np.abs(loss_analysis.curves(spec("entropy"), c, p)["dloss_dp"])
    square = np.abs(loss_analysis.curves(spec("max_square"), c, p)["dloss_dp"])
    # Entropy: every factor 10 closer to 1 adds log(10)/C: no bound.
    np.testing.assert_allclose(np.diff(entropy), np.log(10) / c, rtol=2e-2)
    # Max squares: below its supremum 1/C (p → 1); the increments shrink tenfold (a convergent series).
    steps = np.diff(square)
    assert np.all(square <= 1 / c + 1e-6) and np.all(steps[1:] < 0.2 * steps[:-1])
    grid = loss_analysis.probability_grid(c)
    assert np.abs(loss_analysis.curves(spec("max_square"), c, grid)["dloss_dp"]).max() <= 1 / c + 1e-6


def test_loss_specs_options_and_errors():
  iw = spec("IW_maxsquare@iw_ratio=0.5,normalization=pixel")
  assert iw.options == {"ratio": 0.5, "normalization": "pixel"} and iw.label == "IW_maxsquare (iw_ratio=0.5, normalization=pixel)"
  assert spec("hard_pseudo_label").options == {"threshold": 0.95}
  assert spec("tests.user_losses:focal_max_square@threshold=0.8").options == {"threshold": 0.8, "normalization": "reference"}
  # An option the function does not take is not passed (as in training) and not shown.
  assert spec("entropy@iw_ratio=0.3").label == "entropy"
  for bad, match in (("max_sqare", "did you mean 'max_square'"), ("entropy@ratio=0.3", "option 'ratio=0.3'"),
                     ("iw_max_square@iw_ratio=big", "iw_ratio='big' is not a float"),
                     ("entropy@normalization=per_pixel", "normalization must be one of"),
                     ("tests.user_losses:missing", "has no attribute")):
    with pytest.raises(ConfigError, match=match):
      spec(bad)
  with pytest.raises(ConfigError, match=r"--loss=tests.user_losses:not_a_scalar: it returned float32\[2, 4, 4\], not a "
                                        "float scalar"):
    loss_analysis.check_scalar(spec("tests.user_losses:not_a_scalar"), 19)
  with pytest.raises(ConfigError, match="--loss=tests.user_losses:not_traceable: calling it on traced logits"):
    loss_analysis.check_scalar(spec("tests.user_losses:not_traceable"), 19)


def test_user_loss_is_plotted_without_library_change(tmp_path):
  analysis = analyze_loss.analyze(str(tmp_path), ["tests.user_losses:my_loss", "max_square"], num_classes=5)
  assert sorted(os.listdir(tmp_path)) == ["analysis.json", "curves.png", "summary.md"]
  with open(tmp_path / "curves.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  saved = json.loads((tmp_path / "analysis.json").read_text())
  assert saved["curves"] == json.loads(json.dumps(analysis["curves"]))
  two = saved["curves"]["two_class"]
  p = np.asarray(two["p"])
  # my_loss on a 2-class pixel: L = -(p - (1 - p))², so dL/dp = -4(2p - 1).
  np.testing.assert_allclose(two["tests.user_losses:my_loss"]["dloss_dp"], -4 * (2 * p - 1), rtol=2e-3, atol=1e-5)
  assert saved["curves"]["c_class"]["num_classes"] == 5
  assert "| tests.user_losses:my_loss |" in (tmp_path / "summary.md").read_text()


def test_run_statistics_match_a_numpy_computation():
  """Per-(class, bin) sums of max_square's per-pixel gradient norms, against the softmax-Jacobian form."""
  rng = np.random.default_rng(0)
  c, edges = 4, loss_analysis.CONFIDENCE_EDGES
  logits = rng.normal(size=(3, 5, 6, c)).astype(np.float32) * np.array([1, 3, 6])[:, None, None, None].astype(np.float32)
  mask = np.array([True, True, False])
  stats = jax.jit(loss_analysis.make_run_statistics([spec("max_square"), spec("entropy")], c))(logits, mask)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  g = -p / (5 * 6 * c)  # ∂L/∂p of one image's max_square (reference constants).
  norms = np.linalg.norm(p * (g - np.sum(p * g, -1, keepdims=True)), axis=-1)
  bins = np.searchsorted(np.asarray(edges[1:-1]), p.max(-1), side="right")
  expected = np.zeros((c, len(edges) - 1))
  counts = np.zeros((c, len(edges) - 1), int)
  for b in range(2):  # Image 2 is padding.
    np.add.at(expected, (p[b].argmax(-1), bins[b]), norms[b])
    np.add.at(counts, (p[b].argmax(-1), bins[b]), 1)
  np.testing.assert_allclose(stats["gradient"][0], expected, rtol=1e-4, atol=1e-9)
  np.testing.assert_array_equal(stats["pixels"], counts)
  summary = loss_analysis.summarize(stats["gradient"], stats["pixels"], ["max_square", "entropy"], list("abcd"))
  for label in ("max_square", "entropy"):
    loss = summary["losses"][label]
    assert sum(loss["share_per_bin"]) == pytest.approx(1.0)
    assert sum(loss["share_per_class"].values()) == pytest.approx(1.0)
  high = [k for k, (lo, _) in enumerate(summary["bins"]) if lo >= 0.9]
  assert summary["losses"]["max_square"]["share_above"]["0.9"] == pytest.approx(expected[:, high].sum() / expected.sum())
  assert summary["num_pixels"] == 2 * 5 * 6


def test_source_cross_entropy_statistics_and_ratio_match_a_numpy_computation():
  """Per-pixel ||∂CE(image alone)/∂logits|| = ||softmax − one-hot|| / (labelled pixels of the image), 0 where
  ignored; the ratio is λ_T × the target loss's mean per-pixel norm / the cross-entropy's."""
  rng = np.random.default_rng(1)
  c = 5
  logits = rng.normal(size=(3, 4, 6, c)).astype(np.float32) * 2
  labels = rng.integers(0, c, size=(3, 4, 6)).astype(np.int32)
  labels[0, 0, :3] = -1  # Ignored pixels: no gradient, but counted in the mean.
  mask = np.array([True, True, False])
  stats = jax.jit(loss_analysis.make_source_statistics())(logits, labels, mask)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  expected = 0.0
  for b in range(2):  # Image 2 is padding.
    valid = labels[b] >= 0
    onehot = np.eye(c)[np.where(valid, labels[b], 0)]
    norms = np.linalg.norm(p[b] - onehot, axis=-1) / valid.sum()
    expected += np.where(valid, norms, 0.0).sum()
  assert float(stats["gradient"]) == pytest.approx(expected, rel=1e-5)
  assert int(stats["pixels"]) == 2 * 4 * 6

  summary = {"num_pixels": 100, "losses": {"max_square": {"total": 2e-4}, "entropy": {"total": 8e-4}}}
  ratios = loss_analysis.gradient_ratios(summary, source_gradient=0.5, source_pixels=1000, lambda_target=10.0)
  # Source mean 5e-4; max_square mean 2e-6 -> 10 x 2e-6 / 5e-4 = 0.04; entropy 8e-6 -> 0.16.
  assert ratios["source_ce_mean_norm"] == pytest.approx(5e-4) and ratios["lambda_target"] == 10.0
  assert ratios["losses"]["max_square"] == {"mean_norm": pytest.approx(2e-6), "ratio": pytest.approx(0.04)}
  assert ratios["losses"]["entropy"]["ratio"] == pytest.approx(0.16)
  assert loss_analysis.gradient_ratios(summary, 0.0, 0, 1.0)["losses"]["entropy"]["ratio"] is None


@pytest.mark.integration
def test_run_analysis_on_the_tiny_demo(tiny_demo_table, tmp_path):
  workdir, _ = tiny_demo_table
  out = tmp_path / "analysis"
  proc = subprocess.run([sys.executable, "-m", "maxsq_jax.analyze_loss", f"--out={out}",
                         f"--workdir={workdir / 'seed0' / 'maxsquare'}", "--num_images=3", "--batch_size=2",
                         "--loss=entropy", "--loss=max_square", "--loss=iw_max_square", "--loss=tests.user_losses:my_loss"],
                        capture_output=True, text=True, cwd=ROOT, timeout=600,
                        env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(os.listdir(out)) == ["analysis.json", "classes.png", "confidence.png", "curves.png", "summary.md"]
  run = json.loads((out / "analysis.json").read_text())["run"]
  assert run["run"]["num_images"] == 3 and run["run"]["devices"] == 2 and run["run"]["step"] == 3
  assert run["num_pixels"] == 3 * 48 * 32  # The padding image of the last batch counts nowhere.
  assert sum(run["pixel_share_per_bin"]) == pytest.approx(1.0)
  for loss in run["losses"].values():
    assert sum(loss["share_per_bin"]) == pytest.approx(1.0)
    assert sum(loss["share_per_class"].values()) == pytest.approx(1.0)
  assert "share of the gradient from max p ≥ 0.9" in proc.stdout
  # The ratio to the source cross-entropy, at the run's λ_T (the tiny main job's 0.1).
  ratios = run["ratios"]
  assert ratios["lambda_target"] == 0.1 and ratios["source_split"] == "val" and ratios["source_ce_mean_norm"] > 0
  for label, loss in run["losses"].items():
    mean = loss["total"] / run["num_pixels"]
    assert ratios["losses"][label]["ratio"] == pytest.approx(0.1 * mean / ratios["source_ce_mean_norm"])
  assert "λ_T × it / source CE's" in proc.stdout


@pytest.mark.integration
@pytest.mark.parametrize("args, message", [
    (["--loss=maxsquares"], "error: --loss=maxsquares: Unknown target loss 'maxsquares'"),
    (["--workdir=RUN"], "error: RUN: not a training run's workdir (no config.json)"),
    (["--workdir=RUN", "--with_config"], "error: no checkpoint in "),
])
def test_bad_input_is_a_one_line_error(tmp_path, args, message):
  run = tmp_path / "run"
  os.makedirs(run)
  if "--with_config" in args:  # A workdir that has a config.json but no checkpoint.
    from tests.helpers import tiny_config
    with open(run / "config.json", "w") as f:
      json.dump({"config": json.loads(tiny_config(str(tmp_path)).to_json_best_effort())}, f)
    args = [a for a in args if a != "--with_config"]
  args = [a.replace("RUN", str(run)) for a in args]
  # On the CPU platform, as the other command-line tests: with libtpu installed (the test extra) and no TPU,
  # jax would log its failed TPU initialisation first.
  proc = subprocess.run([sys.executable, "-m", "maxsq_jax.analyze_loss", f"--out={tmp_path / 'out'}", *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(message.replace("RUN", str(run))), proc.stderr
  assert not os.path.exists(tmp_path / "out")
