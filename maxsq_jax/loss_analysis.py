"""Gradient analysis of target losses, computed with `jax.grad` of the loss functions themselves.

Any function `config.loss.target` accepts (a built-in name or "package.module:function") is analysed
unchanged: nothing here knows a derivative by hand.

* `curves`: the gradient of a loss on one pixel as a function of the probability p of its predicted
  class, with the remaining mass 1 − p spread evenly over the other C − 1 classes: dL/dp along that
  path (the paper's Fig. 2 view: entropy's grows without bound as p → 1, max-squares' stays bounded)
  and ||∂L/∂logits||₂. The pixel is a whole image (B = H = W = 1), so per-pixel normalisations are 1
  and the image-wise weight of its only class is 1.
* `make_run_statistics` / `summarize`: on a model's predictions, the per-pixel gradient norm
  ||∂L/∂logits[b, h, w, :]||₂ of each loss applied to each image alone (a batch of one, as the
  reference trains), summed per (predicted class, confidence bin); from those sums, the share of the
  total gradient per confidence bin, above max p ≥ 0.9 / 0.99, and per predicted class.
* `make_source_statistics` / `gradient_ratios`: the same per-pixel norm of the source cross-entropy on
  labelled source images, and the ratio λ_T × (a target loss's mean per-pixel norm) / (the
  cross-entropy's): how strongly the target term pulls on the network next to the supervised term.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from maxsq_jax import losses, objective
from maxsq_jax.errors import ConfigError

# Bins of a pixel's confidence (max_c p): edges, left-closed. 0.9 and 0.99 are edges, so the shares
# "above 0.9 / 0.99" are sums of whole bins.
CONFIDENCE_EDGES = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)
HIGH_CONFIDENCE = (0.9, 0.99)
# config.loss fields a loss spec may set (the options training passes to a target loss).
OPTION_TYPES = {"iw_ratio": float, "threshold": float, "normalization": str}


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """A target loss to analyse: `fn(logits, **options)`, shown as `label`."""
  name: str
  fn: Callable[..., jax.Array]
  options: dict[str, Any]
  label: str

  def __call__(self, logits):
    return self.fn(logits, **self.options)


def parse_loss_spec(spec: str, defaults: dict[str, Any]) -> LossSpec:
  """A LossSpec from "NAME" or "NAME@field=value,field=value".

  NAME is anything `config.loss.target` accepts; the fields are the config.loss options
  (iw_ratio, threshold, normalization), default `defaults` (e.g. a run's config.loss). The function
  receives exactly the options training would give it (objective.target_loss_options). Raises
  ConfigError naming the spec for an unknown loss, field or value.
  """
  name, _, option_text = spec.partition("@")
  try:
    fn = losses.resolve_target_loss(name.strip())
  except ValueError as e:  # Its message lists the built-ins and suggests the closest.
    raise ConfigError(f"--loss={spec}: {e}") from e
  fields = dict(defaults)
  given = {}
  for item in filter(None, (s.strip() for s in option_text.split(","))):
    key, eq, value = item.partition("=")
    if not eq or key not in OPTION_TYPES:
      raise ConfigError(f"--loss={spec}: option {item!r} is not FIELD=VALUE with FIELD one of "
                       f"{', '.join(OPTION_TYPES)} (e.g. --loss=iw_max_square@iw_ratio=0.3)")
    try:
      given[key] = OPTION_TYPES[key](value)
    except ValueError as e:
      raise ConfigError(f"--loss={spec}: {key}={value!r} is not a {OPTION_TYPES[key].__name__}") from e
  fields.update(given)
  if fields.get("normalization", "reference") not in losses.NORMALIZATIONS:
    raise ConfigError(f"--loss={spec}: normalization must be one of {losses.NORMALIZATIONS}")
  options = objective.target_loss_options(fields, fn)
  shown = {k: v for k, v in given.items() if objective.target_loss_options({k: v}, fn)}
  label = name.strip() + (" (" + ", ".join(f"{k}={v}" for k, v in shown.items()) + ")" if shown else "")
  return LossSpec(name=name.strip(), fn=fn, options=options, label=label)


def check_scalar(spec: LossSpec, num_classes: int) -> None:
  """Raises ConfigError unless the loss can be traced and returns a float scalar (losses.check_target_loss,
  the check config validation makes of config.loss.target)."""
  try:
    losses.check_target_loss(spec, {}, num_classes)
  except ValueError as e:
    raise ConfigError(f"--loss={spec.name}: {e}") from None


# --- Curves -----------------------------------------------------------------------------------------


def probability_grid(num_classes: int, num_points: int = 200, closest: float = 1e-5) -> np.ndarray:
  """float64 [num_points]: p from just above 1/C to 1 − `closest`, evenly spaced in logit(p)."""
  lo, hi = 1.0 / num_classes, 1.0 - closest
  logit = lambda q: np.log(q) - np.log1p(-q)
  t = np.linspace(logit(lo) + 1e-2, logit(hi), num_points)
  return 1.0 / (1.0 + np.exp(-t))


def pixel_logits(p, num_classes: int):
  """Logits [1, 1, 1, C] of a pixel whose class 0 has probability p, the others (1 − p)/(C − 1) each."""
  rest = jnp.log1p(-p) - jnp.log(num_classes - 1.0)
  return jnp.concatenate([jnp.log(p)[None], jnp.full((num_classes - 1,), rest)]).reshape(1, 1, 1, num_classes)


def curves(spec: LossSpec, num_classes: int, probabilities) -> dict[str, np.ndarray]:
  """{"dloss_dp": [N], "dloss_dlogits_norm": [N]} of `spec` on one pixel at each probability.

  dloss_dp = d/dp L(pixel_logits(p)) (the derivative along the path that moves mass from the other
  classes evenly to the predicted one); dloss_dlogits_norm = ||∂L/∂logits||₂ at that pixel.
  """
  p = jnp.asarray(probabilities, jnp.float32)
  along = jax.vmap(jax.grad(lambda q: spec(pixel_logits(q, num_classes))))(p)
  wrt_logits = jax.vmap(lambda q: jnp.linalg.norm(jax.grad(spec)(pixel_logits(q, num_classes))))(p)
  return {"dloss_dp": np.asarray(along, np.float64), "dloss_dlogits_norm": np.asarray(wrt_logits, np.float64)}


# --- On a model's predictions --------------------------------------------------------------------


def per_pixel_gradient_norms(spec: LossSpec, logits):
  """float32 [B, H, W]: ||∂L(image b alone)/∂logits[b, h, w, :]||₂ for logits [B, H, W, C]."""
  grads = jax.vmap(lambda z: jax.grad(spec)(z[None])[0])(logits.astype(jnp.float32))
  return jnp.linalg.norm(grads, axis=-1)


def make_run_statistics(specs, num_classes: int, edges=CONFIDENCE_EDGES):
  """statistics(logits [B,H,W,C], mask [B] bool) -> {"gradient": [L, C, K] float32 sums of per-pixel
  gradient norms per (loss, predicted class, confidence bin), "pixels": [C, K] int32 counts}.
  Pixels of masked-out (padding) images count nowhere. K = len(edges) − 1."""
  inner_edges = jnp.asarray(edges[1:-1], jnp.float32)
  num_bins = len(edges) - 1

  def statistics(logits, mask):
    logits = logits.astype(jnp.float32)
    p = jax.nn.softmax(logits, axis=-1)
    confidence, predicted = jnp.max(p, axis=-1), jnp.argmax(p, axis=-1)
    bins = jnp.searchsorted(inner_edges, confidence, side="right")
    cell = (predicted * num_bins + bins).reshape(-1)  # [B·H·W] index of (class, bin)
    weight = jnp.broadcast_to(mask[:, None, None], confidence.shape).astype(jnp.float32).reshape(-1)
    norms = jnp.stack([per_pixel_gradient_norms(s, logits).reshape(-1) for s in specs])  # [L, B·H·W]
    sums = jax.vmap(lambda n: jax.ops.segment_sum(n * weight, cell, num_segments=num_classes * num_bins))(norms)
    gradient = sums.reshape(len(specs), num_classes, num_bins)
    pixels = jax.ops.segment_sum(weight, cell, num_segments=num_classes * num_bins)
    pixels = pixels.astype(jnp.int32).reshape(num_classes, num_bins)
    return {"gradient": gradient, "pixels": pixels}

  return statistics


def summarize(gradient, pixels, labels, class_names, edges=CONFIDENCE_EDGES) -> dict:
  """JSON-ready shares from summed statistics.

  Args:
    gradient: [L, C, K] sums of per-pixel gradient norms (make_run_statistics), float64 is best.
    pixels: [C, K] pixel counts. labels: L loss labels. class_names: C names.
  Returns {"bins": [[lo, hi], ...], "pixel_share_per_bin": [K], "num_pixels", "classes": {...},
  "losses": {label: {"share_per_bin": [K] (sums to 1), "mean_norm_per_bin": [K] (None for empty bins),
  "share_above": {"0.9": s, "0.99": s}, "share_per_class": {name: s} (sums to 1),
  "share_above_per_class": {"0.9": {name: share of that class's gradient}}, "total": float}}}.
  """
  gradient, pixels = np.asarray(gradient, np.float64), np.asarray(pixels, np.int64)
  lower = np.asarray(edges[:-1])
  total_pixels = int(pixels.sum())
  per_bin_pixels = pixels.sum(axis=0)
  per_class_pixels = pixels.sum(axis=1)
  present = [i for i, n in enumerate(per_class_pixels) if n > 0]
  out = {"bins": [[edges[k], edges[k + 1]] for k in range(len(edges) - 1)], "num_pixels": total_pixels,
         "pixel_share_per_bin": (per_bin_pixels / max(total_pixels, 1)).tolist(),
         "pixel_share_above": {str(t): float(per_bin_pixels[lower >= t].sum() / max(total_pixels, 1))
                               for t in HIGH_CONFIDENCE},
         "pixel_share_per_class": {class_names[i]: float(per_class_pixels[i] / max(total_pixels, 1)) for i in present},
         "losses": {}}
  for label, g in zip(labels, gradient):
    total = float(g.sum())
    safe = total if total > 0 else 1.0
    per_bin, per_class = g.sum(axis=0), g.sum(axis=1)
    out["losses"][label] = {
        "total": total,
        "share_per_bin": (per_bin / safe).tolist(),
        "mean_norm_per_bin": [float(s / n) if n else None for s, n in zip(per_bin, per_bin_pixels)],
        "share_above": {str(t): float(per_bin[lower >= t].sum() / safe) for t in HIGH_CONFIDENCE},
        "share_per_class": {class_names[i]: float(per_class[i] / safe) for i in present},
        "share_above_per_class": {str(t): {class_names[i]: float(g[i, lower >= t].sum() / per_class[i])
                                           if per_class[i] > 0 else None for i in present}
                                  for t in HIGH_CONFIDENCE},
    }
  return out


def make_source_statistics():
  """statistics(logits [B,H,W,C], labels [B,H,W] int, mask [B] bool) -> {"gradient": float32 sum of the
  per-pixel ||∂CE(image b alone)/∂logits[b, h, w, :]||₂, "pixels": int32 count}, over every pixel of the
  real (mask) images (ignored pixels have a zero gradient and count, as in the target losses' means)."""

  def ce_norms(logits, labels):
    grads = jax.vmap(lambda z, y: jax.grad(losses.cross_entropy)(z[None], y[None])[0])(logits, labels)
    return jnp.linalg.norm(grads, axis=-1)

  def statistics(logits, labels, mask):
    norms = ce_norms(logits.astype(jnp.float32), labels)
    weight = jnp.broadcast_to(mask[:, None, None], norms.shape).astype(jnp.float32)
    return {"gradient": jnp.sum(norms * weight), "pixels": jnp.sum(weight).astype(jnp.int32)}

  return statistics


def gradient_ratios(target_summary: dict, source_gradient: float, source_pixels: int,
                    lambda_target: float) -> dict:
  """{"source_ce_mean_norm", "lambda_target", "losses": {label: {"mean_norm", "ratio"}}}: each target
  loss's mean per-pixel gradient norm (summarize's total / num_pixels) and λ_T × it / the source
  cross-entropy's mean (None when that is 0)."""
  source_mean = source_gradient / max(source_pixels, 1)
  out = {"source_ce_mean_norm": source_mean, "source_pixels": int(source_pixels),
         "lambda_target": float(lambda_target), "losses": {}}
  for label, stats in target_summary["losses"].items():
    mean = stats["total"] / max(target_summary["num_pixels"], 1)
    out["losses"][label] = {"mean_norm": mean,
                            "ratio": lambda_target * mean / source_mean if source_mean > 0 else None}
  return out
