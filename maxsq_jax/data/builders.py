"""tensorflow-datasets builders (array_record, no TensorFlow) for GTA5, SYNTHIA-RAND-CITYSCAPES,
Cityscapes (leftImg8bit + gtFine) and the NTHU cross-city cities.

Each builder reads its dataset's own folder layout (its registry.py entry) from the manual directory and writes

  {data_dir}/{name}[/{city}]/1.0.0/{name}-{split}.array_record-0000i-of-0000n, dataset_info.json, ...

with one record per image:

  image      the image file's own encoded bytes (PNG, or JPEG for NTHU), never re-encoded (a file
             that is not 8-bit RGB is converted to RGB and stored as PNG; a "train" split prepared
             with a train_size is stored resized, as uncompressed PPM); decodes to uint8 [H, W, 3];
  label      uint8 [H, W, 1] PNG of 19-class train ids (0..18), void stored as 255
             (classes.STORED_IGNORE); read back as int32 with void = -1 and mapped to the 16/13-class
             set by `classes.stored_to_train_ids` (config.model.num_classes);
  has_label  False for unlabelled examples (NTHU "train"), whose label is a 1x1 void placeholder;
  name       the image path relative to the dataset folder.

Records keep the sorted file order (no tfds shuffling), so index i is the i-th file of the split.
Every file is fully decoded and checked while preparing (corrupt PNG, missing label, label size,
unexpected label ids); errors name the file, or with on_error="skip" the example is left out and
listed in the summary. tfds writes into an `incomplete.*` folder renamed only on success, so an
interrupted run never leaves a dataset that looks complete. Readers: `open_split`.

The builders are not registered with tfds (a name like "cityscapes" is taken by tfds's own
catalogue): open them through this module, e.g. `builder("gta5", data_dir).as_data_source("train")`.
"""

import collections
import concurrent.futures
import glob
import io
import logging
import os
import shutil

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from maxsq_jax.data import classes, folders, registry, transforms

DATA_VERSION = "1.0.0"

_LABEL_DOC = ("label: uint8 PNG of 19-class Cityscapes train ids (0 road .. 18 bicycle), 255 = void; "
              "has_label is False for unlabelled examples.")


def encode_label(train19: np.ndarray) -> bytes:
  """int 19-class train ids (-1 = void) [H, W] -> single-channel uint8 PNG bytes, void = 255."""
  buffer = io.BytesIO()
  Image.fromarray(classes.to_stored(train19), mode="L").save(buffer, format="PNG", compress_level=1)
  return buffer.getvalue()


_EMPTY_LABEL = None


def _empty_label() -> bytes:
  global _EMPTY_LABEL
  if _EMPTY_LABEL is None:
    _EMPTY_LABEL = encode_label(np.full((1, 1), -1, np.int32))
  return _EMPTY_LABEL


