"""Tiny fake dataset trees in each dataset's real folder layout and file formats, for the data tests.

  GTA5        images/00001.png (RGB), labels/00001.png (8-bit palette PNG of Cityscapes ids), list/*.txt
  SYNTHIA     RAND_CITYSCAPES/RGB/0000000.png, GT/LABELS/0000000.png (16-bit RGB PNG: class id, instance id, 0)
  Cityscapes  leftImg8bit/{split}/{city}/{city}_000000_0000NN_leftImg8bit.png, gtFine/.../*_gtFine_labelIds.png (L)
  NTHU        {City}/Images/Train/*.jpg, Images/Test/*.jpg, Labels/Test/*_eval.png (L)

Every writer returns {key: label ids array} so tests can compute the expected train ids themselves.
Label ids cover every id of the dataset (Cityscapes 0..33, SYNTHIA 0..22) and, for SYNTHIA, instance
ids above 255 in the second channel, so a reader that drops the low byte or mixes channels fails.
"""

import os
import struct
import zlib

import numpy as np
from PIL import Image

# Cityscapes colours by label id (the GTA5 label palette); any palette works, the ids are the indices.
_PALETTE = np.random.default_rng(123).integers(0, 256, (256, 3)).astype(np.uint8)


def _image(rng, size) -> np.ndarray:
  width, height = size
  base = rng.integers(0, 256, (1, 1, 3))
  ramp = np.linspace(0, 60, width)[None, :, None]
  noise = rng.integers(0, 40, (height, width, 3))
  return np.clip(base + ramp + noise, 0, 255).astype(np.uint8)


def _ids(rng, size, num_ids: int) -> np.ndarray:
  """A label map of blocks covering ids 0..num_ids-1 (shuffled), then random pixels."""
  width, height = size
  ids = rng.integers(0, num_ids, (height, width))
  flat = ids.reshape(-1)
  flat[:num_ids] = rng.permutation(num_ids)
  return ids


def write_png16(path: str, array: np.ndarray) -> None:
  """A 16-bit PNG (grey, grey+alpha, RGB or RGBA from the channel count) with every row filter type
  (None, Sub, Up, Average, Paeth in turn), written without Pillow (which cannot write 16-bit colour)."""
  if array.ndim == 2:
    array = array[..., None]
  height, width, channels = array.shape
  colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
  bpp = 2 * channels
  raw = array.astype(">u2").reshape(height, width * channels).view(np.uint8).astype(np.int32)
  rows = []
  for y in range(height):
    line = raw[y]
    prior = raw[y - 1] if y > 0 else np.zeros_like(line)
    left = np.concatenate([np.zeros(bpp, np.int32), line[:-bpp]])
    upper_left = np.concatenate([np.zeros(bpp, np.int32), prior[:-bpp]])
    kind = y % 5
    if kind == 0:
      filtered = line
    elif kind == 1:
      filtered = line - left
    elif kind == 2:
      filtered = line - prior
    elif kind == 3:
      filtered = line - (left + prior) // 2
    else:
      p = left + prior - upper_left
      pa, pb, pc = np.abs(p - left), np.abs(p - prior), np.abs(p - upper_left)
      predictor = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prior, upper_left))
      filtered = line - predictor
    rows.append(bytes([kind]) + (filtered % 256).astype(np.uint8).tobytes())

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


def _save_palette(path: str, ids: np.ndarray) -> None:
  image = Image.fromarray(ids.astype(np.uint8), mode="P")
  image.putpalette(_PALETTE.reshape(-1).tolist())
  image.save(path)


def fake_gta5(root, splits=None, size=(24, 16), seed=0) -> dict:
  """GTA5 tree; splits: {split: [ids]} written to list/{split}.txt (default train 1..6, val 7..9)."""
  splits = splits or {"train": list(range(1, 7)), "val": [7, 8, 9]}
  rng = np.random.default_rng(seed)
  for sub in ("images", "labels", "list"):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
  labels = {}
  for split, ids in splits.items():
    with open(os.path.join(root, "list", f"{split}.txt"), "w") as f:
      f.write("".join(f"{i}\n" for i in ids))  # The reference's lists hold bare integer ids.
    for i in ids:
      name = f"{i:05d}.png"
      Image.fromarray(_image(rng, size)).save(os.path.join(root, "images", name))
      ids_map = _ids(rng, size, 34)
      _save_palette(os.path.join(root, "labels", name), ids_map)
      labels[f"images/{name}"] = ids_map
  return labels


def fake_synthia(root, num=5, size=(24, 16), seed=1) -> dict:
  """SYNTHIA-RAND-CITYSCAPES tree under root/RAND_CITYSCAPES (16-bit RGB labels)."""
  rng = np.random.default_rng(seed)
  base = os.path.join(root, "RAND_CITYSCAPES")
  os.makedirs(os.path.join(base, "RGB"), exist_ok=True)
  os.makedirs(os.path.join(base, "GT", "LABELS"), exist_ok=True)
  labels = {}
  for i in range(num):
    name = f"{i:07d}.png"
    Image.fromarray(_image(rng, size)).save(os.path.join(base, "RGB", name))
    ids_map = _ids(rng, size, 23)
    instances = rng.integers(0, 60000, ids_map.shape)
    write_png16(os.path.join(base, "GT", "LABELS", name),
                np.stack([ids_map, instances, np.zeros_like(ids_map)], axis=-1))
    labels[f"RGB/{name}"] = ids_map
  return labels


def fake_cityscapes(root, splits=None, size=(32, 16), seed=2) -> dict:
  """Cityscapes tree; splits: {split: number of images} spread over two cities."""
  splits = splits or {"train": 4, "val": 3}
  rng = np.random.default_rng(seed)
  labels = {}
  for split, count in splits.items():
    for i in range(count):
      city = ("aachen", "bochum")[i % 2]
      stem = f"{city}_000000_{i:06d}"
      image_dir = os.path.join(root, "leftImg8bit", split, city)
      label_dir = os.path.join(root, "gtFine", split, city)
      os.makedirs(image_dir, exist_ok=True)
      os.makedirs(label_dir, exist_ok=True)
      Image.fromarray(_image(rng, size)).save(os.path.join(image_dir, f"{stem}_leftImg8bit.png"))
      ids_map = _ids(rng, size, 34)
      Image.fromarray(ids_map.astype(np.uint8), mode="L").save(os.path.join(label_dir, f"{stem}_gtFine_labelIds.png"))
      labels[f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"] = ids_map
  return labels


def fake_nthu(root, city="Rome", num_train=4, num_test=3, size=(32, 16), seed=3) -> dict:
  """One NTHU city under root/<City>: JPEG images, Labels/Test/{id}_eval.png (Cityscapes ids)."""
  rng = np.random.default_rng(seed)
  base = os.path.join(root, city)
  for sub in ("Images/Train", "Images/Test", "Labels/Test"):
    os.makedirs(os.path.join(base, sub), exist_ok=True)
  labels = {}
  for i in range(num_train):
    Image.fromarray(_image(rng, size)).save(os.path.join(base, "Images", "Train", f"pano_{i:05d}_0_0.jpg"), quality=95)
  for i in range(num_test):
    stem = f"pano_{i:05d}_1_180"
    Image.fromarray(_image(rng, size)).save(os.path.join(base, "Images", "Test", f"{stem}.jpg"), quality=95)
    ids_map = _ids(rng, size, 34)
    Image.fromarray(ids_map.astype(np.uint8), mode="L").save(os.path.join(base, "Labels", "Test", f"{stem}_eval.png"))
    labels[f"Images/Test/{stem}.jpg"] = ids_map
  return labels
