"""Segmentation metrics: a confusion matrix accumulated on device, IoU computed on the host.

Protocol (METHOD.md §5): only ground-truth pixels with a label in [0, C) count; IoU_c =
TP/(TP+FP+FN); mIoU = mean over classes whose IoU is defined (TP+FP+FN > 0), i.e. numpy's nanmean.
"""

import jax.numpy as jnp
import numpy as np


def confusion_matrix(predictions, labels, num_classes: int, mask=None):
  """Confusion counts [C, C] int32, rows = ground truth, columns = prediction.

  predictions, labels: int [B, H, W] (labels -1 = ignore); mask: bool [B] (False = padding example).
  """
  valid = (labels >= 0) & (labels < num_classes)
  if mask is not None:
    valid &= mask[:, None, None]
  index = jnp.where(valid, labels * num_classes + predictions, 0)
  counts = jnp.bincount(index.reshape(-1), weights=valid.reshape(-1).astype(jnp.int32),
                        length=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
  """[C] IoU per class from a [C, C] confusion matrix; NaN where the class is absent from GT and prediction."""
  confusion = np.asarray(confusion, dtype=np.float64)
  tp = np.diag(confusion)
  union = confusion.sum(0) + confusion.sum(1) - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def mean_iou(confusion: np.ndarray) -> float:
  """nanmean of the per-class IoU (a fraction in [0, 1])."""
  iou = iou_per_class(confusion)
  return float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan")


def pixel_accuracy(confusion: np.ndarray) -> float:
  confusion = np.asarray(confusion, dtype=np.float64)
  total = confusion.sum()
  return float(np.diag(confusion).sum() / total) if total else float("nan")


def iou_table(confusion: np.ndarray, names: tuple[str, ...], title: str = "") -> str:
  """A plain-text table of per-class IoU (%) with class names, then mIoU and pixel accuracy."""
  iou = iou_per_class(confusion)
  gt_pixels = np.asarray(confusion).sum(1)
  width = max(len(n) for n in names)
  lines = [title] if title else []
  lines.append(f"{'class':<{width}}  {'IoU %':>6}  {'GT pixels':>10}")
  for name, value, count in zip(names, iou, gt_pixels):
    shown = "   n/a" if np.isnan(value) else f"{100 * value:6.1f}"
    lines.append(f"{name:<{width}}  {shown}  {int(count):>10d}")
  lines.append(f"{'mIoU':<{width}}  {100 * mean_iou(confusion):6.1f}")
  lines.append(f"{'pixel acc':<{width}}  {100 * pixel_accuracy(confusion):6.1f}")
  return "\n".join(lines)
