"""Tests of maxsq_jax.objective: terms, weights, metrics, user losses and error messages."""

import pathlib
import sys

import jax
import numpy as np
import pytest

# `tests.user_losses` must import as a user module would: from the repository root (which
# `python -m pytest` puts on sys.path; plain `pytest` does not).
ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import tests.user_losses as user_losses  # noqa: E402
from maxsq_jax import losses, objective  # noqa: E402
from maxsq_jax.config_base import base_config  # noqa: E402

B, H, W, C = 2, 4, 5, 6


def logits(seed, scale=3.0):
  return (np.random.default_rng(seed).normal(size=(B, H, W, C)) * scale).astype(np.float32)


def loss_config(**kw):
  cfg = base_config().loss
  for k, v in kw.items():
    cfg[k] = v
  return cfg


MAIN, AUX = logits(0), logits(1)
LABELS = np.random.default_rng(2).integers(-1, C, size=(B, H, W)).astype(np.int32)


def test_default_is_max_square_with_reference_lambda():
  obj = objective.make_objective(base_config().loss)
  assert obj.target_fn is losses.max_square
  assert obj.target_options == {"normalization": "reference"}
  assert obj.target_metric == "target_max_square"
  assert not obj.multi_level


def test_source_loss_single_level():
  src, _ = objective.make_objective(loss_config())
  loss, metrics = src(MAIN, None, LABELS)
  ce = float(losses.cross_entropy(MAIN, LABELS))
  assert float(loss) == pytest.approx(ce, rel=1e-6)
  assert set(metrics) == {"source_ce", "source_total"}
  assert float(metrics["source_ce"]) == pytest.approx(ce, rel=1e-6)


def test_source_loss_multi_level_adds_lambda_seg_aux_ce():
  src, _ = objective.make_objective(loss_config(multi_level=True, lambda_seg=0.1))
  loss, metrics = src(MAIN, AUX, LABELS)
  ce = float(losses.cross_entropy(MAIN, LABELS))
  ce_aux = float(losses.cross_entropy(AUX, LABELS))
  assert float(loss) == pytest.approx(ce + 0.1 * ce_aux, rel=1e-6)
  assert set(metrics) == {"source_ce", "source_ce_aux", "source_total"}
  assert float(metrics["source_ce_aux"]) == pytest.approx(ce_aux, rel=1e-6)  # Unweighted.


@pytest.mark.parametrize("name", sorted(losses.BUILTIN_TARGET_LOSSES))
def test_target_loss_single_level(name):
  cfg = loss_config(target=name, lambda_target=0.1, iw_ratio=0.3, threshold=0.6)
  obj = objective.make_objective(cfg)
  loss, metrics = jax.jit(obj.target_loss)(MAIN, AUX)
  fn = losses.BUILTIN_TARGET_LOSSES[name]
  value = float(fn(MAIN, **obj.target_options))
  assert float(loss) == pytest.approx(0.1 * value, rel=1e-5)
  assert set(metrics) == {f"target_{name}", "target_total"}
  assert float(metrics[f"target_{name}"]) == pytest.approx(value, rel=1e-5)


def test_target_loss_multi_level_terms_and_weights():
  cfg = loss_config(target="iw_max_square", lambda_target=0.09, lambda_seg=0.1, multi_level=True,
                    threshold=0.8)
  obj = objective.make_objective(cfg)
  loss, metrics = jax.jit(obj.target_loss)(MAIN, AUX)
  iw = float(losses.iw_max_square(MAIN, 0.2))
  guide, kept = losses.multi_level_guidance(MAIN, AUX, 0.8)
  assert 0.0 < float(kept) < 1.0
  assert float(loss) == pytest.approx(0.09 * iw + 0.1 * 0.09 * float(guide), rel=1e-5)
  assert set(metrics) == {"target_iw_max_square", "target_guidance_ce", "guidance_kept_fraction",
                          "target_total"}
  assert float(metrics["target_guidance_ce"]) == pytest.approx(float(guide), rel=1e-5)
  assert float(metrics["guidance_kept_fraction"]) == pytest.approx(float(kept))
  assert float(metrics["target_total"]) == pytest.approx(float(loss), rel=1e-6)


