"""The demo's adaptation variants and `python -m maxsq_jax.demo_table` (the paper's table in miniature)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from maxsq_jax import config_validation, demo_table, train
from tests.helpers import ROOT

DEMO = os.path.join(ROOT, "configs", "demo.py")


def demo_module():
  spec = importlib.util.spec_from_file_location("demo_config_variants", DEMO)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_variant_builds_validates_and_changes_only_the_papers_fields():
  module = demo_module()
  base = module.get_config().to_dict()
  assert module.get_config("maxsquare").to_dict() == base  # The main job, unchanged.
  expected = {
      "minent": {"target": "entropy"},
      "maxsquare": {},
      "maxsquare_iw": {"target": "iw_max_square"},
      "maxsquare_iw_multi": {"target": "iw_max_square", "multi_level": True, "lambda_target": 0.09},
      "hard": {"target": "hard_pseudo_label"},
      "bn_only": {"lambda_target": 0.0},
      "adabn": {},
  }
  assert set(expected) == set(module.METHODS)
  for method, loss_changes in expected.items():
    for tiny in (False, True):
      config = module.get_config(method + (",tiny" if tiny else ""))
      config_validation.validate(config, 1)
      reference = module.get_config("tiny" if tiny else None).to_dict()
      got = config.to_dict()
      other = {k: v for k, v in got.items() if k != "loss"}
      assert other == {**{k: v for k, v in reference.items() if k != "loss"},
                       "stage": "source_then_adabn" if method == "adabn" else "source_then_adapt"}
      changed = {k: v for k, v in got["loss"].items() if reference["loss"][k] != v}
      assert changed == loss_changes, (method, tiny)
      assert config.loss.lambda_seg == 0.1 and config.loss.iw_ratio == 0.2 and config.loss.threshold == 0.95
  with pytest.raises(ValueError, match="unknown variant 'minent,maxsquare'"):
    module.get_config("minent,maxsquare")
  with pytest.raises(ValueError, match="unknown variant 'tny'"):
    module.get_config("tny")


def test_losses_variant_changes_the_data_the_start_and_lambda():
  module = demo_module()
  for method in module.METHODS:
    for tiny in (False, True):
      plain = module.get_config(method + (",tiny" if tiny else "")).to_dict()
      config = module.get_config("losses," + method + (",tiny" if tiny else ""))
      config_validation.validate(config, 1)
      got = config.to_dict()
      root = "data_tiny/shifted" if tiny else "data/shifted"
      assert got["data"] == {**plain["data"], "source_dir": f"{root}/synthetic_source",
                             "target_dir": f"{root}/synthetic_target",
                             "synthetic_class_hue_deg": module.LOSSES_CLASS_HUE_DEG}
      assert got["adabn"] == {**plain["adabn"], "after_adapt": True}
      # lambda_T scaled by the same factor for every row (0 stays 0: the control).
      assert config.loss.lambda_target == pytest.approx(plain["loss"]["lambda_target"] / 0.1
                                                        * module.LOSSES_LAMBDA_TARGET)
      steps = (3, 4) if tiny else (module.LOSSES_NUM_STEPS, module.LOSSES_PRETRAIN_STEPS)
      assert (config.num_steps, config.pretrain.num_steps) == steps
      assert (config.optim.schedule_steps, config.pretrain.schedule_steps) == steps
      assert got["eval"] == {**plain["eval"], "protocols": ("reference",), "source_split": ""}
      changed = ("data", "adabn", "loss", "num_steps", "optim", "pretrain", "eval")
      assert {k: v for k, v in got.items() if k not in changed} == {k: v for k, v in plain.items() if k not in changed}
      assert got["optim"] == {**plain["optim"], "schedule_steps": steps[0]}


def test_plan_of_the_losses_variant_ends_every_adaptation_with_adabn(tmp_path):
  module = demo_module()
  methods = ["adabn", "bn_only", "maxsquare_iw_multi", "tests.user_losses:my_loss"]
  runs = demo_table.plan(module, str(tmp_path), [1], methods, variant="losses")
  names = [os.path.relpath(path, tmp_path) for path, _ in runs]
  assert names == ["seed1/source_only", "seed1/source_only_multi", "seed1/adabn",
                   "seed1/bn_only", "seed1/maxsquare_iw_multi", "seed1/tests.user_losses-my_loss"]
  by_name = dict(zip(names, (config for _, config in runs)))
  assert by_name["seed1/adabn"].stage == "adabn"
  assert by_name["seed1/adabn"].init_from == str(tmp_path / "seed1" / "source_only")
  for name, start in (("bn_only", "source_only"), ("maxsquare_iw_multi", "source_only_multi"),
                      ("tests.user_losses-my_loss", "source_only")):
    config = by_name[f"seed1/{name}"]
    assert config.stage == "adapt" and config.init_from == str(tmp_path / "seed1" / start)
    assert config.adabn.after_adapt and config.seed == 1
  assert by_name["seed1/tests.user_losses-my_loss"].loss.target == "tests.user_losses:my_loss"
  assert by_name["seed1/tests.user_losses-my_loss"].loss.lambda_target == module.LOSSES_LAMBDA_TARGET


def test_plan_trains_each_source_model_once_per_seed_as_the_main_job_does(tmp_path):
  module = demo_module()
  runs = demo_table.plan(module, str(tmp_path), [0, 3], list(module.METHODS))
  names = [os.path.relpath(path, tmp_path) for path, _ in runs]
  adaptations = [m for m in module.METHODS if m != "adabn"]
  assert names == [f"seed{s}/{n}" for s in (0, 3) for n in ("source_only", "source_only_multi", "adabn", *adaptations)]
  by_name = dict(zip(names, (config for _, config in runs)))
  for seed in (0, 3):
    main_job = module.get_config()
    main_job.seed = seed
    # Exactly the stages `python -m maxsq_jax.main --config=configs/demo.py --config.seed=S` runs.
    assert by_name[f"seed{seed}/source_only"].to_dict() == train.source_stage_config(main_job).to_dict()
    source_dir = str(tmp_path / f"seed{seed}" / "source_only")
    assert by_name[f"seed{seed}/maxsquare"].to_dict() == train.adapt_stage_config(main_job, source_dir).to_dict()
    assert by_name[f"seed{seed}/minent"].init_from == source_dir
    assert by_name[f"seed{seed}/maxsquare_iw_multi"].init_from == source_dir + "_multi"
    assert by_name[f"seed{seed}/source_only_multi"].loss.multi_level
    assert all(by_name[f"seed{seed}/{m}"].seed == seed for m in module.METHODS)
    assert by_name[f"seed{seed}/adabn"].stage == "adabn" and by_name[f"seed{seed}/adabn"].init_from == source_dir
    assert not by_name[f"seed{seed}/minent"].adabn.after_adapt


def test_main_jobs_last_line_names_the_loss_that_ran():
  from maxsq_jax.main import summary_line
  summary = {"source_only_target_miou": 0.1234, "adapted_target_miou": 0.25}
  assert summary_line(summary) == "source-only target mIoU: 12.3  max-squares target mIoU: 25.0"
  assert summary_line(summary, "maxsquare").endswith("  max-squares target mIoU: 25.0")  # The reference's alias.
  assert summary_line(summary, "entropy").endswith("  entropy target mIoU: 25.0")
  assert summary_line(summary, "IW_maxsquare").endswith("  image-wise max-squares target mIoU: 25.0")
  assert summary_line(summary, "hard_pseudo_label").endswith("  hard pseudo-labels target mIoU: 25.0")
  assert summary_line(summary, "mypkg.losses:my_loss").endswith("  adapted (mypkg.losses:my_loss) target mIoU: 25.0")
  assert summary_line(summary, "entropy", 0.0).endswith("  adapted (no target loss) target mIoU: 25.0")
  assert summary_line(summary, stage="source_then_adabn").endswith("  AdaBN target mIoU: 25.0")


@pytest.mark.integration
def test_demo_table_runs_every_tiny_variant_from_one_source_model(tiny_demo_table):
  workdir, proc = tiny_demo_table
  module = demo_module()
  runs = sorted(os.listdir(workdir / "seed0"))
  assert runs == sorted(["source_only", "source_only_multi", *module.METHODS, "tests.user_losses-my_loss"])
  for name in runs:
    with open(workdir / "seed0" / name / "results.json") as f:
      results = json.load(f)
    with open(workdir / "seed0" / name / "config.json") as f:
      config = json.load(f)["config"]
    if name == "adabn":  # AdaBN of the source-only model: no gradient step.
      assert results["step"] == 0 and config["stage"] == "adabn"
      assert config["init_from"] == str(workdir / "seed0" / "source_only")
      continue
    assert results["step"] == config["num_steps"]
    if name not in ("source_only", "source_only_multi"):
      assert config["stage"] == "adapt"
      assert config["init_from"] == str(workdir / "seed0" / ("source_only_multi" if config["loss"]["multi_level"]
                                                             else "source_only"))
  # The source-only stages were trained once each: one checkpoint series, written before any adaptation.
  assert proc.stdout.count(": source_only (CE)") == 2
  table = (workdir / "table.md").read_text()
  for label in ("| Source | 1 |", "| MinEnt† | 1 |", "| MaxSquare | 1 |", "| MaxSquare+IW | 1 |",
                "| MaxSquare+IW+Multi | 1 |", "| Hard pseudo-labels | 1 |", "| Target BN statistics only (λ_T = 0) | 1 |",
                "| AdaBN (no gradient step) | 1 |", "| tests.user_losses:my_loss | 1 |"):
    assert label in table and label in proc.stdout
  # The user's loss ran as the target loss of the main job's row, and its row is compared with the control.
  with open(workdir / "seed0" / "tests.user_losses-my_loss" / "metrics.jsonl") as f:
    assert any("train/target_my_loss" in json.loads(line) for line in f)
  assert table.split("| tests.user_losses:my_loss | 1 |")[1].split("|")[2].strip().endswith("(n=1)")
  assert json.loads((workdir / "timing.json").read_text())["runs"]
  # Rerunning finds every run finished and trains nothing.
  rerun = subprocess.run([sys.executable, "-m", "maxsq_jax.demo_table", f"--workdir={workdir}", "--num_seeds=1",
                          "--tiny", "--data_root=unused_because_nothing_runs",
                          "--methods=" + ",".join(module.METHODS + ("tests.user_losses:my_loss",))],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert rerun.returncode == 0, rerun.stderr
  assert rerun.stdout.count("finished earlier, skipped") == 10 and "0 run(s) trained" in rerun.stdout


@pytest.mark.integration
def test_demo_table_bad_method_is_one_line_error(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "maxsq_jax.demo_table", f"--workdir={tmp_path}", "--methods=maxsqure"],
                        capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "error: --methods: unknown maxsqure; configs/demo.py has minent, maxsquare, maxsquare_iw, maxsquare_iw_multi, hard, "
      "bn_only, adabn, or give a target loss as package.module:function"]
  assert not os.listdir(tmp_path)
