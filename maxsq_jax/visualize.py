"""Pictures of predictions: image | ground truth | prediction panels as PNG files."""

import os

import numpy as np
from PIL import Image

from maxsq_jax.data import transforms


def prediction_panel(image: np.ndarray, label: np.ndarray, prediction: np.ndarray, num_classes: int,
                     normalization: str) -> np.ndarray:
  """uint8 [H, 3W, 3]: the (denormalised) image, the colourised label and prediction side by side.

  image: float [H, W, 3] as fed to the model; label, prediction: int [H, W] train ids (-1 = ignore).
  """
  return np.concatenate([transforms.denormalize(image, normalization), transforms.colourize(label, num_classes),
                         transforms.colourize(prediction, num_classes)], axis=1)


def save_png(path: str, array: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)
