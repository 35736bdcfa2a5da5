"""DeepLabV2 and its layers: shapes, PyTorch-equivalent pooling/resize/BatchNorm, heads, bf16."""

import os
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from maxsq_jax.models import DeepLabV2, feature_size
from maxsq_jax.models.convert import expected_shapes, torch_state_dict_to_variables
from maxsq_jax.models.deeplab import ClassifierModule
from maxsq_jax.models.layers import (
  BatchNorm,
  _align_corners_matrix,
  ceil_mode_output_size,
  max_pool_ceil,
  resize_bilinear_align_corners,
)
from tests.helpers import import_torch

torch, requires_torch = import_torch()
if torch is not None:  # The reference model in PyTorch, for the comparisons.
  from tests.torch_deeplab import DeeplabMulti, randomize_

TINY = dict(blocks=(1, 1, 1, 1), width=4)


def random_variables(model, input_shape=(1, 17, 17, 3), seed=0):
  """Random variables of `model` without `model.init`: XLA:CPU compiles threefry slowly (~0.3 s per
  random call), so a jitted init of even a small DeepLabV2 takes ~20 s here."""
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct(input_shape, jnp.float32))
  rng = np.random.RandomState(seed)
  out = {}
  for path, s in flatten_dict(shapes).items():
    if path[-1] == "kernel":
      v = rng.randn(*s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1]))
    elif path[-1] == "scale":
      v = rng.uniform(0.5, 1.0, s.shape)
    elif path[-1] == "var":
      v = rng.uniform(0.5, 1.5, s.shape)
    else:  # bias, mean
      v = rng.randn(*s.shape) * 0.1
    out[path] = jnp.asarray(v, s.dtype)
  return _unflatten(out)


def _unflatten(flat):
  return flax.traverse_util.unflatten_dict(flat)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


# ----------------------------------------------------------------------------------------------
# Shapes and names.


@pytest.mark.parametrize("wh,feat", [((1280, 720), (161, 91)), ((1024, 512), (129, 65)),
                                     ((1280, 640), (161, 81))])
def test_feature_sizes(wh, feat):
  w, h = wh
  model = DeepLabV2(19)  # the full ResNet-101, abstractly
  x = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  (main, aux), state = jax.eval_shape(
      lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]),
      variables, x)
  inter = state["intermediates"]
  assert inter["layer4"]["__call__"][0].shape == (1, feat[1], feat[0], 2048)
  assert inter["layer3"]["__call__"][0].shape == (1, feat[1], feat[0], 1024)
  assert feature_size(h, w) == (feat[1], feat[0])
  assert main.shape == aux.shape == (1, h, w, 19)
  assert main.dtype == aux.dtype == jnp.float32


def test_variable_names_and_shapes():
  model = DeepLabV2(19)
  variables = jax.eval_shape(model.init, jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 65, 65, 3), jnp.float32))
  assert set(variables) == {"params", "batch_stats"}
  assert set(variables["params"]) == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4",
                                      "layer5", "layer6"}
  assert set(variables["params"]["layer3"]) == {f"block_{i}" for i in range(23)}
  assert set(variables["params"]["layer6"]) == {f"conv2d_list_{i}" for i in range(4)}
  assert set(variables["params"]["layer1"]["block_0"]) == {
      "conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample_conv", "downsample_bn"}
  assert "downsample_conv" not in variables["params"]["layer1"]["block_1"]
  shapes = {k: tuple(v.shape) for k, v in flatten_dict(variables).items()}
  assert shapes == expected_shapes(19, (3, 4, 23, 3), 64)
  assert shapes[("params", "layer6", "conv2d_list_0", "kernel")] == (3, 3, 2048, 19)
  assert shapes[("params", "layer5", "conv2d_list_3", "kernel")] == (3, 3, 1024, 19)
  for v in jax.tree_util.tree_leaves(variables):
    assert v.dtype == jnp.float32
  n_params = sum(np.prod(v.shape) for v in jax.tree_util.tree_leaves(variables["params"]))
  # ResNet-101 without fc (42.5M) + two 4-branch heads (2.1M), as the PyTorch reference.
  assert n_params == 44_601_560


