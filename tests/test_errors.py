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
    ({"stage": "adpat"}, "config.stage='adpat': use one of source_only, adapt, source_then_adapt, adabn, source_then_adabn (did you mean 'adapt'?)"),
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


def base_config_file(tmp_path) -> str:
  """A config file of the schema's defaults (stage "adapt": trains in --workdir itself)."""
  path = tmp_path / "base.py"
  path.write_text("from maxsq_jax.config_base import base_config\n\n\ndef get_config():\n  return base_config()\n")
  return str(path)


def test_unusable_workdirs_are_one_line_naming_the_path_and_the_fix(tmp_path, capsys):
  (tmp_path / "a_file").write_text("notes")
  os.symlink("loop_b", tmp_path / "loop_a")
  os.symlink("loop_a", tmp_path / "loop_b")
  os.symlink(tmp_path / "nowhere", tmp_path / "dead")
  too_long = tmp_path / ("x" * 300) / "run"
  cases = [
      (tmp_path / "a_file", "is a file, not a directory; give a directory (a new name is created)"),
      (tmp_path / "a_file" / "run", f"cannot create it: a part of {tmp_path}/a_file/run is a file, not a directory"),
      (tmp_path / "loop_a", f"a symbolic link loop ({tmp_path}/loop_a -> loop_b -> ... never reaches a directory); "
                            "remove or fix the link, or give another directory"),
      (tmp_path / "dead", f"a symbolic link to {tmp_path}/nowhere, which does not exist; remove or fix the link"),
      (too_long, "cannot create it: the name xxxxxxxxxxxxxxxxxxxxxxxx... is 300 bytes, over the file system's limit "
                 "of 255 bytes per name (NAME_MAX); use a shorter name"),
  ]
  for workdir, expected in cases:
    code, err = main_error(capsys, f"--config={base_config_file(tmp_path)}", f"--workdir={workdir}")
    assert code == 1 and err.startswith(f"error: --workdir={workdir}") and expected in err, err
    assert err.count("\n") == 1, err
  assert (tmp_path / "a_file").read_text() == "notes" and not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("address", ["notaport", "host:", ":8476", "host:port", "host:70000"])
def test_a_coordinator_address_that_is_not_host_port_is_named(tmp_path, capsys, address):
  code, err = main_error(capsys, f"--config={base_config_file(tmp_path)}", f"--workdir={tmp_path / 'run'}",
                         f"--coordinator_address={address}", "--num_processes=2", "--process_id=0")
  assert code == 2 and err == (f"error: --coordinator_address={address}: not HOST:PORT; give process 0's host name "
                               "or address and a free port, e.g. 10.0.0.2:8476 (the same on every process)\n")


@pytest.mark.parametrize("target, problem", [
    ("tests.user_losses:not_traceable", "calling it on traced logits float32[B, H, W, C] raised "
                                        "TracerArrayConversionError at "),
    ("tests.user_losses:returns_text", "it returned a str, not a number; a target loss returns a float scalar"),
    ("tests.user_losses:not_a_scalar", "it returned float32[2, 4, 4], not a float scalar"),
])
def test_a_user_loss_that_cannot_be_traced_or_returns_no_scalar_is_refused_before_compiling(target, problem):
  message = problems(**{"loss.target": target})
  assert message.startswith(f"config.loss.target={target!r}: {problem}"), message
  assert "user_losses.py line" in message or "traceable" not in target


@pytest.mark.parametrize("content", ["{}", "[]", '{"step": 3}'])
def test_report_names_a_results_file_without_an_evaluation(tmp_path, capsys, content):
  from maxsq_jax import report
  run = tmp_path / "run"
  run.mkdir()
  (run / "results.json").write_text(content)
  with pytest.raises(SystemExit) as exit_:
    run_cli_in_process(report, run)
  assert exit_.value.code == 1 and capsys.readouterr().err == (
      f'error: {run}/results.json holds no evaluation (no "miou"): it is damaged or not a results file; evaluate the '
      "run again (python -m maxsq_jax.evaluate) or leave it out\n")