def encode_record(example: folders.RawExample, size: tuple[int, int] | None = None) -> dict:
  """Reads, fully decodes and checks one example; returns its tfds record (raises DatasetError).

  size (W, H): store image and label resized to it (bicubic / nearest: `transforms.resize`, the
  training pipeline's own resize), the image as uncompressed PPM; None: as downloaded."""
  try:
    with open(example.image, "rb") as f:
      image_bytes = f.read()
  except FileNotFoundError as e:
    raise folders.DatasetError(f"missing file {example.image}") from e
  label_bytes = None
  if example.label is not None:
    try:
      with open(example.label, "rb") as f:
        label_bytes = f.read()
    except FileNotFoundError as e:
      raise folders.DatasetError(f"missing label {example.label} for image {example.image}") from e
  decoded = folders.load_example(example, image_bytes, label_bytes)
  with Image.open(io.BytesIO(image_bytes)) as probe:
    keep = probe.mode == "RGB" and probe.format in ("PNG", "JPEG")
  if size is not None:
    # Uncompressed PPM: it decodes ~15x faster than PNG, the point of storing training images
    # resized (bench/RESULTS.md); array_record's own record compression keeps the files small.
    decoded = transforms.resize(decoded, size)
    buffer = io.BytesIO()
    Image.fromarray(decoded["image"]).save(buffer, format="PPM")
    image_bytes = buffer.getvalue()
  elif not keep:  # E.g. an RGBA or palette image: store what the readers see, as PNG.
    buffer = io.BytesIO()
    Image.fromarray(decoded["image"]).save(buffer, format="PNG")
    image_bytes = buffer.getvalue()
  has_label = "label" in decoded
  return {
      "image": image_bytes,
      "label": encode_label(decoded["label"]) if has_label else _empty_label(),
      "has_label": has_label,
      "name": example.key,
  }


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Common part: features, splits from the manual dir, checked parallel record encoding."""

  VERSION = tfds.core.Version(DATA_VERSION)
  RELEASE_NOTES = {DATA_VERSION: "Images as downloaded; labels as 19-class train ids (uint8 PNG, 255 = void)."}
  DESCRIPTION = ""
  HOMEPAGE = ""
  CITATION = ""

  # Preparation options (set by `builder()`, read by _split_generators).
  dataset: registry.Dataset | None = None  # The registry entry whose folder it reads.
  splits: tuple[str, ...] = ()
  on_error = "raise"  # "raise" or "skip".
  train_size: tuple[int, int] | None = None  # (W, H): the "train" split is stored resized to it.
  threads = 4
  progress = True

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # tfds looks for a checksums file next to the builder's module through `importlib_resources`
    # (not installed here); these builders download nothing, so there is none.
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{self.DESCRIPTION}\n\n{_LABEL_DOC}",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            "has_label": np.bool_,
            "name": tfds.features.Text(),
        }),
        homepage=self.HOMEPAGE,
        citation=self.CITATION,
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    self.skipped = collections.defaultdict(list)
    self.size_mismatch = collections.defaultdict(list)  # Accepted pairs (RawExample.sizes_may_differ).
    generators = {}
    for split in self.splits or self.dataset.splits:
      what = f"{self.name} {split} under {root}"
      examples = self.dataset.examples(root, split)
      examples, skipped = folders.check_labels(examples, what, skip=self.on_error == "skip")
      for message in skipped:
        logging.warning("skipping: %s", message)
      self.skipped[split].extend(skipped)
      generators[split] = self._generate_examples(examples, split)
    return generators

  def _generate_examples(self, examples, split):
    """Yields (key, record) in file order; decoding runs on `threads` threads (PIL frees the GIL)."""
    from tqdm import tqdm
    bar = tqdm(total=len(examples), desc=f"{self.name}{'/' + self.builder_config.name if self.builder_config else ''} "
               f"{split}", unit="img", disable=not self.progress, dynamic_ncols=True)
    window = max(2 * self.threads, 1)
    with concurrent.futures.ThreadPoolExecutor(max(self.threads, 1)) as pool:
      pending = collections.deque()
      position = 0
      while pending or position < len(examples):
        while position < len(examples) and len(pending) < window:
          size = self.train_size if split == "train" else None
          pending.append((examples[position], pool.submit(encode_record, examples[position], size)))
          position += 1
        example, future = pending.popleft()
        try:
          record = future.result()
        except folders.DatasetError as e:
          if self.on_error != "skip":
            bar.close()
            for _, f in pending:
              f.cancel()
            raise
          logging.warning("skipping: %s", e)
          self.skipped[split].append(str(e))
          bar.update(1)
          continue
        bar.update(1)
        if example.sizes_may_differ and record["has_label"]:
          # The downloaded files' sizes (headers only): a stored train split may be resized already.
          image_size, label_size = (Image.open(path).size for path in (example.image, example.label))
          if image_size != label_size:
            self.size_mismatch[split].append(f"{example.key}: image {image_size[0]}x{image_size[1]}, "
                                             f"label {label_size[0]}x{label_size[1]}")
        yield example.key, record
    bar.close()


_MANUAL = ("Point --manual_dir at the unpacked dataset folder; docs/datasets.md says where to download it "
           "and which folders it must contain.")


class GTA5(_Builder, skip_registration=True):
  """GTA5 ("Playing for Data"): 24,966 synthetic 1914x1052 frames with Cityscapes-id labels."""
  name = "gta5"
  MANUAL_DOWNLOAD_INSTRUCTIONS = "images/*.png, labels/*.png and list/{train,val}.txt or split.mat. " + _MANUAL
  DESCRIPTION = "GTA5 (Richter et al., Playing for Data, ECCV 2016): frames of a video game with Cityscapes-id labels."
  HOMEPAGE = "https://download.visinf.tu-darmstadt.de/data/from_games/"
  CITATION = ("@inproceedings{Richter_2016_ECCV, title={Playing for Data: Ground Truth from Computer Games}, "
              "author={Richter, Stephan R. and Vineet, Vibhav and Roth, Stefan and Koltun, Vladlen}, "
              "booktitle={ECCV}, year={2016}}")


class SynthiaRandCityscapes(_Builder, skip_registration=True):
  """SYNTHIA-RAND-CITYSCAPES: 9,400 synthetic 1280x760 images with 16-bit SYNTHIA-id labels; splits train
  (ids 0-8999, the reference's), val (9000-9399), full (all)."""
  name = "synthia_rand_cityscapes"
  MANUAL_DOWNLOAD_INSTRUCTIONS = "RAND_CITYSCAPES/RGB/*.png and RAND_CITYSCAPES/GT/LABELS/*.png. " + _MANUAL
  DESCRIPTION = "SYNTHIA-RAND-CITYSCAPES (Ros et al., CVPR 2016), labels mapped from SYNTHIA ids to Cityscapes train ids."
  HOMEPAGE = "https://synthia-dataset.net/"
  CITATION = ("@inproceedings{Ros_2016_CVPR, title={The SYNTHIA Dataset: A Large Collection of Synthetic Images "
              "for Semantic Segmentation of Urban Scenes}, author={Ros, German and Sellart, Laura and Materzynska, "
              "Joanna and Vazquez, David and Lopez, Antonio M.}, booktitle={CVPR}, year={2016}}")


class CityscapesGtFine(_Builder, skip_registration=True):
  """Cityscapes leftImg8bit + gtFine: 2,975 train and 500 val 2048x1024 images."""
  name = "cityscapes_gtfine"
  MANUAL_DOWNLOAD_INSTRUCTIONS = "leftImg8bit/{train,val}/<city>/*.png and gtFine/{train,val}/<city>/*_labelIds.png. " + _MANUAL
  DESCRIPTION = "Cityscapes (Cordts et al., CVPR 2016), fine annotations, labels as train ids."
  HOMEPAGE = "https://www.cityscapes-dataset.com/"
  CITATION = ("@inproceedings{Cordts2016Cityscapes, title={The Cityscapes Dataset for Semantic Urban Scene "
              "Understanding}, author={Cordts, Marius and others}, booktitle={CVPR}, year={2016}}")


class NthuCrossCity(_Builder, skip_registration=True):
  """NTHU cross-city (Rome, Rio, Tokyo, Taipei): unlabelled train images and 100 labelled test images per city."""
  name = "nthu_crosscity"
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=city, description=f"NTHU cross-city, {city.capitalize()}")
                     for city in registry.NTHU_CITIES]
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("NTHU_Datasets/<City>/Images/{Train,Test}/*.jpg and "
                                  "NTHU_Datasets/<City>/Labels/Test/*_eval.png. " + _MANUAL)
  DESCRIPTION = ("NTHU cross-city (Chen et al., No More Discrimination, ICCV 2017); test labels are the "
                 "*_eval.png files read as Cityscapes label ids (as the MaxSquare reference does).")
  HOMEPAGE = "https://yihsinchen.github.io/segmentation_adaptation_dataset/"
  CITATION = ("@inproceedings{Chen_2017_ICCV, title={No More Discrimination: Cross City Adaptation of Road Scene "
              "Segmenters}, author={Chen, Yi-Hsin and Chen, Wei-Yu and Chen, Yu-Ting and Tsai, Bo-Cheng and "
              "Wang, Yu-Chiang Frank and Sun, Min}, booktitle={ICCV}, year={2017}}")


