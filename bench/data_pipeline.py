r"""Training input pipeline speed on CPU: grain, a plain PIL + numpy loop, a pre-resized split, side by side.

  python bench/data_pipeline.py [--images=16] [--batches=48] [--out=/tmp/maxsq_bench_data]

Writes street scenes of the reference sizes in the datasets' real formats (GTA5 layout at 1914x1052,
PNG images + palette PNG id labels; Cityscapes layout at 2048x1024), prepares them with the tfds
builders, then times the per-step work of training on one core:
  * grain: `pipeline.train_stream` over the prepared datasets (decode, mirror, resize to 1280x720 /
    1024x512, blur, BGR mean normalisation, batch, global array), threads=0 and workers=0, so all
    of it runs on the calling thread;
  * plain: a loop over the raw files doing the same (PIL decode of image and label, id -> train id
    table, mirror, bicubic / nearest resize, blur, normalise, np.stack);
  * pre-resized: `pipeline.train_stream` over the same datasets prepared with
    `--train_size` (the train split stored at 1280x720 / 1024x512: decode fewer pixels, no resize).
Both are measured in images per CPU-second of this process (time.process_time, so other load on a
shared machine counts less) and in images per wall-clock second, with the ratio grain / plain; a last
column runs the pipeline with the default config.data.threads=2, wall-clock images/s per core (÷ 2).
All are timed in alternating rounds of 8 batches, so load changes hit them alike.
"""

import argparse
import importlib.metadata
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402


def write_datasets(out: str, count: int) -> tuple[str, str]:
  """GTA5-layout (1914x1052) and Cityscapes-layout (2048x1024) trees of synthetic street scenes."""
  from maxsq_jax.data import synthetic
  gta5, cityscapes = os.path.join(out, "GTA5"), os.path.join(out, "Cityscapes")
  if os.path.exists(os.path.join(out, "WRITTEN")):
    return gta5, cityscapes
  rng = np.random.default_rng(0)
  palette = rng.integers(0, 256, 768).tolist()
  for sub in ("images", "labels", "list"):
    os.makedirs(os.path.join(gta5, sub), exist_ok=True)
  with open(os.path.join(gta5, "list", "train.txt"), "w") as f:
    f.write("".join(f"{i}\n" for i in range(1, count + 1)))
  for i in range(1, count + 1):
    label = synthetic.draw_layout(rng, 1052, 1914)
    Image.fromarray(synthetic.render(rng, label, synthetic.SOURCE_STYLE)).save(os.path.join(gta5, "images", f"{i:05d}.png"))
    ids = Image.fromarray(label.astype(np.uint8), mode="P")
    ids.putpalette(palette)
    ids.save(os.path.join(gta5, "labels", f"{i:05d}.png"))
  for i in range(count):
    image_dir = os.path.join(cityscapes, "leftImg8bit", "train", "bench")
    label_dir = os.path.join(cityscapes, "gtFine", "train", "bench")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(label_dir, exist_ok=True)
    label = synthetic.draw_layout(rng, 1024, 2048)
    stem = f"bench_000000_{i:06d}"
    Image.fromarray(synthetic.render(rng, label, synthetic.TARGET_STYLE)).save(
        os.path.join(image_dir, f"{stem}_leftImg8bit.png"))
    Image.fromarray(label.astype(np.uint8), mode="L").save(os.path.join(label_dir, f"{stem}_gtFine_labelIds.png"))
  open(os.path.join(out, "WRITTEN"), "w").close()
  return gta5, cityscapes


def plain_loop(files, size, keep_label: bool, n: int, seed: int = 0):
  """The same per-example work as the training pipeline, written directly with PIL and numpy."""
  from maxsq_jax.data import classes, transforms
  rng = np.random.default_rng(seed)
  for k in range(n):
    image_path, label_path = files[k % len(files)]
    image = Image.open(image_path).convert("RGB")
    label = Image.open(label_path) if keep_label else None
    if rng.uniform() < 0.5:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
      label = label.transpose(Image.FLIP_LEFT_RIGHT) if label is not None else None
    image = image.resize(size, Image.BICUBIC)
    if rng.uniform() < 0.5:
      image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform())))
    batch = {"image": np.stack([(np.asarray(image, np.float32)[..., ::-1] - transforms.BGR_MEAN)])}
    if label is not None:
      label = label.resize(size, Image.NEAREST)
      batch["label"] = np.stack([classes.CITYSCAPES_ID_LUT[np.asarray(label)]])
    yield batch


