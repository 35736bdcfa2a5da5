"""Segmentation losses of MaxSquare UDA (docs/method.md, Losses), as pure functions of the logits.

Conventions, for every function here:

* `logits` are float `[B, H, W, C]` (NHWC), already upsampled to the label size. They are cast to
  float32 before any arithmetic, so bfloat16 activations are fine.
* `labels` are integer `[B, H, W]`; `IGNORE_LABEL` (-1) marks pixels without a label (any label
  outside `[0, C)` is ignored too: the reference's ignore label is -1 everywhere, never 255).
* `p = softmax(logits, axis=-1)`; N = B·H·W pixels.
* Every loss returns a float32 scalar and works for any batch size B (the reference's image-wise
  weighting only worked for B = 1, issue #15; here the weight map is broadcast over the class axis).
* `normalization` selects the constant in front of the sums:
    - "reference" (default): the reference code's, which divides by the number of classes C as well
      (a mean over all B·H·W·C elements). The λ values of the paper's commands (0.1, 0.09) were
      tuned with it.
    - "pixel": the per-pixel form the paper writes (no 1/C). For every loss here,
      pixel = C × reference, so a λ tuned for "reference" must be divided by C to keep the same step.

Target losses take `(logits, **options)` and return a scalar; `BUILTIN_TARGET_LOSSES` names them
and `resolve_target_loss` also accepts `"package.module:function"` for user-written ones
(docs/losses.md).
"""

from __future__ import annotations

import importlib
import traceback
from typing import Callable

import jax
import jax.numpy as jnp

from maxsq_jax.errors import did_you_mean

IGNORE_LABEL = -1
NORMALIZATIONS = ("reference", "pixel")

Array = jax.Array


def _f32(x) -> Array:
  return jnp.asarray(x).astype(jnp.float32)


def _class_divisor(num_classes: int, normalization: str) -> float:
  """The extra factor the reference divides by: C for "reference", 1 for "pixel"."""
  if normalization == "reference":
    return float(num_classes)
  if normalization == "pixel":
    return 1.0
  raise ValueError(
      f"Unknown loss normalization {normalization!r}; expected one of {NORMALIZATIONS}.")


def cross_entropy(logits, labels) -> Array:
  """Softmax cross-entropy averaged over the labelled pixels.

  Args:
    logits: float [B, H, W, C].
    labels: int [B, H, W]; IGNORE_LABEL (-1), or anything outside [0, C), is ignored.

  Returns:
    float32 scalar  Σ_{valid n} −log p_n[y_n] / max(#valid, 1): the mean over labelled pixels, as
    PyTorch's `CrossEntropyLoss(ignore_index=-1)`, but 0 (not NaN) when no pixel is labelled, with a
    zero (finite) gradient then.
  """
  logits = _f32(logits)
  labels = jnp.asarray(labels)
  num_classes = logits.shape[-1]
  valid = (labels >= 0) & (labels < num_classes)
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_p, safe[..., None], axis=-1)[..., 0]
  nll = jnp.where(valid, nll, 0.0)
  count = jnp.sum(valid.astype(jnp.float32))
  return jnp.sum(nll) / jnp.maximum(count, 1.0)


def max_square(logits, normalization: str = "reference") -> Array:
  """Maximum squares loss (`maxsquare` in the reference).

  reference: L = −Σ_{b,h,w,c} p² / (2·B·H·W·C)   (= −½·mean of p² over all elements)
  pixel:     L = −Σ_{b,h,w,c} p² / (2·B·H·W)     (the paper's −1/(2N)·Σ_n Σ_c p²)

  No pixel is masked; gradients flow through p. Its gradient w.r.t. p is −p/(B·H·W·C) (reference),
  linear in p, where entropy's −(log p + 1) grows without bound as p → 1 (the paper's point).
  """
  logits = _f32(logits)
  b, h, w, c = logits.shape
  p = jax.nn.softmax(logits, axis=-1)
  return -jnp.sum(p * p) / (2.0 * b * h * w * _class_divisor(c, normalization))


def image_wise_class_weights(logits, ratio: float = 0.2) -> Array:
  """Per-pixel image-wise class weights, detached, shaped [B, H, W, 1] to broadcast over classes.

  For image b, k(h,w) = argmax_c p and n_{b,k} = #pixels of b whose argmax is k (a one-hot sum,
  so Σ_k n_{b,k} = H·W). Each pixel takes w_b(k) = 1 / max(n_{b,k}^α · (H·W)^(1−α), 1) of its own
  argmax class, α = `ratio`. The result carries no gradient (jax.lax.stop_gradient).
  """
  logits = jax.lax.stop_gradient(_f32(logits))
  _, h, w, c = logits.shape
  onehot = jax.nn.one_hot(jnp.argmax(logits, axis=-1), c, dtype=jnp.float32)  # [B,H,W,C]
  counts = jnp.sum(onehot, axis=(1, 2))  # [B, C]
  hw = float(h * w)
  class_w = 1.0 / jnp.maximum(jnp.power(counts, ratio) * hw ** (1.0 - ratio), 1.0)  # [B, C]
  pixel_w = jnp.einsum("bhwc,bc->bhw", onehot, class_w)
  return jax.lax.stop_gradient(pixel_w[..., None])


