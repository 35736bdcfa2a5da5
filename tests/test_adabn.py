"""AdaBN (maxsq_jax/adabn.py): only the BatchNorm statistics change, and they are the NumPy average of
every layer's per-image statistics over the target images."""


import flax
import jax
import numpy as np
import pytest

from maxsq_jax import adabn, checkpointing, config_validation, train
from maxsq_jax.errors import ConfigError
from maxsq_jax.models.layers import BatchNorm
from tests import helpers


def tiny_config(data_root, **adabn_fields):
  """configs/demo.py:adabn,tiny with config.adabn fields set."""
  return helpers.tiny_config(data_root, "adabn,tiny", **{f"adabn.{k}": v for k, v in adabn_fields.items()})


def trained_like_variables(config, mesh):
  """A state whose batch statistics are not the initial ones (so that a change is visible)."""
  model = train.build_model(config)
  width, height = config.data.target_size
  state, _, _, _ = train.initial_state(config, model, mesh, (1, height, width, 3))
  stats = jax.tree_util.tree_map(lambda x: x + 0.5, state.batch_stats)
  return model, state.replace(batch_stats=stats)


def numpy_statistics(config, model, mesh, params, batch_stats):
  """{layer path: (mean [C], var [C]) per batch} from the inputs each BatchNorm receives in the train-mode
  forward pass (recorded by intercepting its calls), computed in NumPy: per image (bn_group_size 1) the mean
  and the unbiased variance over H, W, averaged over the batch's images."""
  per_layer = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, BatchNorm) and context.method_name == "__call__":
      x = np.asarray(args[0], np.float64)  # [B, H, W, C]
      n = x.shape[1] * x.shape[2]
      mean = x.mean(axis=(1, 2))
      var = x.var(axis=(1, 2)) * n / (n - 1)
      per_layer.setdefault(context.module.path, []).append((mean.mean(0), var.mean(0)))
    return next_fun(*args, **kwargs)

  for batch in adabn.target_images(config, mesh).batches(mesh):
    with flax.linen.intercept_methods(record):
      model.apply({"params": params, "batch_stats": batch_stats}, batch["image"], train=True, mutable=["batch_stats"])
  return per_layer


def as_flat(batch_stats):
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(jax.device_get(batch_stats)))


@pytest.mark.parametrize("accumulation,num_images", [("cumulative", 12), ("momentum", 10)])
def test_estimate_is_the_numpy_average_of_every_layers_statistics(tiny_data_root, accumulation, num_images):
  config = tiny_config(tiny_data_root, num_images=num_images, accumulation=accumulation)
  mesh = train.create_mesh()
  model, state = trained_like_variables(config, mesh)
  stats, used = adabn.estimate(config, model, mesh, state.params, state.batch_stats)
  assert used == (12 if num_images == 12 else 8)  # Whole batches of 4 only.
  expected = numpy_statistics(config, model, mesh, state.params, state.batch_stats)
  got, before = as_flat(stats), as_flat(state.batch_stats)
  assert len(expected) == len(got) // 2 == 17  # bn1, and 3 + the downsampling one in each stage's bottleneck.
  m = BatchNorm.momentum
  for path, batches in expected.items():
    for i, name in enumerate(("mean", "var")):
      if accumulation == "cumulative":
        want = np.mean([b[i] for b in batches], axis=0)
      else:  # The layers' own running update, from the model's statistics, batch after batch.
        want = before[path + (name,)].astype(np.float64)
        for b in batches:
          want = m * want + (1 - m) * b[i]
      np.testing.assert_allclose(got[path + (name,)], want, rtol=2e-4, atol=1e-5, err_msg=str(path + (name,)))


def test_estimate_needs_one_whole_batch(tiny_data_root):
  config = tiny_config(tiny_data_root, num_images=3)
  mesh = train.create_mesh()
  model, state = trained_like_variables(config, mesh)
  with pytest.raises(ConfigError, match=r"config.adabn.num_images=3: 3 target image\(s\) .* fewer than "
                                         r"config.adabn.batch_size=4"):
    adabn.estimate(config, model, mesh, state.params, state.batch_stats)


def test_config_fields_are_validated():
  from maxsq_jax.config_base import base_config
  config = base_config()
  config.stage = "adabn"
  config.adabn.accumulation = "average"
  config.adabn.num_images = 0
  with pytest.raises(ConfigError) as error:
    config_validation.validate(config, 1)
  message = str(error.value)
  assert "config.adabn.accumulation='average': use one of cumulative, momentum" in message
  assert "config.adabn.num_images=0: must be >= 1" in message
  assert "config.init_from='': stage 'adabn' re-estimates the statistics of a trained model" in message


@pytest.mark.integration
def test_adabn_stage_changes_only_the_batchnorm_statistics(tiny_data_root, tmp_path):
  """The stage from a saved model: parameters bit-identical, statistics those of `estimate`, a step-0
  checkpoint another stage starts from, and the evaluation."""
  config = tiny_config(tiny_data_root)
  mesh = train.create_mesh()
  model, state = trained_like_variables(config, mesh)
  mngr = checkpointing.manager(tmp_path / "source" / "checkpoints", 1)
  checkpointing.save(mngr, 4, state, {}, {"step": 4})
  mngr.wait_until_finished()
  mngr.close()

  results = adabn.run(adabn.stage_config(config, tmp_path / "source"), tmp_path / "adabn")
  like = {"params": state.params, "batch_stats": state.batch_stats}
  saved, _ = checkpointing.load_weights(tmp_path / "adabn", like)
  for a, b in zip(jax.tree_util.tree_leaves(saved["params"]), jax.tree_util.tree_leaves(state.params)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  want, _ = adabn.estimate(config, adabn.statistics_model(config), mesh, state.params, state.batch_stats)
  for a, b, old in zip(jax.tree_util.tree_leaves(saved["batch_stats"]), jax.tree_util.tree_leaves(want),
                       jax.tree_util.tree_leaves(state.batch_stats)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    assert not np.allclose(np.asarray(a), np.asarray(old))
  assert results["step"] == adabn.STEP and results["adabn"] == {"accumulation": "cumulative", "num_images": 16}
  assert (tmp_path / "adabn" / "results.json").is_file() and (tmp_path / "adabn" / "config.json").is_file()
  assert 0 <= results["target_miou"] <= 1 and "source_miou" in results
  # Rerunning reads the statistics back instead of estimating them again.
  again = adabn.run(adabn.stage_config(config, tmp_path / "source"), tmp_path / "adabn")
  assert again["miou"] == results["miou"]