@requires_torch
def test_parameter_count_equals_the_reference():
  assert sum(p.numel() for p in DeeplabMulti(19).parameters()) == 44_601_560


def test_head_init():
  head = ClassifierModule(19)
  v = jax.jit(head.init)(jax.random.key(0), jnp.zeros((1, 9, 9, 128)))
  assert set(v["params"]) == {f"conv2d_list_{i}" for i in range(4)}
  k = np.asarray(v["params"]["conv2d_list_0"]["kernel"])  # 3*3*128*19 values
  assert abs(k.std() - 0.01) < 0.002 and abs(k.mean()) < 0.002
  b = np.asarray(v["params"]["conv2d_list_0"]["bias"])  # PyTorch default bias init
  assert np.all(np.abs(b) <= 1 / np.sqrt(128 * 9)) and b.std() > 0.005


# ----------------------------------------------------------------------------------------------
# Pooling and resize vs PyTorch.


@requires_torch
def test_max_pool_ceil_vs_torch():
  rng = np.random.RandomState(0)
  pool = torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True)
  for h, w in [(1, 1), (2, 3), (4, 5), (7, 8), (9, 16), (17, 10), (360, 640)]:
    x = rng.randn(2, 3, h, w).astype(np.float32)
    want = pool(torch.from_numpy(x)).numpy()
    got = nchw(max_pool_ceil(jnp.asarray(nhwc(x))))
    assert got.shape == want.shape, (h, w)
    np.testing.assert_array_equal(got, want)
    assert want.shape[2:] == (ceil_mode_output_size(h, 3, 2, 1), ceil_mode_output_size(w, 3, 2, 1))
  assert ceil_mode_output_size(360, 3, 2, 1) == 181  # 720-pixel input -> 91 features
  # Negative inputs: the padding must be -inf, not 0.
  x = -1 - np.abs(rng.randn(1, 1, 6, 6)).astype(np.float32)
  np.testing.assert_array_equal(nchw(max_pool_ceil(jnp.asarray(nhwc(x)))),
                                pool(torch.from_numpy(x)).numpy())


@requires_torch
@pytest.mark.parametrize("in_hw,out_hw", [((5, 7), (37, 45)), ((9, 6), (33, 41)), ((4, 4), (4, 4)),
                                          ((13, 11), (5, 3)), ((1, 3), (4, 1)), ((65, 129), (512, 1024))])
def test_resize_align_corners_vs_torch(in_hw, out_hw):
  x = np.random.RandomState(1).randn(2, 3, *in_hw).astype(np.float32)
  want = torch.nn.functional.interpolate(torch.from_numpy(x), size=out_hw, mode="bilinear",
                                         align_corners=True).numpy()
  got = nchw(resize_bilinear_align_corners(jnp.asarray(nhwc(x)), out_hw))
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_resize_matrix_rows_sum_to_one():
  for i, o in [(3, 10), (10, 3), (1, 5), (5, 1), (129, 1024)]:
    m = _align_corners_matrix(i, o)
    np.testing.assert_allclose(m.sum(1), 1.0, rtol=1e-6)
    assert m[0, 0] == 1.0
    if o > 1 and i > 1:
      assert abs(m[-1, -1] - 1.0) < 1e-6


def test_resize_differs_from_jax_image_resize():
  x = jnp.asarray(np.random.RandomState(2).randn(1, 5, 7, 2).astype(np.float32))
  ours = resize_bilinear_align_corners(x, (20, 28))
  half_pixel = jax.image.resize(x, (1, 20, 28, 2), "bilinear")
  assert float(jnp.abs(ours - half_pixel).max()) > 1e-2
  np.testing.assert_allclose(ours[:, 0, 0], x[:, 0, 0], rtol=1e-6)  # corners align
  np.testing.assert_allclose(ours[:, -1, -1], x[:, -1, -1], rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# BatchNorm modes.


def _bn_variables(c=6, seed=0):
  """Random BatchNorm variables (scale, bias, running mean and variance) of `c` channels."""
  rng = np.random.RandomState(seed)
  scale, bias = rng.rand(c).astype(np.float32) + 0.5, rng.randn(c).astype(np.float32)
  mean, var = rng.randn(c).astype(np.float32), rng.rand(c).astype(np.float32) + 0.5
  return {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)},
          "batch_stats": {"mean": jnp.asarray(mean), "var": jnp.asarray(var)}}


