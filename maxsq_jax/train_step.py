"""The train state (one pytree) and the pure train step.

`train_step(state, source_batch[, target_batch]) -> (state, metrics)` runs the source forward pass,
then (stage "adapt", which takes the target batch) the target forward pass with the BatchNorm running statistics threaded from
the first into the second, sums the losses (the same gradient as the reference's two backward
passes), and applies one SGD update. A non-finite loss leaves the state unchanged and is reported
in the metrics, so the host can stop with the last good state intact.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: updates applied so far.
  params: Any
  batch_stats: Any
  opt_state: Any


def init_state(model, tx: optax.GradientTransformation, rng, image_shape) -> TrainState:
  """Initialises the variables for images of shape [B, H, W, 3] and the state of the optimiser `tx`."""
  variables = model.init(rng, jnp.zeros(image_shape, jnp.float32), train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))


def make_train_step(model, objective, tx: optax.GradientTransformation, lr_schedule, stage: str):
  """Builds the pure step; `stage` is "source_only" (the step takes no target batch) or "adapt".

  Batches: {"image": float32 [B, H, W, 3]} and, for the source, "label": int32 [B, H, W] (-1: ignored).
  """
  if stage not in ("source_only", "adapt"):
    raise ValueError(f"config.stage={stage!r}: use 'source_only', 'adapt' or 'source_then_adapt'.")

  def loss_fn(params, batch_stats, source_batch, target_batch):
    (main, aux), updates = model.apply({"params": params, "batch_stats": batch_stats}, source_batch["image"],
                                       train=True, mutable=["batch_stats"])
    loss, terms = objective.source_loss(main, aux, source_batch["label"])
    batch_stats = updates["batch_stats"]
    if stage == "adapt":
      (main_t, aux_t), updates = model.apply({"params": params, "batch_stats": batch_stats},
                                             target_batch["image"], train=True, mutable=["batch_stats"])
      target_loss, target_terms = objective.target_loss(main_t, aux_t)
      loss = loss + target_loss
      terms = {**terms, **target_terms}
      batch_stats = updates["batch_stats"]
    return loss, (batch_stats, terms)

  def train_step(state: TrainState, source_batch, target_batch=None):
    (loss, (batch_stats, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, source_batch, target_batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                           batch_stats=batch_stats, opt_state=opt_state)
    # A non-finite loss or update (e.g. from a bad learning rate) leaves the state untouched.
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(updates))
    new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    metrics = {"loss": loss, "learning_rate": lr_schedule(state.step), "grad_norm": optax.global_norm(grads),
               "nonfinite": jnp.logical_not(finite).astype(jnp.int32), **terms}
    return new_state, metrics

  return train_step
