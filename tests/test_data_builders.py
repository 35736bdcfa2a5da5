"""The tfds builders and `prepare`: fake trees in each dataset's real layout and file formats are
prepared, read back through grain, and compared pixel by pixel with labels computed here from the
written ids (19, 16 and 13 classes); bad input gives errors that name the file, or logged skips;
interrupted preparations never look complete and are redone on the next run."""

import io
import os
import signal
import subprocess
import sys
import time

import grain
import numpy as np
import pytest
from PIL import Image

from maxsq_jax.data import builders, folders, pipeline, prepare, registry
from tests import fake_datasets as fake

# docs/method.md (Data), independent of maxsq_jax.data.classes.
CITYSCAPES = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
              26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
SYNTHIA = {1: 10, 2: 2, 3: 0, 4: 1, 5: 4, 6: 8, 7: 5, 8: 13, 9: 7, 10: 11, 11: 18, 12: 17, 15: 6, 16: 9,
           17: 12, 18: 14, 19: 15, 20: 16, 21: 3}
SUBSETS = {19: list(range(19)), 16: [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18],
           13: [0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]}


def expected_label(ids: np.ndarray, table: dict, num_classes: int) -> np.ndarray:
  subset = SUBSETS[num_classes]
  out = np.full(ids.shape, -1)
  for (y, x), value in np.ndenumerate(ids):
    train = table.get(int(value), -1)
    out[y, x] = subset.index(train) if train in subset else -1
  return out


def run_prepare(dataset, manual_dir, data_dir, **kwargs):
  out = io.StringIO()
  summary = prepare.prepare(dataset, str(manual_dir), str(data_dir), progress=False, out=out, threads=2, **kwargs)
  return summary, out.getvalue()


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
  """All four datasets as raw trees, prepared into one tfds data_dir."""
  root = tmp_path_factory.mktemp("raw")
  data_dir = tmp_path_factory.mktemp("tfds")
  written = {
      "gta5": (root / "GTA5", fake.fake_gta5(root / "GTA5"), CITYSCAPES),
      "synthia": (root / "SYNTHIA", fake.fake_synthia(root / "SYNTHIA"), SYNTHIA),
      "cityscapes": (root / "Cityscapes", fake.fake_cityscapes(root / "Cityscapes"), CITYSCAPES),
      "rome": (root / "NTHU", fake.fake_nthu(root / "NTHU", "Rome"), CITYSCAPES),
      "tokyo": (root / "NTHU", fake.fake_nthu(root / "NTHU", "Tokyo", seed=9), CITYSCAPES),
  }
  summaries = {name: run_prepare(name, manual, data_dir)[0] for name, (manual, _, _) in written.items()}
  return data_dir, written, summaries


SPLITS = [("gta5", "train", 6), ("gta5", "val", 3), ("synthia", "train", 5), ("cityscapes", "train", 4),
          ("cityscapes", "val", 3), ("rome", "train", 4), ("rome", "test", 3), ("tokyo", "test", 3)]


def test_prepare_writes_every_split(trees):
  data_dir, _, summaries = trees
  for dataset, split, count in SPLITS:
    assert builders.is_prepared(dataset, str(data_dir))
    assert summaries[dataset]["splits"][split]["examples"] == count
  assert summaries["rome"]["path"].endswith(os.path.join("nthu_crosscity", "rome", "1.0.0"))


@pytest.mark.parametrize("dataset, split, count", SPLITS)
@pytest.mark.parametrize("num_classes", [19, 16, 13])
def test_read_back_through_grain_pixel_exact(trees, dataset, split, count, num_classes):
  data_dir, written, _ = trees
  manual, labels, table = written[dataset]
  source = pipeline.open_examples(dataset, str(data_dir), split, num_classes)
  assert isinstance(source, builders.PreparedExamples) and len(source) == count
  raw_records = builders.builder(dataset, str(data_dir), progress=False).as_data_source(split)
  examples = registry.get(dataset).examples(str(manual), split)
  examples_out = list(grain.MapDataset.source(source).to_iter_dataset())
  assert len(examples_out) == count
  for i, (example, got) in enumerate(zip(examples, examples_out)):
    assert raw_records[i]["name"].decode() == example.key  # Records keep the sorted file order.
    with Image.open(example.image) as image:
      np.testing.assert_array_equal(got["image"], np.asarray(image.convert("RGB")))
    assert got["image"].dtype == np.uint8 and int(got["index"]) == i
    if split == "train" and dataset in ("rome", "tokyo"):
      assert "label" not in got  # NTHU train images are unlabelled.
      continue
    assert got["label"].dtype == np.int32
    np.testing.assert_array_equal(got["label"], expected_label(labels[example.key], table, num_classes))