def _bn_setup(c=6, seed=0):
  """(torch BatchNorm2d, the same variables for BatchNorm)."""
  variables = _bn_variables(c, seed)
  tbn = torch.nn.BatchNorm2d(c)
  with torch.no_grad():
    tbn.weight.copy_(torch.from_numpy(np.asarray(variables["params"]["scale"])))
    tbn.bias.copy_(torch.from_numpy(np.asarray(variables["params"]["bias"])))
    tbn.running_mean.copy_(torch.from_numpy(np.asarray(variables["batch_stats"]["mean"])))
    tbn.running_var.copy_(torch.from_numpy(np.asarray(variables["batch_stats"]["var"])))
  return tbn, variables


def _bn_input(b=4, h=5, w=7, c=6, seed=3):
  rng = np.random.RandomState(seed)
  # Per-image offsets and scales, so per-image and whole-batch statistics clearly differ.
  return (rng.randn(b, c, h, w) * rng.rand(b, 1, 1, 1) * 3 + rng.randn(b, 1, 1, 1) * 2).astype(
      np.float32)


@requires_torch
def test_bn_train_group_equals_torch_per_group():
  b, g = 4, 2
  x = _bn_input(b)
  tbn, variables = _bn_setup()
  r_mean0 = tbn.running_mean.clone()
  r_var0 = tbn.running_var.clone()
  tbn.train()
  outs, means, vars_ = [], [], []
  for i in range(0, b, g):  # torch BatchNorm2d in train mode on each group, from the same stats
    tbn.running_mean.copy_(r_mean0)
    tbn.running_var.copy_(r_var0)
    with torch.no_grad():
      outs.append(tbn(torch.from_numpy(x[i:i + g])).numpy())
    means.append(tbn.running_mean.numpy().copy())
    vars_.append(tbn.running_var.numpy().copy())
  y, state = BatchNorm(mode="train", group_size=g).apply(variables, jnp.asarray(nhwc(x)), train=True,
                                                          mutable=["batch_stats"])
  np.testing.assert_allclose(nchw(y), np.concatenate(outs), rtol=1e-5, atol=1e-5)
  # Linear update, so the averaged group update is the mean of torch's per-group updates.
  np.testing.assert_allclose(state["batch_stats"]["mean"], np.mean(means, 0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state["batch_stats"]["var"], np.mean(vars_, 0), rtol=1e-5, atol=1e-6)


@requires_torch
@pytest.mark.parametrize("mode,g", [("train", 4), ("sync", 1)])
def test_bn_whole_batch_equals_torch(mode, g):
  x = _bn_input(4)
  tbn, variables = _bn_setup()
  tbn.train()
  with torch.no_grad():
    want = tbn(torch.from_numpy(x)).numpy()  # torch: unbiased var into running_var
  y, state = BatchNorm(mode=mode, group_size=g).apply(variables, jnp.asarray(nhwc(x)), train=True,
                                                       mutable=["batch_stats"])
  np.testing.assert_allclose(nchw(y), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state["batch_stats"]["mean"], tbn.running_mean.numpy(), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(state["batch_stats"]["var"], tbn.running_var.numpy(), rtol=1e-5,
                             atol=1e-6)


@requires_torch
def test_bn_eval_and_frozen_use_running_stats():
  x = _bn_input(3)
  tbn, variables = _bn_setup()
  tbn.eval()
  with torch.no_grad():
    want = tbn(torch.from_numpy(x)).numpy()
  for mode in ("train", "frozen", "sync"):
    y = BatchNorm(mode=mode).apply(variables, jnp.asarray(nhwc(x)), train=False)
    np.testing.assert_allclose(nchw(y), want, rtol=1e-5, atol=1e-5)
  # frozen with train=True: running stats, unchanged, and scale/bias still get gradients.
  bn = BatchNorm(mode="frozen")
  y, state = bn.apply(variables, jnp.asarray(nhwc(x)), train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(nchw(y), want, rtol=1e-5, atol=1e-5)
  for k in ("mean", "var"):
    np.testing.assert_array_equal(state["batch_stats"][k], variables["batch_stats"][k])

  def loss(params):
    out, _ = bn.apply({"params": params, "batch_stats": variables["batch_stats"]},
                      jnp.asarray(nhwc(x)), train=True, mutable=["batch_stats"])
    return jnp.sum(out ** 2)

  grads = jax.grad(loss)(variables["params"])
  assert float(jnp.abs(grads["scale"]).min()) > 0 and float(jnp.abs(grads["bias"]).min()) > 0


def test_bn_per_image_differs_from_sync():
  x = jnp.asarray(nhwc(_bn_input(4)))
  variables = _bn_variables()
  y1, s1 = BatchNorm(mode="train").apply(variables, x, train=True, mutable=["batch_stats"])
  ys, ss = BatchNorm(mode="sync").apply(variables, x, train=True, mutable=["batch_stats"])
  assert float(jnp.abs(y1 - ys).max()) > 0.1
  # Per-image: each image is normalised on its own.
  np.testing.assert_allclose(jnp.mean(y1 - variables["params"]["bias"], axis=(1, 2)), 0, atol=1e-4)
  assert float(jnp.abs(s1["batch_stats"]["var"] - ss["batch_stats"]["var"]).max()) > 0.1


def test_bn_errors():
  x = jnp.zeros((3, 4, 4, 2))
  bn = BatchNorm(mode="train", group_size=2)
  variables = bn.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="not divisible by bn_group_size 2"):
    bn.apply(variables, x, train=True, mutable=["batch_stats"])
  bn.apply(variables, x, train=False)  # eval needs no divisibility
  with pytest.raises(ValueError, match="unknown bn_mode 'bogus'"):
    BatchNorm(mode="bogus").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="unknown bn_mode"):
    DeepLabV2(3, bn_mode="eval", **TINY).init(jax.random.key(0), jnp.zeros((1, 17, 17, 3)))
  model = DeepLabV2(3, bn_group_size=2, **TINY)
  v = random_variables(model)
  with pytest.raises(ValueError, match="batch size 3 is not divisible by bn_group_size 2"):
    model.apply(v, jnp.zeros((3, 17, 17, 3)), train=True, mutable=["batch_stats"])


@pytest.mark.integration
def test_bn_sync_over_device_mesh():
  """Under jit with the batch sharded over 2 devices, "sync" uses the global batch statistics."""
  script = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from maxsq_jax.models.layers import BatchNorm
    assert jax.device_count() == 2
    mesh = jax.make_mesh((2,), ("data",))
    rng = np.random.RandomState(0)
    x = (rng.randn(4, 5, 5, 3) + np.arange(4)[:, None, None, None] * 3).astype(np.float32)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    for mode, g in (("sync", 1), ("train", 2)):
      bn = BatchNorm(mode=mode, group_size=g)
      v = jax.device_put(bn.init(jax.random.key(0), x), NamedSharding(mesh, P()))
      f = jax.jit(lambda v, x: bn.apply(v, x, train=True, mutable=["batch_stats"]))
      y, s = f(v, xs)
      y_ref, s_ref = bn.apply(jax.device_get(v), x, train=True, mutable=["batch_stats"])
      np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(s["batch_stats"]["var"], s_ref["batch_stats"]["var"], rtol=1e-5)
    # sync == whole-batch statistics
    ys, _ = jax.jit(lambda v, x: BatchNorm(mode="sync").apply(v, x, train=True,
                    mutable=["batch_stats"]))(v, xs)
    want = (x - x.mean((0, 1, 2))) / np.sqrt(x.var((0, 1, 2)) + 1e-5)
    np.testing.assert_allclose(ys, want, rtol=1e-4, atol=1e-4)
    print("OK")
  """)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
  r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                     timeout=120)
  assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# Whole model.


def _torch_to_variables(tm, num_classes):
  return torch_state_dict_to_variables(tm.state_dict(), num_classes)


@requires_torch
def test_train_mode_batch1_matches_torch_train():
  """bn_mode "train", batch 1: outputs and updated running stats equal torch's model.train()."""
  tm = randomize_(DeeplabMulti(3, blocks=(1, 2, 1, 1), width=4), seed=1)
  variables = _torch_to_variables(tm, 3)
  x = np.random.RandomState(0).randn(1, 3, 29, 35).astype(np.float32) * 50
  tm.train()
  with torch.no_grad():
    t_main, t_aux = tm(torch.from_numpy(x))
  after = torch_state_dict_to_variables(tm.state_dict(), 3)
  model = DeepLabV2(3, blocks=(1, 2, 1, 1), width=4)
  (main, aux), state = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, jnp.asarray(nhwc(x)))
  assert rel_err(nchw(main), t_main.numpy()) < 1e-4
  assert rel_err(nchw(aux), t_aux.numpy()) < 1e-4
  got, want = flatten_dict(state["batch_stats"]), flatten_dict(after["batch_stats"])
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5, err_msg=str(k))
  # The running stats did move.
  before = flatten_dict(variables["batch_stats"])
  assert max(float(np.abs(got[k] - before[k]).max()) for k in want) > 1e-2


