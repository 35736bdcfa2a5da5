"""`python -m maxsq_jax.report` on fake run directories: rows identified from config.json, mean ± std
over seeds next to the paper's numbers, the SYNTHIA mIoU-13 column, explicit TABLE:VARIANT=PATH."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from maxsq_jax import report
from maxsq_jax.data import classes
from tests.helpers import ROOT, run_cli_in_process


def config_dict(file, variant):
  spec = importlib.util.spec_from_file_location("cfg_" + file, os.path.join(ROOT, "configs", file + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return json.loads(module.get_config(variant).to_json_best_effort())


def fake_run(path, config, per_class, step=None, protocols=("reference", "full")):
  """A workdir with config.json and results.json; per_class: fractions, one per class."""
  os.makedirs(path, exist_ok=True)
  names = classes.class_names(len(per_class))
  entry = lambda shift: {"miou": float(np.mean(per_class)) + shift,
                         "per_class_iou": {n: v + shift for n, v in zip(names, per_class)}}
  results = {"step": step or config["num_steps"], "protocol": protocols[0],
             "protocols": {p: entry(0.01 * i) for i, p in enumerate(protocols)}}
  if len(per_class) == 16:
    for i, p in enumerate(protocols):
      results["protocols"][p]["miou_13"] = float(np.mean([per_class[j] for j in (0, 1, 2, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)])) + 0.01 * i
  results["miou"] = results["protocols"][protocols[0]]["miou"]
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"config": config, "versions": {}}, f)
  with open(os.path.join(path, "results.json"), "w") as f:
    json.dump(results, f)
  return results


def test_identify_every_paper_config():
  for file, variants in (("gta5_to_cityscapes", ("source_only", "minent", "maxsquare", "maxsquare_iw", "maxsquare_iw_multi")),
                         ("synthia_to_cityscapes", ("source_only", "maxsquare_iw_multi"))):
    for v in variants:
      assert report.identify(config_dict(file, v)) == (file, v)
  assert report.identify(config_dict("cityscapes_to_crosscity", "tokyo_maxsquare_iw")) == (
      "cityscapes_to_crosscity", "tokyo_maxsquare_iw")
  assert report.identify(config_dict("demo", None)) == ("demo", "maxsquare")
  assert report.identify(config_dict("demo", "hard,tiny")) == ("demo", "hard")
  assert report.identify(config_dict("demo", "bn_only")) == ("demo", "bn_only")
  assert report.identify(config_dict("demo", "losses,bn_only")) == ("demo_losses", "bn_only")
  assert report.identify(config_dict("demo", "losses,minent,tiny")) == ("demo_losses", "minent")
  adabn = config_dict("demo", "losses,maxsquare_iw_multi")
  adabn["stage"] = "adabn"
  assert report.identify(adabn) == ("demo_losses", "adabn_multi")
  user = config_dict("demo", "losses")
  user["loss"]["target"] = "tests.user_losses:my_loss"
  assert report.identify(user) == ("demo_losses", "tests.user_losses:my_loss")


@pytest.mark.integration
def test_report_cli_two_seeds_next_to_paper(tmp_path):
  cfg = config_dict("gta5_to_cityscapes", "maxsquare")
  a = np.linspace(0.30, 0.60, 19)
  fake_run(tmp_path / "seed0", cfg, a)
  fake_run(tmp_path / "seed1", cfg, a + 0.02)
  out = tmp_path / "report.md"
  proc = subprocess.run([sys.executable, "-m", "maxsq_jax.report", str(tmp_path / "seed0"), str(tmp_path / "seed1"),
                         f"--out={out}"], capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert proc.returncode == 0, proc.stderr
  text = out.read_text()
  assert text.strip() == proc.stdout.strip()
  mean, std = 100 * (a.mean() + 0.01), 100 * np.std([a.mean(), a.mean() + 0.02], ddof=1)
  row = next(l for l in text.splitlines() if l.startswith("| MaxSquare |"))
  assert f"| 2 | {mean:.1f} ± {std:.1f} | 44.3 | {mean - 44.3:+.1f} |" in row, row
  # Rows of the paper's table without runs still show the paper's number.
  assert "| MaxSquare+IW+Multi | 0 | – | 46.4 | – |" in text
  assert "| MaxSquare+IW+Multi (paper) | 89.4 | 43.0 |" in text  # Per-class paper row.
  per_class = next(l for l in text.splitlines() if l.startswith("| MaxSquare (ours, n=2) |"))
  assert f"{100 * (a[0] + 0.01):.1f} ± {100 * np.std([a[0], a[0] + 0.02], ddof=1):.1f}" in per_class
  # All protocols side by side; the full-resolution column is the (fake) +1 point.
  proto = next(l for l in text.splitlines() if l.startswith("| gta5_to_cityscapes | maxsquare |"))
  assert f"{mean + 1:.1f} ± {std:.1f}" in proto
  # --protocol picks another column for the main tables.
  text_full = report.render(report.find_runs([str(tmp_path / "seed0"), str(tmp_path / "seed1")]), "full")
  assert f"| 2 | {mean + 1:.1f} ± {std:.1f} | 44.3 |" in text_full


def test_report_synthia_crosscity_explicit_and_nested(tmp_path):
  b = np.linspace(0.2, 0.5, 16)
  fake_run(tmp_path / "syn", config_dict("synthia_to_cityscapes", "maxsquare_iw"), b)
  fake_run(tmp_path / "rome", config_dict("cityscapes_to_crosscity", "rome_maxsquare"), np.full(13, 0.5))
  # A demo-style directory whose subdirectories are runs, and an unfinished one.
  fake_run(tmp_path / "demo" / "adapt", config_dict("demo", None), np.full(19, 0.1), step=10)
  # Evaluation output of converted released weights: no config.json, placed explicitly.
  os.makedirs(tmp_path / "released" / "evaluation")
  with open(tmp_path / "released" / "evaluation" / "results.json", "w") as f:
    json.dump({"step": 0, "protocol": "reference", "miou": 0.443,
               "protocols": {"reference": {"miou": 0.443, "per_class_iou": {n: 0.443 for n in classes.CLASS_NAMES_19}}}}, f)
  runs = report.find_runs([str(tmp_path / "syn"), str(tmp_path / "rome"), str(tmp_path / "demo"),
                           f"gta5_to_cityscapes:maxsquare={tmp_path / 'released'}"])
  assert [(r["table"], r["variant"]) for r in runs] == [
      ("synthia_to_cityscapes", "maxsquare_iw"), ("cityscapes_to_crosscity", "rome_maxsquare"),
      ("demo", "maxsquare"), ("gta5_to_cityscapes", "maxsquare")]
  text = report.render(runs)
  m13 = 100 * np.mean(b[[0, 1, 2, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]])
  assert f"| MaxSquare+IW | 1 | {100 * b.mean():.1f} | 40.4 | {100 * b.mean() - 40.4:+.1f} | {m13:.1f} | 46.9 |" in text
  assert "| Rome | – | 51.0 | 50.0 (n=1) | 53.9 | – | 54.5 |" in text
  assert "| MaxSquare | 1 | 44.3 | 44.3 | +0.0 |" in text
  assert "of 300 (unfinished?)" in text
  assert "| MaxSquare+IW+Multi (paper) | 82.9 |" in text and "| 41.4 | 48.2 |" in text


def test_report_demo_table_gains_are_paired_by_seed(tmp_path):
  def demo_run(name, variant, stage, seed, miou):
    config = config_dict("demo", variant)
    config.update(stage=stage, seed=seed)
    fake_run(tmp_path / f"seed{seed}" / name, config, np.full(19, miou))
    return str(tmp_path / f"seed{seed}" / name)

  paths = [demo_run("source_only", None, "source_only", 0, 0.10), demo_run("source_only", None, "source_only", 1, 0.20),
           demo_run("maxsquare", None, "adapt", 0, 0.15), demo_run("maxsquare", None, "adapt", 1, 0.28),
           demo_run("source_only_multi", "maxsquare_iw_multi", "source_only", 0, 0.30),
           demo_run("maxsquare_iw_multi", "maxsquare_iw_multi", "adapt", 0, 0.33)]
  runs = report.find_runs(paths)
  assert [r["variant"] for r in runs] == ["source_only", "source_only", "maxsquare", "maxsquare", "source_only_multi",
                                          "maxsquare_iw_multi"]
  text = report.render(runs)
  # Gains +5 and +8 points (each against its own seed's source-only model): mean 6.5, std 2.1.
  # No control runs: no paired difference.
  assert "| MaxSquare | 2 | 21.5 ± 9.2 | +6.5 ± 2.1 | – | 44.3 | +7.4 |" in text, text
  assert "| Source | 2 | 15.0 ± 7.1 | – | – | 36.9 | – |" in text
  # The multi-level row is compared with the multi-level source-only model.
  assert "| MaxSquare+IW+Multi | 1 | 33.0 | +3.0 | – | 46.4 | +9.5 |" in text
  assert "| MinEnt† |" not in text.split("Per-class")[0]  # Rows without runs are left out.


def test_paired_interval_against_a_hand_computed_example():
  # d = 1, 2, 3, 6: mean 3, s² = (4 + 1 + 0 + 9) / 3 = 14/3, s/√n = 1.0801; t(0.975, 3 df) = 3.182 (a t table)
  # -> 3 ± 3.437 = [-0.437, 6.437]: includes 0.
  mean, low, high, n = report.paired_interval([1.0, 2.0, 3.0, 6.0])
  assert (mean, n) == (3.0, 4)
  assert low == pytest.approx(3 - 3.182 * 1.0801, abs=2e-3) and high == pytest.approx(3 + 3.182 * 1.0801, abs=2e-3)
  # d = 0.5, 0.7, 0.6: mean 0.6, s = 0.1, t(0.975, 2 df) = 4.303 -> 0.6 ± 0.2484: excludes 0.
  mean, low, high, n = report.paired_interval([0.5, 0.7, 0.6])
  assert mean == pytest.approx(0.6) and low == pytest.approx(0.3516, abs=1e-3) and high == pytest.approx(0.8484, abs=1e-3)
  mean, low, high, n = report.paired_interval([2.0])  # One seed: no interval.
  assert (mean, n) == (2.0, 1) and np.isnan(low) and np.isnan(high)
  assert report.paired_interval([])[3] == 0


def test_report_losses_table_pairs_every_row_with_the_control_by_seed(tmp_path):
  def run(name, variant, stage, seed, miou, target=None):
    config = config_dict("demo", f"losses,{variant}")
    config.update(stage=stage, seed=seed)
    if target:
      config["loss"]["target"] = target
    fake_run(tmp_path / f"seed{seed}" / name, config, np.full(19, miou))
    return str(tmp_path / f"seed{seed}" / name)

  control = (0.30, 0.32, 0.28, 0.31)
  paths = []
  for seed, c in enumerate(control):
    paths += [run("source_only", "maxsquare", "source_only", seed, 0.10),
              run("adabn", "adabn", "adabn", seed, 0.25),
              run("bn_only", "bn_only", "adapt", seed, c),
              # MinEnt: +1, +2, +3, +6 points over the control (the first hand example: includes 0).
              run("minent", "minent", "adapt", seed, c + (0.01, 0.02, 0.03, 0.06)[seed]),
              # A user's loss: -2 points on every seed but one (-3): an interval below 0.
              run("mine", "maxsquare", "adapt", seed, c - (0.02, 0.02, 0.03, 0.02)[seed],
                  target="tests.user_losses:my_loss")]
  text = report.render(report.find_runs(paths))
  assert "## Where the target loss decides" in text and "The paper's table in miniature" not in text
  table = text.split("Per-class")[0]
  assert "| Control (λ_T = 0): source CE, then AdaBN | 4 | 30.2 ± 1.7 | +20.2 ± 1.7 | – |" in table, table
  assert "| Control (λ_T = 0): source CE, then AdaBN (ours, n=4) |" in text.split("Per-class")[1]
  # MinEnt 31, 34, 31, 37: mean 33.25, s = √(24.75/3) = 2.87.
  assert "| MinEnt† | 4 | 33.2 ± 2.9 | +23.2 ± 2.9 | +3.0 [-0.4, +6.4] (n=4) |" in table
  # d = -2, -2, -3, -2: mean -2.25, s = 0.5, t(0.975, 3) · s/2 = 0.80 -> [-3.05, -1.45], marked.
  assert "| tests.user_losses:my_loss | 4 | 28.0 ± 2.2 | +18.0 ± 2.2 | -2.3 [-3.0, -1.5] (n=4) * |" in table
  # AdaBN: d = -5, -7, -3, -6: mean -5.25, s = √(8.75/3) = 1.708, 3.182 · 1.708/2 = 2.72 -> [-7.97, -2.53].
  assert "| AdaBN (no gradient step) | 4 | 25.0 ± 0.0 | +15.0 ± 0.0 | -5.3 [-8.0, -2.5] (n=4) * |" in table


def test_report_missing_results_is_an_error(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    run_cli_in_process(report, tmp_path)
  err = capsys.readouterr().err
  assert exit_info.value.code == 1 and err.startswith(f"error: {tmp_path}: no results.json") and err.count("\n") == 1


@pytest.mark.parametrize("name", ["results.json", "config.json"])
def test_report_names_a_truncated_json_file(tmp_path, capsys, name):
  run = tmp_path / "run"
  run.mkdir()
  (run / "results.json").write_text(json.dumps({"step": 1, "miou": 0.5}))
  (run / "config.json").write_text(json.dumps({"config": {}}))
  (run / name).write_text((run / name).read_text()[:7])  # What an in-place write killed midway left.
  with pytest.raises(SystemExit) as exit_info:
    run_cli_in_process(report, run)
  err = capsys.readouterr().err
  assert exit_info.value.code == 1 and err.startswith(f"error: {run / name} is truncated or corrupt")
