"""Random-access sources over datasets in their own folder layouts (GTA5, Cityscapes, and the
embedded synthetic benchmark, which is written in those two layouts).

A source yields examples ``{"image": uint8 [H, W, 3] RGB, "label": int32 [H, W] train ids (-1 =
ignore), "index": int}`` and plugs into grain (``__len__`` + ``__getitem__``). Every failure names the
file and what to do about it.
"""

import glob
import os

import numpy as np
from PIL import Image

from maxsq_jax.data import classes


class DatasetError(Exception):
  """A dataset folder or file is missing or malformed; the message names it and the fix."""


def _read_image(path: str, mode: str) -> np.ndarray:
  try:
    with Image.open(path) as image:
      image.load()
      return np.asarray(image.convert(mode) if image.mode != mode else image)
  except FileNotFoundError as e:
    raise DatasetError(f"missing file {path}") from e
  except (OSError, SyntaxError, ValueError) as e:
    raise DatasetError(f"cannot decode {path} ({e}); re-download or regenerate this file") from e


class FolderSource:
  """Pairs of (image file, label file) with labels in Cityscapes label ids."""

  def __init__(self, pairs: list[tuple[str, str]], num_classes: int, description: str):
    if not pairs:
      raise DatasetError(f"{description}: no images found")
    self._pairs = pairs
    self._num_classes = num_classes
    self.description = description

  def __len__(self) -> int:
    return len(self._pairs)

  def __repr__(self) -> str:
    return f"FolderSource({self.description}, {len(self)} examples)"

  def image_path(self, index: int) -> str:
    return self._pairs[index][0]

  def __getitem__(self, index: int) -> dict:
    image_path, label_path = self._pairs[index]
    image = _read_image(image_path, "RGB")
    label_ids = _read_image(label_path, "L")
    if label_ids.shape != image.shape[:2]:
      raise DatasetError(
          f"label {label_path} is {label_ids.shape[1]}x{label_ids.shape[0]} but its image {image_path} is "
          f"{image.shape[1]}x{image.shape[0]}; labels must have their image's size")
    label = classes.to_train_ids(label_ids, self._num_classes)
    return {"image": image, "label": label, "index": np.int32(index)}


def _require_dir(path: str, what: str, fix: str) -> None:
  if not os.path.isdir(path):
    raise DatasetError(f"{what} folder {path!r} does not exist. {fix}")


def gta5_source(root: str, split: str, num_classes: int, fix: str = "") -> FolderSource:
  """GTA5 layout: root/images/X.png, root/labels/X.png, split list root/list/{split}.txt of file names."""
  fix = fix or "Download GTA5 (images + labels) and point config.data.source_dir at it (README: Datasets)."
  _require_dir(root, "GTA5", fix)
  list_path = os.path.join(root, "list", f"{split}.txt")
  if not os.path.exists(list_path):
    raise DatasetError(f"split list {list_path} does not exist: it names the {split} images, one per line. {fix}")
  with open(list_path) as f:
    names = [line.strip() for line in f if line.strip()]
  pairs = [(os.path.join(root, "images", n), os.path.join(root, "labels", n)) for n in names]
  return FolderSource(pairs, num_classes, f"GTA5-layout {root} [{split}]")


def cityscapes_source(root: str, split: str, num_classes: int, fix: str = "") -> FolderSource:
  """Cityscapes layout: root/leftImg8bit/{split}/{city}/*_leftImg8bit.png, root/gtFine/.../*_gtFine_labelIds.png."""
  fix = fix or "Download Cityscapes leftImg8bit + gtFine and point config.data.target_dir at it (README: Datasets)."
  image_dir = os.path.join(root, "leftImg8bit", split)
  _require_dir(image_dir, "Cityscapes", fix)
  images = sorted(glob.glob(os.path.join(image_dir, "*", "*_leftImg8bit.png")))
  pairs = []
  for image_path in images:
    city = os.path.basename(os.path.dirname(image_path))
    stem = os.path.basename(image_path)[: -len("_leftImg8bit.png")]
    pairs.append((image_path, os.path.join(root, "gtFine", split, city, f"{stem}_gtFine_labelIds.png")))
  return FolderSource(pairs, num_classes, f"Cityscapes-layout {root} [{split}]")
