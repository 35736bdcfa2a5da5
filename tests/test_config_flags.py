"""Configs on the command line and in config files: overrides, locked configs, a key the schema does not
have (an error naming it, the closest key and the file), every other error of a config file in one line,
and a missing dataset folder reported with the path and the command that creates it."""

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, run_cli_in_process, tiny_config

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


def _main_error(capsys, *args) -> tuple[int, str]:
  """(exit code, stderr) of `python -m maxsq_jax.main ARGS` run in this process, which must fail."""
  from maxsq_jax import main
  with pytest.raises(SystemExit) as exit_:
    run_cli_in_process(main, *args)
  return exit_.value.code, capsys.readouterr().err


def _config_file(tmp_path, body: str, name: str = "mine.py") -> str:
  path = tmp_path / name
  path.write_text("from maxsq_jax.config_base import base_config\n\n\ndef get_config(arg=None):\n" + body)
  return str(path)


def test_a_mistyped_key_in_a_config_file_is_an_error_naming_it_the_closest_key_and_the_file(tmp_path, capsys):
  path = _config_file(tmp_path, "  c = base_config()\n  c.optim.lrr = 0.5\n  return c\n")
  code, err = _main_error(capsys, f"--config={path}", f"--workdir={tmp_path / 'run'}")
  assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
  assert "config.optim.lrr: no such config key (did you mean 'optim.lr'?)" in err and f"set in {path}" in err
  assert not (tmp_path / "run").exists()  # Refused before anything was written.


@pytest.mark.parametrize("body, variant, expected", [
    # A get_config that raises: the exception's last line, the file and its line.
    ("  raise KeyError('boom')\n", "", "mine.py line 5: KeyError: 'boom'"),
    # A wrong type, refused by ml_collections' type-safe ConfigDict inside the file.
    ("  c = base_config()\n  c.num_steps = 'abc'\n  return c\n", "",
     "mine.py line 6 (c.num_steps = 'abc'): TypeError: Could not override field 'num_steps'"),
    # An unknown variant, raised by the file as configs/demo.py does.
    ("  raise ValueError(f'unknown variant {arg!r}')\n", ":bogus", "mine.py line 5: ValueError: unknown variant 'bogus'"),
    ("  return {'seed': 1}\n", "", "get_config() returned dict, not a ConfigDict"),
    ("  c = base_config()\n  del c['optim']\n  return c\n", "", "config lacks optim: start from"),
    ("  c = base_config()\n  c.eval_every = 5\n  return c\n", "", "config.eval_every: this key is now config.eval.every"),
    ("  return base_config(\n", "", "mine.py line 5 (return base_config(): SyntaxError: '(' was never closed"),
])
def test_every_error_of_a_config_file_is_one_line_naming_the_file(tmp_path, capsys, body, variant, expected):
  path = _config_file(tmp_path, body)
  code, err = _main_error(capsys, f"--config={path}{variant}", f"--workdir={tmp_path / 'run'}")
  assert code == 2 and err.count("\n") == 1, err
  assert err.startswith(f"error: --config={path}{variant}: ") and expected in err, err


def test_a_missing_config_file_is_named(tmp_path, capsys):
  code, err = _main_error(capsys, f"--config={tmp_path / 'absent.py'}:tiny", f"--workdir={tmp_path / 'run'}")
  assert code == 2 and err == (f"error: --config={tmp_path / 'absent.py'}:tiny: {tmp_path / 'absent.py'} does not "
                               "exist; give a config file, e.g. configs/demo.py or configs/demo.py:tiny\n")


def test_schema_keys_come_from_base_config_and_validate_refuses_an_unknown_key():
  from maxsq_jax import config_base, config_validation
  from maxsq_jax.errors import ConfigError
  keys = config_validation.schema_keys()
  assert "optim" in keys and "optim.lr" in keys and "eval.protocols" in keys
  assert len(keys) == len(set(keys)) and set(keys) >= set(config_base.base_config().keys())
  config = config_base.base_config()
  config.optim.lrr = 0.5  # Set in Python, not through a config file: validate still names it.
  with pytest.raises(ConfigError, match=r"config.optim.lrr: no such config key \(did you mean 'optim.lr'\?\)"):
    config_validation.validate(config)
