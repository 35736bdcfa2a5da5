"""The `evaluate` command on the runs it is pointed at: a two-stage run's workdir evaluates its final
stage, a run's stored config takes --config.data.* / --config.eval.* overrides (no --config), and a
data folder stored on another machine is an error naming the override, never created."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from maxsq_jax import evaluate, jsonfile, run_config
from maxsq_jax.errors import ConfigError
from tests.helpers import ROOT, tiny_config

ELSEWHERE = "/no-such-mount/maxsq-bucket/data"  # A data root as a pod's config.json stores it.


def write_run(workdir, data_root=ELSEWHERE, **overrides):
  """A run's config.json (the tiny demo config with its data under `data_root`) in `workdir`."""
  os.makedirs(workdir, exist_ok=True)
  jsonfile.write(os.path.join(workdir, "config.json"),
                 {"config": run_config.config_dict(tiny_config(data_root, **overrides))})


def test_config_file_given_matches_the_forms_config_flags_accepts():
  assert evaluate.config_file_given(["evaluate", "--config=configs/demo.py"])
  assert evaluate.config_file_given(["evaluate", "--config", "configs/demo.py"])
  assert evaluate.config_file_given(["evaluate", "-config=configs/demo.py"])
  assert not evaluate.config_file_given(["evaluate", "--checkpoint=w", "--config.data.target_dir=d"])
  assert not evaluate.config_file_given(["evaluate", "--configs=x"])


def test_a_two_stage_workdir_evaluates_its_final_stage_and_says_so(tmp_path, capsys):
  from etils import epath
  top = epath.Path(tmp_path / "demo")
  write_run(top / "source_only", stage="source_only")
  # Only the first stage has started: it is evaluated, and the note says why.
  assert evaluate.final_stage(top) == top / "source_only"
  note = capsys.readouterr().out
  assert note == (f"note: {top} is a two-stage run (source_only, adapt); evaluating {top}/source_only (its adapt "
                  "stage has not started)\n")
  write_run(top / "adapt")
  assert evaluate.final_stage(top) == top / "adapt"
  assert capsys.readouterr().out == (f"note: {top} is a two-stage run (source_only, adapt); evaluating {top}/adapt "
                                     f"(its final stage); give --checkpoint={top}/source_only for the other stage\n")
  # A stage's own workdir, and a converted-weights directory (no config.json, no stages), stay as given.
  assert evaluate.final_stage(top / "adapt") == top / "adapt"
  weights = epath.Path(tmp_path / "weights")
  weights.mkdir()
  assert evaluate.final_stage(weights) == weights
  assert capsys.readouterr().out == ""


def test_a_stored_data_folder_missing_here_is_an_error_naming_the_override(tmp_path):
  write_run(tmp_path)
  target = f"{ELSEWHERE}/synthetic_target"
  with pytest.raises(ConfigError) as error:
    evaluate.stored_config_with_overrides(tmp_path, {})
  assert str(error.value) == (f"{target} (data.target_dir of {tmp_path}/config.json) does not exist on this "
                              "machine: give --config.data.target_dir=DIR with the synthetic_target dataset (a "
                              "synthetic one is generated there if missing)")
  with pytest.raises(ConfigError, match=f"^{ELSEWHERE}/synthetic_source \\(data.source_dir of "):
    evaluate.stored_config_with_overrides(tmp_path, {}, domain="source")
  assert not os.path.exists("/no-such-mount")  # Nothing was created there.


def test_a_stored_config_takes_data_and_eval_overrides_only(tmp_path):
  write_run(tmp_path, **{"eval.num_images": 4})
  here = tmp_path / "data" / "synthetic_target"
  config = evaluate.stored_config_with_overrides(tmp_path, {"data.target_dir": str(here), "eval.num_images": 2})
  assert config.data.target_dir == str(here) and config.eval.num_images == 2
  assert config.data.source_dir == f"{ELSEWHERE}/synthetic_source"  # Not evaluated: not checked.
  assert config.model.to_dict() == tiny_config(ELSEWHERE).model.to_dict()
  # An existing stored folder needs no override.
  here.mkdir(parents=True)
  write_run(tmp_path, data_root=str(tmp_path / "data"))
  assert evaluate.stored_config_with_overrides(tmp_path, {}).data.target_dir == str(here)
  with pytest.raises(ConfigError, match="^--config.model.num_classes: a run's stored config takes only "
                                        "--config.data.\\* and --config.eval.\\* overrides; .* --config=FILE"):
    evaluate.stored_config_with_overrides(tmp_path, {"data.target_dir": str(here), "model.num_classes": 3})


@pytest.mark.integration
def test_evaluate_a_two_stage_pod_run_from_another_machine(reference_run, tiny_data_root, tmp_path):
  """The shared reference run as the adapt stage of a two-stage workdir whose config.json names a pod's
  data mount: evaluated with a data override that points at a new folder (the synthetic data is
  generated there) and an eval override, without --config; the confusion matrix is the run's own final
  one (the same generated data)."""
  reference_dir, _ = reference_run
  top = tmp_path / "demo"
  shutil.copytree(reference_dir, top / "adapt", ignore=shutil.ignore_patterns("evaluation"))
  stored = json.loads((top / "adapt" / "config.json").read_text())
  for domain in ("source", "target"):
    stored["config"]["data"][f"{domain}_dir"] = f"{ELSEWHERE}/synthetic_{domain}"
  # The reference run trains 5 steps of the tiny config's 3-step schedule (tests/train_tiny.py skips the
  # check that the commands make); evaluation reads no schedule.
  stored["config"]["optim"]["schedule_steps"] = stored["config"]["num_steps"]
  (top / "adapt" / "config.json").write_text(json.dumps(stored))
  (top / "source_only").mkdir()
  shutil.copy(top / "adapt" / "config.json", top / "source_only" / "config.json")
  fresh = tmp_path / "here" / "synthetic_target"
  proc = subprocess.run([sys.executable, "-m", "maxsq_jax.evaluate", f"--checkpoint={top}",
                         f"--config.data.target_dir={fresh}", "--config.eval.protocols=('reference',)"],
                        capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert proc.stdout.startswith(f"note: {top} is a two-stage run (source_only, adapt); evaluating {top}/adapt "
                                "(its final stage)")
  results = json.loads((top / "adapt" / "evaluation" / "results.json").read_text())
  final = json.loads((reference_dir / "results.json").read_text())
  assert list(results["protocols"]) == ["reference"] and results["step"] == final["step"]
  assert results["protocols"]["reference"]["confusion"] == final["protocols"]["reference"]["confusion"]
  assert os.path.isdir(fresh) and not os.path.exists("/no-such-mount")
