"""Config validation and the one-line `error:` report of the command-line tools."""

import json
import os
import subprocess
import sys

import pytest

from maxsq_jax import config_validation, errors, jsonfile
from maxsq_jax.config_base import base_config
from tests.helpers import ROOT, run_cli_in_process, with_overrides


def configured(**overrides):
  return with_overrides(base_config(), **overrides)


def problems(device_count=None, training=True, **overrides) -> str:
  with pytest.raises(errors.ConfigError) as e:
    config_validation.validate(configured(**overrides), device_count, training)
  return str(e.value)


def test_every_shipped_config_is_valid():
  import importlib.util
  for name, variants in (("demo", [None, "tiny"]),
                         ("gta5_to_cityscapes", ["source_only", "source_only_multi", "minent", "maxsquare",
                                                 "maxsquare_iw", "maxsquare_iw_multi"]),
                         ("synthia_to_cityscapes", ["source_only", "maxsquare_iw_multi"]),
                         ("cityscapes_to_crosscity", ["rome_source_only", "taipei_maxsquare_iw"])):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for variant in variants:
      config_validation.validate(module.get_config(variant) if variant else module.get_config(), 1)


@pytest.mark.parametrize("overrides, message", [
    ({"stage": "adpat"}, "config.stage='adpat': use one of source_only, adapt, source_then_adapt (did you mean 'adapt'?)"),
    ({"model.bn_mode": "froze"}, "config.model.bn_mode='froze': use one of train, frozen, sync (did you mean 'frozen'?)"),
    ({"data.target": "cityscape"}, "did you mean 'cityscapes'?"),
    ({"eval.protocols": ("reference", "ful")}, "'ful' is not one of reference, reference_flip, full, full_flip "
                                                "(did you mean 'full'?)"),
    ({"optim.rule": "refrence"}, "config.optim.rule='refrence': use one of reference, nominal (did you mean 'reference'?)"),
    ({"loss.target": "max_sqare"}, "config.loss.target='max_sqare': Unknown target loss"),
    ({"num_steps": -1, "optim.schedule_steps": 10}, "config.num_steps=-1: must be >= 1"),
    ({"checkpoint_every": 0}, "config.checkpoint_every=0: must be >= 1"),
    ({"log_every": 0}, "config.log_every=0: must be >= 1"),
    ({"optim.schedule_steps": 0}, "config.optim.schedule_steps=0: must be >= 1"),
    ({"num_steps": 100, "optim.schedule_steps": 50}, "config.optim.schedule_steps=50: must be >= config.num_steps (100)"),
    ({"stage": "source_then_adapt", "pretrain.num_steps": 10, "pretrain.schedule_steps": 5},
     "config.pretrain.schedule_steps=5: must be >= config.pretrain.num_steps (10)"),
    ({"loss.lambda_target": float("nan")}, "config.loss.lambda_target=nan: must be finite"),
    ({"loss.lambda_target": float("inf")}, "config.loss.lambda_target=inf: must be finite"),
    ({"loss.lambda_target": -0.1}, "config.loss.lambda_target=-0.1: must be in [0, inf)"),
    ({"optim.lr": 0.0}, "config.optim.lr=0.0: must be in (0, inf)"),
    ({"optim.momentum": 1.0}, "config.optim.momentum=1.0: must be in [0, 1)"),
    ({"loss.iw_ratio": 0.0}, "config.loss.iw_ratio=0.0: must be in (0, 1]"),
    ({"model.num_classes": 20}, "config.model.num_classes=20: use one of 19, 16, 13"),
    ({"model.aspp_branches": 5}, "config.model.aspp_branches=5: must be in [1, 4]"),
    ({"data.source_size": (0, 10)}, "config.data.source_size=(0, 10): must be (width, height)"),
    ({"data.scale_range": (2.0, 0.5)}, "config.data.scale_range=(2.0, 0.5): must be (low, high) with 0 < low <= high"),
    ({"batch_size": 4, "model.bn_group_size": 3}, "config.model.bn_group_size=3: must divide config.batch_size (4)"),
])
def test_each_invalid_field_is_named_with_value_and_what_is_allowed(overrides, message):
  assert message in problems(**overrides)


def test_all_problems_are_reported_together_on_one_line():
  text = problems(stage="adpat", checkpoint_every=0, **{"loss.lambda_target": float("nan")})
  assert "\n" not in text and text.count("; ") == 2


def test_batch_sizes_must_divide_by_the_device_count():
  text = problems(device_count=3, batch_size=4, **{"eval.batch_size": 6})
  assert "config.batch_size=4: is the GLOBAL batch and must be divisible by the number of devices (3)" in text
  assert "eval.batch_size" not in text
  config_validation.validate(configured(batch_size=4, **{"eval.batch_size": 6}), 3, training=False)  # Evaluation only.


def test_a_key_renamed_into_config_eval_names_its_new_key():
  message = errors.unknown_config_key(["main", "--config=configs/demo.py", "--config.data.eval_size=(64,32)"])
  assert message == ("--config.data.eval_size: this key is now --config.eval.size (the evaluation settings are "
                     "grouped in config.eval, maxsq_jax/config_base.py)")
  assert errors.unknown_config_key(["main", "--config.num_vis_images=1"]).startswith(
      "--config.num_vis_images: this key is now --config.eval.num_vis_images ")
  assert errors.unknown_config_key(["main", "--config.eval.every=5"]) is None  # The new key is known.