@pytest.mark.parametrize("dataset, split, count", SPLITS)
def test_raw_folder_reads_the_same(trees, dataset, split, count):
  data_dir, written, _ = trees
  manual = written[dataset][0]
  raw = pipeline.open_examples(dataset, str(manual), split, 16)
  prepared = pipeline.open_examples(dataset, str(data_dir), split, 16)
  assert isinstance(raw, folders.FolderExamples) and len(raw) == count
  for i in range(count):
    a, b = raw[i], prepared[i]
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_synthia_16bit_labels_need_both_bytes(trees):
  _, written, _ = trees
  manual, labels, _ = written["synthia"]
  path = os.path.join(manual, "RAND_CITYSCAPES", "GT", "LABELS", "0000001.png")
  with Image.open(path) as image:
    assert image.mode == "RGB" and not np.asarray(image)[..., 0].any()  # Pillow keeps the high byte: all 0.
  ids = folders.read_label_ids(path, folders.SYNTHIA_IDS)
  np.testing.assert_array_equal(ids, labels["RGB/0000001.png"])


def test_prepare_is_skipped_when_complete(trees):
  data_dir, written, _ = trees
  before = os.path.getmtime(os.path.join(builders.dataset_dir("gta5", str(data_dir)), "dataset_info.json"))
  summary, text = run_prepare("gta5", written["gta5"][0], data_dir)
  assert "already prepared" in text and summary["splits"]["train"]["examples"] == 6
  assert os.path.getmtime(os.path.join(builders.dataset_dir("gta5", str(data_dir)), "dataset_info.json")) == before