def iw_max_square(logits, ratio: float = 0.2, normalization: str = "reference") -> Array:
  """Maximum squares with image-wise class-balanced weights (`IW_maxsquare`).

  reference: L = −Σ_{b,h,w,c} p² · w_b(k(h,w)) / (B·C)
  pixel:     L = −Σ_{b,h,w,c} p² · w_b(k(h,w)) / B
  with w from `image_wise_class_weights` (detached). There is no ½ factor, as in the reference:
  with balanced classes this is ≈ 2·C^α × `max_square` (≈ 3.6× at C = 19, α = 0.2). Since w already
  divides by ≈ H·W, the loss of a batch is the mean of its images' losses.
  """
  logits = _f32(logits)
  b, _, _, c = logits.shape
  p = jax.nn.softmax(logits, axis=-1)
  weights = image_wise_class_weights(logits, ratio)
  return -jnp.sum(p * p * weights) / (b * _class_divisor(c, normalization))


def entropy(logits, normalization: str = "reference") -> Array:
  """Entropy minimisation baseline (`entropy`, "MinEnt").

  reference: L = Σ_{b,h,w,c} −p·log p / (B·H·W·C)   (mean per-pixel entropy in nats, divided by C)
  pixel:     L = Σ_{b,h,w,c} −p·log p / (B·H·W)     (mean per-pixel entropy)
  p is not detached; log p comes from log_softmax. No log(C) normalisation (unlike ADVENT).
  """
  logits = _f32(logits)
  b, h, w, c = logits.shape
  log_p = jax.nn.log_softmax(logits, axis=-1)
  p = jnp.exp(log_p)
  return -jnp.sum(p * log_p) / (b * h * w * _class_divisor(c, normalization))


def iw_entropy(logits, ratio: float = 0.2, normalization: str = "reference") -> Array:
  """Entropy with image-wise class weights (`IW_entropy`).

  reference: L = Σ_{b,h,w,c} −p·log p · w_b(k(h,w)) / (B·C)
  pixel:     L = Σ_{b,h,w,c} −p·log p · w_b(k(h,w)) / B
  with the same detached weights as `iw_max_square`.
  """
  logits = _f32(logits)
  b, _, _, c = logits.shape
  log_p = jax.nn.log_softmax(logits, axis=-1)
  p = jnp.exp(log_p)
  weights = image_wise_class_weights(logits, ratio)
  return -jnp.sum(p * log_p * weights) / (b * _class_divisor(c, normalization))


def hard_pseudo_labels(logits, threshold: float = 0.95) -> Array:
  """Pseudo-labels argmax_c p of detached p, IGNORE_LABEL where max_c p ≤ threshold. int32 [B,H,W]."""
  p = jax.nn.softmax(jax.lax.stop_gradient(_f32(logits)), axis=-1)
  confident = jnp.max(p, axis=-1) > threshold
  return jnp.where(confident, jnp.argmax(p, axis=-1), IGNORE_LABEL).astype(jnp.int32)


def hard_pseudo_label(logits, threshold: float = 0.95) -> Array:
  """Self-training with hard pseudo-labels (`hard`).

  L = cross_entropy(logits, ŷ), ŷ = argmax_c p (p detached) where max_c p > threshold, else ignored.
  Mean over the kept pixels of the whole batch; 0 with a zero gradient when none is kept (the
  reference returns NaN there).
  """
  return cross_entropy(logits, hard_pseudo_labels(logits, threshold))


def multi_level_guidance(main_logits, aux_logits, threshold: float = 0.95) -> tuple[Array, Array]:
  """Multi-level self-produced guidance for the aux (layer3) head on target images.

  Labels ŷ = argmax_c (p_main + p_aux)/2, both detached; a pixel is kept only where
  max_c p_main > τ or max_c p_aux > τ (τ = threshold), else ignored.

  Args:
    main_logits, aux_logits: float [B, H, W, C] of the two heads on the same target batch.

  Returns:
    (loss, fraction_kept): cross_entropy(aux_logits, ŷ) (gradient flows into aux_logits only; 0
    when nothing is kept) and the float32 fraction of the B·H·W pixels kept.
  """
  p_main = jax.nn.softmax(jax.lax.stop_gradient(_f32(main_logits)), axis=-1)
  p_aux = jax.nn.softmax(jax.lax.stop_gradient(_f32(aux_logits)), axis=-1)
  keep = (jnp.max(p_main, axis=-1) > threshold) | (jnp.max(p_aux, axis=-1) > threshold)
  labels = jnp.where(keep, jnp.argmax(p_main + p_aux, axis=-1), IGNORE_LABEL).astype(jnp.int32)
  loss = cross_entropy(aux_logits, labels)
  return loss, jnp.mean(keep.astype(jnp.float32))


