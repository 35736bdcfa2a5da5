"""The dataset registry, and the generic "folder" dataset: a user's own images and label PNGs, trained on
without code (the tiny synthetic benchmark rearranged into that layout must read and train exactly as
the synthetic datasets themselves)."""

import os
import shutil

import jax
import numpy as np
import pytest

from maxsq_jax import config_validation
from maxsq_jax.data import folders, pipeline, prepare, registry
from maxsq_jax.errors import ConfigError
from tests.helpers import REFERENCE_OVERRIDES, load_npz, run_tiny, tiny_config, weights_of

SPLITS = ("train", "val")


def to_folder_layout(data_root, dest) -> dict:
  """Copies the synthetic source (GTA5 layout) and target (Cityscapes layout, one sub-folder per city)
  into dest/{source,target}/images/<split>/... and labels/<split>/... (same relative path, .png);
  returns {domain: folder}."""
  out = {}
  for domain, name in (("source", "synthetic_source"), ("target", "synthetic_target")):
    root = os.path.join(data_root, name)
    for split in SPLITS:
      for e in registry.get(name).examples(root, split):
        relative = os.path.basename(e.image) if domain == "source" else os.path.relpath(
            e.image, os.path.join(root, "leftImg8bit", split))
        for kind, path in (("images", e.image), ("labels", e.label)):
          copy = os.path.join(dest, domain, kind, split, relative)
          os.makedirs(os.path.dirname(copy), exist_ok=True)
          shutil.copyfile(path, copy)
    out[domain] = os.path.join(dest, domain)
  return out


@pytest.fixture(scope="module")
def own_folders(tiny_data_root, tmp_path_factory):
  return to_folder_layout(tiny_data_root, str(tmp_path_factory.mktemp("own")))


@pytest.mark.parametrize("domain, name", [("source", "synthetic_source"), ("target", "synthetic_target")])
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("num_classes", [19, 13])
def test_folder_dataset_reads_the_same_examples(tiny_data_root, own_folders, domain, name, split, num_classes):
  mine = pipeline.open_examples("folder", own_folders[domain], split, num_classes)
  theirs = pipeline.open_examples(name, os.path.join(tiny_data_root, name), split, num_classes)
  assert isinstance(mine, folders.FolderExamples) and len(mine) == len(theirs) == {"train": 16, "val": 4}[split]
  for i in range(len(mine)):
    a, b = mine[i], theirs[i]
    assert a.keys() == b.keys() == {"image", "label", "index"}
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.integration
def test_training_on_own_folders_equals_the_synthetic_run(own_folders, reference_run, compilation_cache, tmp_path):
  """The README's "my own source/target folders" route: config overrides only, same weights bit for bit."""
  _, reference = reference_run
  overrides = {"data.source": "folder", "data.source_dir": own_folders["source"],
               "data.target": "folder", "data.target_dir": own_folders["target"]}
  run_tiny("unused", tmp_path / "run", tmp_path / "final.npz", cache_dir=compilation_cache,
           **REFERENCE_OVERRIDES, **overrides)
  mine = load_npz(tmp_path / "final.npz")
  assert mine["step"] == reference["step"]
  for key, value in weights_of(reference).items():
    np.testing.assert_array_equal(mine[key], value, err_msg=key)


def test_unlabelled_split_and_missing_label(tmp_path, own_folders):
  root = tmp_path / "own"
  shutil.copytree(own_folders["target"], root)
  shutil.rmtree(root / "labels" / "train")
  images_only = pipeline.open_examples("folder", str(root), "train", 19, labels=False)
  assert len(images_only) == 16 and "label" not in images_only[0]
  assert all(e.label is None for e in registry.get("folder").examples(str(root), "train"))
  config = tiny_config("unused", **{"data.target": "folder", "data.target_dir": str(root), "eval.split": "train"})
  with pytest.raises(folders.DatasetError, match="folder split 'train' in .* has no labels, so it cannot be evaluated; "
                     "set config.eval.split to a labelled split"):
    pipeline.eval_data(config, jax.make_mesh((1,), ("data",)))
  first = sorted((root / "labels" / "val").rglob("*.png"))[0]
  first.unlink()
  with pytest.raises(folders.DatasetError, match=f"no label file, e.g. {first}"):
    pipeline.open_examples("folder", str(root), "val", 19)


def test_folder_errors_name_the_folder_and_the_layout(tmp_path):
  with pytest.raises(folders.DatasetError, match=r"has no images/ folder\. Put the images in images/<split>/"):
    pipeline.open_examples("folder", str(tmp_path / "nowhere"), "train", 19)
  os.makedirs(tmp_path / "own" / "images" / "train")
  with pytest.raises(folders.DatasetError, match=r"'val' images folder .*images/val' does not exist"):
    pipeline.open_examples("folder", str(tmp_path / "own"), "val", 19)
  with pytest.raises(folders.DatasetError, match="folder train under .*: no images found"):
    pipeline.open_examples("folder", str(tmp_path / "own"), "train", 19)


def test_folder_is_read_in_place_not_prepared(tmp_path):
  assert "folder" not in registry.preparable()
  with pytest.raises(prepare.app.UsageError, match="unknown dataset 'folder'; choose from .*'gta5'.*'nthu'"):
    prepare.expand(["folder"], str(tmp_path))


def test_config_validation_accepts_every_registered_name(tiny_data_root):
  for name in registry.NAMES:
    config = tiny_config(tiny_data_root)
    config.unlock()
    config.data.source = config.data.target = name
    config_validation.validate(config)
  config.data.target = "folders"
  with pytest.raises(ConfigError, match="config.data.target='folders': .*did you mean 'folder'"):
    config_validation.validate(config)


def test_registry_entries():
  assert registry.NTHU_CITIES == ("rome", "rio", "tokyo", "taipei")
  assert registry.preparable() == ("gta5", "synthia", "cityscapes", *registry.NTHU_CITIES)
  for name, dataset in registry.DATASETS.items():
    assert dataset.name == name and dataset.fix
    assert dataset.label_format in (folders.CITYSCAPES_IDS, folders.SYNTHIA_IDS)
    assert bool(dataset.tfds_name) == bool(dataset.splits)  # Preparable datasets name their default splits.
  assert registry.get("synthia").label_format == folders.SYNTHIA_IDS
  with pytest.raises(ValueError, match="unknown dataset 'gta6'.*known: .*'folder'"):
    registry.get("gta6")
