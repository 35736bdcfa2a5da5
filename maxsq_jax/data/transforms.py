"""Small pure per-example preprocessing ops on {"image": uint8 [H,W,3], "label": int32 [H,W]} dicts.

Images are resized bicubic, labels only nearest-neighbour (docs/method.md, Data). Random ops take a
``np.random.Generator`` so a grain ``random_map`` makes them deterministic per (seed, example, epoch).
"""

import numpy as np
from PIL import Image, ImageFilter

from maxsq_jax.data import classes

# The reference's BGR means (docs/method.md, Data); RGB mean/std is the ImageNet convention.
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


def random_scale_crop(example: dict, rng: np.random.Generator, size: tuple[int, int],
                      scale_range: tuple[float, float] = (0.5, 2.0)) -> dict:
  """The reference's optional random scale + crop (its `random_crop` path, docs/method.md, Data).

  The side that limits fitting `size` = (width, height) is scaled to an integer drawn uniformly
  from [lo*base, hi*base] (base = that side of `size`), keeping the aspect ratio (image bicubic,
  label nearest); the result is zero-padded right and bottom (label: ignore) up to `size` and a
  random `size` window is cut out.
  """
  crop_w, crop_h = size
  lo, hi = scale_range
  height, width = example["image"].shape[:2]
  if crop_w / width > crop_h / height:
    new_w = int(rng.integers(int(crop_w * lo), int(crop_w * hi) + 1))
    new_h = int(1.0 * height * new_w / width)
  else:
    new_h = int(rng.integers(int(crop_h * lo), int(crop_h * hi) + 1))
    new_w = int(1.0 * width * new_h / height)
  out = resize(example, (new_w, new_h))
  pad_h, pad_w = max(crop_h - new_h, 0), max(crop_w - new_w, 0)
  if pad_h or pad_w:
    out["image"] = np.pad(out["image"], ((0, pad_h), (0, pad_w), (0, 0)))
    if "label" in out:
      out["label"] = np.pad(out["label"], ((0, pad_h), (0, pad_w)), constant_values=classes.IGNORE_LABEL)
  height, width = out["image"].shape[:2]
  x0 = int(rng.integers(0, width - crop_w + 1))
  y0 = int(rng.integers(0, height - crop_h + 1))
  out["image"] = out["image"][y0:y0 + crop_h, x0:x0 + crop_w]
  if "label" in out:
    out["label"] = out["label"][y0:y0 + crop_h, x0:x0 + crop_w]
  return out


def random_flip(example: dict, rng: np.random.Generator) -> dict:
  """Mirrors image and label horizontally with probability 1/2."""
  if rng.uniform() < 0.5:
    return example
  out = dict(example)
  out["image"] = _mirror_pixels(example["image"])
  if "label" in example:
    out["label"] = example["label"][:, ::-1]
  return out


def _mirror_pixels(image: np.ndarray) -> np.ndarray:
  """A contiguous mirrored copy of [H, W, C] uint8; each pixel moves as one C-byte item, about 2x
  faster than numpy's copy of a reversed byte axis (and PIL then takes it without another copy)."""
  height, width, channels = image.shape
  pixels = np.ascontiguousarray(image).view(f"V{channels}")
  return pixels[:, ::-1].copy().view(np.uint8).reshape(height, width, channels)


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
  if mode == "bgr_mean":
    return np.subtract(image[..., ::-1], BGR_MEAN, dtype=np.float32)  # One pass, no float copy first.
  if mode == "rgb_mean_std":
    out = np.subtract(image, RGB_MEAN, dtype=np.float32)
    out /= RGB_STD
    return out
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
