"""grain pipelines over the prepared (tfds) and raw datasets: hosts read disjoint examples that
cover the split, the evaluation visits every image exactly once across hosts, worker processes give
deterministic batches, the iterator state resumes at the next unseen batch, and the optional random
scale + crop keeps image and label aligned."""

import io
import sys

import jax
import numpy as np
import pytest

from maxsq_jax.data import classes, pipeline, prepare, transforms
from tests import fake_datasets as fake
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """Raw GTA5 (10 train images) and Cityscapes (6 train, 5 val) trees, also prepared as tfds."""
  raw = tmp_path_factory.mktemp("raw")
  tfds_dir = tmp_path_factory.mktemp("tfds")
  fake.fake_gta5(raw / "GTA5", splits={"train": list(range(1, 11))}, size=(24, 16))
  fake.fake_cityscapes(raw / "Cityscapes", splits={"train": 6, "val": 5}, size=(32, 16))
  for name, folder in (("gta5", "GTA5"), ("cityscapes", "Cityscapes")):
    prepare.prepare(name, str(raw / folder), str(tfds_dir), splits=["train"] + (["val"] if name == "cityscapes" else []),
                    progress=False, out=io.StringIO(), threads=1)
  return raw, tfds_dir


def make_config(data_dirs, prepared=True, **overrides):
  raw, tfds_dir = data_dirs
  values = {
      "data.source": "gta5", "data.target": "cityscapes",
      "data.source_dir": str(tfds_dir if prepared else raw / "GTA5"),
      "data.target_dir": str(tfds_dir if prepared else raw / "Cityscapes"),
      "data.source_size": (24, 16), "data.target_size": (32, 16), "eval.size": (32, 16),
      "data.random_mirror": False, "data.gaussian_blur": False, "data.prefetch": 1,
      "batch_size": 2, "eval.batch_size": 2, "model.num_classes": 19,
  }
  values.update(overrides)
  # tiny_config wants a synthetic data root; every data field it sets is overridden here.
  return tiny_config(str(raw), **values)


@pytest.fixture
def mesh():
  return jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def fake_hosts(monkeypatch, host: int, hosts: int) -> None:
  """Makes this process look like host `host` of `hosts` (batches stay host-local numpy)."""
  monkeypatch.setattr(jax, "process_index", lambda: host)
  monkeypatch.setattr(jax, "process_count", lambda: hosts)
  monkeypatch.setattr(pipeline, "to_global", lambda mesh, local: local)


def keep_index(monkeypatch):
  """The training transform, but the example index stays in the batch (to tell examples apart)."""
  original = pipeline._train_example

  def with_index(example, rng, **kwargs):
    out = original(example, rng, **kwargs)
    out["index"] = example["index"]
    return out
  monkeypatch.setattr(pipeline, "_train_example", with_index)


@pytest.mark.parametrize("prepared", [True, False])
def test_two_hosts_read_disjoint_examples_covering_the_split(data, mesh, monkeypatch, prepared):
  config = make_config(data, prepared, batch_size=4)
  keep_index(monkeypatch)
  seen = {}
  for host in (0, 1):
    fake_hosts(monkeypatch, host, 2)
    stream = pipeline.train_stream(config, "source", mesh, seed=3)
    # 10 examples, global batch 4 = 2 per host: 5 steps of 2 per host are exactly 2 epochs.
    batches = [next(stream) for _ in range(5)]
    assert all(b["image"].shape == (2, 16, 24, 3) and b["label"].shape == (2, 16, 24) for b in batches)
    seen[host] = [int(i) for b in batches for i in b["index"]]
  # Global order: step s is host 0's 2 examples, then host 1's; 20 examples are 2 epochs.
  order, owner = [], []
  for step in range(5):
    for host in (0, 1):
      order += seen[host][2 * step:2 * step + 2]
      owner += [host, host]
  for epoch in (slice(0, 10), slice(10, 20)):
    assert sorted(order[epoch]) == list(range(10))  # Together the hosts cover the split ...
    host0 = {i for i, h in zip(order[epoch], owner[epoch]) if h == 0}
    host1 = {i for i, h in zip(order[epoch], owner[epoch]) if h == 1}
    assert not host0 & host1  # ... with disjoint examples.
  assert order[:10] != order[10:]  # A new permutation every epoch.


