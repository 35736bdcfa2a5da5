"""Label sets: the 19 Cityscapes train ids, the 16/13-class subsets, id tables and the colour palette.

Labels inside maxsq_jax are int32 train ids in [0, C) with IGNORE_LABEL = -1 for void pixels
(the reference's convention, docs/method.md).

On disk there are two forms:
* raw dataset folders hold each dataset's own ids (Cityscapes/GTA5/NTHU: 8-bit Cityscapes label
  ids; SYNTHIA: the first channel of a 16-bit PNG, SYNTHIA class ids), mapped to train ids on load;
* prepared (tfds) datasets hold 19-class train ids in a single-channel uint8 PNG, void stored as
  STORED_IGNORE = 255 and mapped to -1 on read (`stored_to_train_ids`), then to the 16/13-class
  set of config.model.num_classes.
"""

import numpy as np

IGNORE_LABEL = -1

CLASS_NAMES_19 = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "light", "sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)

# Cityscapes label id -> train id (docs/method.md, Data); GTA5 labels use the same ids.
CITYSCAPES_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
TRAIN_ID_TO_CITYSCAPES_ID = {v: k for k, v in CITYSCAPES_ID_TO_TRAIN_ID.items()}
# Ids that may occur in a Cityscapes-id label map: the ids of cityscapesscripts' label table
# (0 unlabeled .. 33 bicycle; license plate's -1 is never drawn) and 255, which some tools use for
# void. Anything else means the file is not a Cityscapes-id map (e.g. a colour or train-id PNG).
CITYSCAPES_KNOWN_IDS = frozenset(range(34)) | {255}

# SYNTHIA-RAND-CITYSCAPES class id (first channel of GT/LABELS/*.png) -> train id (docs/method.md, Data).
# 0 void, 13 parking-slot, 14 road-work and 22 lanemarking have no train id.
SYNTHIA_ID_TO_TRAIN_ID = {
    1: 10, 2: 2, 3: 0, 4: 1, 5: 4, 6: 8, 7: 5, 8: 13, 9: 7, 10: 11, 11: 18, 12: 17, 15: 6, 16: 9,
    17: 12, 18: 14, 19: 15, 20: 16, 21: 3,
}
SYNTHIA_KNOWN_IDS = frozenset(range(23))

# Train ids as stored by the tfds builders (uint8 PNG): 0..18, void = 255.
STORED_IGNORE = 255

# Subsets of the 19 train ids, remapped to 0..15 and 0..12 (docs/method.md, Data).
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
SYNTHIA_ID_LUT = _lookup_table(SYNTHIA_ID_TO_TRAIN_ID, size=65536)


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


def to_stored(train19: np.ndarray) -> np.ndarray:
  """int train ids of the 19-class set (-1 = void) -> uint8 with void = STORED_IGNORE (255)."""
  return np.where(train19 < 0, STORED_IGNORE, train19).astype(np.uint8)


def _stored_lut(num_classes: int) -> np.ndarray:
  table = np.full((256,), -2, dtype=np.int32)  # -2: not a stored train id (corrupt data).
  table[STORED_IGNORE] = IGNORE_LABEL
  table[:19] = subset_lut(num_classes)[1:]
  return table


_STORED_LUTS = {c: _stored_lut(c) for c in (19, 16, 13)}


def stored_to_train_ids(stored: np.ndarray, num_classes: int = 19) -> np.ndarray:
  """uint8 stored train ids (255 = void) -> int32 train ids of the C-class set (-1 = ignore).

  Raises ValueError on a value that is neither a 19-class train id nor 255.
  """
  if num_classes not in _STORED_LUTS:
    raise ValueError(f"num_classes={num_classes}: label sets are 19, 16 or 13 classes.")
  out = _STORED_LUTS[num_classes][stored]
  if (out == -2).any():
    bad = sorted(set(np.unique(stored[out == -2]).tolist()))
    raise ValueError(f"stored label holds values {bad[:10]} that are neither train ids 0..18 nor 255")
  return out
