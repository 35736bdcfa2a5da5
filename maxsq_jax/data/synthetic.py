"""The embedded default dataset: a seeded, procedurally drawn street-scene domain-adaptation benchmark.

Two domains share one scene generator (same label layout statistics: sky, buildings and trees above a
horizon, a road in perspective with sidewalks, terrain, walls and fences beside it, poles with signs
and lights, cars, buses and people) and differ only in appearance:

* ``source`` ("synthetic GTA5"): saturated palette, crisp edges, little noise, even lighting;
* ``target`` ("synthetic Cityscapes"): hue-rotated, desaturated palette, other textures (window grid,
  lane marks, foliage grain), sensor noise, blur, dim and uneven lighting.

Files are real PNGs in the real datasets' layouts, so training reads them through the same code path:

  <root>/synthetic_source/images/00000.png, labels/00000.png, list/{train,val}.txt   (GTA5 layout)
  <root>/synthetic_target/leftImg8bit/{train,val}/synth/synth_000000_000000_leftImg8bit.png
  <root>/synthetic_target/gtFine/{train,val}/synth/synth_000000_000000_gtFine_labelIds.png
                                                                                   (Cityscapes layout)

An optional shift that BatchNorm cannot absorb (``class_hue_deg`` > 0, off by default): in the target
domain every material's colour is also rotated around the grey axis by an angle of its own (the
class-wise hue shift below). BatchNorm re-normalises each feature channel with one mean and variance
over all pixels, so it can undo a global change of colour, brightness or contrast (the default
shift) but not colours that move differently for each class; only learning on the target images can.

Labels hold Cityscapes label ids (0 = unlabeled), mapped to train ids on load like GTA5's.
Target training labels are written (the Cityscapes layout has them) but only evaluation reads them.

  python -m maxsq_jax.data.synthetic --root=data --num_train=400 --num_val=100 --size=128,64 [--class_hue_deg=60]
"""

import dataclasses
import os
import re
import shutil

import numpy as np
from absl import app, flags
from PIL import Image, ImageFilter

from maxsq_jax import cli
from maxsq_jax.data import classes
from maxsq_jax.errors import DataError

FLAGS = flags.FLAGS

SOURCE_NAME = "synthetic_source"
TARGET_NAME = "synthetic_target"
_COMPLETE_MARKER = "COMPLETE"
# Written first into a folder the generator creates: what such a folder holds may be cleared.
_GENERATING_MARKER = "GENERATING"
# What the generator writes in a domain's folder (paths relative to it, '/'-separated): folders, files.
_OWN_FOLDERS = {SOURCE_NAME: re.compile(r"images|labels|list"),
                TARGET_NAME: re.compile(r"(leftImg8bit|gtFine)(/(train|val)(/synth)?)?")}
_OWN_FILES = {SOURCE_NAME: re.compile(r"(images|labels)/\d{5,}\.png|list/(train|val)\.txt"),
              TARGET_NAME: re.compile(r"(leftImg8bit|gtFine)/(train|val)/synth/synth_\d{6,}_\d{6}_"
                                      r"(leftImg8bit|gtFine_labelIds)\.png")}

# Cityscapes label ids used by the generator.
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY = (
    7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23)
PERSON, CAR, BUS = 24, 26, 28


@dataclasses.dataclass(frozen=True)
class DomainStyle:
  """How a domain renders a label map into an image."""
  hue_rotation_deg: float  # Rotation of the palette around the grey axis.
  saturation: float  # 1 keeps the palette's chroma.
  brightness: float
  contrast: float
  lighting_gradient: float  # Amplitude of a smooth left-to-right/top-to-bottom light falloff.
  noise_std: float  # Per-pixel Gaussian noise, 0-255 scale.
  blur_radius: float
  window_period: int  # Building texture: window grid spacing in pixels.
  texture_strength: float
  instance_jitter: float  # Per-object colour variation.


SOURCE_STYLE = DomainStyle(
    hue_rotation_deg=0.0, saturation=1.15, brightness=1.05, contrast=1.1, lighting_gradient=0.05,
    noise_std=3.0, blur_radius=0.0, window_period=6, texture_strength=1.0, instance_jitter=18.0)
TARGET_STYLE = DomainStyle(
    hue_rotation_deg=25.0, saturation=0.75, brightness=0.8, contrast=0.85, lighting_gradient=0.25,
    noise_std=8.0, blur_radius=0.6, window_period=4, texture_strength=0.7, instance_jitter=25.0)

