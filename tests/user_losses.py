"""Example user-defined target losses, loaded by name as `--config.loss.target=tests.user_losses:my_loss`.

A target loss is `fn(logits, **options) -> scalar`: `logits` float [B, H, W, C] (NHWC, the main
head on a target batch, upsampled to the image size); it receives, among ratio (= loss.iw_ratio),
threshold (= loss.threshold) and normalization (= loss.normalization), only the options its
signature names (all of them if it takes **kwargs). It must be a pure jnp function (it runs inside
jax.jit and jax.grad). See docs/losses.md.
"""

import jax
import jax.numpy as jnp


def my_loss(logits):
  """Squared margin: L = −mean over pixels of (p_top1 − p_top2)². No options."""
  p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  top2 = jax.lax.top_k(p, 2)[0]
  return -jnp.mean((top2[..., 0] - top2[..., 1]) ** 2)


def focal_max_square(logits, threshold=0.95, normalization="reference"):
  """Focal-style max-square: pixels already above `threshold` are down-weighted by (1 − max p)².

  L = −Σ p² · f / (2·B·H·W·K), f = 1 where max p ≤ threshold, (1 − max p)² elsewhere (detached),
  K = C ("reference") or 1 ("pixel").
  """
  logits = logits.astype(jnp.float32)
  b, h, w, c = logits.shape
  p = jax.nn.softmax(logits, axis=-1)
  top = jax.lax.stop_gradient(jnp.max(p, axis=-1, keepdims=True))
  f = jnp.where(top > threshold, (1.0 - top) ** 2, 1.0)
  k = c if normalization == "reference" else 1
  return -jnp.sum(p * p * f) / (2.0 * b * h * w * k)


def with_ratio(logits, ratio=0.5):
  """Only `ratio` in the signature: the objective must pass ratio and nothing else."""
  return ratio * jnp.mean(logits.astype(jnp.float32))


def with_kwargs(logits, **options):
  """Takes **options: the objective passes all of ratio, threshold and normalization."""
  scale = options["ratio"] + options["threshold"]
  if options["normalization"] == "pixel":
    scale = scale * 2.0
  return scale * jnp.mean(jnp.square(logits.astype(jnp.float32)))


def not_a_scalar(logits):
  """Wrong: returns a per-pixel map. The objective rejects it when tracing."""
  return jnp.sum(logits, axis=-1)


NOT_CALLABLE = 3


def nan_loss(logits):
  """A broken target loss (NaN everywhere), for the non-finite-loss guard test."""
  import jax.numpy as jnp
  return jnp.nan * jnp.mean(logits)


def not_traceable(logits):
  """Wrong: converts the traced logits to NumPy, which jax.jit cannot do."""
  import numpy as np
  return float(np.mean(np.asarray(logits)))


def returns_text(logits):
  """Wrong: returns a string."""
  return "max square"
