"""grain input pipelines: per-host sharded, shuffled, augmented training streams and a padded
evaluation stream, assembled into global arrays over the device mesh.

Sizes: a *global* batch of B images per domain per step; each of P hosts loads B/P of them (its own
chunk of every global batch, so hosts read disjoint examples); the mesh splits the global batch over
all devices.

Where the data comes from (`open_examples`): config.data.source_dir / target_dir is either
  * a tfds data_dir holding the prepared dataset (`python -m maxsq_jax.data.prepare`, builders.py):
    used when {dir}/{tfds name}[/{city}]/1.0.0/dataset_info.json exists; or
  * the dataset's own downloaded folder (folders.py layouts), decoded and checked on every read.
The prepared form is checked once, stores labels as train ids and is what the paper configs use
(data/tfds); the raw folders need no preparation. The synthetic datasets and the generic "folder"
dataset (registry.py) are always raw folders.
"""

import collections
import dataclasses
import functools
import os
from typing import Any, Iterator

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maxsq_jax import paths
from maxsq_jax.data import folders, registry, synthetic, transforms

_SYNTHETIC_FIX = ("Create it with `{command}` (the main job does this by itself for the synthetic "
                  "datasets when config.data.generate_synthetic is True).")


def open_examples(name: str, root: str, split: str, num_classes: int, data_config: Any = None,
                  labels: bool = True):
  """Opens `split` of dataset `name` (a registry.py name) stored under `root`: its examples, read by index
  (len() and [i]; what grain calls a data source).

  `root` is a tfds data_dir if it holds `name` prepared, else the dataset's own folder (module doc).
  labels=False: examples without labels, which are then not even read (a target training stream).
  """
  dataset = registry.get(name)
  found = None if os.path.isdir(root) else paths.not_a_directory(root)
  if found not in (None, "does not exist"):  # A missing folder is explained (or generated) below.
    raise folders.DatasetError(f"{root!r} (config.data.source_dir/target_dir for {name}) is {found}; fix or remove "
                               "it, or give the dataset's folder")
  if dataset.synthetic:
    data_root = os.path.dirname(os.path.normpath(root)) or "."
    size = tuple(data_config.synthetic_size) if data_config is not None else (128, 64)
    num_train = data_config.synthetic_num_train if data_config is not None else 400
    num_val = data_config.synthetic_num_val if data_config is not None else 100
    command = synthetic.generate_command(data_root, num_train, num_val, size)
    if os.path.isdir(root) and not synthetic.is_complete(root):
      raise folders.DatasetError(f"synthetic dataset {root!r} is incomplete (interrupted generation?). "
                                 f"Delete it and re-create it: `{command}`.")
    return dataset.open_folder(root, split, num_classes, _SYNTHETIC_FIX.format(command=command), labels)
  if not dataset.tfds_name:
    if dataset.is_raw_folder(root):
      return dataset.open_folder(root, split, num_classes, labels=labels)
    raise folders.DatasetError(f"{root!r} (config.data.source_dir/target_dir for {name}) has no "
                               f"{os.path.relpath(dataset.marker(root), root)}/ folder. {dataset.fix}")
  try:
    # tensorflow-datasets reads prepared datasets only; without it (an accelerator image that lacks
    # it, say) training still reads dataset folders.
    from maxsq_jax.data import builders
  except ImportError as e:
    if dataset.is_raw_folder(root):
      return dataset.open_folder(root, split, num_classes, labels=labels)
    raise folders.DatasetError(
        f"{root!r} (config.data.source_dir/target_dir for {name}) is not {name}'s own folder layout, and a "
        f"prepared dataset cannot be read: {e}. Install tensorflow-datasets (`pip install -e .` does).") from e
  if builders.is_prepared(name, root):
    return builders.open_split(name, root, split, num_classes, labels)
  if dataset.is_raw_folder(root):
    return dataset.open_folder(root, split, num_classes, labels=labels)
  raise folders.DatasetError(
      f"{root!r} (config.data.source_dir/target_dir for {name}) holds neither the prepared dataset "
      f"({builders.dataset_dir(name, root)}/dataset_info.json: create it with `python -m maxsq_jax.data.prepare "
      f"{name} --manual_dir=<the downloaded {name} folder> --data_dir={root}`) nor {name}'s own folder layout. "
      "docs/datasets.md says where to download it.")