# Shared "true" colours of the scene's materials (RGB); each domain renders them through its style.
_BASE_COLOURS = {
    ROAD: (110, 100, 112), SIDEWALK: (190, 150, 170), BUILDING: (140, 120, 95), WALL: (160, 160, 120),
    FENCE: (150, 110, 60), POLE: (200, 200, 200), LIGHT: (230, 170, 40), SIGN: (230, 220, 30),
    VEGETATION: (60, 140, 40), TERRAIN: (150, 190, 100), SKY: (110, 160, 220), PERSON: (200, 50, 70),
    CAR: (40, 50, 160), BUS: (30, 120, 140),
}


def _rect(label, y0, y1, x0, x1, value):
  h, w = label.shape
  y0, y1 = max(int(y0), 0), min(int(y1), h)
  x0, x1 = max(int(x0), 0), min(int(x1), w)
  if y1 > y0 and x1 > x0:
    label[y0:y1, x0:x1] = value


def _ellipse(label, cy, cx, ry, rx, value):
  h, w = label.shape
  yy, xx = np.ogrid[:h, :w]
  label[((yy - cy) / max(ry, 0.5)) ** 2 + ((xx - cx) / max(rx, 0.5)) ** 2 <= 1.0] = value


def draw_layout(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """Draws one street scene's label map: [H, W] uint8 Cityscapes label ids."""
  label = np.full((height, width), SKY, dtype=np.uint8)
  horizon = int(height * rng.uniform(0.38, 0.52))
  vanish_x = width * rng.uniform(0.35, 0.65)

  # Skyline: buildings and tree masses standing on the horizon, with gaps of sky.
  x = 0.0
  while x < width:
    seg = width * rng.uniform(0.07, 0.22)
    kind = rng.choice([BUILDING, BUILDING, BUILDING, VEGETATION, SKY])
    top = horizon - height * rng.uniform(0.12, 0.42)
    if kind == VEGETATION:
      for _ in range(3):
        _ellipse(label, top + height * 0.1 + rng.uniform(-3, 3), x + seg * rng.uniform(0.2, 0.8),
                 height * rng.uniform(0.08, 0.16), seg * rng.uniform(0.3, 0.6), VEGETATION)
      _rect(label, top + height * 0.1, horizon, x, x + seg, VEGETATION)
    elif kind == BUILDING:
      _rect(label, top, horizon, x, x + seg, BUILDING)
    x += seg

  # Ground: road in perspective, sidewalks, then terrain / wall / fence at the sides.
  rows = np.arange(horizon, height)
  t = (rows - horizon + 1) / (height - horizon)
  left_half, right_half = width * rng.uniform(0.35, 0.6), width * rng.uniform(0.35, 0.6)
  walk = width * rng.uniform(0.12, 0.3)
  side_left, side_right = rng.choice([TERRAIN, WALL, FENCE, VEGETATION], size=2, p=[0.5, 0.2, 0.2, 0.1])
  cols = np.arange(width)[None, :]
  road_l = (vanish_x - t * left_half)[:, None]
  road_r = (vanish_x + t * right_half)[:, None]
  ground = np.where(cols < vanish_x, side_left, side_right).astype(np.uint8)
  ground = np.where((cols >= road_l - t[:, None] * walk) & (cols < road_r + t[:, None] * walk),
                    SIDEWALK, ground)
  ground = np.where((cols >= road_l) & (cols < road_r), ROAD, ground).astype(np.uint8)
  label[horizon:] = ground
  # Walls and fences stand up from the ground at the sides.
  for side, kind in ((0, side_left), (1, side_right)):
    if kind in (WALL, FENCE):
      edge = vanish_x - left_half * 0.8 if side == 0 else vanish_x + right_half * 0.8
      x0, x1 = (0, max(edge - walk, 0)) if side == 0 else (min(edge + walk, width), width)
      _rect(label, horizon - height * rng.uniform(0.05, 0.15), horizon + height * 0.05, x0, x1, kind)

  # Objects, drawn far to near so nearer ones occlude.
  objects = []
  for _ in range(rng.integers(1, 4)):
    objects.append(("pole", rng.uniform(0.15, 1.0), rng.integers(0, 2)))
  for _ in range(rng.integers(1, 5)):
    objects.append(("car", rng.uniform(0.1, 1.0), rng.uniform(0.1, 0.9)))
  if rng.uniform() < 0.35:
    objects.append(("bus", rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8)))
  for _ in range(rng.integers(0, 5)):
    objects.append(("person", rng.uniform(0.15, 1.0), rng.integers(0, 2)))
  objects.sort(key=lambda o: o[1])
  for kind, depth, where in objects:
    y_ground = horizon + depth * (height - horizon)
    scale = 0.15 + 0.85 * depth
    road_l_y = vanish_x - depth * left_half
    road_r_y = vanish_x + depth * right_half
    if kind in ("car", "bus"):
      x_c = road_l_y + where * (road_r_y - road_l_y)
      w_obj = width * (0.22 if kind == "car" else 0.42) * scale
      h_obj = height * (0.16 if kind == "car" else 0.34) * scale
      value = CAR if kind == "car" else BUS
      _rect(label, y_ground - h_obj, y_ground, x_c - w_obj / 2, x_c + w_obj / 2, value)
      if kind == "car":  # Cabin narrower than the body.
        _rect(label, y_ground - h_obj * 1.5, y_ground - h_obj * 0.9, x_c - w_obj / 3, x_c + w_obj / 3, CAR)
    elif kind == "pole":
      x_p = road_l_y - depth * walk * 0.6 if where == 0 else road_r_y + depth * walk * 0.6
      h_pole = height * 0.55 * scale
      w_pole = max(1.0, width * 0.012 * scale)
      _rect(label, y_ground - h_pole, y_ground, x_p - w_pole / 2, x_p + w_pole / 2, POLE)
      head = SIGN if rng.uniform() < 0.6 else LIGHT
      hs = max(2.0, height * 0.06 * scale)
      if head == SIGN:
        _rect(label, y_ground - h_pole - hs, y_ground - h_pole + hs * 0.6, x_p - hs, x_p + hs, SIGN)
      else:
        _rect(label, y_ground - h_pole - hs * 1.6, y_ground - h_pole + hs * 0.4, x_p - hs * 0.5,
              x_p + hs * 0.5, LIGHT)
    else:  # person on a sidewalk
      x_p = road_l_y - depth * walk * 0.5 if where == 0 else road_r_y + depth * walk * 0.5
      h_p = height * 0.22 * scale
      _ellipse(label, y_ground - h_p / 2, x_p, h_p / 2, max(1.0, h_p / 5), PERSON)
      _ellipse(label, y_ground - h_p * 1.05, x_p, max(1.0, h_p / 8), max(1.0, h_p / 8), PERSON)
  return label


