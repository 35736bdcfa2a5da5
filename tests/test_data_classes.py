"""Label tables: Cityscapes ids -> train ids against the official cityscapesscripts definitions,
SYNTHIA ids and the 16/13-class subsets against docs/method.md (Data), and the stored (uint8, 255 = void) form."""

import numpy as np
import pytest

from maxsq_jax.data import classes

# docs/method.md (Data), typed in independently of maxsq_jax.
SYNTHIA_TABLE = {1: 10, 2: 2, 3: 0, 4: 1, 5: 4, 6: 8, 7: 5, 8: 13, 9: 7, 10: 11, 11: 18, 12: 17, 15: 6, 16: 9,
                 17: 12, 18: 14, 19: 15, 20: 16, 21: 3}
SET_16 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]
SET_13 = [0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]


def test_cityscapes_table_matches_cityscapesscripts():
  labels = pytest.importorskip("cityscapesscripts.helpers.labels", reason="pip install cityscapesscripts").labels
  official = {}
  for label in labels:
    if label.id < 0:
      continue  # license plate (-1) is never drawn into *_labelIds.png.
    official[label.id] = label.trainId if 0 <= label.trainId < 19 else -1
  assert sorted(official) == list(range(34))
  assert {i: int(classes.CITYSCAPES_ID_LUT[i]) for i in range(34)} == official
  assert all(classes.CITYSCAPES_ID_LUT[i] == -1 for i in range(34, 256))
  names = {label.trainId: label.name for label in labels if 0 <= label.trainId < 19}
  short = {"traffic light": "light", "traffic sign": "sign"}
  assert tuple(short.get(names[i], names[i]) for i in range(19)) == classes.CLASS_NAMES_19
  colours = {label.trainId: label.color for label in labels if 0 <= label.trainId < 19}
  assert [tuple(colours[i]) for i in range(19)] == [tuple(c) for c in classes.PALETTE_19.tolist()]


def test_synthia_table():
  assert classes.SYNTHIA_ID_TO_TRAIN_ID == SYNTHIA_TABLE
  expected = np.full(65536, -1)
  for k, v in SYNTHIA_TABLE.items():
    expected[k] = v
  np.testing.assert_array_equal(classes.SYNTHIA_ID_LUT, expected)


@pytest.mark.parametrize("num_classes, subset", [(19, list(range(19))), (16, SET_16), (13, SET_13)])
def test_stored_labels_map_to_each_class_set(num_classes, subset):
  stored = np.array([list(range(19)) + [255]], np.uint8)
  expected = [subset.index(t) if t in subset else -1 for t in range(19)] + [-1]
  got = classes.stored_to_train_ids(stored, num_classes)
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got[0], expected)
  np.testing.assert_array_equal(classes.to_stored(np.array([-1, 0, 18])), [255, 0, 18])
  assert classes.class_names(num_classes) == tuple(classes.CLASS_NAMES_19[i] for i in subset)


def test_stored_labels_reject_other_values():
  with pytest.raises(ValueError, match=r"\[19, 200\]"):
    classes.stored_to_train_ids(np.array([[0, 19, 200, 255]], np.uint8))
  with pytest.raises(ValueError, match="19, 16 or 13"):
    classes.stored_to_train_ids(np.zeros((1, 1), np.uint8), 12)
