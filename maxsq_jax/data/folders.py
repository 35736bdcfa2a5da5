"""The datasets in their own folder layouts: listing examples, decoding files, label ids -> train ids.

Layouts (each is the folder its download unpacks to; docs/datasets.md):

  GTA5        images/00001.png, labels/00001.png (8-bit palette PNG of Cityscapes label ids);
              splits from list/{split}.txt (one id or file name per line, the reference's lists),
              else split.mat (the official trainIds/valIds/testIds), and "full" (every image).
  SYNTHIA     RAND_CITYSCAPES/RGB/0000000.png, RAND_CITYSCAPES/GT/LABELS/0000000.png (16-bit PNG, the
              first channel is the SYNTHIA class id); splits from list/{split}.txt (7-digit ids),
              else the reference's split made here (SYNTHIA_SPLIT_IDS: "train" ids 0-8999, "val"
              9000-9399), and "full" (every image).
  Cityscapes  leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png,
              gtFine/{split}/{city}/{stem}_gtFine_labelIds.png (8-bit Cityscapes label ids).
  NTHU        {City}/Images/Train/*.jpg (unlabelled, split "train"), {City}/Images/Test/*.jpg with
              {City}/Labels/Test/{id}_eval.png (split "test"; Cityscapes label ids, as the reference
              reads them; `Labels/{id}_eval.png` is accepted too).
  folder      images/{split}/**/X.{png,jpg,jpeg} with labels/{split}/**/X.png (Cityscapes label ids;
              no labels/{split} folder: an unlabelled split): a user's own data (docs/datasets.md).

The synthetic benchmark (data/synthetic.py) is written in the GTA5 and Cityscapes layouts. Which
dataset name uses which layout and label table: registry.py.

`FolderExamples` reads such a folder directly (random access, for grain): examples
``{"image": uint8 [H, W, 3] RGB, "label": int32 [H, W] train ids of the C-class set (-1 = ignore),
"index": int}``. The tfds builders (builders.py) list and validate the same files with the same
functions. Every failure is a DatasetError that names the file and what to do about it.
"""

import dataclasses
import glob
import io
import os
import re

import numpy as np
from PIL import Image

from maxsq_jax.data import classes
from maxsq_jax.errors import DataError
from maxsq_jax.paths import not_a_directory


class DatasetError(DataError):
  """A dataset folder or file is missing or malformed; the message names it and the fix."""


_IMAGE_FILE = re.compile(r"\.(jpe?g|png)$", re.I)


CITYSCAPES_IDS = "cityscapes_ids"  # 8-bit map of Cityscapes label ids (GTA5, Cityscapes, NTHU).
SYNTHIA_IDS = "synthia16"  # SYNTHIA: first channel of a 16-bit PNG holds the class id.

_ID_LUTS = {
    # id -> 19-class train id; -1 for known ids without a train id, -2 for ids that should not occur.
    CITYSCAPES_IDS: np.where(np.isin(np.arange(256), sorted(classes.CITYSCAPES_KNOWN_IDS)),
                             classes.CITYSCAPES_ID_LUT, -2).astype(np.int32),
    SYNTHIA_IDS: np.where(np.isin(np.arange(65536), sorted(classes.SYNTHIA_KNOWN_IDS)),
                          classes.SYNTHIA_ID_LUT, -2).astype(np.int32),
}


@dataclasses.dataclass(frozen=True)
class RawExample:
  """One example of a dataset folder: its image file and (for labelled splits) its label file."""
  key: str  # Stable unique name (the image path relative to the dataset folder).
  image: str
  label: str | None
  label_format: str = CITYSCAPES_IDS  # The id table of its label file (registry.Dataset.label_format).
  # GTA5 has pairs whose label is not its image's size; the reference resizes each to the training
  # size on its own (image bicubic, label nearest), and so do the transforms here.
  sizes_may_differ: bool = False


# ----------------------------------------------------------------------------------------------
# Decoding.


def _open(path: str, data: bytes | None = None) -> Image.Image:
  """Opens and fully decodes an image file (or its bytes); errors name the file."""
  try:
    image = Image.open(io.BytesIO(data) if data is not None else path)
    image.load()
    return image
  except FileNotFoundError as e:
    raise DatasetError(f"missing file {path}") from e
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DatasetError(f"cannot decode {path} ({e}); re-download or re-extract this file") from e


