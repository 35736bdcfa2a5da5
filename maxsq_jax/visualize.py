"""Pictures of predictions (uint8 RGB arrays, saved as PNG and sent to TensorBoard).

- `prediction_panel`: image | ground truth | prediction, in Cityscapes colours.
- `error_panel`: where the prediction is wrong, coloured by the missed (ground-truth) class | by the
  wrongly predicted class; correct pixels grey, ignored pixels black.
- `class_error_grid`: one tile per class present in the label or the prediction: true positives
  green, false negatives (class missed) red, false positives (class wrongly predicted) blue, with
  the class name and its IoU on this image.
- `confusion_image`: the row-normalised confusion matrix (rows = ground truth) as a heat map with
  class names on both axes and a colour scale (matplotlib).
- `enlarge`: nearest-neighbour scaling to a viewable width (the evaluation enlarges its pictures).
"""


import numpy as np
from PIL import Image, ImageDraw, ImageFont

from maxsq_jax import paths
from maxsq_jax.data import classes, transforms

CORRECT_GREY = np.array([90, 90, 90], np.uint8)
TP_COLOUR = np.array([40, 200, 40], np.uint8)
FN_COLOUR = np.array([230, 40, 40], np.uint8)
FP_COLOUR = np.array([40, 90, 240], np.uint8)
TILE_BACKGROUND = np.array([25, 25, 25], np.uint8)
VIEW_WIDTH = 512  # Pictures narrower than this are enlarged (nearest neighbour) so that they can be seen.


def prediction_panel(image: np.ndarray, label: np.ndarray, prediction: np.ndarray, num_classes: int,
                     normalization: str) -> np.ndarray:
  """uint8 [H, 3W, 3]: the (denormalised) image, the colourised label and prediction side by side.

  image: float [H, W, 3] as fed to the model; label, prediction: int [H, W] train ids (-1 = ignore).
  """
  return np.concatenate([transforms.denormalize(image, normalization), transforms.colourize(label, num_classes),
                         transforms.colourize(prediction, num_classes)], axis=1)


def error_panel(label: np.ndarray, prediction: np.ndarray, num_classes: int) -> np.ndarray:
  """uint8 [H, 2W, 3]: errors coloured by the ground-truth class (what was missed) | by the predicted
  class (what was wrongly predicted); correct pixels grey, ignored (label -1) black."""
  valid = (label >= 0) & (label < num_classes)
  wrong = valid & (label != prediction)
  panels = []
  for colour_by in (label, prediction):
    out = np.zeros(label.shape + (3,), np.uint8)
    out[valid & ~wrong] = CORRECT_GREY
    colours = transforms.colourize(colour_by, num_classes)
    out[wrong] = colours[wrong]
    panels.append(out)
  return np.concatenate(panels, axis=1)


def _font():
  try:
    return ImageFont.load_default()
  except OSError:  # pragma: no cover - Pillow without its bundled font.
    return None


def _write(array: np.ndarray, text: str, xy=(2, 1), fill=(255, 255, 255)) -> np.ndarray:
  image = Image.fromarray(array)
  ImageDraw.Draw(image).text(xy, text, fill=fill, font=_font())
  return np.asarray(image)


def _rescale_nearest(array: np.ndarray, max_width: int, min_width: int = 128) -> np.ndarray:
  """Nearest-neighbour down- (to <= max_width) or up-scaling (to >= min_width, so names fit)."""
  if array.shape[1] > max_width:
    step = -(-array.shape[1] // max_width)
    return array[::step, ::step]
  return enlarge(array, min_width)


def class_error_grid(label: np.ndarray, prediction: np.ndarray, num_classes: int, names=None,
                     columns: int = 4, tile_width: int = 256) -> np.ndarray:
  """uint8 grid of per-class error maps for one image (see the module docstring).

  Tiles are nearest-rescaled to between 128 and `tile_width` pixels wide; classes that occur neither in
  the label nor in the prediction are left out (an all-correct image without classes gives one
  empty tile).
  """
  names = names or classes.class_names(num_classes)
  label, prediction = _rescale_nearest(label, tile_width), _rescale_nearest(prediction, tile_width)
  valid = (label >= 0) & (label < num_classes)
  present = [c for c in range(num_classes) if np.any(valid & (label == c)) or np.any(valid & (prediction == c))]
  header = 12
  h, w = label.shape
  tiles = []
  for c in present:
    gt, pr = valid & (label == c), valid & (prediction == c)
    tile = np.zeros((h, w, 3), np.uint8)
    tile[:] = TILE_BACKGROUND
    tile[gt & pr] = TP_COLOUR
    tile[gt & ~pr] = FN_COLOUR
    tile[~gt & pr] = FP_COLOUR
    union = int((gt | pr).sum())
    iou = (gt & pr).sum() / union if union else float("nan")
    top = np.zeros((header, w, 3), np.uint8)
    top = _write(top, f"{names[c]} {100 * iou:.0f}%", xy=(2, 0))
    tiles.append(np.concatenate([top, tile], axis=0))
  if not tiles:
    tiles.append(np.zeros((h + header, w, 3), np.uint8))
  rows = []
  for r in range(0, len(tiles), columns):
    row = tiles[r:r + columns]
    row += [np.zeros_like(tiles[0])] * (columns - len(row)) if len(tiles) > columns else []
    rows.append(np.concatenate(row, axis=1))
  return np.concatenate(rows, axis=0)


def confusion_figure(confusion: np.ndarray, names):
  """matplotlib Figure of the row-normalised confusion matrix (rows: ground truth, columns: prediction):
  a heat map with the class names on both axes and a colour scale (the fraction of a class's pixels,
  square-root spaced so that small confusions stay visible next to the diagonal); rows without
  ground-truth pixels are left blank."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.colors import PowerNorm
  from matplotlib.figure import Figure
  confusion = np.asarray(confusion, np.float64)
  rows = confusion.sum(1, keepdims=True)
  with np.errstate(invalid="ignore", divide="ignore"):
    normalized = np.ma.masked_where(np.broadcast_to(rows == 0, confusion.shape), confusion / np.maximum(rows, 1))
  c = len(names)
  side = 2.5 + 0.3 * c
  fig = Figure(figsize=(max(side + 1.5, 6.0), max(side, 5.0)), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  heat = ax.imshow(normalized, cmap="viridis", norm=PowerNorm(0.5, vmin=0.0, vmax=1.0))
  ax.set_xticks(range(c), names, rotation=90)
  ax.set_yticks(range(c), names)
  ax.set_xlabel("predicted class")
  ax.set_ylabel("ground-truth class")
  fig.colorbar(heat, ax=ax, label="fraction of the ground-truth class's pixels")
  fig.tight_layout()
  return fig


def confusion_image(confusion: np.ndarray, names) -> np.ndarray:
  """uint8 [H, W, 3] rendering of `confusion_figure` (at least 600 pixels wide)."""
  fig = confusion_figure(confusion, names)
  fig.canvas.draw()
  return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def enlarge(array: np.ndarray, min_width: int = VIEW_WIDTH) -> np.ndarray:
  """`array` [H, W, ...] scaled up by the smallest integer factor k (nearest neighbour: each pixel
  becomes a k x k block) that makes it at least `min_width` wide; unchanged when it already is."""
  factor = max(1, -(-min_width // array.shape[1]))
  return np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)


def save_png(path, array: np.ndarray) -> None:
  """Writes uint8 `array` [H, W, 3] as a PNG at `path` (local or gs://), creating its directory."""
  path = paths.resolve(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    Image.fromarray(array).save(f, format="PNG")