@pytest.mark.parametrize("hosts", [1, 2, 3])
def test_evaluation_visits_every_image_once_across_hosts(data, mesh, monkeypatch, hosts):
  config = make_config(data, **{"eval.batch_size": hosts * 2})
  visited = []
  for host in range(hosts):
    fake_hosts(monkeypatch, host, hosts)
    eval_data = pipeline.eval_data(config, mesh)
    batches = list(eval_data.batches(mesh))
    assert len(batches) == eval_data.batches_per_host  # Every host runs the same number of batches.
    for b in batches:
      visited += [int(i) for i, m in zip(b["index"], b["mask"]) if m]
  assert sorted(visited) == list(range(5))


@pytest.mark.parametrize("eval_size", [(16, 8), (32, 16)])
def test_evaluation_at_reference_and_full_resolution(data, mesh, eval_size):
  raw, _ = data
  config = make_config(data, **{"eval.size": eval_size})
  batch = next(iter(pipeline.eval_data(config, mesh).batches(mesh)))
  assert batch["image"].shape == (2, eval_size[1], eval_size[0], 3)
  source = pipeline.open_examples("cityscapes", str(raw / "Cityscapes"), "val", 19)
  expected = [transforms.resize(source[i], eval_size)["label"] for i in range(2)]
  np.testing.assert_array_equal(np.asarray(batch["label"]), np.stack(expected))
  if eval_size == (32, 16):  # The native size: labels untouched.
    np.testing.assert_array_equal(np.asarray(batch["label"])[0], source[0]["label"])


@pytest.mark.parametrize("num_classes", [16, 13])
def test_training_labels_in_the_class_set(data, mesh, num_classes):
  config = make_config(data, **{"model.num_classes": num_classes, "data.random_mirror": True,
                                "data.gaussian_blur": True})
  labels = np.concatenate([np.asarray(next(pipeline.train_stream(config, "source", mesh, 0))["label"])
                           for _ in range(2)])
  assert labels.min() >= -1 and labels.max() < num_classes and labels.max() > 0


def _parse_flags():
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1])