@requires_torch
def test_aspp_branches_switch():
  tm2 = randomize_(DeeplabMulti(4, width=4, blocks=(1, 1, 2, 1), aspp_branches=2), seed=2).eval()
  tm4 = DeeplabMulti(4, width=4, blocks=(1, 1, 2, 1), aspp_branches=4).eval()
  tm4.load_state_dict(tm2.state_dict())
  variables = _torch_to_variables(tm2, 4)
  x = np.random.RandomState(0).randn(2, 3, 27, 21).astype(np.float32) * 50
  outs = {}
  for n, tm in ((2, tm2), (4, tm4)):
    with torch.no_grad():
      t_main, t_aux = tm(torch.from_numpy(x))
    model = DeepLabV2(4, width=4, blocks=(1, 1, 2, 1), aspp_branches=n)
    main, aux = jax.jit(model.apply)(variables, jnp.asarray(nhwc(x)))
    assert rel_err(nchw(main), t_main.numpy()) < 1e-4
    assert rel_err(nchw(aux), t_aux.numpy()) < 1e-4
    outs[n] = main
  assert rel_err(outs[2], outs[4]) > 0.05
  # Both settings have the same variables (all four branches always exist).
  shapes = [jax.eval_shape(DeepLabV2(4, aspp_branches=n, **TINY).init, jax.random.key(0),
                           jax.ShapeDtypeStruct((1, 17, 17, 3), jnp.float32)) for n in (2, 4)]
  assert shapes[0] == shapes[1]
  with pytest.raises(ValueError, match="aspp_branches"):
    DeepLabV2(4, aspp_branches=5, **TINY).init(jax.random.key(0), jnp.zeros((1, 17, 17, 3)))