def _train_example(example: dict, rng: np.random.Generator, *, size, mirror: bool, blur: bool,
                   normalization: str, keep_label: bool, scale_crop: tuple[float, float] | None = None) -> dict:
  """The reference's training transform: mirror, resize (or random scale + crop), blur, normalise."""
  if not keep_label:
    example = {k: v for k, v in example.items() if k != "label"}
  elif "label" not in example:
    raise folders.DatasetError("a source-domain training example has no label (an unlabelled split such as "
                               "NTHU 'train' can only be a target)")
  if mirror:
    example = transforms.random_flip(example, rng)
  if scale_crop is not None:
    example = transforms.random_scale_crop(example, rng, size, scale_crop)
  else:
    example = transforms.resize(example, size)
  if blur:
    example = transforms.random_blur(example, rng)
  out = transforms.finalize(example, normalization)
  out.pop("index", None)
  return out


def local_batch_size(global_batch: int, mesh: Mesh, what: str = "config.batch_size") -> int:
  """Per-host batch size; the global batch must split evenly over devices (and so over hosts)."""
  num_devices = mesh.devices.size
  if global_batch % num_devices:
    raise ValueError(f"{what}={global_batch} is the GLOBAL batch and must be divisible by the number of "
                     f"devices ({num_devices}); use a multiple of {num_devices}.")
  return global_batch // jax.process_count()


def to_global(mesh: Mesh, local_batch: dict) -> dict:
  """Host-local numpy batch (leading axis = this host's examples) -> global jax.Arrays sharded on 'data'."""
  sharding = NamedSharding(mesh, P("data"))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


class TrainStream:
  """An endless stream of global training batches for one domain, with a checkpointable position.

  `get_state()` is the position after the last batch handed out (prefetched batches excluded), so a
  run restored from it continues at the next unseen batch.
  """

  def __init__(self, dataset: grain.MapDataset, mesh: Mesh, prefetch: int, workers: int, threads: int = 0):
    # grain's default (16 threads, 500 batches read ahead per process) would hold gigabytes of
    # full-size batches per stream; `threads` threads keep 2 batches each in flight instead.
    read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
    iter_ds = dataset.to_iter_dataset(read)
    if workers > 0:
      iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    self._iterator = iter(iter_ds)
    self._mesh = mesh
    self._prefetch = max(prefetch, 1)
    self._queue: collections.deque = collections.deque()
    self._state = self._iterator.get_state()

  def _fill(self) -> None:
    while len(self._queue) < self._prefetch:
      local = next(self._iterator)
      self._queue.append((to_global(self._mesh, local), self._iterator.get_state()))

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    self._fill()
    batch, self._state = self._queue.popleft()
    return batch

  def get_state(self) -> dict:
    return self._state

  def set_state(self, state: dict) -> None:
    self._queue.clear()
    self._iterator.set_state(state)
    self._state = state


def train_stream(config, domain: str, mesh: Mesh, seed: int) -> TrainStream:
  """The training stream of `domain` ("source" or "target") from `config.data`."""
  data = config.data
  name, root, split, size = {
      "source": (data.source, data.source_dir, data.source_split, data.source_size),
      "target": (data.target, data.target_dir, data.target_split, data.target_size),
  }[domain]
  examples = open_examples(name, root, split, config.model.num_classes, data, labels=(domain == "source"))
  per_host = local_batch_size(config.batch_size, mesh)
  dataset = grain.MapDataset.source(examples)
  # One global order for all hosts (a new permutation every epoch); each global batch is cut into
  # per-host chunks of `per_host` consecutive examples and host i loads only chunk i. So every host
  # reads disjoint examples, and the data seen at every step does not depend on the number of hosts.
  dataset = dataset.shuffle(seed=seed).repeat(None)
  dataset = dataset.random_map(functools.partial(
      _train_example, size=tuple(size), mirror=data.random_mirror, blur=data.gaussian_blur,
      normalization=data.normalization, keep_label=(domain == "source"),
      scale_crop=tuple(data.scale_range) if data.random_scale_crop else None), seed=seed + 1)
  dataset = dataset.batch(per_host, drop_remainder=True)
  dataset = dataset[jax.process_index()::jax.process_count()]
  return TrainStream(dataset, mesh, data.prefetch, data.workers, data.threads)


def train_batch_spec(config, domain: str, mesh: Mesh) -> dict:
  """One global training batch of `domain` as `train_stream` yields it, as shapes only (for compiling
  without data, aot.py): {"image": float32 [B, H, W, 3]} and, for the source, "label": int32 [B, H, W];
  B = config.batch_size, split over the mesh's "data" axis."""
  width, height = config.data.source_size if domain == "source" else config.data.target_size
  sharding = NamedSharding(mesh, P("data"))
  spec = {"image": jax.ShapeDtypeStruct((config.batch_size, height, width, 3), np.float32, sharding=sharding)}
  if domain == "source":
    spec["label"] = jax.ShapeDtypeStruct((config.batch_size, height, width), np.int32, sharding=sharding)
  return spec