def _hue_rotation_matrix(degrees: float) -> np.ndarray:
  """3x3 RGB matrix rotating colours around the grey axis (luminance preserved approximately)."""
  theta = np.deg2rad(degrees)
  c, s = np.cos(theta), np.sin(theta)
  k = 1.0 / 3.0
  sq = np.sqrt(k)
  return np.array([
      [c + (1 - c) * k, k * (1 - c) - sq * s, k * (1 - c) + sq * s],
      [k * (1 - c) + sq * s, c + k * (1 - c), k * (1 - c) - sq * s],
      [k * (1 - c) - sq * s, k * (1 - c) + sq * s, c + k * (1 - c)],
  ])


def class_hue_angles(seed: int, class_hue_deg: float) -> dict[int, float]:
  """{label id: degrees} of the class-wise hue shift: each material of _BASE_COLOURS turns by
  ±U(0.5, 1)·class_hue_deg (sign and size drawn per class, from `seed` alone), so that classes move
  apart and across one another in colour; all 0 when class_hue_deg is 0."""
  if not class_hue_deg:
    return {value: 0.0 for value in _BASE_COLOURS}
  rng = np.random.default_rng([seed, 21])
  signs = rng.choice([-1.0, 1.0], size=len(_BASE_COLOURS))
  sizes = rng.uniform(0.5, 1.0, size=len(_BASE_COLOURS))
  return {value: float(class_hue_deg * s * m) for value, s, m in zip(_BASE_COLOURS, signs, sizes)}


