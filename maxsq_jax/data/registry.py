"""Every dataset a config can name (config.data.source / target), one entry each.

An entry says how the dataset's folder is laid out (a listing function of folders.py and the folder
that marks the layout), which table maps its label ids to train ids, which splits `prepare` writes
by default, and which tfds builder (builders.py) prepares it, if any. The training pipeline, the
tfds builders, `prepare`, config validation, the report and the cross-city configs all read this
module, so adding a dataset means adding one entry here (docs/datasets.md, "Adding a dataset").

This module imports neither tensorflow-datasets nor JAX: config validation reads it.
"""

import dataclasses
import functools
import os
from typing import Callable

from maxsq_jax.data import folders, synthetic

# The NTHU cross-city cities: one dataset each (config names; their folders are capitalised).
NTHU_CITIES = ("rome", "rio", "tokyo", "taipei")


@dataclasses.dataclass(frozen=True)
class Dataset:
  """One dataset: its folder layout, label table, default splits and tfds builder."""
  name: str  # config.data.source / target.
  # (root, split, fix, label_format) -> the split's examples, sorted (a listing function of folders.py).
  layout: Callable[..., list[folders.RawExample]]
  # root -> the folder whose existence says that `root` is this dataset's own (raw) layout.
  marker: Callable[[str], str]
  fix: str  # What to do when the folder is missing (quoted in errors).
  label_format: str = folders.CITYSCAPES_IDS  # The label id table (folders.CITYSCAPES_IDS or SYNTHIA_IDS).
  splits: tuple[str, ...] = ()  # The splits `prepare` writes by default.
  # The tfds builder that prepares it (builders.py: its class `name`, and the builder config if the
  # class holds several datasets); "": read from its own folder only.
  tfds_name: str = ""
  tfds_config: str | None = None
  synthetic: bool = False  # The embedded benchmark (data/synthetic.py), generated rather than downloaded.
  # (W, H) of every label as distributed, where all share one: the full-resolution evaluation canvas that
  # aot.py compiles for when config.eval.full_size is not set (None: sizes vary, or unknown).
  label_size: tuple[int, int] | None = None

  def examples(self, root: str, split: str, fix: str = "") -> list[folders.RawExample]:
    """The examples of `split` stored under `root` in this dataset's own layout (sorted; never empty)."""
    fix = fix or self.fix
    examples = self.layout(root, split, fix, self.label_format)
    if not examples:
      raise folders.DatasetError(f"{self.name} {split} under {root}: no images found. {fix}")
    return examples

  def is_raw_folder(self, root: str) -> bool:
    """Whether `root` looks like this dataset's own folder layout."""
    return os.path.isdir(self.marker(root))

  def open_folder(self, root: str, split: str, num_classes: int, fix: str = "",
                  labels: bool = True) -> folders.FolderExamples:
    """The examples of `split` in this dataset's own layout under `root` (labels=False: images only)."""
    examples = self.examples(root, split, fix)
    if labels:
      examples, _ = folders.check_labels(examples, f"{self.name} {split} under {root}")
    return folders.FolderExamples(examples, num_classes, f"{self.name} folder {root} [{split}]", labels)


def _join(*parts: str) -> Callable[[str], str]:
  return lambda root: os.path.join(root, *parts)


_GTA5_FIX = "Download GTA5 (images + labels) and unpack it there (docs/datasets.md)."
_CITYSCAPES_FIX = ("Download Cityscapes leftImg8bit_trainvaltest + gtFine_trainvaltest and unpack both there "
                   "(docs/datasets.md).")
_SYNTHETIC_FIX = ("Create it with `python -m maxsq_jax.data.synthetic` (the main job does this by itself when "
                  "config.data.generate_synthetic is True).")

_ENTRIES = (
    Dataset("gta5", folders.gta5_examples, _join("images"), _GTA5_FIX, splits=("train", "val"), tfds_name="gta5"),
    Dataset("synthia", folders.synthia_examples, lambda root: os.path.join(folders.synthia_root(root), "RGB"),
            "Download SYNTHIA-RAND-CITYSCAPES and unpack it there (docs/datasets.md).",
            label_format=folders.SYNTHIA_IDS, splits=("train",), tfds_name="synthia_rand_cityscapes"),
    Dataset("cityscapes", folders.cityscapes_examples, _join("leftImg8bit"), _CITYSCAPES_FIX,
            splits=("train", "val"), tfds_name="cityscapes_gtfine", label_size=(2048, 1024)),
    *(Dataset(city, functools.partial(folders.nthu_examples, city=city),
              lambda root, city=city: os.path.join(folders.nthu_city_root(root, city), "Images"),
              "Download the NTHU cross-city dataset and unpack it there (docs/datasets.md).",
              splits=("train", "test"), tfds_name="nthu_crosscity", tfds_config=city, label_size=(2048, 1024))
      for city in NTHU_CITIES),
    Dataset(synthetic.SOURCE_NAME, folders.gta5_examples, _join("images"), _SYNTHETIC_FIX, synthetic=True),
    Dataset(synthetic.TARGET_NAME, folders.cityscapes_examples, _join("leftImg8bit"), _SYNTHETIC_FIX, synthetic=True),
    Dataset("folder", folders.folder_examples, _join("images"),
            "Put the images in images/<split>/ and their label-id PNGs in labels/<split>/ (docs/datasets.md, "
            "\"Your own data\")."),
)
DATASETS = {d.name: d for d in _ENTRIES}
NAMES = tuple(DATASETS)


def get(name: str) -> Dataset:
  """The entry of config dataset name `name`; an unknown name raises ValueError listing the known ones."""
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r} (config.data.source/target); known: {sorted(DATASETS)}")
  return DATASETS[name]


def preparable() -> tuple[str, ...]:
  """The names `python -m maxsq_jax.data.prepare` prepares (those with a tfds builder)."""
  return tuple(d.name for d in _ENTRIES if d.tfds_name)