@pytest.mark.integration
def test_prepare_cli_nthu_prepares_the_cities_present(trees, tmp_path):
  _, written, _ = trees
  proc = subprocess.run([sys.executable, "-m", "maxsq_jax.data.prepare", "nthu", f"--manual_dir={written['rome'][0]}",
                         f"--data_dir={tmp_path}", "--num_shards=2"], capture_output=True, text=True,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "no folder for Rio, Taipei" in proc.stdout
  assert "rome: prepared" in proc.stdout and "tokyo: prepared" in proc.stdout
  assert "train       4 examples    2 shard(s)" in proc.stdout
  files = os.listdir(builders.dataset_dir("rome", str(tmp_path)))
  assert sorted(f for f in files if "train.array_record" in f) == [
      "nthu_crosscity-train.array_record-00000-of-00002", "nthu_crosscity-train.array_record-00001-of-00002"]


# ------------------------------------------------------------------------------------------------
# Bad input.


def test_open_source_names_the_prepare_command(tmp_path):
  with pytest.raises(folders.DatasetError, match="python -m maxsq_jax.data.prepare gta5 --manual_dir="):
    pipeline.open_examples("gta5", str(tmp_path / "nothing"), "train", 19)
  fake.fake_cityscapes(tmp_path / "cs", splits={"val": 2})
  run_prepare("cityscapes", tmp_path / "cs", tmp_path / "tfds", splits=["val"])
  with pytest.raises(folders.DatasetError, match="has no split 'train'"):
    pipeline.open_examples("cityscapes", str(tmp_path / "tfds"), "train", 19)


@pytest.mark.parametrize("dataset, make, missing", [
    ("gta5", lambda p: os.makedirs(p / "labels"), "images"),
    ("synthia", lambda p: os.makedirs(p / "RAND_CITYSCAPES" / "RGB"), "LABELS"),
    ("cityscapes", lambda p: os.makedirs(p / "leftImg8bit" / "val"), os.path.join("leftImg8bit", "train")),
    ("rome", lambda p: os.makedirs(p / "Rome" / "Images" / "Test"), os.path.join("Rome", "Images", "Train")),
])
def test_missing_folder(tmp_path, dataset, make, missing):
  make(tmp_path / "raw")
  with pytest.raises(folders.DatasetError, match=f"{missing}.*does not exist"):
    run_prepare(dataset, tmp_path / "raw", tmp_path / "tfds")
  assert not builders.is_prepared(dataset, str(tmp_path / "tfds"))
  with pytest.raises(folders.DatasetError, match="does not exist"):
    registry.get(dataset).examples(str(tmp_path / "raw"), "train")
  with pytest.raises(folders.DatasetError, match="does not exist"):
    run_prepare(dataset, tmp_path / "elsewhere", tmp_path / "tfds")


def _gta5_tree(tmp_path):
  root = tmp_path / "GTA5"
  fake.fake_gta5(root, splits={"train": [1, 2, 3, 4]})
  return root


def _corrupt(root):
  path = root / "images" / "00003.png"
  path.write_bytes(path.read_bytes()[:60])
  return str(path)


def _missing_label(root):
  path = root / "labels" / "00004.png"
  os.remove(path)
  return str(path)


def _bad_id(root):
  path = root / "labels" / "00001.png"
  with Image.open(path) as image:
    ids = np.asarray(image).copy()
  ids[0, 0] = 40
  Image.fromarray(ids, mode="L").save(path)
  return str(path)


@pytest.mark.parametrize("damage, message", [
    (_corrupt, "cannot decode"), (_missing_label, "no label file"), (_bad_id, r"unexpected label ids \[40\]")])
def test_bad_example_raises_or_is_skipped(tmp_path, damage, message):
  root = _gta5_tree(tmp_path)
  path = damage(root)
  data_dir = tmp_path / "tfds"
  with pytest.raises(folders.DatasetError, match=message) as error:
    run_prepare("gta5", root, data_dir, splits=["train"])
  assert path in str(error.value)
  # Nothing that looks complete, and no leftovers.
  assert not builders.is_prepared("gta5", str(data_dir))
  assert not os.path.exists(builders.dataset_dir("gta5", str(data_dir)))
  assert not [p for p in os.listdir(data_dir / "gta5")] if (data_dir / "gta5").exists() else True
  # The raw-folder reader refuses the same file (at open for a missing label, else on read).
  with pytest.raises(folders.DatasetError, match=message):
    source = pipeline.open_examples("gta5", str(root), "train", 19)
    for i in range(len(source)):
      source[i]
  summary, text = run_prepare("gta5", root, data_dir, splits=["train"], on_error="skip")
  assert summary["splits"]["train"]["examples"] == 3
  assert "skipped 1 example(s)" in text and path in text
  assert path in summary["skipped"]["train"][0]


def test_gta5_pairs_of_different_sizes_are_kept_and_resized_each_on_its_own(tmp_path):
  """As the reference: the image bicubic, the label nearest, each to the training size; listed in the summary."""
  root = _gta5_tree(tmp_path)
  ids = np.full((5, 5), 7, np.uint8)  # Cityscapes id 7 = road (train id 0) ...
  ids[1:3, 2:] = 26  # ... and a block of car (train id 13).
  Image.fromarray(ids, mode="L").save(root / "labels" / "00002.png")
  data_dir = tmp_path / "tfds"
  summary, text = run_prepare("gta5", root, data_dir, splits=["train"])
  assert summary["splits"]["train"]["examples"] == 4 and not summary["skipped"]
  assert summary["size_mismatch"] == {"train": ["images/00002.png: image 24x16, label 5x5"]}
  assert "1 pair(s) whose image and label sizes differ" in text and "images/00002.png" in text
  train_ids = np.where(ids == 26, 13, 0)
  expected = np.repeat(np.repeat(train_ids, 2, axis=0), 4, axis=1)  # Nearest, 5x5 -> 20x10.
  for where in (data_dir, root):  # The prepared copy and the raw folder.
    source = pipeline.open_examples("gta5", str(where), "train", 19)
    index = next(i for i in range(len(source)) if source[i]["label"].shape == (5, 5))
    out = pipeline._train_example(source[index], np.random.default_rng(0), size=(20, 10), mirror=False,
                                  blur=False, normalization="bgr_mean", keep_label=True)
    assert out["image"].shape == (10, 20, 3)
    np.testing.assert_array_equal(out["label"], expected)


def test_label_of_another_size_is_refused_outside_gta5(tmp_path):
  fake.fake_cityscapes(tmp_path, splits={"val": 1})
  label = next((tmp_path / "gtFine" / "val").rglob("*_labelIds.png"))
  Image.fromarray(np.zeros((5, 5), np.uint8), mode="L").save(label)
  with pytest.raises(folders.DatasetError, match="is 5x5 but its image") as error:
    run_prepare("cityscapes", tmp_path, tmp_path / "tfds", splits=["val"])
  assert str(label) in str(error.value)


def test_synthia_unexpected_id(tmp_path):
  fake.fake_synthia(tmp_path, num=2)
  path = tmp_path / "RAND_CITYSCAPES" / "GT" / "LABELS" / "0000001.png"
  ids = np.zeros((16, 24, 3), np.uint16)
  ids[3, 4, 0] = 300  # High byte set: a reader that keeps only one byte would not see it.
  fake.write_png16(str(path), ids)
  with pytest.raises(folders.DatasetError, match=r"unexpected label ids \[300\]") as error:
    run_prepare("synthia", tmp_path, tmp_path / "tfds")
  assert str(path) in str(error.value)


def test_colour_label_is_refused(tmp_path):
  fake.fake_cityscapes(tmp_path, splits={"val": 1})
  label = next((tmp_path / "gtFine" / "val").rglob("*_labelIds.png"))
  Image.new("RGB", (32, 16)).save(label)
  with pytest.raises(folders.DatasetError, match="RGB image; expected a single-channel map"):
    run_prepare("cityscapes", tmp_path, tmp_path / "tfds", splits=["val"])


def test_gta5_needs_split_lists_or_all(tmp_path):
  root = _gta5_tree(tmp_path)
  os.remove(root / "list" / "train.txt")
  with pytest.raises(folders.DatasetError, match="split 'full'"):
    run_prepare("gta5", root, tmp_path / "tfds", splits=["train"])
  summary, _ = run_prepare("gta5", root, tmp_path / "tfds", splits=["full"])
  assert summary["splits"]["full"]["examples"] == 4


def test_synthia_splits_are_the_reference_ids_without_lists(tmp_path):
  base = tmp_path / "RAND_CITYSCAPES"
  for folder in ("RGB", "GT/LABELS"):
    os.makedirs(base / folder)
    for i in (0, 1, 8999, 9000, 9399):
      (base / folder / f"{i:07d}.png").write_bytes(b"")
  keys = lambda split: [e.key for e in registry.get("synthia").examples(str(tmp_path), split)]
  assert keys("train") == ["RGB/0000000.png", "RGB/0000001.png", "RGB/0008999.png"]
  assert keys("val") == ["RGB/0009000.png", "RGB/0009399.png"]
  assert len(keys("full")) == 5
  with pytest.raises(folders.DatasetError, match="'train' \\(ids 0-8999"):
    keys("test")
  os.makedirs(base / "list")
  (base / "list" / "train.txt").write_text("1\n9000\n")  # The lists win where they exist.
  assert keys("train") == ["RGB/0000001.png", "RGB/0009000.png"]


@pytest.mark.integration
def test_killed_prepare_is_redone_cleanly(tmp_path):
  """A prepare killed (SIGKILL) while writing leaves only an incomplete.* folder; the next run
  removes it and writes the dataset from scratch."""
  root = _gta5_tree(tmp_path)
  blocked = root / "images" / "00003.png"
  content = blocked.read_bytes()
  os.remove(blocked)
  os.mkfifo(blocked)  # Reading it blocks: the run is killed in the middle of writing the split.
  data_dir = tmp_path / "tfds"
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.Popen([sys.executable, "-m", "maxsq_jax.data.prepare", "gta5", f"--manual_dir={root}",
                           f"--data_dir={data_dir}", "--splits=train", "--threads=1"], cwd=repo,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.time() + 60
  while not list((data_dir / "gta5").glob("incomplete.*")) if (data_dir / "gta5").exists() else True:
    assert time.time() < deadline and proc.poll() is None, proc.stdout.read().decode()[-2000:]
    time.sleep(0.1)
  time.sleep(0.5)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  stale = list((data_dir / "gta5").glob("incomplete.*"))
  assert stale and not builders.is_prepared("gta5", str(data_dir))
  with pytest.raises(folders.DatasetError, match="neither the prepared dataset"):
    pipeline.open_examples("gta5", str(data_dir), "train", 19)
  os.remove(blocked)
  blocked.write_bytes(content)
  summary, text = run_prepare("gta5", root, data_dir, splits=["train"])
  assert f"removed {stale[0]}" in text
  assert summary["splits"]["train"]["examples"] == 4 and not stale[0].exists()
  assert len(pipeline.open_examples("gta5", str(data_dir), "train", 19)) == 4


def test_overwrite_prepares_again_with_the_splits_asked_for(tmp_path):
  fake.fake_cityscapes(tmp_path / "cs", splits={"train": 2, "val": 2})
  run_prepare("cityscapes", tmp_path / "cs", tmp_path / "tfds")
  summary, text = run_prepare("cityscapes", tmp_path / "cs", tmp_path / "tfds", splits=["val"], overwrite=True)
  assert "prepared in" in text and sorted(summary["splits"]) == ["val"]
  assert not list((tmp_path / "tfds" / "cityscapes_gtfine").glob("incomplete.*"))
