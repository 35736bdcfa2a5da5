"""mIoU code vs independent implementations: per-pixel set counting on random label maps (with classes
absent from prediction and label), cityscapesscripts' own evaluation on label-id PNG files (or, when
it is not installed, a numpy transcription of its per-class IoU definition), and the 16 -> 13 report."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from maxsq_jax import metrics
from maxsq_jax.data import classes


def per_pixel_iou(pred, gt, num_classes):
  """IoU by counting pixel sets class by class (no confusion matrix); None if absent from both."""
  valid = (gt >= 0) & (gt < num_classes)
  out = []
  for c in range(num_classes):
    inter = np.sum(valid & (gt == c) & (pred == c))
    union = np.sum(valid & ((gt == c) | (pred == c)))
    out.append(inter / union if union else None)
  return out


def random_maps(rng, num_classes, shape, absent=(), ignore_fraction=0.1):
  """Random prediction/label maps where the classes `absent` occur in neither."""
  allowed = np.array([c for c in range(num_classes) if c not in absent])
  gt = rng.choice(allowed, size=shape)
  # Correlated predictions: 60 % copy the label, the rest random among allowed classes.
  pred = np.where(rng.uniform(size=shape) < 0.6, gt, rng.choice(allowed, size=shape))
  gt = np.where(rng.uniform(size=shape) < ignore_fraction, -1, gt)
  return pred.astype(np.int32), gt.astype(np.int32)


@pytest.mark.parametrize("num_classes,absent,seed", [(19, (), 0), (19, (3, 14, 16), 1), (16, (9,), 2), (13, (), 3),
                                                     (5, (0, 4), 4)])
def test_miou_matches_per_pixel_counting(num_classes, absent, seed):
  rng = np.random.default_rng(seed)
  pred, gt = random_maps(rng, num_classes, (3, 37, 53), absent)
  mask = np.array([True, True, False])  # The third image is padding: it must not count.
  confusion = np.asarray(metrics.confusion_matrix(jnp.asarray(pred), jnp.asarray(gt), num_classes, jnp.asarray(mask)))
  np.testing.assert_array_equal(confusion, metrics.confusion_matrix_np(pred[:2], gt[:2], num_classes))
  expected = per_pixel_iou(pred[:2], gt[:2], num_classes)
  iou = metrics.iou_per_class(confusion)
  for c, e in enumerate(expected):
    if e is None:
      assert np.isnan(iou[c]), c
    else:
      np.testing.assert_allclose(iou[c], e, rtol=1e-12)
  present = [e for e in expected if e is not None]
  assert metrics.mean_iou(confusion) == pytest.approx(np.mean(present), rel=1e-12)
  for c in absent:
    assert np.isnan(iou[c])


def test_class_absent_from_labels_but_predicted_counts_as_zero():
  gt = np.array([[0, 0, 1, 1]])
  pred = np.array([[0, 2, 1, 1]])  # Class 2 has no label pixel but one false positive.
  confusion = metrics.confusion_matrix_np(pred, gt, 4)
  iou = metrics.iou_per_class(confusion)
  np.testing.assert_allclose(iou[:3], [0.5, 1.0, 0.0])
  assert np.isnan(iou[3])  # Absent from both: excluded from the mean.
  assert metrics.mean_iou(confusion) == pytest.approx(0.5)
  assert metrics.pixel_accuracy(confusion) == pytest.approx(0.75)


def test_ignored_and_out_of_range_labels_do_not_count():
  gt = np.array([[-1, 5, 0, 1]])
  pred = np.array([[1, 1, 0, 1]])
  confusion = metrics.confusion_matrix_np(pred, gt, 2)
  np.testing.assert_array_equal(confusion, [[1, 0], [0, 1]])
  device = np.asarray(metrics.confusion_matrix(jnp.asarray(pred[None]), jnp.asarray(gt[None]), 2))
  np.testing.assert_array_equal(device, confusion)


def test_reference_formula_agrees():
  """The reference's Eval.Mean_Intersection_over_Union: nanmean(diag / (rows + cols - diag))."""
  rng = np.random.default_rng(7)
  confusion = rng.integers(0, 50, (19, 19))
  confusion[4, :] = 0
  confusion[:, 4] = 0  # A class absent from labels and predictions.
  with np.errstate(invalid="ignore", divide="ignore"):
    reference = np.diag(confusion) / (confusion.sum(1) + confusion.sum(0) - np.diag(confusion))
  np.testing.assert_allclose(metrics.iou_per_class(confusion), reference, equal_nan=True)
  assert metrics.mean_iou(confusion) == pytest.approx(np.nanmean(reference))
  with np.errstate(invalid="ignore", divide="ignore"):
    recall = np.diag(confusion) / confusion.sum(1)
  np.testing.assert_allclose(metrics.class_accuracy(confusion), recall, equal_nan=True)


