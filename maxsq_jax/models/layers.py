"""Layers that reproduce PyTorch semantics the DeepLab-v2 port depends on (docs/method.md, Model).

- `resize_bilinear_align_corners`: `F.interpolate(x, size, mode="bilinear", align_corners=True)`
  (`jax.image.resize` uses half-pixel centres, which is a different function).
- `max_pool_ceil`: `nn.MaxPool2d(k, stride, padding, ceil_mode=True)`, padding with -inf.
- `BatchNorm`: BatchNorm2d with three modes ("train", "frozen", "sync") and PyTorch's running-stat
  update (momentum 0.1 == flax momentum 0.9, running_var updated with the unbiased batch variance).

All functions take NHWC arrays.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

BN_MODES = ("train", "frozen", "sync")


# ----------------------------------------------------------------------------------------------
# Bilinear resize with align_corners=True.


def _align_corners_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] interpolation matrix of PyTorch's bilinear align_corners=True.

  Source coordinates are computed in float32 like PyTorch's CPU/GPU kernels
  (src = float32((in - 1) / (out - 1)) * dst), so the weights match its to the last bits.
  """
  m = np.zeros((out_size, in_size), np.float64)
  if out_size == 1 or in_size == 1:
    # PyTorch: scale 0 when out_size == 1, so every output samples input index 0.
    m[:, 0] = 1.0
    return m
  scale = np.float32((in_size - 1) / (out_size - 1))
  src = np.arange(out_size, dtype=np.float32) * scale
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = (src - i0.astype(np.float32)).astype(np.float32)
  w0 = np.float32(1) - w1
  rows = np.arange(out_size)
  np.add.at(m, (rows, i0), w0.astype(np.float64))
  np.add.at(m, (rows, i1), w1.astype(np.float64))
  return m


def resize_bilinear_align_corners(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Bilinearly resizes NHWC `x` to `size` = (out_h, out_w) with align_corners=True semantics.

  Implemented as two small dense matmuls with static interpolation matrices (HIGHEST precision),
  which is exact to float rounding, deterministic (no scatter-add in the backward pass) and cheap
  next to the network (the inputs here are logits with few channels). Output dtype = input dtype.
  """
  if x.ndim != 4:
    raise ValueError(f"expected an NHWC array, got shape {x.shape}")
  _, in_h, in_w, _ = x.shape
  out_h, out_w = int(size[0]), int(size[1])
  if (in_h, in_w) == (out_h, out_w):
    return x
  mh = jnp.asarray(_align_corners_matrix(in_h, out_h), x.dtype)
  mw = jnp.asarray(_align_corners_matrix(in_w, out_w), x.dtype)
  hp = jax.lax.Precision.HIGHEST
  # Pick the cheaper order of the two separable passes (static shapes).
  cost_h_first = out_h * in_h * in_w + out_h * out_w * in_w
  cost_w_first = in_h * out_w * in_w + out_h * in_h * out_w
  if cost_h_first <= cost_w_first:
    y = jnp.einsum("oh,bhwc->bowc", mh, x, precision=hp)
    return jnp.einsum("pw,bowc->bopc", mw, y, precision=hp)
  y = jnp.einsum("pw,bhwc->bhpc", mw, x, precision=hp)
  return jnp.einsum("oh,bhpc->bopc", mh, y, precision=hp)


# ----------------------------------------------------------------------------------------------
# Max pooling with PyTorch's ceil_mode=True output size.


def ceil_mode_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
  """Output length of PyTorch's max_pool with ceil_mode=True (dilation 1)."""
  out = -(-(size + 2 * padding - kernel) // stride) + 1  # ceil division
  # PyTorch drops the last window if it would start inside the right padding.
  if (out - 1) * stride >= size + padding:
    out -= 1
  return out


def max_pool_ceil(x: jax.Array, kernel: int = 3, stride: int = 2, padding: int = 1) -> jax.Array:
  """`nn.MaxPool2d(kernel, stride, padding, ceil_mode=True)` on NHWC `x`; pads with -inf."""
  _, h, w, _ = x.shape
  pads = [(0, 0)]
  for size in (h, w):
    out = ceil_mode_output_size(size, kernel, stride, padding)
    right = max((out - 1) * stride + kernel - size - padding, 0)
    pads.append((padding, right))
  pads.append((0, 0))
  # A Python scalar init lets jax pick the differentiable reduce_window_max primitive.
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, kernel, kernel, 1), (1, stride, stride, 1),
                               pads)


# ----------------------------------------------------------------------------------------------
# BatchNorm with modes.


class BatchNorm(nn.Module):
  """BatchNorm2d over the channel (last) axis with the modes of `DeepLabV2.bn_mode`.

  Modes:
    "train":  `train=True` normalises with the statistics of each group of `group_size`
              consecutive images (the batch [B,...] is viewed as [B/group_size, group_size, ...];
              group_size=1 gives per-image statistics, what the reference computes at batch 1 per
              GPU) and updates the running statistics with the average of the group statistics;
              `train=False` uses the running statistics.
    "frozen": always the running statistics, never updated (scale/bias still get gradients).
    "sync":   `train=True` uses the statistics of the whole batch. Under `jax.jit` with the batch
              sharded over a mesh, that is the global batch across devices (XLA inserts the
              all-reduce; no axis_name needed). Running statistics updated from them.

  Running statistics follow PyTorch: `running = momentum * running + (1 - momentum) * batch`
  with flax's momentum convention (0.9 here == PyTorch's 0.1), and the variance that enters the
  running average is the unbiased one (n / (n - 1), n = elements per channel in a group).
  Statistics are computed in float32 whatever `dtype` is; the output has dtype `dtype`.

  Variables: params `scale`, `bias` (PyTorch weight, bias); batch_stats `mean`, `var`
  (running_mean, running_var).
  """

  mode: str = "train"
  group_size: int = 1
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.mode not in BN_MODES:
      raise ValueError(f"unknown bn_mode {self.mode!r}; expected one of {BN_MODES}")
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))

    use_batch_stats = train and self.mode != "frozen"
    xf = x.astype(jnp.float32)
    if not use_batch_stats:
      mul = scale.astype(jnp.float32) * jax.lax.rsqrt(ra_var.value + self.epsilon)
      add = bias.astype(jnp.float32) - ra_mean.value * mul
      return (xf * mul + add).astype(self.dtype)

    b = x.shape[0]
    g = b if self.mode == "sync" else self.group_size
    if g < 1 or b % g:
      raise ValueError(f"batch size {b} is not divisible by bn_group_size {self.group_size}")
    xg = xf.reshape((b // g, g) + x.shape[1:])  # [G, g, H, W, C]
    axes = tuple(range(1, xg.ndim - 1))
    mean = jnp.mean(xg, axis=axes, keepdims=True)  # [G, 1, 1, 1, C]
    var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)  # biased, for normalising
    mul = scale.astype(jnp.float32) * jax.lax.rsqrt(var + self.epsilon)
    y = (xg - mean) * mul + bias.astype(jnp.float32)

    if not self.is_initializing():
      n = math.prod(xg.shape[1:-1])
      unbiased = var * (n / max(n - 1, 1))
      m = self.momentum
      mean, unbiased = jax.lax.stop_gradient((mean, unbiased))
      ra_mean.value = m * ra_mean.value + (1 - m) * jnp.mean(mean, axis=(0,) + axes)
      ra_var.value = m * ra_var.value + (1 - m) * jnp.mean(unbiased, axis=(0,) + axes)
    return y.reshape(x.shape).astype(self.dtype)
