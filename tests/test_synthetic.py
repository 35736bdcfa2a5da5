"""The embedded benchmark: deterministic, in the real layouts, same label statistics in both domains,
different appearance."""

import os

import numpy as np
from PIL import Image

from maxsq_jax.data import classes, folders, registry, synthetic
from tests.helpers import run_cli_in_process


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
  (tmp_path / "synthetic_source" / "images" / "00007.png").write_bytes(b"half written")
  synthetic.generate(str(tmp_path), num_train=2, num_val=4, size=(24, 16), seed=0, verbose=False)
  assert sorted(os.listdir(target)) == [f"synth_{i:06d}_000019_leftImg8bit.png" for i in range(4)]
  assert all(Image.open(target / name).size == (24, 16) for name in os.listdir(target))
  assert not (tmp_path / "synthetic_source" / "images" / "00007.png").exists()
  assert sorted(os.listdir(tmp_path / "synthetic_source")) == ["COMPLETE", "images", "labels", "list"]
  source = pipeline.open_examples("synthetic_target", str(tmp_path / "synthetic_target"), "val", 19)
  assert len(source) == 4


def test_a_users_folder_is_never_cleared(tmp_path, capsys):
  import pytest

  from maxsq_jax.errors import DataError
  mine = tmp_path / "mine" / "synthetic_source"
  (mine / "images").mkdir(parents=True)
  (mine / "NOTES.txt").write_text("my notes")
  (mine / "images" / "holiday.jpg").write_bytes(b"a photo")
  (mine / "images" / "00001.png").write_bytes(b"a name the generator also writes")
  before = sorted(str(p.relative_to(mine)) for p in mine.rglob("*"))
  message = (f"{mine} has no COMPLETE marker and holds files the synthetic generator does not write: "
             "NOTES.txt, images/holiday.jpg. It is not an interrupted generation, so nothing was deleted: move "
             "those files away, or name a folder that does not exist for the synthetic dataset")
  with pytest.raises(DataError) as e:
    synthetic.generate(str(mine.parent), 2, 1, (24, 16), verbose=False)
  assert str(e.value) == message
  with pytest.raises(SystemExit) as e:  # The command line: one error line.
    run_cli_in_process(synthetic, f"--root={mine.parent}", "--num_train=2", "--num_val=1", "--size=24,16")
  assert e.value.code == 1 and capsys.readouterr().err == f"error: {message}\n"
  assert sorted(str(p.relative_to(mine)) for p in mine.rglob("*")) == before
  assert (mine / "NOTES.txt").read_text() == "my notes"
  assert (mine / "images" / "holiday.jpg").read_bytes() == b"a photo"


def test_a_folder_the_generator_created_is_cleared_and_a_link_is_never_followed(tmp_path):
  import pytest

  from maxsq_jax.errors import DataError
  root = tmp_path / "data"
  (root / "synthetic_target" / "junk").mkdir(parents=True)
  (root / "synthetic_target" / "GENERATING").write_text("")  # Created by an interrupted generation.
  (root / "synthetic_target" / "junk" / "x.bin").write_bytes(b"x")
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  (elsewhere / "keep.txt").write_text("keep")
  (root / "synthetic_source").symlink_to(elsewhere)
  with pytest.raises(DataError, match=f"^{root}/synthetic_source is a symbolic link \\(to {elsewhere}\\) and holds no "
                                      "complete generated dataset; .* remove the link, or name a folder that does not"):
    synthetic.generate(str(root), 2, 1, (24, 16), verbose=False)
  assert sorted(os.listdir(elsewhere)) == ["keep.txt"]
  (root / "synthetic_source").unlink()
  synthetic.generate(str(root), 2, 1, (24, 16), verbose=False)
  assert sorted(os.listdir(root / "synthetic_target")) == ["COMPLETE", "gtFine", "leftImg8bit"]
  # A link to a complete dataset is read, not rewritten.
  (root / "synthetic_source").rename(elsewhere / "synthetic_source")
  (root / "synthetic_source").symlink_to(elsewhere / "synthetic_source")
  before = {p: p.stat().st_mtime_ns for p in (elsewhere / "synthetic_source").rglob("*")}
  synthetic.generate(str(root), 2, 1, (24, 16), verbose=False)
  assert {p: p.stat().st_mtime_ns for p in (elsewhere / "synthetic_source").rglob("*")} == before


