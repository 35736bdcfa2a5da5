"""The optimiser rules (maxsq_jax.optim): the reference's listing counts against its module walk, the
PyTorch <= 1.4 SGD rule by hand and against PyTorch, and the train step against the authors' step."""

import os
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from maxsq_jax import optim
from maxsq_jax.models import DeepLabV2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESNET101 = (3, 4, 23, 3)
DEMO_BLOCKS = (1, 1, 1, 1)


def params_shape(blocks, width=2, num_classes=3):
  model = DeepLabV2(num_classes=num_classes, blocks=blocks, width=width)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 33, 33, 3))))["params"]


def backbone_counts(params) -> dict:
  """{flax path: listing count} of the parameters the backbone group updates."""
  labels = flax.traverse_util.flatten_dict(optim.parameter_labels(params, multi_level=False, aspp_branches=2))
  counts = flax.traverse_util.flatten_dict(optim.reference_listing_counts(params))
  return {path: counts[path] for path, label in labels.items() if label == "backbone"}


@pytest.mark.parametrize("blocks,tensors,entries", [
    # conv1 once; per bottleneck 9 tensors (3 convs, 3 BNs' gamma/beta) x 3 entries; per stage a
    # downsample conv + BN (3 tensors) x 4 entries; the stem BN is frozen.
    (RESNET101, 1 + 33 * 9 + 4 * 3, 1 + 33 * 9 * 3 + 4 * 3 * 4),
    (DEMO_BLOCKS, 1 + 4 * 9 + 4 * 3, 1 + 4 * 9 * 3 + 4 * 3 * 4),
])
def test_reference_listing_totals(blocks, tensors, entries):
  params = params_shape(blocks)
  counts = backbone_counts(params)
  assert (len(counts), sum(counts.values())) == (tensors, entries)
  if blocks == RESNET101:
    assert (tensors, entries) == (310, 940)
  heads = flax.traverse_util.flatten_dict(optim.reference_listing_counts({k: params[k] for k in ("layer5", "layer6")}))
  assert set(heads.values()) == {1}


@pytest.mark.parametrize("blocks", [RESNET101, DEMO_BLOCKS])
def test_reference_listing_counts_equal_the_reference_module_walk(blocks):
  """Per PyTorch key, our count = how often the reference's param-group code lists the tensor."""
  import collections
  pytest.importorskip("torch")
  sys.path.insert(0, ROOT)
  from bench import torch_reference
  from maxsq_jax.models import convert
  model = torch_reference.build(3, blocks, width=2)
  names = {id(p): n for n, p in model.named_parameters()}
  walked = collections.Counter(names[id(p)] for p in torch_reference.backbone_listing(model))
  walked_heads = collections.Counter(names[id(p)] for p in torch_reference.head_listing(model))
  params = params_shape(blocks)
  ours = {convert.torch_key(path): n for path, n in backbone_counts(params).items()}
  counts = flax.traverse_util.flatten_dict(optim.reference_listing_counts(params))
  ours_heads = {convert.torch_key(path): n for path, n in counts.items() if path[0] in ("layer5", "layer6")}
  assert ours == walked
  assert ours_heads == walked_heads and len(walked_heads) == 2 * 4 * 2  # 2 heads x 4 branches x (weight, bias).


def test_listed_sgd_two_steps_by_hand():
  """a listed once, b twice; lr 0.1, momentum 0.5, wd 0.1, grad 1 at both steps, params start at 1."""
  tx = optim.listed_sgd(0.1, momentum=0.5, weight_decay=0.1, listing_count=lambda path: {"a": 1, "b": 2}[path[0]])
  params = {"a": jnp.ones(()), "b": jnp.ones(())}
  grads = {"a": jnp.ones(()), "b": jnp.ones(())}
  state = tx.init(params)
  expected = [
      # a: g = 1 + 0.1*1 = 1.1, buf = 1.1, p = 1 - 0.11 = 0.89.
      # b: entry 1 as a; entry 2: g = 1.1 + 0.1*0.89 = 1.189 (the decay accumulates),
      #    buf = 0.5*1.1 + 1.189 = 1.739, p = 0.89 - 0.1739 = 0.7161.
      ({"a": 0.89, "b": 0.7161}, {"a": 1.1, "b": 1.739}),
      # a: g = 1 + 0.089 = 1.089, buf = 0.55 + 1.089 = 1.639, p = 0.89 - 0.1639 = 0.7261.
      # b: entry 1: g = 1 + 0.07161 = 1.07161, buf = 0.8695 + 1.07161 = 1.94111, p = 0.521989;
      #    entry 2: g = 1.07161 + 0.0521989 = 1.1238089, buf = 0.970555 + 1.1238089 = 2.0943639,
      #    p = 0.521989 - 0.20943639 = 0.31255261.
      ({"a": 0.7261, "b": 0.31255261}, {"a": 1.639, "b": 2.0943639}),
  ]
  for want_params, want_bufs in expected:
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    for k in params:
      np.testing.assert_allclose(params[k], want_params[k], rtol=1e-6, err_msg=k)
      np.testing.assert_allclose(state[1].trace[k], want_bufs[k], rtol=1e-6, err_msg=k)
  assert int(state[2].count) == 2


