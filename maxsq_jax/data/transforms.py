"""Small pure per-example preprocessing ops on {"image": uint8 [H,W,3], "label": int32 [H,W]} dicts.

Images are resized bicubic, labels only nearest-neighbour (METHOD.md §4). Random ops take a
``np.random.Generator`` so a grain ``random_map`` makes them deterministic per (seed, example, epoch).
"""

import numpy as np
from PIL import Image, ImageFilter

from maxsq_jax.data import classes

# The reference's BGR means (METHOD.md §4); RGB mean/std is the ImageNet convention.
BGR_MEAN = np.array([104.00698793, 116.66876762, 122.67891434], dtype=np.float32)
RGB_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
RGB_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)


def resize(example: dict, size: tuple[int, int]) -> dict:
  """Resizes image (bicubic) and label (nearest) to size = (width, height)."""
  width, height = size
  out = dict(example)
  image = example["image"]
  if image.shape[1] != width or image.shape[0] != height:
    out["image"] = np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))
  if "label" in example:
    label = example["label"]
    if label.shape[1] != width or label.shape[0] != height:
      # Labels go through PIL as int32 ("I" mode) so -1 survives nearest-neighbour resizing.
      out["label"] = np.asarray(Image.fromarray(label.astype(np.int32), mode="I").resize(
          (width, height), Image.NEAREST)).astype(np.int32)
  return out


def random_flip(example: dict, rng: np.random.Generator) -> dict:
  """Mirrors image and label horizontally with probability 1/2."""
  if rng.uniform() < 0.5:
    return example
  out = dict(example)
  out["image"] = example["image"][:, ::-1]
  if "label" in example:
    out["label"] = example["label"][:, ::-1]
  return out


def random_blur(example: dict, rng: np.random.Generator) -> dict:
  """PIL Gaussian blur with probability 1/2 and radius ~ U[0, 1) (the reference's augmentation)."""
  if rng.uniform() < 0.5:
    return example
  out = dict(example)
  out["image"] = np.asarray(Image.fromarray(np.ascontiguousarray(example["image"])).filter(
      ImageFilter.GaussianBlur(radius=float(rng.uniform()))))
  return out


def normalize(image: np.ndarray, mode: str) -> np.ndarray:
  """uint8 RGB [H,W,3] -> float32 [H,W,3]: "bgr_mean" (reference: BGR, minus mean, no std) or "rgb_mean_std"."""
  image = image.astype(np.float32)
  if mode == "bgr_mean":
    return image[..., ::-1] - BGR_MEAN
  if mode == "rgb_mean_std":
    return (image - RGB_MEAN) / RGB_STD
  raise ValueError(f"config.data.normalization={mode!r}: use 'bgr_mean' or 'rgb_mean_std'.")


def denormalize(image: np.ndarray, mode: str) -> np.ndarray:
  """Inverse of `normalize`, back to uint8 RGB (for pictures of predictions)."""
  if mode == "bgr_mean":
    rgb = (image + BGR_MEAN)[..., ::-1]
  else:
    rgb = image * RGB_STD + RGB_MEAN
  return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def finalize(example: dict, normalization: str) -> dict:
  """Normalises the image and fixes dtypes; labels stay int32 with -1 = ignore."""
  out = {"image": normalize(np.ascontiguousarray(example["image"]), normalization)}
  if "label" in example:
    out["label"] = np.ascontiguousarray(example["label"]).astype(np.int32)
  for key in ("index", "mask"):
    if key in example:
      out[key] = example[key]
  return out


def colourize(label: np.ndarray, num_classes: int) -> np.ndarray:
  """int [H,W] train ids -> uint8 [H,W,3] Cityscapes colours; ignore (-1) is black."""
  colours = np.concatenate([np.zeros((1, 3), np.uint8), classes.palette(num_classes)], axis=0)
  return colours[np.clip(label, -1, num_classes - 1) + 1]