_CLASSES = {cls.name: cls for cls in (GTA5, SynthiaRandCityscapes, CityscapesGtFine, NthuCrossCity)}
# Config dataset name -> (builder class, builder config or None), from the registry's entries.
BUILDERS = {name: (_CLASSES[registry.get(name).tfds_name], registry.get(name).tfds_config)
            for name in registry.preparable()}


def _check_name(dataset: str) -> None:
  if dataset not in BUILDERS:
    raise ValueError(f"no tfds builder for dataset {dataset!r}; builders: {sorted(BUILDERS)}")


def dataset_dir(dataset: str, data_dir: str) -> str:
  """Where `dataset` is (or will be) prepared under `data_dir`: {data_dir}/{name}[/{city}]/{version}."""
  _check_name(dataset)
  entry = registry.get(dataset)
  return os.path.join(data_dir, entry.tfds_name, *([entry.tfds_config] if entry.tfds_config else []), DATA_VERSION)


def is_prepared(dataset: str, data_dir: str) -> bool:
  """Whether `data_dir` holds a completely prepared `dataset` (tfds writes dataset_info.json last)."""
  return dataset in BUILDERS and os.path.exists(os.path.join(dataset_dir(dataset, data_dir), "dataset_info.json"))


def builder(dataset: str, data_dir: str, *, splits=(), on_error: str = "raise", threads: int = 4,
            progress: bool = True, train_size: tuple[int, int] | None = None) -> _Builder:
  """The builder of config dataset name `dataset` (gta5, synthia, cityscapes, rome, ...) in `data_dir`.

  train_size (W, H): the "train" split's images and labels are stored resized to it (the training
  size, config.data.source_size / target_size), so that training decodes fewer pixels and skips the
  resize; the other splits keep their own size (evaluation needs full-resolution labels)."""
  _check_name(dataset)
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error={on_error!r}: use 'raise' or 'skip'")
  cls, config = BUILDERS[dataset]
  b = cls(data_dir=data_dir, config=config, file_format="array_record")
  b.dataset = registry.get(dataset)
  b.splits, b.on_error, b.threads, b.progress = tuple(splits), on_error, threads, progress
  b.train_size = tuple(train_size) if train_size else None
  return b


