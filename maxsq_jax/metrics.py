"""Segmentation metrics: a confusion matrix accumulated on device, IoU computed on the host.

Protocol (docs/method.md, Evaluation): only ground-truth pixels with a label in [0, C) count; IoU_c =
TP/(TP+FP+FN); mIoU = mean over classes whose IoU is defined (TP+FP+FN > 0), i.e. numpy's nanmean.
A class absent from both the labels and the predictions has no IoU and does not enter the mean
(the reference's `np.nanmean`, and cityscapesscripts' `getScoreAverage`).

16-class (SYNTHIA) runs also report mIoU-13: the IoUs are computed over the 16 classes (so a pixel
of class 'sidewalk' predicted as 'wall' is still a false negative of sidewalk) and averaged over
the 13 classes of the older papers (the reference's `synthia_set_16_to_13`).
"""

import jax.numpy as jnp
import numpy as np

from maxsq_jax.data import classes

# Indices of the 13-class set inside the 16-class set: [0, 1, 2, 6, 7, ..., 15].
SUBSET_16_TO_13 = tuple(classes.SUBSET_16.index(c) for c in classes.SUBSET_13)


def confusion_matrix(predictions, labels, num_classes: int, mask=None):
  """Confusion counts [C, C] int32, rows = ground truth, columns = prediction.

  predictions, labels: int [B, H, W] (labels -1 = ignore); mask: bool [B] (False = padding example).
  Counts are int32: one call must see fewer than 2^31 valid pixels (sum batches on the host in int64).
  """
  valid = (labels >= 0) & (labels < num_classes)
  if mask is not None:
    valid &= mask[:, None, None]
  index = jnp.where(valid, labels * num_classes + predictions, 0)
  counts = jnp.bincount(index.reshape(-1), weights=valid.reshape(-1).astype(jnp.int32),
                        length=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def confusion_matrix_np(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Host (numpy) version of `confusion_matrix`, int64, for files of predictions and labels."""
  labels = np.asarray(labels).reshape(-1).astype(np.int64)
  predictions = np.asarray(predictions).reshape(-1).astype(np.int64)
  valid = (labels >= 0) & (labels < num_classes)
  return np.bincount(labels[valid] * num_classes + predictions[valid],
                     minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
  """[C] IoU per class from a [C, C] confusion matrix; NaN where the class is absent from GT and prediction."""
  confusion = np.asarray(confusion, dtype=np.float64)
  tp = np.diag(confusion)
  union = confusion.sum(0) + confusion.sum(1) - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def _nanmean(values: np.ndarray) -> float:
  values = np.asarray(values, dtype=np.float64)
  return float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")


def mean_iou(confusion: np.ndarray) -> float:
  """nanmean of the per-class IoU (a fraction in [0, 1])."""
  return _nanmean(iou_per_class(confusion))


def subset_mean_iou(confusion: np.ndarray, indices) -> float:
  """nanmean of the per-class IoU (computed over all C classes) over the classes `indices`."""
  return _nanmean(iou_per_class(confusion)[list(indices)])


def pixel_accuracy(confusion: np.ndarray) -> float:
  confusion = np.asarray(confusion, dtype=np.float64)
  total = confusion.sum()
  return float(np.diag(confusion).sum() / total) if total else float("nan")


def class_accuracy(confusion: np.ndarray) -> np.ndarray:
  """[C] per-class recall TP/(TP+FN) (the reference's 'MPA' terms); NaN where the class has no GT pixel."""
  confusion = np.asarray(confusion, dtype=np.float64)
  gt = confusion.sum(1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(gt > 0, np.diag(confusion) / np.maximum(gt, 1), np.nan)


def frequency_weighted_iou(confusion: np.ndarray) -> float:
  confusion = np.asarray(confusion, dtype=np.float64)
  freq = confusion.sum(1) / max(confusion.sum(), 1)
  iou = np.nan_to_num(iou_per_class(confusion))
  return float((freq * iou).sum())


def summarize(confusion: np.ndarray, names: tuple[str, ...]) -> dict:
  """All metrics of one confusion matrix, JSON-ready (fractions; None where undefined).

  {"miou", "per_class_iou" {name: IoU|None}, "pixel_accuracy", "mean_accuracy", "fw_iou",
   "per_class_accuracy", "gt_pixels" {name: count}} and, for the 16-class set, "miou_13".
  """
  confusion = np.asarray(confusion)
  if confusion.shape != (len(names), len(names)):
    raise ValueError(f"confusion matrix {confusion.shape} does not match {len(names)} class names")
  iou = iou_per_class(confusion)
  acc = class_accuracy(confusion)
  none = lambda v: None if np.isnan(v) else float(v)
  out = {"miou": none(mean_iou(confusion)),
         "per_class_iou": {n: none(v) for n, v in zip(names, iou)},
         "pixel_accuracy": none(pixel_accuracy(confusion)),
         "mean_accuracy": none(_nanmean(acc)),
         "fw_iou": none(frequency_weighted_iou(confusion)),
         "per_class_accuracy": {n: none(v) for n, v in zip(names, acc)},
         "gt_pixels": {n: int(v) for n, v in zip(names, confusion.sum(1))}}
  if len(names) == 16:
    out["miou_13"] = none(subset_mean_iou(confusion, SUBSET_16_TO_13))
  return out


def iou_table(confusion: np.ndarray, names: tuple[str, ...], title: str = "") -> str:
  """A plain-text table of per-class IoU (%) with class names, then mIoU (and mIoU-13) and pixel accuracy."""
  iou = iou_per_class(confusion)
  gt_pixels = np.asarray(confusion).sum(1)
  width = max(max(len(n) for n in names), len("pixel acc"))
  lines = [title] if title else []
  lines.append(f"{'class':<{width}}  {'IoU %':>6}  {'GT pixels':>10}")
  for name, value, count in zip(names, iou, gt_pixels):
    shown = "   n/a" if np.isnan(value) else f"{100 * value:6.1f}"
    lines.append(f"{name:<{width}}  {shown}  {int(count):>10d}")
  lines.append(f"{'mIoU':<{width}}  {100 * mean_iou(confusion):6.1f}")
  if len(names) == 16:
    lines.append(f"{'mIoU-13':<{width}}  {100 * subset_mean_iou(confusion, SUBSET_16_TO_13):6.1f}")
  lines.append(f"{'pixel acc':<{width}}  {100 * pixel_accuracy(confusion):6.1f}")
  return "\n".join(lines)