def test_bfloat16_close_to_float32():
  blocks = (1, 1, 2, 1)
  variables = random_variables(DeepLabV2(5, blocks=blocks, width=8), seed=4)
  x = jnp.asarray(np.random.RandomState(0).randn(2, 41, 33, 3).astype(np.float32) * 50)
  # Bounds: bf16 has an 8-bit mantissa. In train mode (per-image BN) a random-weight BN network is
  # chaotic (a 0.4% input perturbation in float32 moves a full-depth width-4 model's logits by
  # ~40%), so the bound is only meaningful for a shallow model like this one.
  for train, bound in ((False, 0.03), (True, 0.08)):
    outs = {}
    for dtype in ("float32", "bfloat16"):
      model = DeepLabV2(5, blocks=blocks, width=8, dtype=dtype)
      outs[dtype] = jax.jit(lambda v, x: model.apply(v, x, train=train, mutable=["batch_stats"]))(
          variables, x)
    (o32, s32), (o16, s16) = outs["float32"], outs["bfloat16"]
    for a, b in zip(o32, o16):
      assert b.dtype == jnp.float32 and b.shape == a.shape
      assert 1e-5 < rel_err(b, a) < bound  # bf16 really used, and close
    for a, b in zip(jax.tree_util.tree_leaves(s32), jax.tree_util.tree_leaves(s16)):
      assert b.dtype == jnp.float32
      assert rel_err(b, a) < bound
  # Params stay float32 when initialised with the bf16 model.
  v16 = jax.eval_shape(DeepLabV2(5, dtype=jnp.bfloat16, **TINY).init, jax.random.key(0),
                       jax.ShapeDtypeStruct((1, 17, 17, 3), jnp.float32))
  assert {v.dtype for v in jax.tree_util.tree_leaves(v16)} == {jnp.dtype(jnp.float32)}