def interleaved(iterators: dict, rounds: int, per_round: int) -> dict:
  """{name: (CPU seconds, wall seconds)} to pull rounds*per_round items from each iterator, measured in
  alternating rounds so that changing load on a shared machine affects all of them alike."""
  totals = {name: [0.0, 0.0] for name in iterators}
  for name, iterator in iterators.items():
    next(iterator)  # Warm-up: opening files, first compilation of the device put.
  names = list(iterators)
  for r in range(rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      cpu, wall = time.process_time(), time.perf_counter()
      for _ in range(per_round):
        next(iterators[name])
      totals[name][0] += time.process_time() - cpu
      totals[name][1] += time.perf_counter() - wall
  return totals


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=16, help="images written per dataset")
  parser.add_argument("--batches", type=int, default=48, help="batches of 1 timed per measurement")
  parser.add_argument("--out", default="/tmp/maxsq_bench_data")
  args = parser.parse_args()

  import jax
  import tensorflow_datasets as tfds
  from absl import logging
  logging.set_verbosity(logging.ERROR)
  tfds.disable_progress_bar()
  from maxsq_jax.config_base import base_config
  from maxsq_jax.data import pipeline, prepare, registry

  start = time.time()
  gta5, cityscapes = write_datasets(args.out, args.images)
  data_dir, resized_dir = os.path.join(args.out, "tfds"), os.path.join(args.out, "tfds_resized")
  sizes = {"gta5": (1280, 720), "cityscapes": (1024, 512)}
  with open(os.devnull, "w") as devnull:
    for name, manual in (("gta5", gta5), ("cityscapes", cityscapes)):
      prepare.prepare(name, manual, data_dir, splits=["train"], progress=False, out=devnull)
      prepare.prepare(name, manual, resized_dir, splits=["train"], progress=False, out=devnull,
                      train_size=sizes[name])
  print(f"data written and prepared in {time.time() - start:.0f} s under {args.out}", file=sys.stderr)

  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rows = []
  rounds, per_round = max(args.batches // 8, 1), 8
  n = rounds * per_round
  for domain, name, raw, size, raw_size in (("source", "gta5", gta5, (1280, 720), "1914x1052"),
                                            ("target", "cityscapes", cityscapes, (1024, 512), "2048x1024")):
    config = base_config()
    config.data.source_dir = config.data.target_dir = data_dir
    config.data.source, config.data.target = "gta5", "cityscapes"
    config.batch_size, config.data.prefetch = 1, 1
    config.data.workers, config.data.threads = 0, 0
    serial = pipeline.train_stream(config, domain, mesh, seed=0)
    config.data.source_dir = config.data.target_dir = resized_dir
    resized = pipeline.train_stream(config, domain, mesh, seed=0)
    config.data.source_dir = config.data.target_dir = data_dir
    config.data.threads = 2
    threaded = pipeline.train_stream(config, domain, mesh, seed=0)
    files = [(e.image, e.label) for e in registry.get(name).examples(raw, "train")]
    plain = plain_loop(files, size, domain == "source", n + 1)
    t = interleaved({"grain": serial, "plain": plain, "threaded": threaded, "resized": resized}, rounds, per_round)
    label = "image + label" if domain == "source" else "image only"
    rows.append((f"{domain}: {name} {raw_size} -> {size[0]}x{size[1]}, {label}", n / t["grain"][0], n / t["plain"][0],
                 n / t["grain"][1], n / t["plain"][1], n / t["threaded"][1] / 2, n / t["resized"][0]))

  print(f"\n{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores; "
        f"python {platform.python_version()}, grain {importlib.metadata.version('grain')}, "
        f"tensorflow-datasets {tfds.__version__}, pillow {Image.__version__}, numpy {np.__version__}, jax {jax.__version__}")
  print(f"command: python bench/data_pipeline.py --images={args.images} --batches={args.batches}\n")
  print("| stream (batch 1) | grain img/CPU-s | plain img/CPU-s | ratio | grain img/s wall | plain img/s wall "
        "| grain threads=2 img/s/core | pre-resized img/CPU-s | pre-resized / grain |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name, grain_cpu_rate, plain_cpu_rate, grain_wall_rate, plain_wall_rate, threaded_rate, resized_rate in rows:
    print(f"| {name} | {grain_cpu_rate:.2f} | {plain_cpu_rate:.2f} | {grain_cpu_rate / plain_cpu_rate:.2f} "
          f"| {grain_wall_rate:.2f} | {plain_wall_rate:.2f} | {threaded_rate:.2f} | {resized_rate:.2f} "
          f"| {resized_rate / grain_cpu_rate:.2f}x |")


if __name__ == "__main__":
  main()