def test_did_you_mean():
  assert errors.did_you_mean("adpat", ("source_only", "adapt")) == " (did you mean 'adapt'?)"
  assert errors.did_you_mean("xyz", ("source_only", "adapt")) == ""


def test_json_write_is_atomic_and_read_names_a_corrupt_file(tmp_path):
  path = tmp_path / "results.json"
  jsonfile.write(path, {"miou": 0.5})
  assert json.loads(path.read_text()) == {"miou": 0.5} and os.listdir(tmp_path) == ["results.json"]
  with pytest.raises(TypeError):
    jsonfile.write(path, {"miou": object()})  # Fails while serialising: the old file stays whole.
  assert jsonfile.read(path) == {"miou": 0.5}
  path.write_text('{"miou": 0.')
  with pytest.raises(errors.CheckpointError, match=f"{path} is truncated or corrupt"):
    jsonfile.read(path)
  with pytest.raises(errors.CheckpointError, match=f"{tmp_path / 'missing.json'} does not exist"):
    jsonfile.read(tmp_path / "missing.json")


def main_error(capsys, *args) -> tuple[int, str]:
  """(exit code, stderr) of `python -m maxsq_jax.main ARGS` run in this process, which must fail."""
  from maxsq_jax import main
  with pytest.raises(SystemExit) as exit_:
    run_cli_in_process(main, *args)
  return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize("content", ["{}", "[]", '{"config": {}}', '{"config": 3}'])
def test_a_config_json_without_its_config_is_named(tmp_path, capsys, content):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(content)
  config = tmp_path / "base.py"  # Stage "adapt": trains in --workdir itself.
  config.write_text("from maxsq_jax.config_base import base_config\n\n\ndef get_config():\n  return base_config()\n")
  code, err = main_error(capsys, f"--config={config}", f"--workdir={workdir}")
  assert code == 1 and err == (f'error: {workdir}/config.json has no "config" object (damaged, or not a maxsq_jax '
                               "run's config.json): restore it from a copy, or delete it and rerun with the config "
                               "the run was trained with (it is written again)\n")
  assert sorted(os.listdir(workdir)) == ["config.json", "logs"] and (workdir / "config.json").read_text() == content
  assert (workdir / "logs" / "host_0.log").read_text().splitlines()[-1] == err.rstrip()  # The host log has the line.


def run_cli(*args, env=None):
  environ = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
  return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT, env=environ,
                        timeout=300)


@pytest.mark.integration
def test_cli_errors_are_one_line_with_exit_code_and_traceback_on_request(tmp_path):
  workdir = tmp_path / "w"
  demo = "--config=configs/demo.py:tiny"
  cases = [
      (["--config.lr=1"], 2, "error: --config.lr: no such config key (did you mean 'optim.lr'?)"),
      (["--config.eval_every=5"], 2, "error: --config.eval_every: this key is now --config.eval.every "),
      (["--config.num_steps=abc"], 2, "error: flag --config.num_steps=abc: invalid literal for int()"),
      (["--config.stage=adpat"], 2, "error: config.stage='adpat': use one of"),
      (["--config.loss.lambda_target=nan"], 2, "error: config.loss.lambda_target=nan: must be finite"),
      (["--config.log_every=0", "--config.checkpoint_every=0"], 2, "error: config.log_every=0: must be >= 1"),
  ]
  for extra, code, start in cases:
    proc = run_cli("maxsq_jax.main", demo, f"--workdir={workdir}", *extra)
    assert proc.returncode == code and proc.stderr.startswith(start) and proc.stderr.count("\n") == 1, (extra, proc.stderr)
  assert not workdir.exists()  # Refused before anything was written.
  proc = run_cli("maxsq_jax.main", demo, "--workdir=")
  assert proc.returncode == 2 and "--workdir is empty" in proc.stderr and proc.stderr.count("\n") == 1
  for verbose in ({"args": ["--verbose"]}, {"env": {"MAXSQ_VERBOSE": "1"}}):
    proc = run_cli("maxsq_jax.main", demo, f"--workdir={workdir}", "--config.stage=adpat", *verbose.get("args", []),
                   env=verbose.get("env"))
    assert proc.returncode == 2 and "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("error: config.stage='adpat'")
  missing = tmp_path / "no_such_run"
  proc = run_cli("maxsq_jax.evaluate", f"--checkpoint={missing}")
  assert proc.returncode == 1 and proc.stderr == (f"error: --checkpoint={missing}: no such directory (give a run's "
                                                  "workdir or a converted-weights directory)\n")
  proc = run_cli("maxsq_jax.evaluate", f"--checkpoint={tmp_path}")
  assert proc.returncode == 2 and proc.stderr == (
      f"error: {tmp_path}/config.json does not exist: {tmp_path} is neither a run's workdir nor a two-stage run's "
      "(with source_only/ and adapt/); for converted weights pass --config=...\n")
  run = tmp_path / "truncated"
  run.mkdir()
  (run / "config.json").write_text('{"config": {"seed": 0, "mod')  # An in-place write killed midway.
  proc = run_cli("maxsq_jax.evaluate", f"--checkpoint={run}")
  assert proc.returncode == 1 and proc.stderr.startswith(f"error: {run}/config.json is truncated or corrupt")
  proc = run_cli("maxsq_jax.evaluate", f"--checkpoint={tmp_path}", demo, "--config.model.bn_mode=froze")
  assert proc.returncode == 2 and proc.stderr.startswith("error: config.model.bn_mode='froze'")