def _take(stream, n):
  return [{k: np.asarray(v) for k, v in next(stream).items()} for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.parametrize("workers", [0, 2])
def test_workers_are_deterministic_and_resume_at_the_next_batch(data, mesh, workers):
  """Run under pytest, workers need absl flags parsed (main.py parses them with app.run)."""
  if workers:
    _parse_flags()
  config = make_config(data, **{"data.workers": workers, "data.random_mirror": True, "data.gaussian_blur": True,
                                "data.prefetch": 2})
  stream = pipeline.train_stream(config, "source", mesh, seed=7)
  first = _take(stream, 3)
  state = stream.get_state()
  import json
  state = json.loads(json.dumps(state))  # What the checkpoint stores per host.
  rest = _take(stream, 4)  # Crosses the epoch boundary (10 examples, 2 per batch).
  again = pipeline.train_stream(config, "source", mesh, seed=7)
  _assert_same(_take(again, 7), first + rest)  # Same seed, same worker count: same batches.
  resumed = pipeline.train_stream(config, "source", mesh, seed=7)
  resumed.set_state(state)
  _assert_same(_take(resumed, 4), rest)
  if workers:  # Augmentation is seeded per example, so even another worker count gives these batches.
    serial = pipeline.train_stream(make_config(data, **{"data.random_mirror": True, "data.gaussian_blur": True}),
                                   "source", mesh, seed=7)
    _assert_same(_take(serial, 7), first + rest)


def test_random_scale_crop_keeps_image_and_label_aligned():
  height, width = 20, 40
  label = (np.arange(height * width).reshape(height, width) % 19).astype(np.int32)
  image = np.stack([label * 10, label * 3, np.full_like(label, 7)], axis=-1).astype(np.uint8)
  rng = np.random.default_rng(0)
  sides = []
  for _ in range(40):
    out = transforms.random_scale_crop({"image": image, "label": label}, rng, (16, 8), (0.5, 2.0))
    assert out["image"].shape == (8, 16, 3) and out["label"].shape == (8, 16)
    valid = out["label"] >= 0
    # Nearest-neighbour labels and bicubic images agree away from edges; padding is ignore + black.
    np.testing.assert_array_equal(out["image"][~valid], 0)
    assert (out["label"] >= -1).all() and (out["label"] < 19).all()
    sides.append(valid.any())
  assert all(sides)
  # Deterministic for a given generator state; the scaled side is drawn from [0.5, 2] x base.
  a = transforms.random_scale_crop({"image": image, "label": label}, np.random.default_rng(5), (16, 8))
  b = transforms.random_scale_crop({"image": image, "label": label}, np.random.default_rng(5), (16, 8))
  np.testing.assert_array_equal(a["label"], b["label"])


def test_random_scale_crop_pads_with_ignore_when_scaled_down():
  label = np.full((100, 100), 3, np.int32)
  image = np.full((100, 100, 3), 200, np.uint8)
  out = None
  rng = np.random.default_rng(1)
  for _ in range(50):  # Scale to 0.5x: 50x50 in a 100x80 crop has padding.
    out = transforms.random_scale_crop({"image": image, "label": label}, rng, (100, 80), (0.5, 0.5))
    assert out["image"].shape == (80, 100, 3)
  assert (out["label"][:50, :50] == 3).all() and (out["label"][50:] == classes.IGNORE_LABEL).all()
  assert (out["image"][50:] == 0).all() and (out["image"][:50, :50] == 200).all()


def test_config_flag_turns_scale_crop_on(data, mesh):
  config = make_config(data, **{"data.random_scale_crop": True, "data.scale_range": (0.5, 0.5)})
  batch = next(pipeline.train_stream(config, "source", mesh, seed=0))
  label = np.asarray(batch["label"])
  assert label.shape == (2, 16, 24) and (label[:, 8:, :] == -1).all()  # Half-size images, padded.


def test_an_unlabelled_split_cannot_be_the_source(data, mesh, tmp_path):
  from maxsq_jax.data import folders
  fake.fake_nthu(tmp_path, "Rio")
  config = make_config(data, **{"data.source": "rio", "data.source_dir": str(tmp_path), "data.source_split": "train",
                                "model.num_classes": 13})
  with pytest.raises(folders.DatasetError, match="no label"):
    next(pipeline.train_stream(config, "source", mesh, seed=0))
  config = make_config(data, **{"data.target": "rio", "data.target_dir": str(tmp_path), "model.num_classes": 13})
  batch = next(pipeline.train_stream(config, "target", mesh, seed=0))  # As the target it is fine.
  assert set(batch) == {"image"} and batch["image"].shape == (2, 16, 32, 3)


@pytest.mark.integration
def test_training_path_without_tensorflow_datasets(data):
  """An image without tensorflow-datasets (an accelerator's) imports the training entry point (and
  with it the pipeline and evaluation modules) and reads dataset folders; a prepared dataset then
  gets an error naming the fix."""
  import subprocess
  raw, tfds_dir = data
  code = (
      "import sys; sys.modules['tensorflow_datasets'] = None\n"
      "import maxsq_jax.main, maxsq_jax.train\n"
      "from maxsq_jax.data import folders, pipeline\n"
      f"s = pipeline.open_examples('gta5', {str(raw / 'GTA5')!r}, 'train', 19)\n"
      "assert isinstance(s, folders.FolderExamples) and len(s) == 10, s\n"
      "try:\n"
      f"  pipeline.open_examples('gta5', {str(tfds_dir)!r}, 'train', 19)\n"
      "except folders.DatasetError as e:\n"
      "  assert 'Install tensorflow-datasets' in str(e), e\n"
      "else:\n"
      "  raise AssertionError('no error')\n"
      "assert 'tensorflow_datasets' not in sys.modules or sys.modules['tensorflow_datasets'] is None\n"
      "print('OK')\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr[-2000:]


def test_prepared_dataset_names_are_the_builders():
  from maxsq_jax.data import builders, registry
  assert tuple(builders.BUILDERS) == ("gta5", "synthia", "cityscapes", "rome", "rio", "tokyo", "taipei")
  assert tuple(builders.BUILDERS) == registry.preparable()