def test_target_gradient_reaches_aux_head_only_through_guidance():
  _, tgt = objective.make_objective(loss_config(multi_level=False))
  g_aux = jax.grad(lambda a: tgt(MAIN, a)[0])(AUX)
  assert float(abs(g_aux).sum()) == 0.0
  _, tgt = objective.make_objective(loss_config(multi_level=True, threshold=0.5))
  g_main, g_aux = jax.grad(lambda m, a: tgt(m, a)[0], argnums=(0, 1))(MAIN, AUX)
  assert float(abs(g_aux).sum()) > 0.0
  # The main head's gradient is the target loss's alone (guidance labels are detached).
  g_ref = jax.grad(lambda m: 0.1 * losses.max_square(m))(MAIN)
  np.testing.assert_allclose(g_main, g_ref, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("name,expected", [
    ("max_square", {"normalization": "pixel"}),
    ("entropy", {"normalization": "pixel"}),
    ("iw_max_square", {"ratio": 0.3, "normalization": "pixel"}),
    ("iw_entropy", {"ratio": 0.3, "normalization": "pixel"}),
    ("hard_pseudo_label", {"threshold": 0.9}),
])
def test_builtin_options(name, expected):
  cfg = loss_config(target=name, iw_ratio=0.3, threshold=0.9, normalization="pixel")
  assert objective.target_loss_options(cfg, losses.BUILTIN_TARGET_LOSSES[name]) == expected


def test_reference_aliases():
  for alias, name in [("maxsquare", "max_square"), ("IW_maxsquare", "iw_max_square"),
                      ("IW_entropy", "iw_entropy"), ("hard", "hard_pseudo_label")]:
    obj = objective.make_objective(loss_config(target=alias))
    assert obj.target_fn is losses.BUILTIN_TARGET_LOSSES[name]
    assert obj.target_metric == f"target_{name}"


def test_iw_ratio_and_normalization_reach_the_loss():
  a = objective.make_objective(loss_config(target="iw_max_square", iw_ratio=0.2))
  b = objective.make_objective(loss_config(target="iw_max_square", iw_ratio=0.5))
  c = objective.make_objective(loss_config(target="iw_max_square", normalization="pixel"))
  va, vb, vc = (float(o.target_loss(MAIN, None)[1]["target_iw_max_square"]) for o in (a, b, c))
  assert va != pytest.approx(vb)
  assert vc == pytest.approx(C * va, rel=1e-5)


# --- User-defined target losses -----------------------------------------------------------------

def test_user_loss_by_module_path():
  cfg = loss_config(target="tests.user_losses:my_loss", lambda_target=0.5)
  obj = objective.make_objective(cfg)
  assert obj.target_fn is user_losses.my_loss
  assert obj.target_options == {}
  assert obj.target_metric == "target_my_loss"
  loss, metrics = jax.jit(obj.target_loss)(MAIN, None)
  value = float(user_losses.my_loss(MAIN))
  assert float(loss) == pytest.approx(0.5 * value, rel=1e-6)
  assert set(metrics) == {"target_my_loss", "target_total"}
  # Differentiable inside the objective.
  g = jax.grad(lambda m: obj.target_loss(m, None)[0])(MAIN)
  assert np.isfinite(np.asarray(g)).all() and float(abs(g).sum()) > 0


def test_user_loss_with_options_and_multi_level():
  cfg = loss_config(target="tests.user_losses:focal_max_square", threshold=0.7,
                    normalization="pixel", multi_level=True)
  obj = objective.make_objective(cfg)
  assert obj.target_options == {"threshold": 0.7, "normalization": "pixel"}
  _, metrics = obj.target_loss(MAIN, AUX)
  assert set(metrics) == {"target_focal_max_square", "target_guidance_ce",
                          "guidance_kept_fraction", "target_total"}


def test_user_options_follow_signature():
  cfg = loss_config(iw_ratio=0.25, threshold=0.9, normalization="pixel")
  assert objective.target_loss_options(cfg, user_losses.with_ratio) == {"ratio": 0.25}
  assert objective.target_loss_options(cfg, user_losses.with_kwargs) == {
      "ratio": 0.25, "threshold": 0.9, "normalization": "pixel"}
  obj = objective.make_objective(loss_config(target="tests.user_losses:with_kwargs", iw_ratio=0.25,
                                             threshold=0.9, normalization="pixel"))
  _, metrics = obj.target_loss(MAIN, None)
  assert float(metrics["target_with_kwargs"]) == pytest.approx(
      2 * 1.15 * float(np.mean(MAIN.astype(np.float64) ** 2)), rel=1e-5)


def test_user_loss_callable_passes_through():
  obj = objective.make_objective({"target": user_losses.my_loss, "lambda_target": 1.0})
  assert obj.target_fn is user_losses.my_loss and obj.target_metric == "target_my_loss"


def test_user_loss_must_return_scalar():
  obj = objective.make_objective(loss_config(target="tests.user_losses:not_a_scalar"))
  with pytest.raises(ValueError, match="scalar"):
    obj.target_loss(MAIN, None)


# --- Errors -------------------------------------------------------------------------------------

def _assert_helpful(err: ValueError):
  msg = str(err)
  for name in losses.BUILTIN_TARGET_LOSSES:
    assert name in msg
  assert "module:function" in msg


@pytest.mark.parametrize("target", [
    "max_sqare",                              # Typo of a built-in.
    "tests.no_such_module:my_loss",           # Unimportable module.
    "no_such_package.losses:my_loss",
    "tests.user_losses:missing",              # Missing function.
    "tests.user_losses:NOT_CALLABLE",         # Not a function.
    "tests.user_losses:",                     # Malformed.
    ":my_loss",
    "",
])
def test_bad_target_names_fail_at_construction(target):
  with pytest.raises(ValueError) as e:
    objective.make_objective(loss_config(target=target))
  _assert_helpful(e.value)


def test_close_names_are_suggested():
  with pytest.raises(ValueError, match="did you mean 'max_square'"):
    losses.resolve_target_loss("max_sqare")
  with pytest.raises(ValueError, match="did you mean 'tests.user_losses:my_loss'"):
    losses.resolve_target_loss("tests.user_losses:my_los")


def test_resolve_target_loss_directly():
  assert losses.resolve_target_loss("entropy") is losses.entropy
  assert losses.resolve_target_loss("tests.user_losses:my_loss") is user_losses.my_loss
  with pytest.raises(ValueError) as e:
    losses.resolve_target_loss("Max_Square")
  _assert_helpful(e.value)


def test_bad_normalization_and_weights():
  with pytest.raises(ValueError, match="normalization"):
    objective.make_objective(loss_config(normalization="per_pixel"))
  with pytest.raises(ValueError, match="lambda"):
    objective.make_objective(loss_config(lambda_target=-0.1))