def test_listed_sgd_once_is_the_nominal_chain_bit_for_bit():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.asarray(rng.normal(size=3), jnp.float32)}
  schedule = optim.poly_schedule(0.3, 10, 0.9)
  nominal = optim.nominal_sgd(schedule, 0.9, 5e-4)
  listed = optim.listed_sgd(schedule, 0.9, 5e-4, listing_count=lambda path: 1)
  s_nominal, s_listed = nominal.init(params), listed.init(params)
  assert jax.tree_util.tree_structure(s_nominal) == jax.tree_util.tree_structure(s_listed)
  p_nominal = p_listed = params
  for _ in range(3):
    grads = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    u, s_nominal = nominal.update(grads, s_nominal, p_nominal)
    p_nominal = optax.apply_updates(p_nominal, u)
    u, s_listed = listed.update(grads, s_listed, p_listed)
    p_listed = optax.apply_updates(p_listed, u)
  for a, b in zip(jax.tree_util.tree_leaves((p_nominal, s_nominal)), jax.tree_util.tree_leaves((p_listed, s_listed))):
    np.testing.assert_array_equal(a, b)


def test_validation_knows_the_rules():
  from maxsq_jax import config_validation
  assert config_validation.OPTIM_RULES == optim.RULES


def test_unknown_rule_is_an_error_naming_the_key():
  cfg = ConfigDict(dict(lr=0.1, momentum=0.9, weight_decay=0.5, poly_power=0.9, head_lr_mult=10.0, rule="torch"))
  with pytest.raises(ValueError, match=r"config.optim.rule='torch'.*reference, nominal"):
    optim.make_optimizer(cfg, schedule_steps=10, params={"conv1": {"kernel": jnp.ones(2)}}, multi_level=False,
                         aspp_branches=2)


def test_optimizer_state_has_the_same_structure_under_both_rules():
  params = params_shape(DEMO_BLOCKS)
  states = []
  for rule in optim.RULES:
    cfg = ConfigDict(dict(lr=0.1, momentum=0.9, weight_decay=5e-4, poly_power=0.9, head_lr_mult=10.0, rule=rule))
    tx, _ = optim.make_optimizer(cfg, schedule_steps=10, params=params, multi_level=False, aspp_branches=2)
    states.append(jax.eval_shape(tx.init, params))
  assert jax.tree_util.tree_structure(states[0]) == jax.tree_util.tree_structure(states[1])
  assert jax.tree_util.tree_leaves(states[0]) == jax.tree_util.tree_leaves(states[1])


# ----------------------------------------------------------------------------------------------
# Against PyTorch: the reference's walk and PyTorch 1.0's SGD (bench/torch_reference.py).

def _torch_setup(blocks, width, num_classes, seed=0):
  torch = pytest.importorskip("torch")
  sys.path.insert(0, ROOT)
  from torch_deeplab import randomize_

  from bench import torch_reference
  torch.manual_seed(seed)
  model = randomize_(torch_reference.build(num_classes, blocks, width), seed=seed)  # Stem BN frozen.
  return torch, torch_reference, model


def _to_flax_params(model, values: dict, num_classes: int):
  """{torch param name: array} (missing: zeros) in the flax params layout, via the converter."""
  from maxsq_jax.models.convert import torch_state_dict_to_variables
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  for name, p in model.named_parameters():
    sd[name] = np.asarray(values.get(name, np.zeros(tuple(p.shape), np.float32)), np.float32)
  return torch_state_dict_to_variables(sd, num_classes)["params"]


