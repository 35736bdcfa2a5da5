"""Evaluation on the target split: a confusion matrix summed on device over every example exactly
once (padding masked), per-class IoU printed under class names, pictures of predictions.

Writes into the workdir: `eval/step_<N>/confusion.npy`, `eval/step_<N>/results.json`,
`eval/step_<N>/pred_<i>.png` (image | label | prediction) and TensorBoard scalars and images.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from maxsq_jax import metrics as metrics_lib, train_step as step_lib, visualize
from maxsq_jax.data import classes


class Evaluator:
  """Compiles the eval step once per run and evaluates (params, batch_stats) on the eval split."""

  def __init__(self, config, model, mesh, eval_set):
    self.config, self.mesh, self.eval_set = config, mesh, eval_set
    self.num_classes = config.model.num_classes
    replicated = NamedSharding(mesh, P())
    self._step = jax.jit(step_lib.make_eval_step(model, self.num_classes, flip=config.eval_flip),
                         out_shardings=(replicated, NamedSharding(mesh, P("data"))))
    self._add = jax.jit(jnp.add, donate_argnums=(0,))

  def __call__(self, params, batch_stats, workdir: str, step: int, writer=None, tag: str = "target") -> dict:
    """Returns {"step", "miou" and "<tag>_miou" (fractions), "per_class_iou" {name: fraction|None},
    "pixel_accuracy", "confusion" [C][C], ...}; `tag` names the evaluated domain in logs and files."""
    total = None
    pictures = []
    for batch in self.eval_set.batches(self.mesh):
      confusion, predictions = self._step(params, batch_stats, batch)
      total = confusion if total is None else self._add(total, confusion)
      if len(pictures) < self.config.num_vis_images and jax.process_index() == 0:
        pictures.extend(_local_panels(batch, predictions, self.num_classes, self.config.data.normalization,
                                      self.config.num_vis_images - len(pictures)))
    confusion = np.asarray(jax.device_get(total))
    names = classes.class_names(self.num_classes)
    iou = metrics_lib.iou_per_class(confusion)
    miou = metrics_lib.mean_iou(confusion)
    results = {"step": int(step), "miou": miou, f"{tag}_miou": miou,
               "per_class_iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, iou)},
               "pixel_accuracy": metrics_lib.pixel_accuracy(confusion),
               "num_images": len(self.eval_set.source), "eval_size": list(self.eval_set.size),
               "flip": bool(self.config.eval_flip), "confusion": confusion.tolist()}
    if jax.process_index() == 0:
      out_dir = os.path.join(workdir, "eval", f"step_{step}")
      os.makedirs(out_dir, exist_ok=True)
      np.save(os.path.join(out_dir, "confusion.npy"), confusion)
      with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
      for i, panel in enumerate(pictures):
        visualize.save_png(os.path.join(out_dir, f"pred_{i}.png"), panel)
      table = metrics_lib.iou_table(confusion, names, title=(
          f"{tag} evaluation at step {step}: {len(self.eval_set.source)} images at "
          f"{self.eval_set.size[0]}x{self.eval_set.size[1]}{' + flip' if self.config.eval_flip else ''}"))
      print(table, flush=True)
      if writer is not None:
        writer.scalars(step, {"miou": miou, "pixel_accuracy": results["pixel_accuracy"],
                              **{f"iou/{n}": v for n, v in zip(names, np.nan_to_num(iou))}},
                       prefix=f"eval_{tag}/", echo=False)
        writer.text(step, f"eval_{tag}/iou_table", table)
        for i, panel in enumerate(pictures):
          writer.image(step, f"eval_{tag}/prediction_{i}", panel)
    return results


def _local_panels(batch, predictions, num_classes, normalization, limit):
  """Panels for this host's first `limit` real (unmasked) examples of a batch."""
  def local(array):
    return np.concatenate([np.asarray(s.data) for s in sorted(
        array.addressable_shards, key=lambda s: s.index[0].start or 0)], axis=0)
  images, labels, preds, mask = (local(batch["image"]), local(batch["label"]), local(predictions),
                                 local(batch["mask"]))
  panels = []
  for i in range(len(images)):
    if len(panels) >= limit:
      break
    if mask[i]:
      panels.append(visualize.prediction_panel(images[i], labels[i], preds[i], num_classes, normalization))
  return panels


def evaluate(config, model, mesh, params, batch_stats, eval_set, workdir, step, writer=None) -> dict:
  """One-off evaluation (compiles the eval step); the loop keeps an `Evaluator` instead."""
  return Evaluator(config, model, mesh, eval_set)(params, batch_stats, workdir, step, writer)