def test_16_to_13_subset_and_report():
  assert metrics.SUBSET_16_TO_13 == (0, 1, 2, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)  # The reference's list.
  names16, names13 = classes.class_names(16), classes.class_names(13)
  assert [names16[i] for i in metrics.SUBSET_16_TO_13] == list(names13)
  rng = np.random.default_rng(3)
  pred, gt = random_maps(rng, 16, (2, 40, 40), absent=(12,))
  confusion = metrics.confusion_matrix_np(pred, gt, 16)
  summary = metrics.summarize(confusion, names16)
  iou16 = per_pixel_iou(pred, gt, 16)
  # mIoU-13: IoUs computed over the 16 classes, averaged over the 13 (absent ones skipped).
  kept = [iou16[names16.index(n)] for n in names13]
  assert summary["miou_13"] == pytest.approx(np.mean([v for v in kept if v is not None]))
  assert summary["miou"] == pytest.approx(np.mean([v for v in iou16 if v is not None]))
  assert summary["per_class_iou"]["bus"] is None or names16[12] != "bus"
  assert summary["per_class_iou"][names16[12]] is None
  assert set(summary) >= {"miou", "miou_13", "per_class_iou", "pixel_accuracy", "mean_accuracy", "gt_pixels"}
  # A wall pixel predicted as sidewalk still costs sidewalk IoU in mIoU-13 (16-class IoUs).
  c = np.zeros((16, 16), np.int64)
  c[0, 0] = c[1, 1] = 10
  c[3, 1] = 10  # wall (16-index 3, not among the 13) predicted as sidewalk.
  s = metrics.summarize(c, names16)
  assert s["per_class_iou"]["sidewalk"] == pytest.approx(0.5)
  assert s["miou_13"] == pytest.approx(0.75)
  assert "miou_13" not in metrics.summarize(np.eye(19, dtype=np.int64), classes.class_names(19))
  assert "mIoU-13" in metrics.iou_table(c, names16)


# ----------------------------------------------------------------------------------------------
# Cityscapes' official evaluation.


def cityscapes_iou_definition(pred_ids, gt_ids):
  """A transcription of cityscapesscripts' getIouScoreForLabel on label-id maps: per eval label,
  TP = diag, FN = row - TP (all predictions), FP = column over non-ignored GT rows without the label;
  then the average over labels with a nonzero denominator."""
  from_ids = {label_id: train_id for label_id, train_id in classes.CITYSCAPES_ID_TO_TRAIN_ID.items()}
  eval_ids = sorted(from_ids)
  conf = np.zeros((256, 256), np.int64)
  np.add.at(conf, (gt_ids.reshape(-1), pred_ids.reshape(-1)), 1)
  scores = {}
  for label in eval_ids:
    tp = conf[label, label]
    fn = conf[label, :].sum() - tp
    fp = conf[[l for l in eval_ids if l != label], label].sum()
    denom = tp + fp + fn
    scores[label] = tp / denom if denom else float("nan")
  return scores