def test_gradients_flow():
  model = DeepLabV2(3, **TINY)
  x = jnp.asarray(np.random.RandomState(0).randn(2, 19, 23, 3).astype(np.float32))
  v = random_variables(model)

  def loss(params):
    (main, aux), _ = model.apply({"params": params, "batch_stats": v["batch_stats"]}, x, train=True,
                                 mutable=["batch_stats"])
    return jnp.mean(main ** 2) + jnp.mean(aux ** 2)

  grads = jax.jit(jax.grad(loss))(v["params"])
  g = flatten_dict(grads)
  assert all(np.isfinite(np.asarray(a)).all() for a in g.values())
  # Unused ASPP branches (2 of 4) get exactly zero gradient; used ones do not.
  assert float(jnp.abs(grads["layer6"]["conv2d_list_3"]["kernel"]).max()) == 0
  assert float(jnp.abs(grads["layer6"]["conv2d_list_1"]["kernel"]).max()) > 0
  assert float(jnp.abs(grads["conv1"]["kernel"]).max()) > 0


@pytest.mark.parametrize("stride,hw", [(1, (7, 9)), (2, (7, 9)), (2, (8, 6))])
def test_pointwise_conv_equals_nn_conv(stride, hw):
  """PointwiseConv (a matmul) is the same function, parameter and gradient as a 1x1 nn.Conv."""
  import flax.linen as nn

  from maxsq_jax.models.deeplab import PointwiseConv
  x = jnp.asarray(np.random.RandomState(1).randn(2, *hw, 5).astype(np.float32))
  ours = PointwiseConv(3, stride=stride)
  conv = nn.Conv(3, (1, 1), strides=(stride, stride), padding=((0, 0), (0, 0)), use_bias=False)
  v = ours.init(jax.random.key(0), x)
  assert jax.tree_util.tree_map(jnp.shape, v) == jax.tree_util.tree_map(jnp.shape, conv.init(jax.random.key(0), x))
  np.testing.assert_allclose(ours.apply(v, x), conv.apply(v, x), rtol=1e-5, atol=1e-5)
  g_ours = jax.grad(lambda v, x: jnp.sum(ours.apply(v, x) ** 2), argnums=(0, 1))(v, x)
  g_conv = jax.grad(lambda v, x: jnp.sum(conv.apply(v, x) ** 2), argnums=(0, 1))(v, x)
  for a, b in zip(jax.tree_util.tree_leaves(g_ours), jax.tree_util.tree_leaves(g_conv)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_remat_same_outputs_gradients_and_statistics():
  """remat=True recomputes each bottleneck in the backward pass: same variables, outputs, updated
  BatchNorm statistics and gradients as without, and the remat really is in the gradient's program."""
  x = jnp.asarray(np.random.RandomState(0).randn(2, 19, 23, 3).astype(np.float32) * 50)
  plain, remat = DeepLabV2(3, blocks=(1, 2, 1, 1), width=4), DeepLabV2(3, blocks=(1, 2, 1, 1), width=4, remat=True)
  v = random_variables(plain)
  shapes = lambda m: jax.eval_shape(m.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 17, 17, 3), jnp.float32))
  assert shapes(plain) == shapes(remat)

  def loss(model, params):
    (main, aux), new = model.apply({"params": params, "batch_stats": v["batch_stats"]}, x, train=True,
                                   mutable=["batch_stats"])
    return jnp.mean(main ** 2) + jnp.mean(aux ** 2), new["batch_stats"]

  results = {}
  for name, model in (("plain", plain), ("remat", remat)):
    fn = jax.value_and_grad(lambda p: loss(model, p), has_aux=True)
    results[name] = jax.jit(fn)(v["params"])
    results[name + "_jaxpr"] = str(jax.make_jaxpr(fn)(v["params"]))
  (l0, s0), g0 = results["plain"]
  (l1, s1), g1 = results["remat"]
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves((s0, g0)), jax.tree_util.tree_leaves((s1, g1))):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
  # One remat per bottleneck (5), none without.
  assert results["remat_jaxpr"].count("remat") == 5 and "remat" not in results["plain_jaxpr"]
