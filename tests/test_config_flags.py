"""Configs on the command line: overrides, locked configs (a mistyped key is an error naming it),
and a missing dataset folder reported with the path and the command that creates it."""

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, tiny_config

# Overrides are parsed by absl's app.run exactly as maxsq_jax.main parses them.
_PRINT_CONFIG = """
from absl import app, flags
from ml_collections import config_flags
config_flags.DEFINE_config_file("config", None, "", lock_config=True)
app.run(lambda _: print(flags.FLAGS.config.to_json()))
"""


def parse(*argv):
  import json

  import ml_collections
  proc = subprocess.run([sys.executable, "-c", _PRINT_CONFIG, *argv], capture_output=True, text=True, cwd=ROOT,
                        timeout=120)
  if proc.returncode != 0:
    raise RuntimeError(proc.stderr)
  return ml_collections.ConfigDict(json.loads(proc.stdout))


@pytest.mark.integration
def test_overrides_reach_nested_fields():
  config = parse(f"--config={ROOT}/configs/demo.py", "--config.optim.lr=0.5", "--config.loss.target=entropy",
                 "--config.data.source_size=(64,32)", "--config.batch_size=4")
  assert config.optim.lr == 0.5
  assert config.loss.target == "entropy"
  assert list(config.data.source_size) == [64, 32]
  assert config.batch_size == 4
  assert config.stage == "source_then_adapt"  # Untouched fields keep the file's values.


@pytest.mark.integration
def test_variant_after_colon():
  assert parse(f"--config={ROOT}/configs/demo.py:tiny").num_steps == 3


@pytest.mark.integration
def test_mistyped_key_is_an_error_naming_it():
  with pytest.raises(RuntimeError, match="Did you mean \"lr\" instead of \"lrr\""):
    parse(f"--config={ROOT}/configs/demo.py", "--config.optim.lrr=0.5")


@pytest.mark.integration
def test_config_is_locked_against_new_fields_in_code():
  config = tiny_config("/nonexistent")
  with pytest.raises(AttributeError, match="batchsize"):
    config.batchsize = 3


@pytest.mark.integration
def test_main_rejects_a_mistyped_key(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "maxsq_jax.main", "--config=configs/demo.py:tiny",
                         f"--workdir={tmp_path}", "--config.optim.momentun=0.5"],
                        capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert proc.returncode != 0
  assert "momentun" in proc.stderr
  assert not os.listdir(tmp_path)  # Nothing was written.


@pytest.mark.integration
def test_missing_synthetic_folder_names_path_and_command(tmp_path):
  from maxsq_jax import train
  from maxsq_jax.data.folders import DatasetError
  config = tiny_config(str(tmp_path / "absent"), **{"data.generate_synthetic": False})
  with pytest.raises(DatasetError) as error:
    train.train_and_evaluate(config, str(tmp_path / "workdir"))
  message = str(error.value)
  assert str(tmp_path / "absent" / "synthetic_source") in message
  assert "python -m maxsq_jax.data.synthetic" in message


@pytest.mark.integration
def test_missing_gta5_folder_names_path(tmp_path):
  from maxsq_jax.data import pipeline
  from maxsq_jax.data.folders import DatasetError
  with pytest.raises(DatasetError, match=str(tmp_path / "GTA5")):
    pipeline.open_examples("gta5", str(tmp_path / "GTA5"), "train", 19)


@pytest.mark.integration
def test_main_generates_a_missing_synthetic_dataset(tmp_path):
  from maxsq_jax import train
  config = tiny_config(str(tmp_path / "generated"), **{"stage": "source_only", "num_steps": 1})
  results = train.train_and_evaluate(config, str(tmp_path / "workdir"))
  assert os.path.exists(tmp_path / "generated" / "synthetic_source" / "COMPLETE")
  assert os.path.exists(tmp_path / "generated" / "synthetic_target" / "COMPLETE")
  assert 0.0 <= results["target_miou"] <= 1.0
