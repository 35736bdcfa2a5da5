"""Tests of maxsq_jax.losses against the formulas of docs/method.md (Losses).

The NumPy references below are written from the formulas of §2 (float64, explicit per-image loops
for the image-wise weights), not from maxsq_jax.losses.
"""

import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxsq_jax import losses

RTOL, ATOL = 2e-5, 1e-7

# Every loss is called through jax.jit in these tests: one compilation per function and shape is
# several times faster on CPU than eager op-by-op dispatch (and jit is how the train step uses them).
_JIT_CACHE = {}


def _jitted(fn, grad=False):
  key = (fn, grad)
  if key not in _JIT_CACHE:
    static = [n for n in ("normalization",) if n in inspect.signature(fn).parameters]
    _JIT_CACHE[key] = jax.jit(jax.grad(fn) if grad else fn, static_argnames=static)
  return _JIT_CACHE[key]


class _Jitted:
  def __getattr__(self, name):
    value = getattr(losses, name)
    return _jitted(value) if callable(value) else value


J = _Jitted()


def jgrad(fn):
  """jax.jit(jax.grad(fn)) with `normalization` static."""
  return _jitted(fn, grad=True)


# --- Independent NumPy references ---------------------------------------------------------------

def np_softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_ce(z, y):
  """Mean over pixels with 0 <= y < C of -log p[y]; 0 when there are none."""
  p = np_softmax(z)
  c = z.shape[-1]
  total, count = 0.0, 0
  for idx in np.ndindex(*y.shape):
    if 0 <= y[idx] < c:
      total -= math.log(p[idx][y[idx]])
      count += 1
  return total / count if count else 0.0


def np_iw_weights(z, ratio):
  """[B,H,W] weight of each pixel: 1/max(n_k^a (HW)^(1-a), 1) of its argmax class k, per image."""
  b, h, w, c = z.shape
  out = np.zeros((b, h, w))
  for i in range(b):
    k = np.argmax(z[i], axis=-1)
    n = np.bincount(k.ravel(), minlength=c).astype(np.float64)
    assert n.sum() == h * w
    wk = 1.0 / np.maximum(n ** ratio * float(h * w) ** (1 - ratio), 1.0)
    out[i] = wk[k]
  return out


def np_max_square(z, norm="reference"):
  b, h, w, c = z.shape
  p = np_softmax(z)
  n = b * h * w * (c if norm == "reference" else 1)
  return -0.5 * np.sum(p ** 2) / n


def np_entropy(z, norm="reference"):
  b, h, w, c = z.shape
  p = np_softmax(z)
  n = b * h * w * (c if norm == "reference" else 1)
  return np.sum(-p * np.log(p)) / n


def np_iw_max_square(z, ratio=0.2, norm="reference"):
  b, _, _, c = z.shape
  p = np_softmax(z)
  wt = np_iw_weights(z, ratio)
  return -np.sum((p ** 2).sum(-1) * wt) / (b * (c if norm == "reference" else 1))


def np_iw_entropy(z, ratio=0.2, norm="reference"):
  b, _, _, c = z.shape
  p = np_softmax(z)
  wt = np_iw_weights(z, ratio)
  return np.sum((-p * np.log(p)).sum(-1) * wt) / (b * (c if norm == "reference" else 1))


def np_hard(z, threshold=0.95):
  p = np_softmax(z)
  y = np.where(p.max(-1) > threshold, p.argmax(-1), -1)
  return np_ce(z, y)


def np_guidance(zm, za, tau=0.95):
  pm, pa = np_softmax(zm), np_softmax(za)
  keep = (pm.max(-1) > tau) | (pa.max(-1) > tau)
  y = np.where(keep, np.argmax((pm + pa) / 2, -1), -1)
  return np_ce(za, y), keep.mean()


def rand_logits(seed, b, h, w, c, scale=3.0):
  return (np.random.default_rng(seed).normal(size=(b, h, w, c)) * scale).astype(np.float32)


SHAPES = [(1, 5, 7, 19), (3, 4, 6, 19), (2, 5, 7, 3)]