@pytest.mark.parametrize("rule", ["reference", "nominal"])
def test_optimizer_matches_pytorch_over_the_reference_param_groups(rule):
  """1 and 2 steps of make_optimizer vs the PyTorch optimiser the reference builds (rule "reference":
  duplicated listings under the 1.0 SGD rule; "nominal": each tensor once under today's SGD)."""
  blocks, width, num_classes, lr, steps = (1, 2, 1, 1), 2, 3, 0.05, 2
  torch, torch_reference, model = _torch_setup(blocks, width, num_classes)
  optimizer = torch_reference.make_optimizer(model, lr=lr, rule=rule)
  params = _to_flax_params(model, {n: p.detach().numpy() for n, p in model.named_parameters()}, num_classes)
  cfg = ConfigDict(dict(lr=lr, momentum=0.9, weight_decay=5e-4, poly_power=0.9, head_lr_mult=10.0, rule=rule))
  tx, _ = optim.make_optimizer(cfg, schedule_steps=10, params=params, multi_level=False, aspp_branches=2)
  opt_state = tx.init(params)
  update = jax.jit(tx.update)
  gen = torch.Generator().manual_seed(1)
  # The reference's heads: layer5 gets no gradient without multi-level, nor do ASPP branches 2, 3.
  with_grad = [(n, p) for n, p in model.named_parameters() if p.requires_grad and not n.startswith("layer5")
               and not n.startswith(("layer6.conv2d_list.2", "layer6.conv2d_list.3"))]
  start = {n: p.detach().clone() for n, p in model.named_parameters()}
  for step in range(steps):
    scale = (1 - step / 10) ** 0.9
    optimizer.param_groups[0]["lr"], optimizer.param_groups[1]["lr"] = lr * scale, 10 * lr * scale
    grads = {n: torch.randn(p.shape, generator=gen) for n, p in with_grad}
    for n, p in with_grad:
      p.grad = grads[n].clone()
    optimizer.step()
    flax_grads = _to_flax_params(model, {n: g.numpy() for n, g in grads.items()}, num_classes)
    updates, opt_state = update(flax_grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    torch_params = _to_flax_params(model, {n: p.detach().numpy() for n, p in model.named_parameters()}, num_classes)
    start_flax = _to_flax_params(model, {n: v.numpy() for n, v in start.items()}, num_classes)
    moved = jax.tree_util.tree_map(lambda a, b: a - b, torch_params, start_flax)
    ours = jax.tree_util.tree_map(lambda a, b: a - b, params, start_flax)
    for path, want in flax.traverse_util.flatten_dict(moved).items():
      got = flax.traverse_util.flatten_dict(ours)[path]
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * float(np.abs(want).max() + 1e-30),
                                 err_msg=f"step {step + 1} {'/'.join(path)}")


def test_first_step_ratios_of_the_reference_rule():
  """At the first step (no weight decay) a tensor listed n times moves 1 + 1.9 + 2.71 (+ 3.439) times as
  far as under the nominal rule: 5.61x for n = 3, 9.05x for n = 4 (the issue measured 5.63x / 9.05x
  with the decay and real gradients)."""
  params = {"one": jnp.ones(()), "three": jnp.ones(()), "four": jnp.ones(())}
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  counts = {"one": 1, "three": 3, "four": 4}
  tx = optim.listed_sgd(0.01, momentum=0.9, weight_decay=0.0, listing_count=lambda path: counts[path[0]])
  updates, _ = tx.update(grads, tx.init(params), params)
  ratios = {k: float(updates[k] / updates["one"]) for k in params}
  np.testing.assert_allclose([ratios["three"], ratios["four"]], [5.61, 9.049], rtol=1e-5)


