"""The reference optimiser: SGD momentum 0.9 with PyTorch-style (coupled) weight decay, a poly
learning-rate schedule, heads (layer5, layer6) at 10x the backbone's lr, and the stem BN's
gamma/beta not trained (METHOD.md §3, §5).

Parameters that get no gradient in the reference (the aux head `layer5` without multi-level, the
unused ASPP branches) are skipped by PyTorch's SGD and so are never decayed; here they are labelled
"frozen" so they stay exactly at their initial values too.
"""

import re

import flax
import jax.numpy as jnp
import optax

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


def _sgd(learning_rate, momentum: float, weight_decay: float) -> optax.GradientTransformation:
  # PyTorch SGD: g <- g + wd*theta; buf <- m*buf + g; theta <- theta - lr*buf.
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.trace(decay=momentum, nesterov=False),
                     optax.scale_by_learning_rate(learning_rate))


def make_optimizer(optim_config, *, schedule_steps: int, params, multi_level: bool, aspp_branches: int):
  """Returns (optax transform, backbone lr schedule) for `params` from config.optim."""
  schedule = poly_schedule(optim_config.lr, schedule_steps, optim_config.poly_power)
  head_schedule = poly_schedule(optim_config.lr * optim_config.head_lr_mult, schedule_steps,
                                optim_config.poly_power)
  transforms = {
      "backbone": _sgd(schedule, optim_config.momentum, optim_config.weight_decay),
      "head": _sgd(head_schedule, optim_config.momentum, optim_config.weight_decay),
      "frozen": optax.set_to_zero(),
  }
  labels = parameter_labels(params, multi_level=multi_level, aspp_branches=aspp_branches)
  return optax.multi_transform(transforms, labels), schedule
