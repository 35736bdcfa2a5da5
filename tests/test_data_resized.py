"""`prepare --train_size`: the training split stored already resized to the training size.

The reference mirrors an image, then resizes it; a pre-resized split is resized first and mirrored
while training. The two orders agree to within one grey level (Pillow's bicubic resampling is
mirror-symmetric; so is nearest-neighbour for labels, but for ties), so training from the
pre-resized split sees the same batches."""

import io

import jax
import numpy as np
import pytest
from PIL import Image

from maxsq_jax.data import builders, classes, pipeline, prepare, synthetic, transforms
from tests import fake_datasets as fake
from tests.helpers import tiny_config


# (downloaded size, training size, fraction of label pixels the two orders must agree on). Nearest
# neighbour is mirror-symmetric except at exact ties: at an integer ratio (Cityscapes' 2:1) each output
# pixel sits between two source pixels and the mirrored order takes the other one (a one-pixel shift of
# the class boundaries); the reference never trains on Cityscapes labels (the target is unlabelled),
# and GTA5's 1914x1052 -> 1280x720 has no ties.
@pytest.mark.parametrize("raw_size,size,labels_agree", [((1914, 1052), (1280, 720), 1.0),
                                                        ((2048, 1024), (1024, 512), 0.99), ((48, 26), (32, 18), 1.0)])
def test_mirror_then_resize_equals_resize_then_mirror(raw_size, size, labels_agree):
  rng = np.random.default_rng(0)
  label = synthetic.draw_layout(rng, raw_size[1], raw_size[0]).astype(np.int32)
  scene = synthetic.render(rng, label, synthetic.SOURCE_STYLE)
  noise = rng.integers(0, 256, (raw_size[1], raw_size[0], 3), dtype=np.uint8)  # Every frequency.
  for image in (scene, noise):
    example = {"image": image, "label": classes.CITYSCAPES_ID_LUT[label]}
    mirrored_first = transforms.resize({k: np.ascontiguousarray(v[:, ::-1]) for k, v in example.items()}, size)
    resized_first = transforms.resize(example, size)
    difference = np.abs(mirrored_first["image"].astype(int) - resized_first["image"][:, ::-1].astype(int))
    assert mirrored_first["image"].shape == (size[1], size[0], 3)
    assert difference.max() <= 1
    assert (mirrored_first["label"] == resized_first["label"][:, ::-1]).mean() >= labels_agree


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
  """A GTA5 tree (48x26: 8 train, 3 val) prepared as downloaded and with the train split at 32x18."""
  raw = tmp_path_factory.mktemp("raw") / "GTA5"
  fake.fake_gta5(raw, splits={"train": list(range(1, 9)), "val": [9, 10, 11]}, size=(48, 26))
  # GTA5 has pairs whose label is not its image's size; each is resized to the training size on its own.
  label = Image.open(raw / "labels" / "00003.png")
  label.resize((44, 24), Image.NEAREST).save(raw / "labels" / "00003.png")
  full, resized = tmp_path_factory.mktemp("full"), tmp_path_factory.mktemp("resized")
  for data_dir, train_size in ((full, None), (resized, (32, 18))):
    prepare.prepare("gta5", str(raw), str(data_dir), splits=["train", "val"], progress=False, out=io.StringIO(),
                    threads=1, train_size=train_size)
  return raw, full, resized


def test_only_the_train_split_is_resized(trees):
  raw, full, resized = trees
  summary = prepare._summary("gta5", str(resized), "checked")
  assert summary["train_size"] == [32, 18] and prepare._summary("gta5", str(full), "checked")["train_size"] is None
  for data_dir in (full, resized):  # The pair of other sizes is listed either way.
    assert prepare._summary("gta5", str(data_dir), "checked")["size_mismatch"] == {
        "train": ["images/00003.png: image 48x26, label 44x24"]}
  train = builders.open_split("gta5", str(resized), "train", 19)
  val = builders.open_split("gta5", str(resized), "val", 19)
  assert train[0]["image"].shape == (18, 32, 3) and train[0]["label"].shape == (18, 32)
  assert val[0]["image"].shape == (26, 48, 3) and val[0]["label"].shape == (26, 48)  # Evaluation's full size.
  record = train._open()[0]
  assert record["image"].startswith(b"P6") and len(record["image"]) >= 32 * 18 * 3  # Uncompressed PPM.
  # Stored = the pipeline's own resize of the downloaded example.
  downloaded = builders.open_split("gta5", str(full), "train", 19)
  for i in range(len(train)):
    want = transforms.resize(downloaded[i], (32, 18))
    np.testing.assert_array_equal(train[i]["image"], want["image"])
    np.testing.assert_array_equal(train[i]["label"], want["label"])


def test_training_reads_the_pre_resized_split_with_the_same_batches(trees):
  raw, full, resized = trees
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batches = {}
  for name, data_dir in (("full", full), ("resized", resized)):
    config = tiny_config(str(data_dir), **{
        "data.source": "gta5", "data.target": "gta5", "data.source_dir": str(data_dir),
        "data.target_dir": str(data_dir), "data.source_size": (32, 18), "data.random_mirror": True,
        "data.gaussian_blur": True, "data.prefetch": 1, "batch_size": 2, "model.num_classes": 19})
    stream = pipeline.train_stream(config, "source", mesh, seed=5)
    batches[name] = [jax.device_get(next(stream)) for _ in range(8)]  # Two epochs: both mirror states occur.
  for a, b in zip(batches["full"], batches["resized"]):
    assert b["image"].shape == (2, 18, 32, 3)
    assert np.abs(a["image"] - b["image"]).max() <= 1.0 + 1e-4  # Normalised floats: one grey level.
    np.testing.assert_array_equal(a["label"], b["label"])


def test_bad_train_size_flag_names_the_fix():
  from absl import app
  assert prepare._train_size(["1280", "720"]) == (1280, 720) and prepare._train_size([]) is None
  for bad in (["1280"], ["a", "b"], ["0", "720"]):
    with pytest.raises(app.UsageError, match="--train_size=.*W,H"):
      prepare._train_size(bad)