def _hue_degrees(rgb) -> float:
  """The hue angle of a mean colour: its direction around the grey axis, in degrees."""
  c = np.asarray(rgb, np.float64) - np.mean(rgb)
  return float(np.degrees(np.arctan2(c @ (np.array([1, 1, -2]) / np.sqrt(6)), c @ (np.array([1, -1, 0]) / np.sqrt(2)))))


def _target_train(root):
  split = os.path.join(root, synthetic.TARGET_NAME, "leftImg8bit", "train", "synth")
  names = sorted(os.listdir(split))
  images = np.stack([np.asarray(Image.open(os.path.join(split, n)), np.float64) for n in names])
  labels = np.stack([np.asarray(Image.open(os.path.join(split.replace("leftImg8bit", "gtFine", 1),
                                                        n.replace("_leftImg8bit", "_gtFine_labelIds"))))
                     for n in names])
  return images, labels


def _files(root):
  out = {}
  for dirpath, _, names in os.walk(root):
    for name in names:
      with open(os.path.join(dirpath, name), "rb") as f:
        out[os.path.relpath(os.path.join(dirpath, name), root)] = f.read()
  return out


def test_class_hue_shift_is_seeded_and_turns_each_class_its_own_way(tmp_path):
  """The shift BatchNorm cannot absorb: each class's colour turns by its own angle, in both directions."""
  plain, shifted, again = (str(tmp_path / n) for n in ("plain", "shifted", "again"))
  synthetic.generate(plain, 12, 2, (64, 32), seed=3, verbose=False)
  synthetic.generate(shifted, 12, 2, (64, 32), seed=3, verbose=False, class_hue_deg=60)
  synthetic.generate(again, 12, 2, (64, 32), seed=3, verbose=False, class_hue_deg=60)
  assert _files(shifted) == _files(again)  # Deterministic per seed.
  # The source domain and every scene are those of the unshifted benchmark; only target images change
  # (and the COMPLETE markers, which record the shift).
  source_plain, source_shifted = (_files(os.path.join(r, synthetic.SOURCE_NAME)) for r in (plain, shifted))
  assert source_shifted.pop("COMPLETE").endswith(b" class_hue_deg=60\n")
  source_plain.pop("COMPLETE")
  assert source_plain == source_shifted
  (a, labels), (b, labels_shifted) = _target_train(plain), _target_train(shifted)
  assert np.array_equal(labels, labels_shifted) and not np.array_equal(a, b)

  angles = synthetic.class_hue_angles(3, 60)
  assert angles == synthetic.class_hue_angles(3, 60) and angles != synthetic.class_hue_angles(4, 60)
  assert all(30 <= abs(v) <= 60 for v in angles.values())  # ±U(0.5, 1) x 60 degrees.
  measured = {}
  for value in (synthetic.SIDEWALK, synthetic.BUILDING, synthetic.VEGETATION, synthetic.TERRAIN, synthetic.SKY,
                synthetic.CAR):
    mask = labels == value
    turn = _hue_degrees(b[mask].mean(0)) - _hue_degrees(a[mask].mean(0))
    measured[value] = (turn + 180) % 360 - 180
    # The class's mean colour turned as designed (within what texture, light, noise and blur add).
    assert abs(measured[value] - angles[value]) < 20, (value, measured[value], angles[value])
  # Some classes turn one way and some the other: no single global colour change (what BatchNorm's
  # per-channel normalisation can undo) maps the unshifted target onto the shifted one.
  assert min(measured.values()) < -25 and max(measured.values()) > 25
  assert synthetic.class_hue_angles(3, 0) == {value: 0.0 for value in angles}
