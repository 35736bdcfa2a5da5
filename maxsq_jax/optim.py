"""The reference optimiser: SGD momentum 0.9 with PyTorch-style (coupled) weight decay, a poly
learning-rate schedule, heads (layer5, layer6) at 10x the backbone's lr, and the stem BN's
gamma/beta not trained.

Parameters that get no gradient in the reference (the aux head `layer5` without multi-level, the
unused ASPP branches) are skipped by PyTorch's SGD and so are never decayed; here they are labelled
"frozen" so they stay exactly at their initial values too.

Two rules (`config.optim.rule`, docs/fidelity.md):
  "nominal":   every tensor is stepped once per step: g += wd*p; buf = m*buf + g; p -= lr*buf.
  "reference": what the authors' code computes. Its backbone param group lists a tensor once per
    PyTorch module that encloses it (`get_1x_lr_params_NOscale` walks `modules()` and yields each
    one's recursive `parameters()`): a bottleneck tensor 3 times, a downsample tensor 4 times, the
    stem conv once; the head group lists each tensor once. PyTorch <= 1.4's SGD (1.0.0 produced
    the paper's numbers) steps every listed entry in turn, adding the decay into `p.grad` in place
    (so it accumulates across a tensor's entries) and sharing one momentum buffer per tensor.
Both keep the same optimiser state (a momentum buffer per tensor and a step count per group), so
a checkpoint written under one rule restores under the other.
"""

import re
from typing import Callable

import flax
import jax
import jax.numpy as jnp
import optax

from maxsq_jax.models import convert

RULES = ("reference", "nominal")
_HEADS = ("layer5", "layer6")
_BRANCH_INDEX = re.compile(r"(\d+)$")


def poly_schedule(base_lr: float, schedule_steps: int, power: float) -> optax.Schedule:
  """lr_t = base * (1 - t / schedule_steps) ** power, clamped at 0 past the end."""

  def schedule(step):
    # Clamp before the power: 1 - t/T can round to a tiny negative number, and x**0.9 of it is NaN.
    remaining = jnp.maximum(1.0 - jnp.asarray(step, jnp.float32) / schedule_steps, 0.0)
    return base_lr * remaining ** power

  return schedule


def parameter_labels(params, *, multi_level: bool, aspp_branches: int):
  """Labels each parameter "backbone", "head" or "frozen" by its path (see module docstring)."""
  flat = flax.traverse_util.flatten_dict(params)
  labels = {}
  for path, _ in flat.items():
    top = path[0]
    if top == "bn1":
      label = "frozen"
    elif top in _HEADS:
      label = "head"
      if top == "layer5" and not multi_level:
        label = "frozen"
      branch = _BRANCH_INDEX.search(path[1]) if len(path) > 1 else None
      if branch is not None and int(branch.group(1)) >= aspp_branches:
        label = "frozen"
    else:
      label = "backbone"
    labels[path] = label
  return flax.traverse_util.unflatten_dict(labels)


def reference_listing_count(path: tuple[str, ...]) -> int:
  """How many entries the reference's optimiser has for the parameter at flax `path`.

  The head group (`get_10x_lr_params`: layer5/layer6 `.parameters()`) lists each tensor once. The
  backbone group walks `modules()` of conv1, bn1, layer1..layer4 and lists each module's recursive
  `parameters()`, so a tensor is listed once per module on its PyTorch key's dotted path:
  `conv1.weight` 1, `layer3.7.bn2.bias` 3 (layer3, layer3.7, layer3.7.bn2),
  `layer1.0.downsample.0.weight` 4.
  """
  if path[0] in _HEADS:
    return 1
  return len(convert.torch_key(path).split(".")) - 1


def reference_listing_counts(params):
  """The pytree of `reference_listing_count` for every leaf of `params` (same structure)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: reference_listing_count(_key_names(p)), params)


def _key_names(key_path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", k)) for k in key_path)


def nominal_sgd(learning_rate, momentum: float, weight_decay: float) -> optax.GradientTransformation:
  # PyTorch SGD: g <- g + wd*theta; buf <- m*buf + g; theta <- theta - lr*buf.
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.trace(decay=momentum, nesterov=False),
                     optax.scale_by_learning_rate(learning_rate))


def listed_sgd(learning_rate: optax.ScalarOrSchedule, momentum: float, weight_decay: float,
               listing_count: Callable[[tuple[str, ...]], int]) -> optax.GradientTransformation:
  """PyTorch <= 1.4 SGD over a parameter list in which the tensor at path q appears listing_count(q) times.

  Per entry, in turn: g += wd * p (g accumulates across the tensor's entries, as PyTorch adds the
  decay into p.grad in place); buf = m * buf + g (one buffer per tensor); p -= lr * buf. The
  update returned is the sum of the entries' changes. `listing_count` gets a leaf's key path as a
  tuple of names (e.g. ("layer1", "block_0", "conv1", "kernel")). With every count 1 and a schedule
  for `learning_rate` (as make_optimizer passes) this is `nominal_sgd` bit for bit, with a state of
  the same structure (EmptyState, TraceState, ScaleByScheduleState): checkpoints restore across them.
  """
  schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

  def init(params):
    return (optax.EmptyState(), optax.TraceState(trace=optax.tree_utils.tree_zeros_like(params)),
            optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32)))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("listed_sgd needs the parameters: call update(grads, state, params).")
    decay_state, trace_state, schedule_state = state
    lr = schedule(schedule_state.count)

    def step(key_path, grad, buf, param):
      delta = jnp.zeros_like(param)  # Accumulated change of the parameter over its entries.
      for _ in range(listing_count(_key_names(key_path))):
        grad = grad + weight_decay * (param + delta)
        buf = momentum * buf + grad
        delta = delta - jnp.asarray(lr, param.dtype) * buf
      return delta, buf

    steps = jax.tree_util.tree_map_with_path(step, updates, trace_state.trace, params)
    deltas, bufs = jax.tree_util.tree_transpose(jax.tree_util.tree_structure(updates),
                                                jax.tree_util.tree_structure((0, 0)), steps)
    return deltas, (decay_state, optax.TraceState(trace=bufs),
                    optax.ScaleByScheduleState(count=optax.safe_increment(schedule_state.count)))

  return optax.GradientTransformation(init, update)


def make_optimizer(optim_config, *, schedule_steps: int, params, multi_level: bool, aspp_branches: int):
  """Returns (optax transform, backbone lr schedule) for `params` from config.optim (its `rule` above)."""
  rule = optim_config.rule
  if rule not in RULES:
    raise ValueError(f"config.optim.rule={rule!r}: use one of {', '.join(RULES)}.")
  schedule = poly_schedule(optim_config.lr, schedule_steps, optim_config.poly_power)
  head_schedule = poly_schedule(optim_config.lr * optim_config.head_lr_mult, schedule_steps,
                                optim_config.poly_power)
  if rule == "reference":
    sgd = lambda lr: listed_sgd(lr, optim_config.momentum, optim_config.weight_decay, reference_listing_count)
  else:
    sgd = lambda lr: nominal_sgd(lr, optim_config.momentum, optim_config.weight_decay)
  transforms = {"backbone": sgd(schedule), "head": sgd(head_schedule), "frozen": optax.set_to_zero()}
  labels = parameter_labels(params, multi_level=multi_level, aspp_branches=aspp_branches)
  return optax.multi_transform(transforms, labels), schedule