# --- Target-loss registry -------------------------------------------------------------------------

# Built-in target losses, by config name (`config.loss.target`). Each is fn(logits, **options).
BUILTIN_TARGET_LOSSES: dict[str, Callable[..., Array]] = {
    "max_square": max_square,
    "iw_max_square": iw_max_square,
    "entropy": entropy,
    "iw_entropy": iw_entropy,
    "hard_pseudo_label": hard_pseudo_label,
}

# The reference's `--target_mode` spellings, accepted as synonyms.
REFERENCE_ALIASES = {
    "maxsquare": "max_square",
    "IW_maxsquare": "iw_max_square",
    "IW_entropy": "iw_entropy",
    "hard": "hard_pseudo_label",
}


def _resolve_error(name, why: str, candidates=()) -> ValueError:
  if isinstance(name, str):
    why += did_you_mean(name, list(candidates))
  return ValueError(
      f"Unknown target loss {name!r}: {why}. Use a built-in name, one of "
      f"{', '.join(sorted(BUILTIN_TARGET_LOSSES))}, or a user function as "
      f"'package.module:function' (importable from the working directory or PYTHONPATH, "
      f"called as function(logits, **options) -> scalar), e.g. "
      f"--config.loss.target=mypkg.losses:my_loss.")


def canonical_target_name(name: str) -> str:
  """The built-in name for `name` (reference aliases mapped), or `name` unchanged."""
  return REFERENCE_ALIASES.get(name, name)


def resolve_target_loss(name) -> Callable[..., Array]:
  """Returns the target-loss function named by `name`.

  `name` is a key of BUILTIN_TARGET_LOSSES (or a reference `--target_mode` alias), or
  "package.module:function": the module is imported with importlib and the function taken from it.
  A callable is returned unchanged. Anything else raises ValueError listing the built-in names.
  """
  if callable(name):
    return name
  if not isinstance(name, str) or not name:
    raise _resolve_error(name, "expected a non-empty string")
  name = canonical_target_name(name)
  if name in BUILTIN_TARGET_LOSSES:
    return BUILTIN_TARGET_LOSSES[name]
  if ":" not in name:
    raise _resolve_error(name, "not a built-in name and not of the form 'module:function'",
                         list(BUILTIN_TARGET_LOSSES) + list(REFERENCE_ALIASES))
  module_name, _, attr = name.partition(":")
  if not module_name or not attr or ":" in attr:
    raise _resolve_error(name, "expected exactly 'module:function'")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise _resolve_error(name, f"cannot import module {module_name!r} ({e})") from e
  fn = module
  for part in attr.split("."):
    if not hasattr(fn, part):
      public = [f"{module_name}:{a}" for a in dir(module) if not a.startswith("_")]
      raise _resolve_error(name, f"module {module_name!r} has no attribute {attr!r}", public)
    fn = getattr(fn, part)
  if not callable(fn):
    raise _resolve_error(name, f"{module_name}.{attr} is not callable")
  return fn


def check_target_loss(fn: Callable[..., Array], options: dict, num_classes: int) -> None:
  """Traces `fn(logits, **options)` on abstract float32 logits [2, 4, 4, num_classes] (jax.eval_shape:
  nothing is computed) and raises ValueError unless it is traceable and returns a float scalar, so
  that a user's loss that is not fails before anything compiles. A target loss runs inside jax.jit
  and jax.grad: a pure jax.numpy function of the logits."""
  returned = []

  def call(logits):
    value = fn(logits, **options)
    returned.append(value)
    return value if isinstance(value, (jax.Array, float, int)) and not isinstance(value, bool) else jnp.zeros(())

  try:
    out = jax.eval_shape(call, jax.ShapeDtypeStruct((2, 4, 4, num_classes), jnp.float32))
  except Exception as e:  # Whatever a user's function raises when traced.
    reason = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    source = getattr(getattr(fn, "__code__", None), "co_filename", None)
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == source]
    at = f" at {source} line {lines[-1]}" if lines else ""
    raise ValueError(f"calling it on traced logits float32[B, H, W, C] raised {type(e).__name__}{at}: {reason}; a target "
                     "loss runs inside jax.jit and jax.grad: write it with jax.numpy only (no np.asarray, float() or "
                     "Python if on array values); docs/losses.md") from None
  value = returned[-1]
  if not isinstance(value, (jax.Array, float, int)) or isinstance(value, bool):
    raise ValueError(f"it returned a {type(value).__name__}, not a number; a target loss returns a float scalar "
                     "(e.g. jnp.mean(...))")
  if out.shape != () or not jnp.issubdtype(out.dtype, jnp.floating):
    raise ValueError(f"it returned {out.dtype}{list(out.shape)}, not a float scalar (e.g. reduce with jnp.mean)")
