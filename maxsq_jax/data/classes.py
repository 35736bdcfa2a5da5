"""Label sets: the 19 Cityscapes train ids, the 16/13-class subsets, id tables and the colour palette.

Labels inside maxsq_jax are int32 train ids in [0, C) with IGNORE_LABEL = -1 for void pixels
(the reference's convention, METHOD.md §2). On disk, train-id label maps would need a void value
that fits in uint8, so datasets are stored with the dataset's own ids and mapped on load.
"""

import numpy as np

IGNORE_LABEL = -1

CLASS_NAMES_19 = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "light", "sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)

# Cityscapes label id -> train id (METHOD.md §4); GTA5 labels use the same ids.
CITYSCAPES_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
TRAIN_ID_TO_CITYSCAPES_ID = {v: k for k, v in CITYSCAPES_ID_TO_TRAIN_ID.items()}

# Subsets of the 19 train ids, remapped to 0..15 and 0..12 (METHOD.md §4).
SUBSET_16 = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
SUBSET_13 = (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)

# The Cityscapes colour map, indexed by train id.
PALETTE_19 = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
], dtype=np.uint8)


def _lookup_table(mapping: dict[int, int], size: int = 256) -> np.ndarray:
  table = np.full((size,), IGNORE_LABEL, dtype=np.int32)
  for key, value in mapping.items():
    table[key] = value
  return table


CITYSCAPES_ID_LUT = _lookup_table(CITYSCAPES_ID_TO_TRAIN_ID)


def subset_lut(num_classes: int) -> np.ndarray:
  """Returns a table indexed by 19-class train id + 1 (so -1 maps via index 0) for C classes."""
  if num_classes == 19:
    subset = tuple(range(19))
  elif num_classes == 16:
    subset = SUBSET_16
  elif num_classes == 13:
    subset = SUBSET_13
  else:
    raise ValueError(f"num_classes={num_classes}: label sets are 19, 16 or 13 classes.")
  table = np.full((20,), IGNORE_LABEL, dtype=np.int32)
  for new_id, train_id in enumerate(subset):
    table[train_id + 1] = new_id
  return table


def class_names(num_classes: int) -> tuple[str, ...]:
  """Names of the C classes of the 19/16/13-class label set."""
  if num_classes == 19:
    return CLASS_NAMES_19
  subset = SUBSET_16 if num_classes == 16 else SUBSET_13 if num_classes == 13 else None
  if subset is None:
    raise ValueError(f"num_classes={num_classes}: label sets are 19, 16 or 13 classes.")
  return tuple(CLASS_NAMES_19[i] for i in subset)


def palette(num_classes: int) -> np.ndarray:
  """[C, 3] uint8 colours of the C classes (Cityscapes colours)."""
  if num_classes == 19:
    return PALETTE_19
  subset = SUBSET_16 if num_classes == 16 else SUBSET_13
  return PALETTE_19[list(subset)]


def to_train_ids(label_ids: np.ndarray, num_classes: int = 19) -> np.ndarray:
  """Maps a Cityscapes/GTA5 label-id map [H, W] (uint8) to int32 train ids of the C-class set."""
  train19 = CITYSCAPES_ID_LUT[label_ids]
  if num_classes == 19:
    return train19
  return subset_lut(num_classes)[train19 + 1]
