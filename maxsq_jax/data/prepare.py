r"""Prepares a downloaded dataset as a tfds dataset (array_record shards) that training streams with grain.

  python -m maxsq_jax.data.prepare gta5 --manual_dir=/path/to/GTA5 --data_dir=data/tfds
  python -m maxsq_jax.data.prepare synthia --manual_dir=/path/to/RAND_CITYSCAPES --data_dir=data/tfds
  python -m maxsq_jax.data.prepare cityscapes --manual_dir=/path/to/Cityscapes --data_dir=data/tfds
  python -m maxsq_jax.data.prepare nthu --manual_dir=/path/to/NTHU_Datasets --data_dir=data/tfds

DATASET is a dataset with a tfds builder (data/registry.py: gta5, synthia, cityscapes, rome, rio,
tokyo, taipei) or nthu (the four cities); several may be given. Then train with `--config.data.source_dir=data/tfds --config.data.target_dir=data/tfds`
(the paper configs' default). docs/datasets.md has the download links and folder layouts.

Resumable: a dataset already prepared in --data_dir is skipped (--overwrite redoes it); tfds writes
into an `incomplete.*` folder and renames it only when every split is written, so an interrupted run
leaves nothing that looks complete, and the next run deletes the leftover and redoes that dataset.
Each file is decoded and checked; a bad one (missing, corrupt, label of another size, unexpected
label ids) stops the run with an error naming it, or with --on_error=skip is left out and listed.
--train_size=W,H stores the train split already resized to the training size (fewer pixels to
decode, no resize while training; docs/datasets.md).
"""

import json
import os
import sys
import time

from absl import app, flags