def render(rng: np.random.Generator, label: np.ndarray, style: DomainStyle,
           class_hues: dict[int, float] | None = None) -> np.ndarray:
  """Renders a label map [H, W] (Cityscapes ids) into an RGB image [H, W, 3] uint8 in a domain's style;
  `class_hues` ({label id: degrees}, class_hue_angles) first turns each material's colour."""
  height, width = label.shape
  image = np.zeros((height, width, 3), dtype=np.float32)
  yy, xx = np.mgrid[:height, :width].astype(np.float32)
  for value, colour in _BASE_COLOURS.items():
    mask = label == value
    if not mask.any():
      continue
    base = np.asarray(colour, np.float32)
    if class_hues and class_hues[value]:
      base = np.clip(_hue_rotation_matrix(class_hues[value]) @ base, 0, 255).astype(np.float32)
    if value in (CAR, BUS, PERSON):
      # Objects come in many colours: only their shape and context identify them.
      base = np.clip(base + rng.normal(0, style.instance_jitter * 3, size=3), 0, 255)
    else:
      base = np.clip(base + rng.normal(0, style.instance_jitter, size=3), 0, 255)
    image[mask] = base
  s = style.texture_strength
  p = style.window_period
  windows = ((yy.astype(int) % p) < p // 2) & ((xx.astype(int) % p) < p // 2)
  image[(label == BUILDING) & windows] *= 1.0 - 0.35 * s
  foliage = rng.normal(0, 25 * s, size=(height, width))
  for value in (VEGETATION, TERRAIN):
    image[label == value] += foliage[label == value][:, None]
  lane = (label == ROAD) & (np.abs(xx - np.median(xx[label == ROAD]) if (label == ROAD).any() else 0) < 1)
  lane &= (yy.astype(int) // max(p, 2)) % 2 == 0
  image[lane] = 230.0
  sky = label == SKY
  image[sky] *= (0.85 + 0.3 * (yy[sky] / height))[:, None]

  # Domain appearance: palette rotation, saturation, contrast, brightness, uneven light.
  image = image @ _hue_rotation_matrix(style.hue_rotation_deg).T
  grey = image.mean(axis=-1, keepdims=True)
  image = grey + style.saturation * (image - grey)
  image = 128.0 + style.contrast * (image - 128.0)
  direction = rng.uniform(0, 2 * np.pi)
  ramp = (np.cos(direction) * (xx / width - 0.5) + np.sin(direction) * (yy / height - 0.5))
  image *= (style.brightness * (1.0 + style.lighting_gradient * 2 * ramp))[..., None]
  image += rng.normal(0, style.noise_std, size=image.shape)
  out = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
  if style.blur_radius > 0:
    out = out.filter(ImageFilter.GaussianBlur(radius=style.blur_radius))
  return np.asarray(out)


def _write_png(path: str, array: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def generate(root: str, num_train: int = 400, num_val: int = 100, size: tuple[int, int] = (128, 64),
             seed: int = 0, verbose: bool = True, class_hue_deg: float = 0.0) -> tuple[str, str]:
  """Writes both domains under `root`; returns (source_dir, target_dir).

  `size` is (width, height). `class_hue_deg` > 0 adds the class-wise hue shift to the target domain
  (class_hue_angles; the source domain and every scene are the same as without it). Each domain's
  folder gets a COMPLETE marker only once every file is written, so an interrupted generation is redone
  (its files cleared first: `_make_room`) rather than read half-written.
  """
  width, height = size
  source_dir = os.path.join(root, SOURCE_NAME)
  target_dir = os.path.join(root, TARGET_NAME)
  splits = (("train", num_train), ("val", num_val))
  # Separate streams per (domain, split, index): the domains share layout statistics, not scenes.
  domains = ((source_dir, SOURCE_STYLE, None), (target_dir, TARGET_STYLE, class_hue_angles(seed, class_hue_deg)))
  for domain_index, (domain_dir, style, class_hues) in enumerate(domains):
    if is_complete(domain_dir):
      continue
    _make_room(domain_dir)
    for split_index, (split, count) in enumerate(splits):
      ids = []
      for i in range(count):
        rng = np.random.default_rng([seed, domain_index, split_index, i])
        label = draw_layout(rng, height, width)
        image = render(rng, label, style, class_hues)
        if domain_dir == source_dir:
          name = f"{split_index * 100000 + i:05d}"
          _write_png(os.path.join(domain_dir, "images", f"{name}.png"), image)
          _write_png(os.path.join(domain_dir, "labels", f"{name}.png"), label)
          ids.append(f"{name}.png")
        else:
          stem = f"synth_{i:06d}_000019"
          _write_png(os.path.join(domain_dir, "leftImg8bit", split, "synth", f"{stem}_leftImg8bit.png"), image)
          _write_png(os.path.join(domain_dir, "gtFine", split, "synth", f"{stem}_gtFine_labelIds.png"), label)
      if domain_dir == source_dir:
        os.makedirs(os.path.join(domain_dir, "list"), exist_ok=True)
        with open(os.path.join(domain_dir, "list", f"{split}.txt"), "w") as f:
          f.write("\n".join(ids) + "\n")
      if verbose:
        print(f"synthetic: wrote {count} {split} images to {domain_dir}", flush=True)
    with open(os.path.join(domain_dir, _COMPLETE_MARKER), "w") as f:
      f.write(f"num_train={num_train} num_val={num_val} size={width},{height} seed={seed}"
              + (f" class_hue_deg={class_hue_deg}" if class_hue_deg else "") + "\n")
    os.unlink(os.path.join(domain_dir, _GENERATING_MARKER))
  return source_dir, target_dir


def _foreign_entries(domain_dir: str) -> list[str]:
  """The entries of `domain_dir` (relative paths) that the generator does not write; symbolic links
  are never its own."""
  name = os.path.basename(os.path.normpath(domain_dir))
  foreign = []
  for folder, subfolders, files in os.walk(domain_dir):
    relative = os.path.relpath(folder, domain_dir)
    for entry in sorted(subfolders) + sorted(files):
      path = entry if relative == "." else f"{relative}/{entry}"
      full = os.path.join(folder, entry)
      if os.path.islink(full):
        foreign.append(f"{path} (a symbolic link)")
      elif entry in subfolders:
        if not _OWN_FOLDERS[name].fullmatch(path):
          foreign.append(f"{path}/")
          subfolders.remove(entry)  # Named once, not walked.
      elif not _OWN_FILES[name].fullmatch(path):
        foreign.append(path)
  return foreign


def _make_room(domain_dir: str) -> None:
  """Makes `domain_dir` an empty folder that holds the GENERATING marker. An interrupted generation's
  files are removed (its stale files, of other counts or sizes, would be read with the new ones), but
  only from a folder the generator created (the marker) or one holding nothing but the generator's
  own files; anything else, and a symbolic link, is a DataError that leaves it as it is."""
  if os.path.islink(domain_dir):
    raise DataError(f"{domain_dir} is a symbolic link (to {os.readlink(domain_dir)}) and holds no complete "
                    "generated dataset; the synthetic generator writes only into a folder it creates: remove the "
                    "link, or name a folder that does not exist")
  if os.path.lexists(domain_dir) and not os.path.isdir(domain_dir):
    raise DataError(f"{domain_dir} is a file, not a folder: move it away, or name a folder that does not exist "
                    "for the synthetic dataset")
  if os.path.isdir(domain_dir):
    if not os.path.exists(os.path.join(domain_dir, _GENERATING_MARKER)):
      foreign = _foreign_entries(domain_dir)
      if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise DataError(
            f"{domain_dir} has no {_COMPLETE_MARKER} marker and holds files the synthetic generator does not "
            f"write: {', '.join(foreign[:5])}{more}. It is not an interrupted generation, so nothing was deleted: "
            "move those files away, or name a folder that does not exist for the synthetic dataset")
    for entry in os.scandir(domain_dir):
      if entry.is_dir(follow_symlinks=False):
        shutil.rmtree(entry.path)
      else:
        os.unlink(entry.path)
  os.makedirs(domain_dir, exist_ok=True)
  with open(os.path.join(domain_dir, _GENERATING_MARKER), "w") as f:
    f.write("written by maxsq_jax.data.synthetic; cleared by the next generation unless COMPLETE is here\n")


def is_complete(domain_dir: str) -> bool:
  return os.path.exists(os.path.join(domain_dir, _COMPLETE_MARKER))


def generate_command(root: str, num_train: int, num_val: int, size: tuple[int, int]) -> str:
  """The command line that creates the dataset (quoted in errors about a missing folder)."""
  return (f"python -m maxsq_jax.data.synthetic --root={root} --num_train={num_train} "
          f"--num_val={num_val} --size={size[0]},{size[1]}")


def define_flags() -> None:
  """The command line's flags (cli.run defines them when this module runs as a program)."""
  flags.DEFINE_string("root", "data", "Folder receiving synthetic_source/ and synthetic_target/.")
  flags.DEFINE_integer("num_train", 400, "Train images per domain.")
  flags.DEFINE_integer("num_val", 100, "Val images per domain.")
  flags.DEFINE_string("size", "128,64", "W,H of every image, in pixels.")
  flags.DEFINE_integer("seed", 0, "Seed of the scene generator (same seed: same files).")
  flags.DEFINE_float("class_hue_deg", 0.0, "Class-wise hue shift of the target domain, in degrees (0: none).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    width, height = (int(v) for v in FLAGS.size.split(","))
  except ValueError:
    raise app.UsageError(f"--size={FLAGS.size}: give W,H in pixels, e.g. --size=128,64") from None
  generate(FLAGS.root, FLAGS.num_train, FLAGS.num_val, (width, height), FLAGS.seed,
           class_hue_deg=FLAGS.class_hue_deg)


def command() -> None:
  """`maxsq-synthetic` (pyproject.toml), the same as `python -m maxsq_jax.data.synthetic`."""
  cli.run(main, define_flags)


if __name__ == "__main__":
  command()