# --- Values vs the references -------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames="norm")
def all_losses(z, z2, labels, ratio, threshold, norm):
  """Every loss of one batch in one compiled function (one compilation per shape and norm)."""
  guide, kept = losses.multi_level_guidance(z, z2, threshold)
  return {
      "max_square": losses.max_square(z, norm),
      "entropy": losses.entropy(z, normalization=norm),
      "iw_max_square": losses.iw_max_square(z, ratio, norm),
      "iw_entropy": losses.iw_entropy(z, ratio=ratio, normalization=norm),
      "weights": losses.image_wise_class_weights(z, ratio),
      "hard_pseudo_label": losses.hard_pseudo_label(z, threshold),
      "cross_entropy": losses.cross_entropy(z, labels),
      "guidance": guide,
      "kept": kept,
  }


def batch(seed, shape, scale=3.0):
  z, z2 = rand_logits(seed, *shape, scale=scale), rand_logits(seed + 100, *shape, scale=scale)
  y = np.random.default_rng(seed).integers(-1, shape[-1], size=shape[:3]).astype(np.int32)
  y.flat[0] = -1
  return z, z2, y


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm", ["reference", "pixel"])
def test_unweighted_losses_match_numpy(shape, norm):
  z, z2, y = batch(0, shape)
  out = all_losses(z, z2, y, 0.2, 0.9, norm)
  np.testing.assert_allclose(out["max_square"], np_max_square(z, norm), RTOL, ATOL)
  np.testing.assert_allclose(out["entropy"], np_entropy(z, norm), RTOL, ATOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm", ["reference", "pixel"])
@pytest.mark.parametrize("ratio", [0.2, 0.0, 1.0])
def test_iw_losses_match_numpy(shape, ratio, norm):
  z, z2, y = batch(1, shape, scale=1.5)
  out = all_losses(z, z2, y, ratio, 0.9, norm)
  np.testing.assert_allclose(out["iw_max_square"], np_iw_max_square(z, ratio, norm), RTOL, ATOL)
  np.testing.assert_allclose(out["iw_entropy"], np_iw_entropy(z, ratio, norm), RTOL, ATOL)
  assert out["weights"].shape == shape[:3] + (1,)
  np.testing.assert_allclose(out["weights"][..., 0], np_iw_weights(z, ratio), RTOL, 0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("threshold", [0.5, 0.9])
def test_hard_pseudo_label_and_guidance_match_numpy(shape, threshold):
  z, z2, y = batch(3, shape)
  out = all_losses(z, z2, y, 0.2, threshold, "reference")
  np.testing.assert_allclose(out["hard_pseudo_label"], np_hard(z, threshold), RTOL, ATOL)
  ref_loss, ref_kept = np_guidance(z, z2, threshold)
  np.testing.assert_allclose(out["guidance"], ref_loss, RTOL, ATOL)
  np.testing.assert_allclose(out["kept"], ref_kept, 1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_cross_entropy_with_ignore_matches_numpy(shape):
  z, z2, y = batch(4, shape)
  assert (y == -1).any()
  out = all_losses(z, z2, y, 0.2, 0.9, "reference")
  np.testing.assert_allclose(out["cross_entropy"], np_ce(z, y), RTOL, ATOL)
  # Labels outside [0, C) count as ignored, like -1.
  y2 = y.copy()
  y2[y2 == -1] = shape[-1] + 3
  out = all_losses(z, z2, y2, 0.2, 0.9, "reference")
  np.testing.assert_allclose(out["cross_entropy"], np_ce(z, y), RTOL, ATOL)


def test_all_return_float32_scalars_even_from_bfloat16():
  z = jnp.asarray(rand_logits(8, 2, 3, 4, 5)).astype(jnp.bfloat16)
  out = all_losses(z, z, jnp.zeros((2, 3, 4), jnp.int32), 0.2, 0.9, "reference")
  outs = [v for k, v in out.items() if k != "weights"]
  for out in outs:
    assert out.shape == () and out.dtype == jnp.float32


def test_bad_normalization_raises():
  with pytest.raises(ValueError, match="normalization"):
    J.max_square(rand_logits(0, 1, 2, 2, 3), "per_pixel")


# --- Hand-worked 2x2 example (B=1, H=W=2, C=2) ----------------------------------------------------
#
# Logits (log 3 = 1.0986...) and probabilities p = softmax:
#   pixel (0,0): (log3, 0) -> p = (3/4, 1/4)    Σp² = 9/16 + 1/16 = 5/8    argmax 0
#   pixel (0,1): (log3, 0) -> p = (3/4, 1/4)    Σp² = 5/8                  argmax 0
#   pixel (1,0): (1, 0)    -> p = (e/(e+1), 1/(e+1)) = (0.731059, 0.268941)
#                            Σp² = 0.534447 + 0.072329 = 0.606776        argmax 0
#   pixel (1,1): (0, log3) -> p = (1/4, 3/4)    Σp² = 5/8                  argmax 1
L3 = math.log(3.0)
HAND = np.array([[[[L3, 0.0], [L3, 0.0]], [[1.0, 0.0], [0.0, L3]]]], np.float32)
S = 1.0 / (1.0 + math.e)  # p_1 of pixel (1,0) = 0.268941
SUM_P2 = 3 * 5 / 8 + (1 - S) ** 2 + S ** 2  # = 1.875 + 0.606776 = 2.481776


def test_hand_example_max_square():
  # reference: −Σp² / (2·B·H·W·C) = −2.481776 / 16 = −0.155111
  assert SUM_P2 == pytest.approx(2.481776, abs=1e-6)
  assert float(J.max_square(HAND)) == pytest.approx(-0.155111, abs=1e-6)
  # pixel: −Σp² / (2·B·H·W) = −2.481776 / 8 = −0.310222
  assert float(J.max_square(HAND, "pixel")) == pytest.approx(-0.310222, abs=1e-6)


def test_hand_example_iw_max_square():
  # Argmax counts: n_0 = 3, n_1 = 1; H·W = 4.
  # α = 1: w(k) = 1/max(n_k, 1): w(0) = 1/3, w(1) = 1.
  #   Σ p²·w = (5/8 + 5/8 + 0.606776)/3 + 5/8·1 = 1.856776/3 + 0.625 = 0.618925 + 0.625 = 1.243925
  #   reference L = −1.243925 / (B·C = 2) = −0.621963
  assert float(J.iw_max_square(HAND, ratio=1.0)) == pytest.approx(-0.621963, abs=1e-6)
  # α = 0: w(k) = 1/(H·W) = 1/4 for every class: L = −Σp²/(4·2) = −2.481776/8 = −0.310222,
  # i.e. exactly 2× max_square (no ½ factor in the IW form).
  assert float(J.iw_max_square(HAND, ratio=0.0)) == pytest.approx(-0.310222, abs=1e-6)
  # α = 0.2: w(0) = 1/(3^0.2·4^0.8) = 1/3.776350 = 0.264806, w(1) = 1/4^0.8 = 1/3.031433 = 0.329877
  #   Σ p²·w = 1.856776·0.264806 + 0.625·0.329877 = 0.491685 + 0.206173 = 0.697858 -> L = −0.348929
  assert float(J.iw_max_square(HAND, ratio=0.2)) == pytest.approx(-0.348929, abs=2e-6)


def test_hand_example_entropy():
  # Pixel entropies (nats): pixels (0,0), (0,1), (1,1) have p = (3/4, 1/4) in some order:
  #   H = 0.75·0.287682 + 0.25·1.386294 = 0.215762 + 0.346574 = 0.562335 each;
  #   pixel (1,0): H = 0.731059·0.313262 + 0.268941·1.313262 = 0.229016 + 0.353188 = 0.582203.
  #   Σ = 3·0.562335 + 0.582203 = 2.269209.
  # reference: Σ / (B·H·W·C = 8) = 0.283651; pixel: Σ / 4 = 0.567302.
  assert float(J.entropy(HAND)) == pytest.approx(0.283651, abs=1e-6)
  assert float(J.entropy(HAND, "pixel")) == pytest.approx(0.567302, abs=1e-6)
  # IW, α = 1: Σ H·w = (0.562335·2 + 0.582203)/3 + 0.562335 = 0.568958 + 0.562335 = 1.131293
  #   reference: / (B·C = 2) = 0.565646
  assert float(J.iw_entropy(HAND, ratio=1.0)) == pytest.approx(0.565646, abs=1e-6)


def test_hand_example_cross_entropy_and_hard():
  # Labels [[0, 1], [-1, 1]]: −log(3/4) + −log(1/4) + (ignored) + −log(3/4)
  #   = 0.287682 + 1.386294 + 0.287682 = 1.961659, over 3 pixels = 0.653886
  labels = np.array([[[0, 1], [-1, 1]]], np.int32)
  assert float(J.cross_entropy(HAND, labels)) == pytest.approx(0.653886, abs=1e-6)
  # Hard pseudo-labels, threshold 0.74: max p = 0.75, 0.75, 0.731 (dropped), 0.75 -> labels
  # [[0, 0], [-1, 1]], each −log(3/4) -> 0.287682.
  assert float(J.hard_pseudo_label(HAND, 0.74)) == pytest.approx(0.287682, abs=1e-6)
  np.testing.assert_array_equal(J.hard_pseudo_labels(HAND, 0.74), [[[0, 0], [-1, 1]]])
  # Threshold 0.75: no pixel has max p > 0.75 -> all ignored -> 0, not NaN.
  assert float(J.hard_pseudo_label(HAND, 0.76)) == 0.0


def test_hand_example_guidance():
  # Aux logits: (0,0): (0, log9) -> p_aux = (0.1, 0.9); (0,1): (0,0) -> (0.5, 0.5);
  #             (1,0): (log19, 0) -> (0.95, 0.05);   (1,1): (0,0) -> (0.5, 0.5).
  # τ = 0.8. Kept: (0,0) (p_aux 0.9 > τ), (1,0) (p_aux 0.95); not (0,1) (0.75, 0.5), not (1,1).
  # Labels: (0,0): mean = (0.425, 0.575) -> 1 (main alone says 0); (1,0): (0.84, 0.16) -> 0.
  # CE(aux): (−log 0.9 + −log 0.95)/2 = (0.105361 + 0.051293)/2 = 0.078327; kept 2/4 = 0.5.
  aux = np.array([[[[0.0, math.log(9)], [0.0, 0.0]], [[math.log(19), 0.0], [0.0, 0.0]]]], np.float32)
  loss, kept = J.multi_level_guidance(HAND, aux, 0.8)
  assert float(loss) == pytest.approx(0.078327, abs=1e-6)
  assert float(kept) == 0.5
  # Raising τ above 0.95 keeps nothing: loss 0, kept 0.
  loss, kept = J.multi_level_guidance(HAND, aux, 0.96)
  assert float(loss) == 0.0 and float(kept) == 0.0


# --- Gradients ----------------------------------------------------------------------------------

def softmax_vjp(p, g):
  """dL/dz from dL/dp through softmax: dL/dz_j = p_j (g_j − Σ_i g_i p_i)."""
  return p * (g - np.sum(g * p, axis=-1, keepdims=True))


@pytest.mark.parametrize("shape", [(1, 3, 4, 19), (3, 3, 4, 5)])
@pytest.mark.parametrize("norm", ["reference", "pixel"])
def test_max_square_gradient_closed_form(shape, norm):
  # L = −Σp²/(2K), K = B·H·W·C (reference) or B·H·W (pixel)  =>  dL/dp = −p/K.
  z = rand_logits(9, *shape)
  b, h, w, c = shape
  k = b * h * w * (c if norm == "reference" else 1)
  p = np_softmax(z)
  expected = softmax_vjp(p, -p / k)
  np.testing.assert_allclose(jgrad(losses.max_square)(z, norm), expected, 1e-4, 1e-9)


@pytest.mark.parametrize("shape", [(1, 3, 4, 19), (3, 3, 4, 5)])
def test_iw_max_square_gradient_closed_form(shape):
  # L = −Σ p²·w/(B·C) with w detached (a constant)  =>  dL/dp = −2·p·w/(B·C).
  z = rand_logits(10, *shape)
  b, _, _, c = shape
  p = np_softmax(z)
  wt = np_iw_weights(z, 0.2)[..., None]
  expected = softmax_vjp(p, -2 * p * wt / (b * c))
  np.testing.assert_allclose(jgrad(losses.iw_max_square)(z), expected, 1e-4, 1e-9)


@pytest.mark.parametrize("shape", [(1, 3, 4, 19), (2, 3, 4, 5)])
def test_entropy_gradient_closed_form(shape):
  # L = −Σ p log p / K  =>  dL/dp = −(log p + 1)/K.
  z = rand_logits(11, *shape)
  b, h, w, c = shape
  p = np_softmax(z)
  expected = softmax_vjp(p, -(np.log(p) + 1) / (b * h * w * c))
  np.testing.assert_allclose(jgrad(losses.entropy)(z), expected, 1e-4, 1e-9)


def test_paper_gradient_argument():
  """Max-square's gradient grows linearly in p; entropy's grows without bound as p -> 1.

  Binary case (C = 2, logits (t, 0), p = sigmoid(t)), pixel normalisation, one pixel:
    max-square L = −(p² + (1−p)²)/2  ->  dL/dp = −(2p − 1)          (|.| <= 1, linear in p)
    entropy    L = −p log p − (1−p) log(1−p)  ->  dL/dp = log((1−p)/p)  (-> −∞ as p -> 1)
  Per element, ∂/∂p_c is −p_c for max-square and −(log p_c + 1) for entropy. The derivative along
  the simplex is recovered from jax.grad w.r.t. t: dL/dp = (dL/dt) / (p(1−p)).
  """
  ps = np.array([0.6, 0.7, 0.8, 0.9, 0.99, 0.999], np.float64)
  ts = np.log(ps / (1 - ps)).astype(np.float32)

  def along_simplex(loss_fn):
    out = []
    for t, p in zip(ts, ps):
      z = jnp.array([[[[t, 0.0]]]], jnp.float32)
      dldt = jgrad(loss_fn)(z, normalization="pixel")[0, 0, 0, 0]
      out.append(float(dldt) / (p * (1 - p)))
    return np.array(out)

  g_ms = along_simplex(losses.max_square)
  g_ent = along_simplex(losses.entropy)
  np.testing.assert_allclose(g_ms, -(2 * ps - 1), rtol=2e-3)
  np.testing.assert_allclose(g_ent, np.log((1 - ps) / ps), rtol=2e-3)
  # Max-square: exactly linear (constant slope −2) and bounded by 1.
  slopes = np.diff(g_ms) / np.diff(ps)
  np.testing.assert_allclose(slopes, -2.0, rtol=5e-3)
  assert np.all(np.abs(g_ms) <= 1.0 + 1e-6)
  # Entropy: magnitude keeps growing and dominates near p = 1 (log 999 ≈ 6.9 at p = 0.999).
  assert np.all(np.diff(np.abs(g_ent)) > 0)
  assert abs(g_ent[-1]) > 6.5 and abs(g_ent[-1]) / abs(g_ms[-1]) > 6.5
  # (Per element, the closed forms −p_c/K and −(log p_c + 1)/K are checked through the chain rule
  # in test_max_square_gradient_closed_form and test_entropy_gradient_closed_form.)


def test_hard_pseudo_label_all_ignored_is_zero_with_finite_gradient():
  z = jnp.zeros((2, 3, 3, 4))  # p = 1/4 everywhere: nothing above 0.95.
  val, grad = jax.jit(jax.value_and_grad(losses.hard_pseudo_label))(z, 0.95)
  assert float(val) == 0.0
  assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).sum()) == 0.0


def test_cross_entropy_all_ignored_is_zero_with_finite_gradient():
  z = rand_logits(12, 2, 3, 3, 4)
  y = -np.ones((2, 3, 3), np.int32)
  val, grad = jax.jit(jax.value_and_grad(losses.cross_entropy))(z, y)
  assert float(val) == 0.0 and bool(jnp.all(grad == 0))


def test_hard_pseudo_label_labels_carry_no_gradient():
  # With the labels fixed (detached), the gradient is CE's: (p − onehot(ŷ))/#kept on kept pixels.
  z = rand_logits(13, 1, 4, 4, 3, scale=4.0)
  p = np_softmax(z)
  keep = p.max(-1) > 0.9
  assert 0 < keep.sum() < keep.size
  onehot = np.eye(3)[p.argmax(-1)]
  expected = np.where(keep[..., None], p - onehot, 0.0) / keep.sum()
  np.testing.assert_allclose(jgrad(losses.hard_pseudo_label)(z, 0.9), expected, 1e-4, 1e-8)


def test_guidance_gradient_only_into_aux():
  zm, za = rand_logits(14, 2, 4, 4, 5), rand_logits(15, 2, 4, 4, 5)
  gm, ga = jax.jit(jax.grad(lambda m, a: losses.multi_level_guidance(m, a, 0.6)[0], argnums=(0, 1)))(zm, za)
  assert float(jnp.abs(gm).sum()) == 0.0
  assert float(jnp.abs(ga).sum()) > 0.0


def test_guidance_mask_is_or_of_both_heads():
  # Main confident at pixel 0 only, aux confident at pixel 1 only, neither at pixel 2, both at 3.
  big = 10.0
  zm = np.array([[[[big, 0, 0], [0, 0, 0], [0, 0, 0], [0, big, 0]]]], np.float32)
  za = np.array([[[[0, 0, 0], [0, 0, big], [0, 0, 0], [0, big, 0]]]], np.float32)
  loss, kept = J.multi_level_guidance(zm, za, 0.95)
  assert float(kept) == pytest.approx(0.75)
  # Labels: pixel 0 -> 0 (from main), pixel 1 -> 2 (from aux), pixel 3 -> 1.
  pa = np_softmax(za)[0, 0]
  expected = -(np.log(pa[0, 0]) + np.log(pa[1, 2]) + np.log(pa[3, 1])) / 3
  assert float(loss) == pytest.approx(expected, rel=1e-5)


# --- Batch-size independence --------------------------------------------------------------------

@jax.jit
def four_losses(z):
  return jnp.stack([losses.iw_max_square(z), losses.iw_entropy(z), losses.max_square(z),
                    losses.entropy(z)])


@pytest.mark.parametrize("c", [19, 3])
def test_batch_loss_is_mean_of_image_losses(c):
  # iw_max_square, iw_entropy (the reference's B = 1 limitation, fixed), max_square, entropy.
  z = rand_logits(16, 4, 5, 6, c, scale=2.0)
  batch_losses = np.asarray(four_losses(z))
  singles = np.stack([np.asarray(four_losses(z[i:i + 1])) for i in range(4)])
  np.testing.assert_allclose(batch_losses, singles.mean(0), rtol=1e-5)
  assert not np.allclose(singles[:, 0], singles[0, 0])  # The images do differ.


def test_iw_weights_are_per_image():
  # Image 0 is all class 0, image 1 is half class 0 and half class 1: the class-0 weight differs.
  z = np.zeros((2, 2, 2, 2), np.float32)
  z[0, ..., 0] = 5.0
  z[1, 0, :, 0] = 5.0
  z[1, 1, :, 1] = 5.0
  w = np.asarray(J.image_wise_class_weights(z, 0.5))[..., 0]
  # HW = 4: image 0: n_0 = 4 -> 1/(2·2) = 1/4; image 1: n = 2 -> 1/(√2·2).
  np.testing.assert_allclose(w[0], 0.25, 1e-6)
  np.testing.assert_allclose(w[1], 1 / (2 * math.sqrt(2)), 1e-6)


def test_pixel_normalization_is_c_times_reference():
  shape = SHAPES[-1]
  z, z2, y = batch(17, shape)
  ref, pix = (all_losses(z, z2, y, 0.2, 0.9, n) for n in ("reference", "pixel"))
  for name in ["max_square", "iw_max_square", "entropy", "iw_entropy"]:
    assert float(pix[name]) == pytest.approx(shape[-1] * float(ref[name]), rel=1e-5), name
