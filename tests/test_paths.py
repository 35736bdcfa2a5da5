"""The path layer without a server: local paths are made absolute, gs:// URLs kept, other schemes and
URLs as training-data directories refused with one line naming them and the fix."""

import os

import pytest

from maxsq_jax import paths, train
from tests.helpers import tiny_config


def test_local_paths_become_absolute_and_gs_urls_stay(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(paths.resolve("runs/x")) == os.path.join(str(tmp_path), "runs", "x")
  assert str(paths.resolve("gs://bucket/runs/x")) == "gs://bucket/runs/x"
  assert str(paths.resolve("gs://bucket/runs/x") / "checkpoints") == "gs://bucket/runs/x/checkpoints"
  assert paths.is_remote("gs://bucket/x") and not paths.is_remote(str(tmp_path))
  assert paths.bucket_of("gs://my-bucket/runs/x") == "my-bucket"


@pytest.mark.parametrize("url", ["s3://bucket/run", "http://host/run", "https://storage.googleapis.com/b/run"])
def test_other_schemes_are_refused(url):
  scheme = url.split("://")[0]
  with pytest.raises(paths.PathError, match=rf"^--workdir={url}: the {scheme}:// scheme is not supported; give a "
                     r"local path or a gs://BUCKET/PATH URL$"):
    paths.resolve(url, "--workdir")


def test_gs_url_without_bucket_is_refused():
  with pytest.raises(paths.PathError, match=r"^--workdir=gs:///run: no bucket name; write gs://BUCKET/PATH$"):
    paths.resolve("gs:///run", "--workdir")


def test_data_directory_on_a_bucket_is_refused_with_the_mount_hint(tiny_data_root):
  config = tiny_config(tiny_data_root, **{"data.target_dir": "gs://bucket/synthetic_target"})
  with pytest.raises(paths.PathError, match=r"^config.data.target_dir=gs://bucket/synthetic_target: training data is "
                     r"read from a local or mounted file system, not a URL; mount the bucket .*gcsfuse"):
    train.prepare_data(config, "test")


def test_workdir_with_another_scheme_fails_before_any_work(tiny_data_root):
  with pytest.raises(paths.PathError, match=r"^--workdir=s3://bucket/run: the s3:// scheme is not supported"):
    train.train_and_evaluate(tiny_config(tiny_data_root), "s3://bucket/run")
