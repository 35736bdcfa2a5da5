"""The train loop's behaviour: loss goes down, 1 vs 4 devices agree, stop-and-resume equals an
uninterrupted run, non-finite losses stop the run without touching the last good checkpoint."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxsq_jax import objective as objective_lib, optim, train, train_step as step_lib, visualize
from tests.helpers import REFERENCE_OVERRIDES, ROOT, checkpoint_weights, load_npz, run_tiny, tiny_config, weights_of


def test_train_step_lowers_loss_on_fixed_batch(tiny_data_root):
  config = tiny_config(tiny_data_root, stage="adapt", **{"optim.lr": 0.01, "optim.schedule_steps": 1000})
  mesh = train.create_mesh()
  model = train.build_model(config)
  state, _, tx, schedule = train.initial_state(config, model, mesh, (1, 32, 48, 3))
  step = jax.jit(step_lib.make_train_step(model, objective_lib.make_objective(config.loss), tx, schedule, "adapt"))
  rng = np.random.default_rng(0)
  source = {"image": jnp.asarray(rng.normal(0, 50, (4, 32, 48, 3)), jnp.float32),
            # Vertical bands of 4 classes with some ignored pixels: learnable from position alone.
            "label": jnp.asarray(np.where(rng.uniform(size=(4, 32, 48)) < 0.1, -1,
                                          np.broadcast_to(np.arange(48) // 12, (4, 32, 48))), jnp.int32)}
  target = {"image": jnp.asarray(rng.normal(0, 50, (4, 32, 48, 3)), jnp.float32)}
  losses = []
  for _ in range(10):
    state, metrics = step(state, source, target)
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 10
  assert losses[-1] < 0.8 * losses[0], losses
  assert set(metrics) >= {"loss", "source_ce", "target_max_square", "learning_rate", "grad_norm"}


def test_optimizer_matches_pytorch_sgd_rule():
  """Coupled wd + momentum: buf = m*buf + (g + wd*θ); θ -= lr*buf; heads at 10x; stem BN frozen."""
  from ml_collections import ConfigDict
  params = {"conv1": {"kernel": jnp.ones((2,))}, "bn1": {"scale": jnp.ones((2,))},
            "layer6": {"conv2d_list_0": {"kernel": jnp.ones((2,))}, "conv2d_list_3": {"kernel": jnp.ones((2,))}},
            "layer5": {"conv2d_list_0": {"kernel": jnp.ones((2,))}}}
  cfg = ConfigDict(dict(lr=0.1, momentum=0.9, weight_decay=0.5, poly_power=0.9, head_lr_mult=10.0,
                        rule="nominal"))
  tx, schedule = optim.make_optimizer(cfg, schedule_steps=100, params=params, multi_level=False, aspp_branches=2)
  grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 2.0), params)
  opt_state = tx.init(params)
  theta, buf_b, buf_h = 1.0, 0.0, 0.0
  theta_h = 1.0
  for t in range(3):
    updates, opt_state = tx.update(grads, opt_state, params)
    params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
    lr = 0.1 * (1 - t / 100) ** 0.9
    buf_b = 0.9 * buf_b + (2.0 + 0.5 * theta)
    theta -= lr * buf_b
    buf_h = 0.9 * buf_h + (2.0 + 0.5 * theta_h)
    theta_h -= 10 * lr * buf_h
  np.testing.assert_allclose(params["conv1"]["kernel"], theta, rtol=1e-5)
  np.testing.assert_allclose(params["layer6"]["conv2d_list_0"]["kernel"], theta_h, rtol=1e-5)
  np.testing.assert_array_equal(params["bn1"]["scale"], 1.0)  # Stem BN not trained.
  np.testing.assert_array_equal(params["layer6"]["conv2d_list_3"]["kernel"], 1.0)  # Unused ASPP branch.
  np.testing.assert_array_equal(params["layer5"]["conv2d_list_0"]["kernel"], 1.0)  # Aux head w/o multi-level.


@pytest.mark.integration
def test_one_device_and_four_devices_give_the_same_parameters(reference_run, four_device_run):
  reference_dir, _ = reference_run
  one = checkpoint_weights(reference_dir, 3)
  _, four = four_device_run
  assert int(four["devices"]) == 4 and int(four["step"]) == 3
  assert len(one) > 20 and set(one) == set(weights_of(four))
  for key in one:
    np.testing.assert_allclose(one[key], four[key], rtol=2e-4, atol=2e-5, err_msg=key)


@pytest.mark.integration
def test_stop_and_resume_equals_uninterrupted_run(tiny_data_root, compilation_cache, reference_run, tmp_path):
  _, full = reference_run
  run_tiny(tiny_data_root, tmp_path / "split", tmp_path / "first.npz", cache_dir=compilation_cache,
           **{**REFERENCE_OVERRIDES, "num_steps": 2})
  proc = run_tiny(tiny_data_root, tmp_path / "split", tmp_path / "resumed.npz", cache_dir=compilation_cache,
                  **REFERENCE_OVERRIDES)
  assert "Resumed from" in proc.stdout and "at step 2" in proc.stdout
  first, resumed = load_npz(tmp_path / "first.npz"), load_npz(tmp_path / "resumed.npz")
  assert int(first["step"]) == 2 and int(resumed["step"]) == 5
  for key in weights_of(full):
    np.testing.assert_array_equal(full[key], resumed[key], err_msg=key)
  # And the run really moved between step 2 and 5.
  assert any(not np.array_equal(first[k], resumed[k]) for k in full if k.startswith("params/"))


@pytest.mark.integration
def test_resume_under_the_other_optimiser_rule(tiny_data_root, compilation_cache, reference_run, tmp_path):
  """A run written under optim.rule "nominal" (the demo's) continues under "reference": same optimiser state."""
  import shutil
  reference_dir, full = reference_run
  shutil.copytree(reference_dir, tmp_path / "run")
  proc = run_tiny(tiny_data_root, tmp_path / "run", tmp_path / "resumed.npz", cache_dir=compilation_cache,
                  **{**REFERENCE_OVERRIDES, "num_steps": 6, "optim.schedule_steps": 10, "optim.rule": "reference",
                     "allow_config_change": True})
  assert "Resumed from" in proc.stdout and "at step 5" in proc.stdout
  assert "written under config.optim.rule='nominal'; continuing under 'reference'" in proc.stdout
  resumed = load_npz(tmp_path / "resumed.npz")
  assert int(resumed["step"]) == 6
  assert any(not np.array_equal(full[k], resumed[k]) for k in full if k.startswith("params/"))


@pytest.mark.integration
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny_data_root, compilation_cache, tmp_path):
  workdir = tmp_path / "nan"
  run_tiny(tiny_data_root, workdir, tmp_path / "good.npz", cache_dir=compilation_cache, stage="adapt",
           num_steps=2, checkpoint_every=2)
  proc = run_tiny(tiny_data_root, workdir, tmp_path / "bad.npz", check=False, cache_dir=compilation_cache,
                  stage="adapt", num_steps=4,
                  checkpoint_every=1, **{"loss.target": "tests.user_losses:nan_loss", "allow_config_change": True})
  assert proc.returncode != 0
  assert "non-finite loss at step 3" in proc.stderr
  assert "last good checkpoint is step 2" in proc.stderr
  steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert steps[-1] == 2, steps