def test_train_step_matches_the_authors_pytorch_step():
  """Two steps of maxsq_jax's train step (source CE + 0.1 MaxSquare) under the reference rule vs the
  authors' step in PyTorch (bench/torch_reference.py: their param groups under the 1.0 SGD rule) from
  the same weights on the same batches: every tensor's update agrees to float32 noise (update ratio
  1; measured within 1.2e-4, relative difference <= 2.3e-4). Against the nominal rule, the bottleneck
  tensors' first updates differ 5.6x."""
  rule = "reference"
  from maxsq_jax import objective as objective_lib, train_step as step_lib
  from maxsq_jax.config_base import base_config
  from maxsq_jax.models.convert import torch_state_dict_to_variables
  blocks, width, num_classes, lr, schedule_steps = DEMO_BLOCKS, 4, 5, 0.01, 10
  torch, torch_reference, model = _torch_setup(blocks, width, num_classes)
  model.train()
  torch_step = torch_reference.make_step(model, lr=lr, lambda_target=0.1, schedule_steps=schedule_steps, rule=rule)

  config = base_config()
  config.optim.lr, config.optim.rule = lr, rule
  jax_model = DeepLabV2(num_classes=num_classes, blocks=blocks, width=width)
  variables = torch_state_dict_to_variables({k: v.numpy() for k, v in model.state_dict().items()}, num_classes)
  params = jax.tree_util.tree_map(jnp.asarray, variables["params"])
  tx, schedule = optim.make_optimizer(config.optim, schedule_steps=schedule_steps, params=params,
                                      multi_level=False, aspp_branches=2)
  state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              batch_stats=jax.tree_util.tree_map(jnp.asarray, variables["batch_stats"]),
                              opt_state=tx.init(params))
  jax_step = jax.jit(step_lib.make_train_step(jax_model, objective_lib.make_objective(config.loss), tx, schedule,
                                              "adapt"))
  rng = np.random.default_rng(0)
  start = flax.traverse_util.flatten_dict(params)
  for i in range(2):
    source = rng.normal(0, 50, (1, 3, 24, 32)).astype(np.float32)
    label = rng.integers(-1, num_classes, (1, 24, 32))
    target = rng.normal(0, 50, (1, 3, 16, 32)).astype(np.float32)
    torch_step(i, torch.from_numpy(source), torch.from_numpy(label), torch.from_numpy(target))
    state, metrics = jax_step(state, {"image": jnp.asarray(source.transpose(0, 2, 3, 1)),
                                      "label": jnp.asarray(label, jnp.int32)},
                              {"image": jnp.asarray(target.transpose(0, 2, 3, 1))})
    want = flax.traverse_util.flatten_dict(torch_state_dict_to_variables(
        {k: v.numpy() for k, v in model.state_dict().items()}, num_classes)["params"])
    got = flax.traverse_util.flatten_dict(jax.device_get(state.params))
    for path, p0 in start.items():
      moved_torch, moved_jax = want[path] - p0, got[path] - p0
      if not np.any(moved_torch):
        np.testing.assert_array_equal(moved_jax, 0, err_msg="/".join(path))  # Frozen in both.
        continue
      ratio = np.linalg.norm(moved_jax) / np.linalg.norm(moved_torch)
      error = np.linalg.norm(moved_jax - moved_torch) / np.linalg.norm(moved_torch)
      assert abs(ratio - 1) < 2e-3 and error < 2e-3, (i + 1, "/".join(path), ratio, error)


def test_checkpoint_written_under_one_rule_restores_under_the_other(tmp_path):
  from maxsq_jax import checkpoint_integrity, checkpointing, train_step as step_lib
  model = DeepLabV2(num_classes=3, blocks=DEMO_BLOCKS, width=2)
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 33, 33, 3))))
  variables = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)

  def state(rule):
    cfg = ConfigDict(dict(lr=0.1, momentum=0.9, weight_decay=5e-4, poly_power=0.9, head_lr_mult=10.0, rule=rule))
    tx, _ = optim.make_optimizer(cfg, schedule_steps=10, params=variables["params"], multi_level=False,
                                 aspp_branches=2)
    opt_state = tx.init(variables["params"])
    grads = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), variables["params"])
    _, opt_state = tx.update(grads, opt_state, variables["params"])  # Non-zero buffers, count 1.
    return step_lib.TrainState(step=jnp.ones((), jnp.int32), params=variables["params"],
                               batch_stats=variables["batch_stats"], opt_state=opt_state)

  for written, restored in [("nominal", "reference"), ("reference", "nominal")]:
    mngr = checkpointing.manager(str(tmp_path / written), max_to_keep=1)
    saved = state(written)
    checkpointing.save(mngr, 1, saved, {}, {"step": 1, "optim_rule": written}, force=True)
    mngr.wait_until_finished()
    back, step, unverified = checkpoint_integrity.restore_newest_verified(
        mngr, checkpointing.abstract_like(state(restored)), checkpointing.StreamPositions({}), False, print)
    assert (step, unverified) == (1, [])
    assert checkpointing.read_meta(mngr, 1)["optim_rule"] == written
    mngr.close()
    for a, b in zip(jax.tree_util.tree_leaves(saved), jax.tree_util.tree_leaves(back)):
      np.testing.assert_array_equal(a, b)