def read_rgb(path: str, data: bytes | None = None) -> np.ndarray:
  """uint8 [H, W, 3] RGB of an image file (any mode PIL reads is converted to RGB)."""
  image = _open(path, data)
  return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def _png_16bit_channels(path: str, data: bytes | None) -> np.ndarray | None:
  """Exact uint16 [H, W, C] of a 16-bit RGB/RGBA PNG, or None if the file is not one.

  Pillow decodes 16-bit colour PNGs to 8 bits by keeping each sample's high byte, which turns
  SYNTHIA's small class ids into 0. Its decoder can also keep the low byte ("RGB;16L" reads the
  second byte of each big-endian sample), so decoding twice gives both bytes, exactly, at C speed.
  """
  try:
    probe = Image.open(io.BytesIO(data) if data is not None else path)
  except FileNotFoundError as e:
    raise DatasetError(f"missing file {path}") from e
  except (OSError, SyntaxError, ValueError) as e:
    raise DatasetError(f"cannot decode {path} ({e}); re-download or re-extract this file") from e
  tile = probe.tile[0] if probe.format == "PNG" and len(probe.tile) == 1 else None
  rawmode = tile.args if tile is not None else None
  if rawmode not in ("RGB;16B", "RGBA;16B"):
    return None
  high = np.asarray(_open(path, data))
  low_image = Image.open(io.BytesIO(data) if data is not None else path)
  low_image.tile = [low_image.tile[0]._replace(args=rawmode.replace(";16B", ";16L"))]
  try:
    low_image.load()
  except (OSError, SyntaxError, ValueError) as e:
    raise DatasetError(f"cannot decode {path} ({e}); re-download or re-extract this file") from e
  return high.astype(np.uint16) << 8 | np.asarray(low_image).astype(np.uint16)


def read_label_ids(path: str, label_format: str, data: bytes | None = None) -> np.ndarray:
  """The dataset's own label ids [H, W] of a label file (uint8, or uint16 for SYNTHIA)."""
  if label_format == SYNTHIA_IDS:
    channels = _png_16bit_channels(path, data)
    if channels is not None:
      return channels[..., 0]
  image = _open(path, data)
  if image.mode in ("L", "P", "I;16", "I;16B", "I;16L", "I"):
    # Palette PNGs (GTA5) hold the ids as palette indices: never convert them to grey levels.
    ids = np.asarray(image)
    if ids.dtype != np.uint8 and (ids.min() < 0 or ids.max() > 65535):
      raise DatasetError(f"label {path} holds values outside 0..65535")
    return ids.astype(np.uint8 if ids.max(initial=0) < 256 else np.uint16)
  if label_format == SYNTHIA_IDS and image.mode in ("RGB", "RGBA", "LA"):
    return np.asarray(image)[..., 0]  # An 8-bit multi-channel SYNTHIA-style label.
  raise DatasetError(
      f"label {path} is a {image.mode} image; expected a single-channel map of label ids "
      + ("(Cityscapes: *_gtFine_labelIds.png, not *_color.png)" if label_format == CITYSCAPES_IDS
         else "(SYNTHIA: GT/LABELS/*.png, not GT/COLOR)"))


def label_to_train_ids(ids: np.ndarray, label_format: str, path: str) -> np.ndarray:
  """Dataset label ids -> int32 19-class train ids (-1 = void); an unexpected id raises, naming `path`."""
  lut = _ID_LUTS[label_format]
  if ids.dtype == np.uint16 and lut.shape[0] == 256:
    if ids.max(initial=0) > 255:
      bad = np.unique(ids[ids > 255])
      raise DatasetError(f"label {path} holds unexpected label ids {bad[:10].tolist()} (expected Cityscapes "
                         f"label ids 0..33); is it a label-id map of this dataset?")
    ids = ids.astype(np.uint8)
  train = lut[ids]
  if (train == -2).any():
    bad = np.unique(ids[train == -2])
    expected = ("Cityscapes label ids 0..33 (or 255)" if label_format == CITYSCAPES_IDS
                else "SYNTHIA class ids 0..22 in the first channel")
    raise DatasetError(f"label {path} holds unexpected label ids {bad[:10].tolist()} (expected {expected}); "
                       "is it a label-id map of this dataset? (prepare: --on_error=skip skips such files)")
  return train


def load_example(example: RawExample, image_data: bytes | None = None,
                 label_data: bytes | None = None) -> dict:
  """{"image": uint8 RGB, "label": int32 19-class train ids (absent for unlabelled examples)}.

  Checks that the label has its image's size (unless `example.sizes_may_differ`). `*_data`: the
  files' bytes, if already read.
  """
  image = read_rgb(example.image, image_data)
  out = {"image": image}
  if example.label is not None:
    ids = read_label_ids(example.label, example.label_format, label_data)
    if ids.shape != image.shape[:2] and not example.sizes_may_differ:
      raise DatasetError(
          f"label {example.label} is {ids.shape[1]}x{ids.shape[0]} but its image {example.image} is "
          f"{image.shape[1]}x{image.shape[0]}; labels must have their image's size "
          "(prepare: --on_error=skip skips such pairs)")
    out["label"] = label_to_train_ids(ids, example.label_format, example.label)
  return out