@pytest.mark.integration
def test_batch_size_must_divide_by_device_count(tiny_data_root, tmp_path):
  proc = run_tiny(tiny_data_root, tmp_path / "w", tmp_path / "o.npz", devices=3, check=False, num_steps=1)
  assert proc.returncode != 0
  assert "config.batch_size=4 is the GLOBAL batch and must be divisible by the number of devices (3)" in proc.stderr


@pytest.mark.integration
def test_demo_main_prints_both_mious_and_writes_run_artifacts(tiny_data_root, tmp_path):
  workdir = tmp_path / "demo"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "maxsq_jax.main", "--config=configs/demo.py:tiny",
                         f"--workdir={workdir}", f"--config.data.source_dir={tiny_data_root}/synthetic_source",
                         f"--config.data.target_dir={tiny_data_root}/synthetic_target"],
                        env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  last = proc.stdout.strip().splitlines()[-1]
  assert last.startswith("source-only target mIoU: ") and "  max-squares target mIoU: " in last, last
  import json
  info = json.load(open(workdir / "adapt" / "config.json"))
  assert info["versions"]["jax"] == jax.__version__ and info["devices"]
  assert info["config"]["init_from"].endswith("source_only")
  for stage in ("source_only", "adapt"):
    lines = (workdir / stage / "metrics.jsonl").read_text().splitlines()
    assert any('"train/loss"' in l for l in lines)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / stage / "tensorboard"))
  eval_dir = workdir / "adapt" / "eval" / "step_3"
  assert (eval_dir / "pred_0.png").exists() and (eval_dir / "confusion.npy").exists()
  from PIL import Image
  panel = np.asarray(Image.open(eval_dir / "pred_0.png"))
  # image | label | prediction at 48x32, enlarged by the smallest integer factor reaching the view width.
  k = -(-visualize.VIEW_WIDTH // (3 * 48))
  assert k > 1 and panel.shape == (32 * k, 3 * 48 * k, 3)
  np.testing.assert_array_equal(panel, np.repeat(np.repeat(panel[::k, ::k], k, axis=0), k, axis=1))
  assert "road" in proc.stdout and "mIoU" in proc.stdout  # The per-class IoU table.


@pytest.mark.integration
def test_demo_trains_with_a_user_defined_target_loss(tiny_data_root, compilation_cache, tmp_path):
  import json
  run_tiny(tiny_data_root, tmp_path / "user", tmp_path / "user.npz", cache_dir=compilation_cache, stage="adapt",
           num_steps=2, checkpoint_every=2, **{"loss.target": "tests.user_losses:my_loss"})
  records = [json.loads(l) for l in (tmp_path / "user" / "metrics.jsonl").read_text().splitlines()]
  train_records = [r for r in records if "train/loss" in r]
  assert train_records and all(np.isfinite(r["train/target_my_loss"]) for r in train_records)
  assert int(load_npz(tmp_path / "user.npz")["step"]) == 2


def test_itstime_and_metric_window():
  due = [s for s in range(1, 11) if train.itstime(s, 3, 10)]
  assert due == [3, 6, 9]  # Not the last step: the loop's final save/evaluation follows it.
  assert [s for s in range(1, 11) if train.itstime(s, 3, 10, at_end=True)] == [3, 6, 9, 10]
  assert not any(train.itstime(s, 0, 10) for s in range(1, 10))  # 0: never.
  window = train.MetricWindow()
  window.add({"loss": 1.0, "nonfinite": 0})
  window.add({"loss": 3.0, "nonfinite": 0})
  first = window.mean()
  assert first["loss"] == 2.0 and "nonfinite" not in first and first["steps_per_sec"] > 0
  window.add({"loss": 5.0, "nonfinite": 0})
  assert window.mean()["loss"] == 5.0  # A new window after each mean.