def remove_stale(dataset: str, data_dir: str) -> list[str]:
  """Deletes `incomplete.*` folders an interrupted (killed) preparation left behind; returns them."""
  parent = os.path.dirname(dataset_dir(dataset, data_dir))
  stale = sorted(glob.glob(os.path.join(parent, "incomplete.*")))
  for path in stale:
    shutil.rmtree(path, ignore_errors=True)
  return stale


class PreparedExamples:
  """A prepared split's examples, read by index (a grain data source), like FolderExamples's
  (``{"image": uint8 [H,W,3], "label": int32 [H,W] C-class train ids, -1 = ignore, "index"}``;
  no "label" for unlabelled examples). Picklable: workers reopen the files."""

  def __init__(self, dataset: str, data_dir: str, split: str, num_classes: int, labels: bool = True):
    classes.subset_lut(num_classes)  # Validates num_classes.
    self.dataset, self.data_dir, self.split, self.num_classes = dataset, data_dir, split, num_classes
    self.labels = labels  # False: labels are neither decoded nor returned (a target training stream).
    self._reader = None
    self._length = len(self._open())
    self.description = f"{dataset} tfds {dataset_dir(dataset, data_dir)} [{split}]"

  def _open(self):
    if self._reader is None:
      b = builder(self.dataset, self.data_dir, progress=False)
      if self.split not in b.info.splits:
        raise folders.DatasetError(
            f"{self.dataset} prepared in {dataset_dir(self.dataset, self.data_dir)} has no split {self.split!r} "
            f"(it has {sorted(b.info.splits)}); prepare it with `python -m maxsq_jax.data.prepare "
            f"{self.dataset} --splits={self.split} ...`")
      # Images and labels are decoded here rather than by tfds: only what is used, without tfds's
      # grey -> [H, W, 1] copy, and with errors that name the example.
      skip = tfds.decode.SkipDecoding()
      self._reader = b.as_data_source(self.split, decoders={"image": skip, "label": skip})
    return self._reader

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_reader"] = None
    return state

  def __len__(self) -> int:
    return self._length

  def __repr__(self) -> str:
    return f"PreparedExamples({self.description}, {len(self)} examples)"

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self._length:
      raise IndexError(index)
    record = self._open()[int(index)]
    where = f"{self.description} example {index} ({record['name'].decode()})"
    out = {"image": folders.read_rgb(where, record["image"]), "index": np.int32(index)}
    if self.labels and record["has_label"]:
      stored = np.asarray(folders.read_label_ids(where, folders.CITYSCAPES_IDS, record["label"]))
      try:
        out["label"] = classes.stored_to_train_ids(stored, self.num_classes)
      except ValueError as e:
        raise folders.DatasetError(f"{where}: {e}; prepare the dataset again") from e
    return out


def open_split(dataset: str, data_dir: str, split: str, num_classes: int, labels: bool = True) -> PreparedExamples:
  """The prepared `split` of `dataset` under tfds `data_dir` (labels=False: images only)."""
  if not is_prepared(dataset, data_dir):
    raise folders.DatasetError(f"{dataset} is not prepared in {data_dir} (no {dataset_dir(dataset, data_dir)}/"
                               "dataset_info.json); run `python -m maxsq_jax.data.prepare` (docs/datasets.md).")
  return PreparedExamples(dataset, data_dir, split, num_classes, labels)