# ----------------------------------------------------------------------------------------------
# Listing the examples of each layout.


def _require_dir(path: str, what: str, fix: str) -> None:
  if not os.path.isdir(path):
    found = not_a_directory(path)
    if found == "does not exist":
      raise DatasetError(f"{what} folder {path!r} does not exist. {fix}")
    raise DatasetError(f"{what} folder {path!r} is {found}; fix or remove it, or give the dataset's folder")


def _check_labels(examples: list[RawExample], what: str) -> list[RawExample]:
  missing = [e for e in examples if e.label is not None and not os.path.exists(e.label)]
  if missing:
    first = missing[0]
    raise DatasetError(
        f"{what}: {len(missing)} image(s) have no label file, e.g. {first.label} for image {first.image}. "
        "Re-extract the labels (prepare: --on_error=skip leaves such images out).")
  return examples


def check_labels(examples: list[RawExample], what: str, skip: bool = False) -> tuple[list[RawExample], list[str]]:
  """Examples whose label file exists, and messages for the others (raises unless `skip`)."""
  if not skip:
    return _check_labels(examples, what), []
  kept, skipped = [], []
  for e in examples:
    if e.label is not None and not os.path.exists(e.label):
      skipped.append(f"missing label {e.label} for image {e.image}")
    else:
      kept.append(e)
  return kept, skipped


def _read_list(path: str) -> list[str]:
  with open(path) as f:
    return [line.strip() for line in f if line.strip()]


def _gta5_split_names(root: str, split: str, fix: str) -> list[str]:
  list_path = os.path.join(root, "list", f"{split}.txt")
  if os.path.exists(list_path):
    names = _read_list(list_path)
    return [n if n.endswith(".png") else f"{int(n):05d}.png" for n in names]
  mat_path = os.path.join(root, "split.mat")
  if split in ("train", "val", "test") and os.path.exists(mat_path):
    import scipy.io  # Only for the official split file.
    ids = scipy.io.loadmat(mat_path)[f"{split}Ids"].ravel()
    return [f"{int(i):05d}.png" for i in ids]
  if split == "full":
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(root, "images", "*.png")))
  raise DatasetError(
      f"GTA5 split {split!r}: neither {list_path} (one image id or file name per line, e.g. the "
      f"reference's datasets/GTA5/list/{split}.txt) nor the official {mat_path} exists; add one, or "
      f"use split 'full' (every image). {fix}")


def gta5_examples(root: str, split: str, fix: str, label_format: str) -> list[RawExample]:
  """GTA5 layout: root/images/X.png, root/labels/X.png; splits as in the module docstring."""
  _require_dir(os.path.join(root, "images"), "GTA5 images", fix)
  names = _gta5_split_names(root, split, fix)
  return [RawExample(f"images/{n}", os.path.join(root, "images", n), os.path.join(root, "labels", n),
                     label_format, sizes_may_differ=True) for n in names]


# The reference's SYNTHIA lists (`synthia_list`): train = ids 0-8999, val = the 400 held out.
SYNTHIA_SPLIT_IDS = {"train": range(0, 9000), "val": range(9000, 9400)}


def synthia_root(root: str) -> str:
  """The RAND_CITYSCAPES folder: `root` itself or root/RAND_CITYSCAPES."""
  nested = os.path.join(root, "RAND_CITYSCAPES")
  return nested if not os.path.isdir(os.path.join(root, "RGB")) and os.path.isdir(nested) else root


def synthia_examples(root: str, split: str, fix: str, label_format: str) -> list[RawExample]:
  """SYNTHIA-RAND-CITYSCAPES layout: RGB/*.png, GT/LABELS/*.png (16-bit)."""
  base = synthia_root(root)
  _require_dir(os.path.join(base, "RGB"), "SYNTHIA RGB", fix)
  _require_dir(os.path.join(base, "GT", "LABELS"), "SYNTHIA GT/LABELS", fix)
  list_path = next((p for p in (os.path.join(base, "list", f"{split}.txt"), os.path.join(root, "list", f"{split}.txt"))
                    if os.path.exists(p)), None)
  if list_path is not None:
    names = [n if n.endswith(".png") else f"{int(n):07d}.png" for n in _read_list(list_path)]
  elif split in SYNTHIA_SPLIT_IDS or split == "full":
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(base, "RGB", "*.png")))
    if split != "full":
      ids = SYNTHIA_SPLIT_IDS[split]
      names = [n for n in names if n[:-4].isdigit() and int(n[:-4]) in ids]
  else:
    raise DatasetError(f"SYNTHIA split {split!r}: no list file {os.path.join(base, 'list', split + '.txt')} "
                       "(one 7-digit image id per line); without lists the splits are 'train' (ids 0-8999, the "
                       "reference's), 'val' (ids 9000-9399) and 'full' (every image).")
  return [RawExample(f"RGB/{n}", os.path.join(base, "RGB", n), os.path.join(base, "GT", "LABELS", n), label_format)
          for n in names]