def test_a_symlink_loop_as_data_folder_is_named_as_one(tmp_path):
  from maxsq_jax.data import pipeline
  os.symlink("b", tmp_path / "a")
  os.symlink("a", tmp_path / "b")
  (tmp_path / "file").write_text("")
  for name in ("gta5", "synthetic_source", "cityscapes"):
    with pytest.raises(errors.DataError) as error:
      pipeline.open_examples(name, str(tmp_path / "a"), "train", 19)
    assert str(error.value) == (f"'{tmp_path}/a' (config.data.source_dir/target_dir for {name}) is a symbolic link loop "
                                f"({tmp_path}/a -> b -> ... never reaches a directory); fix or remove it, or give the "
                                "dataset's folder")
  with pytest.raises(errors.DataError, match="is a file, not a directory"):
    pipeline.open_examples("gta5", str(tmp_path / "file"), "train", 19)


def test_brief_drops_the_json_spec_tensorstore_appends():
  error = ValueError('OUT_OF_RANGE: Error reading "params.w" in OCDBT database at local file "/w/3/state/": '
                     "Requested byte range is not valid for <TensorStore({\n  'context': {'cache_pool': {}},\n  "
                     "'driver': 'cast',\n})>.")
  assert errors.brief(error) == ('ValueError: OUT_OF_RANGE: Error reading "params.w" in OCDBT database at local file '
                                 '"/w/3/state/": Requested byte range is not valid for')
  error = ValueError("Failed to write 217 bytes [os_error_code='28'] [tensorstore_spec='{\"context\": {}}']")
  assert errors.brief(error) == "ValueError: Failed to write 217 bytes [os_error_code='28']"
  assert errors.brief(KeyError()) == "KeyError"


def test_a_full_disk_is_named_with_its_mount_and_the_path_from_any_of_its_reports(tmp_path):
  import errno
  import logging

  from maxsq_jax import full_disk
  tensorstore = ValueError(f'RESOURCE_EXHAUSTED: Error writing local file "{tmp_path}/ckpt/_sharding": Failed '
                           "to write 217 bytes: No space left on device [os_error_code='28']")
  full = full_disk.error(tensorstore)
  assert isinstance(full, errors.DiskFullError)
  mount = str(tmp_path)
  while not os.path.ismount(mount):
    mount = os.path.dirname(mount)
  assert str(full).startswith(f"the disk is full (writing {tmp_path}/ckpt/_sharding: ")
  assert f"mounted at {mount} has " in str(full) and "What was saved before is intact" in str(full)
  # An OSError without a file name, raised while handling another: the path of a hidden report, else --workdir.
  try:
    try:
      raise KeyError("x")
    except KeyError:
      raise OSError(errno.ENOSPC, "No space left on device")
  except OSError as e:
    nameless = e
  assert str(full_disk.error(nameless, seen_path=f"{tmp_path}/a")).startswith(f"the disk is full (writing {tmp_path}/a: ")
  assert f"(writing {tmp_path}/w: " in str(full_disk.error(nameless, argv=["main", f"--workdir={tmp_path}/w"]))
  assert full_disk.error(OSError(errno.EACCES, "Permission denied")) is None
  # While a tool runs, a log record about it is dropped and counted; other records pass.
  quiet = full_disk.Quiet()
  record = lambda message: logging.LogRecord("absl", logging.ERROR, __file__, 1, message, None, None)
  assert not quiet.filter(record(f'Failed writing: "{tmp_path}/d/1": No space left on device'))
  assert quiet.filter(record("an unrelated error")) and quiet.count == 1 and quiet.path == f"{tmp_path}/d/1"


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


@pytest.mark.integration
def test_sigterm_during_the_final_save_exits_143_once_it_is_written(tiny_data_root, tmp_path, monkeypatch):
  import signal

  from maxsq_jax import train
  from tests.helpers import tiny_config
  workdir = tmp_path / "run"
  # checkpoint_every does not divide num_steps: the final checkpoint is the one saved after the loop.
  config = tiny_config(tiny_data_root, stage="adapt", num_steps=2, checkpoint_every=5, init_from="")
  commit = train._Run.commit

  def sigterm_then_commit(run, step):
    if step == 2 and not sent:
      sent.append(step)
      os.kill(os.getpid(), signal.SIGTERM)  # Handled while the final checkpoint is saved and committed.
    commit(run, step)

  sent = []
  monkeypatch.setattr(train._Run, "commit", sigterm_then_commit)
  with pytest.raises(SystemExit) as exit_:
    train.train_and_evaluate(config, str(workdir))
  assert exit_.value.code == 143
  assert os.listdir(workdir / "checkpoints") == ["2"] and (workdir / "checkpoints" / "2" / "commit_success.txt").exists()
  assert not (workdir / "results.json").exists()  # Stopped before the final evaluation; a rerun does it.