def make_cityscapes_files(root, rng, count=3, size=(64, 32)):
  """gtFine-style labelIds PNGs (with void ids 0..6 and the unevaluated 9, 10, 14..16, 18, 29, 30)
  and prediction PNGs in label ids; returns (gt paths, prediction paths, gt arrays, prediction arrays)."""
  evaluated = np.array(sorted(classes.CITYSCAPES_ID_TO_TRAIN_ID))
  void = np.array([0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30])
  gts, preds, gt_paths, pred_paths = [], [], [], []
  w, h = size
  for i in range(count):
    # Evaluated classes without 'train' (31) and 'rider' (25): absent from GT; 'train' also never predicted.
    gt_classes = np.array([c for c in evaluated if c not in (25, 31)])
    gt = np.where(rng.uniform(size=(h, w)) < 0.15, rng.choice(void, (h, w)), rng.choice(gt_classes, (h, w)))
    pred_classes = np.array([c for c in evaluated if c != 31])
    pred = np.where(rng.uniform(size=(h, w)) < 0.5, gt, rng.choice(pred_classes, (h, w)))
    pred = np.where(np.isin(pred, void), rng.choice(pred_classes, (h, w)), pred)  # Models predict train ids only.
    stem = f"frankfurt_000000_{i:06d}"
    os.makedirs(os.path.join(root, "gt", "frankfurt"), exist_ok=True)
    os.makedirs(os.path.join(root, "pred"), exist_ok=True)
    gt_paths.append(os.path.join(root, "gt", "frankfurt", f"{stem}_gtFine_labelIds.png"))
    pred_paths.append(os.path.join(root, "pred", f"{stem}_pred.png"))
    Image.fromarray(gt.astype(np.uint8)).save(gt_paths[-1])
    Image.fromarray(pred.astype(np.uint8)).save(pred_paths[-1])
    gts.append(gt.astype(np.uint8))
    preds.append(pred.astype(np.uint8))
  return gt_paths, pred_paths, np.stack(gts), np.stack(preds)


def ours_on_ids(gt_ids, pred_ids):
  """Our confusion/IoU after mapping label ids to train ids (what the data pipeline does)."""
  gt = classes.to_train_ids(gt_ids, 19)
  pred = classes.to_train_ids(pred_ids, 19)
  return metrics.confusion_matrix_np(pred, gt, 19)


def test_iou_matches_cityscapes_definition(tmp_path):
  rng = np.random.default_rng(11)
  _, _, gts, preds = make_cityscapes_files(str(tmp_path), rng)
  confusion = ours_on_ids(gts, preds)
  iou = metrics.iou_per_class(confusion)
  scores = cityscapes_iou_definition(preds, gts)
  for label_id, train_id in classes.CITYSCAPES_ID_TO_TRAIN_ID.items():
    np.testing.assert_allclose(iou[train_id], scores[label_id], rtol=1e-12, equal_nan=True)
  assert np.isnan(iou[16])  # train: absent from both.
  assert iou[12] == 0.0  # rider: predicted, never labelled.
  assert metrics.mean_iou(confusion) == pytest.approx(np.nanmean(list(scores.values())), rel=1e-12)


def test_iou_matches_cityscapesscripts(tmp_path, monkeypatch):
  """cityscapesscripts 2.3.0's evalPixelLevelSemanticLabeling on PNG files (pip install --no-deps
  cityscapesscripts pyquaternion: its other dependencies are not needed for the evaluation)."""
  monkeypatch.setenv("CITYSCAPES_DATASET", str(tmp_path))  # Read at import; keeps it out of site-packages.
  cs = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
  rng = np.random.default_rng(12)
  gt_paths, pred_paths, gts, preds = make_cityscapes_files(str(tmp_path), rng)
  args = cs.args
  monkeypatch.setattr(args, "evalInstLevelScore", False)
  monkeypatch.setattr(args, "JSONOutput", False)
  monkeypatch.setattr(args, "quiet", True)
  result = cs.evaluateImgLists(pred_paths, gt_paths, args)
  confusion = ours_on_ids(gts, preds)
  iou = metrics.iou_per_class(confusion)
  for name, train_id in zip(classes.CLASS_NAMES_19, range(19)):
    label_id = classes.TRAIN_ID_TO_CITYSCAPES_ID[train_id]
    cs_name = cs.id2label[label_id].name
    np.testing.assert_allclose(iou[train_id], result["classScores"][cs_name], rtol=1e-12, equal_nan=True,
                               err_msg=name)
  assert metrics.mean_iou(confusion) == pytest.approx(result["averageScoreClasses"], rel=1e-12)
