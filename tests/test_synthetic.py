"""The embedded benchmark: deterministic, in the real layouts, same label statistics in both domains,
different appearance."""

import os

import numpy as np
from PIL import Image

from maxsq_jax.data import classes, folders, registry, synthetic


def test_generation_is_seeded_and_deterministic(tmp_path):
  synthetic.generate(str(tmp_path / "a"), 3, 2, (48, 32), seed=5, verbose=False)
  synthetic.generate(str(tmp_path / "b"), 3, 2, (48, 32), seed=5, verbose=False)
  synthetic.generate(str(tmp_path / "c"), 3, 2, (48, 32), seed=6, verbose=False)
  a = tmp_path / "a" / "synthetic_source" / "images" / "00000.png"
  b = tmp_path / "b" / "synthetic_source" / "images" / "00000.png"
  c = tmp_path / "c" / "synthetic_source" / "images" / "00000.png"
  assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
  assert not np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(c)))


def test_layouts_are_those_of_gta5_and_cityscapes(tiny_data_root):
  source = registry.get("gta5").open_folder(os.path.join(tiny_data_root, "synthetic_source"), "train", 19)
  target = registry.get("cityscapes").open_folder(os.path.join(tiny_data_root, "synthetic_target"), "val", 19)
  assert len(source) == 16 and len(target) == 4
  example = source[0]
  assert example["image"].shape == (32, 48, 3) and example["image"].dtype == np.uint8
  assert example["label"].dtype == np.int32
  # Label PNGs hold Cityscapes ids; the reader maps them to train ids.
  raw = np.asarray(Image.open(os.path.join(tiny_data_root, "synthetic_source", "labels", "00000.png")))
  np.testing.assert_array_equal(example["label"], classes.to_train_ids(raw))
  assert set(np.unique(example["label"])) <= set(range(19))
  assert target[0]["image"].shape == (32, 48, 3)


def test_domains_share_layout_statistics_but_not_appearance():
  layouts = [synthetic.draw_layout(np.random.default_rng(i), 64, 128) for i in range(40)]
  fractions = np.mean([[np.mean(l == cid) for cid in (synthetic.ROAD, synthetic.SKY, synthetic.BUILDING)]
                       for l in layouts], axis=0)
  assert np.all(fractions > 0.05)  # Road, sky and buildings occur in every domain's scenes.
  layout = layouts[0]
  source = synthetic.render(np.random.default_rng(1), layout, synthetic.SOURCE_STYLE).astype(float)
  target = synthetic.render(np.random.default_rng(1), layout, synthetic.TARGET_STYLE).astype(float)
  road = layout == synthetic.ROAD
  # Same scene, different look: darker, less saturated and noisier in the target.
  assert target.mean() < source.mean() - 10
  saturation = lambda im: np.mean(im.max(-1) - im.min(-1))
  assert saturation(target) < saturation(source)
  assert np.abs(source[road].mean(0) - target[road].mean(0)).max() > 10


def test_interrupted_generation_is_not_read_as_complete(tmp_path):
  import pytest

  from maxsq_jax.data import pipeline
  root = tmp_path / "synthetic_source"
  (root / "images").mkdir(parents=True)  # Files started, no COMPLETE marker.
  with pytest.raises(folders.DatasetError, match="incomplete"):
    pipeline.open_examples("synthetic_source", str(root), "train", 19)


def test_regeneration_clears_a_half_written_folder(tmp_path):
  from maxsq_jax.data import pipeline
  target = tmp_path / "synthetic_target" / "leftImg8bit" / "val" / "synth"
  target.mkdir(parents=True)  # An interrupted generation of 6 val images at another size, no COMPLETE marker.
  for i in range(6):
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(target / f"synth_{i:06d}_000019_leftImg8bit.png")
  (tmp_path / "synthetic_source" / "images").mkdir(parents=True)
  (tmp_path / "synthetic_source" / "images" / "stale.png").write_bytes(b"not a png")
  synthetic.generate(str(tmp_path), num_train=2, num_val=4, size=(24, 16), seed=0, verbose=False)
  assert sorted(os.listdir(target)) == [f"synth_{i:06d}_000019_leftImg8bit.png" for i in range(4)]
  assert all(Image.open(target / name).size == (24, 16) for name in os.listdir(target))
  assert not (tmp_path / "synthetic_source" / "images" / "stale.png").exists()
  source = pipeline.open_examples("synthetic_target", str(tmp_path / "synthetic_target"), "val", 19)
  assert len(source) == 4
