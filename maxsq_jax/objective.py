"""The UDA objective of MaxSquare (docs/method.md, Losses: "Per step"), built from `config.loss`.

    total = CE_s(main) + [λ_seg·CE_s(aux)]                    <- Objective.source_loss
          + λ_T·L_T(main target) + [λ_seg·λ_T·CE_guide(aux)]  <- Objective.target_loss
    ([...] only when loss.multi_level)

The source and the target terms are separate functions because the reference runs two separate
forward/backward passes (separate BatchNorm statistics) and sums their gradients. Both are pure and
jit-able; the target function is resolved once, in `make_objective`, so a mistyped
`loss.target` fails before anything compiles.

`config.loss` fields: target (built-in name or "package.module:function"), lambda_target,
lambda_seg, multi_level, iw_ratio, threshold, normalization ("reference" | "pixel").
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from maxsq_jax import losses

Array = jax.Array
Metrics = dict[str, Array]

# config.loss field -> keyword argument of a target-loss function.
_OPTION_FIELDS = {"iw_ratio": "ratio", "threshold": "threshold", "normalization": "normalization"}


def target_loss_options(loss_config: Mapping[str, Any], fn: Callable[..., Array]) -> dict[str, Any]:
  """Keyword arguments, from `loss_config`, to call the target loss `fn(logits, **options)` with.

  The candidates are ratio (= loss.iw_ratio), threshold (= loss.threshold) and normalization
  (= loss.normalization). A function gets those whose names are parameters of its signature
  (inspect.signature), or all three if it takes **kwargs. For the built-ins this gives
  ratio+normalization to iw_*, normalization to max_square/entropy, threshold to hard_pseudo_label.
  """
  candidates = {kw: loss_config[field] for field, kw in _OPTION_FIELDS.items() if field in loss_config}
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):  # Some builtins/C callables have no signature: pass nothing.
    return {}
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
    return dict(candidates)
  accepted = {
      n for n, p in params.items()
      if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
  }
  return {k: v for k, v in candidates.items() if k in accepted}


def target_metric_name(target: Any, fn: Callable[..., Array]) -> str:
  """Metric key of the unweighted target term: "target_<built-in name>" or "target_<fn name>"."""
  if isinstance(target, str) and losses.canonical_target_name(target) in losses.BUILTIN_TARGET_LOSSES:
    return "target_" + losses.canonical_target_name(target)
  name = getattr(fn, "__name__", "") or "loss"
  name = re.sub(r"[^0-9A-Za-z_]+", "_", name).strip("_") or "loss"
  return "target_" + name


@dataclasses.dataclass(frozen=True)
class Objective:
  """The two halves of the UDA objective, pure functions of the model outputs.

  source_loss(main_logits, aux_logits, labels) -> (loss, metrics)
      loss = CE(main) + [λ_seg·CE(aux)]; metrics: source_ce, [source_ce_aux], source_total.
  target_loss(main_logits, aux_logits) -> (loss, metrics)
      loss = λ_T·L_T(main) + [λ_seg·λ_T·guidance_CE(aux)];
      metrics: <target_metric> (e.g. target_max_square), [target_guidance_ce,
      guidance_kept_fraction], target_total.
  Every metric is an unweighted term except the *_total ones (the weighted loss returned).
  aux_logits may be None when multi_level is False. Unpacks as (source_loss, target_loss).
  """

  source_loss: Callable[..., tuple[Array, Metrics]]
  target_loss: Callable[..., tuple[Array, Metrics]]
  target_fn: Callable[..., Array]
  target_options: dict[str, Any]
  target_metric: str
  multi_level: bool

  def __iter__(self):
    return iter((self.source_loss, self.target_loss))


def make_objective(loss_config: Mapping[str, Any]) -> Objective:
  """Builds the objective from `config.loss` (see the module docstring for the fields).

  Raises ValueError for an unknown target loss (listing the built-ins), an unknown normalization,
  or a negative weight.
  """
  target = loss_config["target"]
  fn = losses.resolve_target_loss(target)
  normalization = loss_config.get("normalization", "reference")
  if normalization not in losses.NORMALIZATIONS:
    raise ValueError(
        f"Unknown loss.normalization {normalization!r}; expected one of {losses.NORMALIZATIONS}.")
  lambda_target = float(loss_config["lambda_target"])
  lambda_seg = float(loss_config.get("lambda_seg", 0.1))
  multi_level = bool(loss_config.get("multi_level", False))
  threshold = float(loss_config.get("threshold", 0.95))
  if lambda_target < 0 or lambda_seg < 0:
    raise ValueError(f"Loss weights must be >= 0, got lambda_target={lambda_target}, "
                     f"lambda_seg={lambda_seg}.")
  options = target_loss_options(loss_config, fn)
  metric = target_metric_name(target, fn)

  def source_loss(main_logits, aux_logits, labels):
    ce = losses.cross_entropy(main_logits, labels)
    metrics = {"source_ce": ce}
    loss = ce
    if multi_level:
      ce_aux = losses.cross_entropy(aux_logits, labels)
      metrics["source_ce_aux"] = ce_aux
      loss = loss + lambda_seg * ce_aux
    metrics["source_total"] = loss
    return loss, metrics

  def target_loss(main_logits, aux_logits):
    value = fn(main_logits, **options)
    if jnp.shape(value) != ():
      raise ValueError(f"Target loss {target!r} must return a scalar, got shape {jnp.shape(value)}.")
    value = jnp.asarray(value).astype(jnp.float32)
    metrics = {metric: value}
    loss = lambda_target * value
    if multi_level:
      guide, kept = losses.multi_level_guidance(main_logits, aux_logits, threshold)
      metrics["target_guidance_ce"] = guide
      metrics["guidance_kept_fraction"] = kept
      loss = loss + lambda_seg * lambda_target * guide
    metrics["target_total"] = loss
    return loss, metrics

  return Objective(source_loss=source_loss, target_loss=target_loss, target_fn=fn,
                   target_options=options, target_metric=metric, multi_level=multi_level)