def cityscapes_examples(root: str, split: str, fix: str, label_format: str) -> list[RawExample]:
  """Cityscapes layout: leftImg8bit/{split}/{city}/*_leftImg8bit.png + gtFine/.../*_gtFine_labelIds.png."""
  image_dir = os.path.join(root, "leftImg8bit", split)
  _require_dir(image_dir, "Cityscapes", fix)
  images = sorted(glob.glob(os.path.join(image_dir, "*", "*_leftImg8bit.png")))
  examples = []
  for image_path in images:
    city = os.path.basename(os.path.dirname(image_path))
    stem = os.path.basename(image_path)[: -len("_leftImg8bit.png")]
    examples.append(RawExample(os.path.relpath(image_path, root), image_path,
                               os.path.join(root, "gtFine", split, city, f"{stem}_gtFine_labelIds.png"), label_format))
  return examples


def nthu_city_root(root: str, city: str) -> str:
  """The city folder (with Images/): `root` itself or root/<City>."""
  return root if os.path.isdir(os.path.join(root, "Images")) else os.path.join(root, city.capitalize())


def nthu_examples(root: str, split: str, fix: str, label_format: str, city: str = "") -> list[RawExample]:
  """NTHU cross-city layout of one city: Images/Train/* (no labels), Images/Test/* + Labels/Test/*_eval.png."""
  base = nthu_city_root(root, city) if city else root
  if split not in ("train", "test"):
    raise DatasetError(f"NTHU split {split!r}: the splits are 'train' (unlabelled) and 'test' (100 labelled images).")
  image_dir = os.path.join(base, "Images", split.capitalize())
  _require_dir(image_dir, f"NTHU {city.capitalize() or 'city'} {split} images", fix)
  images = sorted(p for p in glob.glob(os.path.join(image_dir, "*")) if _IMAGE_FILE.search(p))
  examples = []
  for image_path in images:
    stem = os.path.splitext(os.path.basename(image_path))[0]
    label = None
    if split == "test":
      candidates = [os.path.join(base, "Labels", "Test", f"{stem}_eval.png"), os.path.join(base, "Labels", f"{stem}_eval.png")]
      label = next((c for c in candidates if os.path.exists(c)), candidates[0])
    examples.append(RawExample(os.path.relpath(image_path, base), image_path, label, label_format))
  return examples


def folder_examples(root: str, split: str, fix: str, label_format: str) -> list[RawExample]:
  """The generic layout: images/{split}/**/X.{png,jpg,jpeg}, labels/{split}/**/X.png (Cityscapes label
  ids), sub-folders allowed, sorted by path. A split without a labels/{split} folder is unlabelled."""
  image_dir = os.path.join(root, "images", split)
  _require_dir(image_dir, f"{split!r} images", fix)
  label_dir = os.path.join(root, "labels", split)
  labelled = os.path.isdir(label_dir)
  images = sorted(p for p in glob.glob(os.path.join(image_dir, "**", "*"), recursive=True) if _IMAGE_FILE.search(p))
  examples = []
  for image_path in images:
    relative = os.path.relpath(image_path, image_dir)
    label = os.path.join(label_dir, os.path.splitext(relative)[0] + ".png") if labelled else None
    examples.append(RawExample(os.path.relpath(image_path, root), image_path, label, label_format))
  return examples


# ----------------------------------------------------------------------------------------------
# A folder's examples, read by index.


class FolderExamples:
  """Examples of a dataset folder, decoded on access, labels mapped to the C-class train ids."""

  def __init__(self, examples: list[RawExample], num_classes: int, description: str, labels: bool = True):
    if not examples:
      raise DatasetError(f"{description}: no images found")
    classes.subset_lut(num_classes)  # Validates num_classes.
    # labels=False: label files are neither read nor returned (a target training stream).
    self._examples = examples if labels else [dataclasses.replace(e, label=None) for e in examples]
    self._num_classes = num_classes
    self.description = description

  def __len__(self) -> int:
    return len(self._examples)

  def __repr__(self) -> str:
    return f"FolderExamples({self.description}, {len(self)} examples)"

  def image_path(self, index: int) -> str:
    return self._examples[index].image

  def __getitem__(self, index: int) -> dict:
    example = load_example(self._examples[index])
    out = {"image": example["image"], "index": np.int32(index)}
    if "label" in example:
      label = example["label"]
      out["label"] = label if self._num_classes == 19 else classes.subset_lut(self._num_classes)[label + 1]
    return out