def eval_batch_spec(config, mesh: Mesh, canvas: tuple[int, int] | None = None) -> dict:
  """One global evaluation batch as `EvalData.batches` yields it, as shapes only: "image" float32
  [B, h, w, 3], "label" int32 [B, h, w], "mask" bool [B], "index" int32 [B] at config.eval.size (w, h),
  B = config.eval.batch_size; with `canvas` (W, H) also "label_full" int32 [B, H, W] and "full_hw"
  int32 [B, 2]."""
  batch, (width, height) = config.eval.batch_size, config.eval.size
  sharding = NamedSharding(mesh, P("data"))
  shapes = {"image": ((batch, height, width, 3), np.float32), "label": ((batch, height, width), np.int32),
            "mask": ((batch,), np.bool_), "index": ((batch,), np.int32)}
  if canvas is not None:
    shapes.update(label_full=((batch, canvas[1], canvas[0]), np.int32), full_hw=((batch, 2), np.int32))
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, (shape, dtype) in shapes.items()}


@dataclasses.dataclass
class EvalData:
  """The evaluation split, visited once: every example exactly once across hosts, padded with masked ones."""
  examples: Any  # The split's examples, read by index (open_examples).
  batches_per_host: int
  per_host_batch: int
  size: tuple[int, int]
  normalization: str
  # Full-resolution labels: also "label_full" (the label at its original size, padded with -1 to
  # `full_size` (W, H), default the first example's size) and "full_hw" (its true [height, width]).
  full_resolution: bool = False
  full_size: tuple[int, int] | None = None

  def full_canvas(self) -> tuple[int, int]:
    """(width, height) of the padded full-resolution labels."""
    if self.full_size:
      return tuple(self.full_size)
    label = self.examples[0]["label"]
    return label.shape[1], label.shape[0]

  def batches(self, mesh: Mesh) -> Iterator[dict]:
    """Global batches {"image", "label", "mask", "index"} (+ "label_full", "full_hw" with
    full_resolution); mask=False marks padding examples."""
    n, hosts, host = len(self.examples), jax.process_count(), jax.process_index()
    canvas = self.full_canvas() if self.full_resolution else None
    for b in range(self.batches_per_host):
      examples = []
      for j in range(self.per_host_batch):
        # Example k of this host is global position (b*per_host + j)*hosts + host: strided over hosts.
        position = (b * self.per_host_batch + j) * hosts + host
        original = self.examples[min(position, n - 1)]
        example = transforms.resize(original, self.size)
        example = transforms.finalize(example, self.normalization)
        example["mask"] = np.bool_(position < n)
        if canvas is not None:
          example.update(_full_label(original["label"], canvas, min(position, n - 1)))
        examples.append(example)
      local = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
      yield to_global(mesh, local)


def eval_data(config, mesh: Mesh, domain: str = "target") -> EvalData:
  """The `domain`'s evaluation split at config.eval.size (images bicubic, labels nearest).

  The target is the reported one; the source domain's (config.eval.source_split) shows the domain gap.
  """
  data, settings = config.data, config.eval
  name, root, split = ((data.target, data.target_dir, settings.split) if domain == "target"
                       else (data.source, data.source_dir, settings.source_split))
  examples = open_examples(name, root, split, config.model.num_classes, data)
  if len(examples) and "label" not in examples[0]:
    key = "config.eval.split" if domain == "target" else "config.eval.source_split"
    raise folders.DatasetError(f"{name} split {split!r} in {root!r} has no labels, so it cannot be evaluated; "
                               f"set {key} to a labelled split")
  if settings.num_images > 0:
    examples = _Subset(examples, min(settings.num_images, len(examples)))
  per_host = local_batch_size(settings.batch_size, mesh, "config.eval.batch_size")
  total_batches = -(-len(examples) // settings.batch_size)
  return EvalData(examples, total_batches, per_host, tuple(settings.size), data.normalization)


def _full_label(label: np.ndarray, canvas: tuple[int, int], index: int) -> dict:
  """{"label_full": label padded with -1 to canvas (W, H), "full_hw": its [H, W]} (evaluation)."""
  height, width = label.shape
  if height > canvas[1] or width > canvas[0]:
    raise ValueError(f"eval example {index}: label {width}x{height} is larger than the full-resolution "
                     f"canvas {canvas[0]}x{canvas[1]} (the first example's size); set "
                     f"config.eval.full_size to the largest label size (W, H).")
  padded = np.full((canvas[1], canvas[0]), -1, np.int32)
  padded[:height, :width] = label
  return {"label_full": padded, "full_hw": np.array([height, width], np.int32)}


class _Subset:
  """The first `count` of `examples`."""

  def __init__(self, examples, count: int):
    self._examples, self._count = examples, count

  def __len__(self) -> int:
    return self._count

  def __getitem__(self, index: int) -> dict:
    if index >= self._count:
      raise IndexError(index)
    return self._examples[index]