from maxsq_jax import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags; defined only when run as a program, so that importing this module (tests,
  other tools) defines none."""
  flags.DEFINE_string("manual_dir", None, "The downloaded, unpacked dataset folder (its own layout).")
  flags.DEFINE_string("data_dir", "data/tfds", "tfds data_dir to write into (config.data.*_dir points here).")
  flags.DEFINE_list("splits", [], "Splits to write (default: gta5 train,val; synthia train; cityscapes "
                    "train,val; NTHU cities train,test). GTA5 without split lists, and SYNTHIA: 'full' (every "
                    "image); SYNTHIA's train is the reference's ids 0-8999, val 9000-9399.")
  flags.DEFINE_enum("on_error", "raise", ["raise", "skip"], "A bad example stops the run (raise) or is "
                    "left out and listed in the summary (skip).")
  flags.DEFINE_integer("threads", min(8, os.cpu_count() or 1), "Threads decoding and checking files.")
  flags.DEFINE_integer("num_shards", 0, "array_record shards per split (0: tfds's choice, about 1 GiB each).")
  flags.DEFINE_bool("overwrite", False, "Prepare again even if the dataset is already prepared.")
  flags.DEFINE_list("train_size", [], "W,H: store the 'train' split resized to the training size (e.g. 1280,720 for "
                    "GTA5, 1024,512 for Cityscapes: config.data.source_size / target_size), so training decodes "
                    "fewer pixels and skips the resize; other splits keep their size. Not with "
                    "data.random_scale_crop, which needs the full-size images.")


def _usage_names() -> list[str]:
  """The names the command accepts: every preparable dataset, and 'nthu' (all its cities)."""
  from maxsq_jax.data import registry
  return [*registry.preparable(), "nthu"]


def expand(names: list[str], manual_dir: str) -> list[str]:
  """Command-line dataset names -> builder dataset names ('nthu': the cities found in manual_dir)."""
  from maxsq_jax.data import folders, registry
  out = []
  for name in names:
    name = name.lower()
    if name == "nthu":
      found = [c for c in registry.NTHU_CITIES
               if registry.get(c).is_raw_folder(os.path.join(manual_dir, c.capitalize()))]
      if not found:
        raise folders.DatasetError(f"--manual_dir {manual_dir!r} holds none of the NTHU city folders "
                                   f"{[c.capitalize() for c in registry.NTHU_CITIES]} (each with Images/)")
      missing = sorted(set(registry.NTHU_CITIES) - set(found))
      if missing:
        print(f"nthu: no folder for {', '.join(c.capitalize() for c in missing)} in {manual_dir}; preparing "
              f"{', '.join(c.capitalize() for c in found)}", flush=True)
      out.extend(found)
    elif name in registry.preparable():
      out.append(name)
    else:
      raise app.UsageError(f"unknown dataset {name!r}; choose from {_usage_names()}")
  return out


def _size(num_bytes: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if num_bytes < 1024 or unit == "TiB":
      return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{num_bytes} B"
    num_bytes /= 1024
  return ""


def prepare(dataset: str, manual_dir: str, data_dir: str, *, splits=(), on_error: str = "raise",
            threads: int = 4, num_shards: int = 0, overwrite: bool = False, progress: bool = True,
            train_size: tuple[int, int] | None = None, out=sys.stdout) -> dict:
  """Prepares one dataset; returns its summary {dataset, path, status, splits: {split: {...}}, skipped,
  train_size} (train_size (W, H): the "train" split stored resized to it; builders.builder)."""
  import tensorflow_datasets as tfds
  from maxsq_jax.data import builders, folders

  path = builders.dataset_dir(dataset, data_dir)
  if builders.is_prepared(dataset, data_dir) and not overwrite:
    summary = _summary(dataset, data_dir, "already prepared (skipped; --overwrite redoes it)")
    _print(summary, out)
    return summary
  for stale in builders.remove_stale(dataset, data_dir):
    print(f"{dataset}: removed {stale}, left by an interrupted run", file=out, flush=True)
  if not os.path.isdir(manual_dir):
    raise folders.DatasetError(f"--manual_dir {manual_dir!r} does not exist (the unpacked {dataset} download; "
                               "docs/datasets.md)")
  b = builders.builder(dataset, data_dir, splits=splits, on_error=on_error, threads=threads, progress=progress,
                       train_size=train_size)
  config = tfds.download.DownloadConfig(
      manual_dir=manual_dir, num_shards=num_shards or None,
      download_mode=(tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
                     else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  start = time.time()
  print(f"{dataset}: preparing {manual_dir} -> {path}", file=out, flush=True)
  b.download_and_prepare(download_config=config)
  skipped = {split: list(messages) for split, messages in getattr(b, "skipped", {}).items() if messages}
  mismatched = {split: list(pairs) for split, pairs in getattr(b, "size_mismatch", {}).items() if pairs}
  with open(os.path.join(path, "prepare_summary.json"), "w") as f:
    json.dump({"manual_dir": os.path.abspath(manual_dir), "skipped": skipped, "size_mismatch": mismatched,
               "train_size": list(train_size) if train_size else None}, f, indent=1)
  summary = _summary(dataset, data_dir, f"prepared in {time.time() - start:.0f} s")
  _print(summary, out)
  return summary


def _summary(dataset: str, data_dir: str, status: str) -> dict:
  from maxsq_jax.data import builders
  path = builders.dataset_dir(dataset, data_dir)
  info = builders.builder(dataset, data_dir, progress=False).info
  splits = {name: {"examples": s.num_examples, "shards": s.num_shards, "bytes": s.num_bytes}
            for name, s in info.splits.items()}
  written = {}
  summary_file = os.path.join(path, "prepare_summary.json")
  if os.path.exists(summary_file):
    with open(summary_file) as f:
      written = json.load(f)
  return {"dataset": dataset, "path": path, "status": status, "splits": splits,
          "skipped": written.get("skipped", {}), "size_mismatch": written.get("size_mismatch", {}),
          "train_size": written.get("train_size")}


def _print(summary: dict, out) -> None:
  print(f"{summary['dataset']}: {summary['status']}: {summary['path']}", file=out)
  if summary.get("train_size"):
    print(f"  train split stored resized to {summary['train_size'][0]}x{summary['train_size'][1]}", file=out)
  for name, s in summary["splits"].items():
    print(f"  {name:6s} {s['examples']:6d} examples  {s['shards']:3d} shard(s)  {_size(s['bytes'])}", file=out)
  lists = [(name, f"skipped {len(messages)} example(s)", messages) for name, messages in summary["skipped"].items()]
  lists += [(name, f"{len(pairs)} pair(s) whose image and label sizes differ (kept; each is resized to the "
             "training size on its own, as the reference does)", pairs)
            for name, pairs in summary["size_mismatch"].items()]
  for name, what, messages in lists:
    print(f"  {name}: {what}:", file=out)
    for message in messages[:20]:
      print(f"    {message}", file=out)
    if len(messages) > 20:
      print(f"    ... {len(messages) - 20} more in {summary['path']}/prepare_summary.json", file=out)
  out.flush()


def _train_size(values: list[str]) -> tuple[int, int] | None:
  """--train_size W,H -> (W, H); [] -> None."""
  if not values:
    return None
  try:
    width, height = (int(v) for v in values)
    if width > 0 and height > 0:
      return width, height
  except ValueError:
    pass
  raise app.UsageError(f"--train_size={','.join(values)}: give W,H in pixels, e.g. --train_size=1280,720")


def main(argv):
  if len(argv) < 2:
    raise app.UsageError(f"name the dataset(s): {' | '.join(_usage_names())}")
  if not FLAGS.manual_dir:
    raise app.UsageError("--manual_dir is required: the unpacked dataset folder")
  import tensorflow_datasets as tfds
  from absl import logging
  tfds.disable_progress_bar()  # Ours counts images per split.
  logging.set_verbosity(logging.WARNING)
  for dataset in expand(argv[1:], FLAGS.manual_dir):
    prepare(dataset, FLAGS.manual_dir, FLAGS.data_dir, splits=FLAGS.splits, on_error=FLAGS.on_error,
            threads=FLAGS.threads, num_shards=FLAGS.num_shards, overwrite=FLAGS.overwrite,
            train_size=_train_size(FLAGS.train_size))


def command() -> None:
  """`maxsq-prepare` (pyproject.toml), the same as `python -m maxsq_jax.data.prepare`."""
  cli.run(main, define_flags)


if __name__ == "__main__":
  command()
