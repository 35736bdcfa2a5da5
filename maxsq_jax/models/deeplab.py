"""DeepLab-v2 ResNet-101 with two ASPP heads (`DeeplabMulti` of the reference), NHWC, Flax linen.

Faithful to the released PyTorch checkpoints (docs/method.md); see docs/models.md for the
parameter-name mapping to the PyTorch state-dict keys.

Architecture:
  conv1 7x7/2 pad 3 (no bias) -> bn1 -> ReLU -> maxpool 3x3/2 pad 1, ceil_mode
  layer1 (stride 1), layer2 (stride 2), layer3 (dilation 2), layer4 (dilation 4): output stride 8
  Caffe-style bottlenecks: the stride sits on the first 1x1 conv; 3x3 padding = dilation;
  the first block of every stage has a 1x1 conv + BN downsample branch.
  layer5: ASPP head on layer3 (aux); layer6: ASPP head on layer4 (main). 3x3 convs with bias,
  dilation = padding in (6, 12, 18, 24); the first `aspp_branches` are summed (2 reproduces the
  early-return bug of the released checkpoints, 4 the intended DeepLab-v2).
  Both heads are upsampled to the input size (bilinear, align_corners=True), returned as float32.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maxsq_jax.models.layers import BN_MODES, BatchNorm, max_pool_ceil, resize_bilinear_align_corners

EXPANSION = 4
ModuleDef = Callable[..., nn.Module]  # A module class with some attributes bound (functools.partial).
# He-normal (fan_out) for backbone convs: only matters when training from scratch; the reference
# starts from converted weights. The ASPP heads follow the reference: N(0, 0.01) weights and
# PyTorch's default uniform(+-1/sqrt(fan_in)) biases.
backbone_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
head_kernel_init = nn.initializers.normal(stddev=0.01)


def _torch_default_bias_init(fan_in: int):
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class PointwiseConv(nn.Module):
  """A 1x1 convolution (stride s, no padding, no bias) computed as a matmul over the channel axis.

  The same function, parameter (`kernel`, [1, 1, in, out]) and initialiser as `nn.Conv` with a 1x1
  kernel, so checkpoints and converted weights are unchanged. On XLA:CPU the matmul form makes the
  train step faster than with `nn.Conv` (measured in bench/RESULTS.md: the ResNet-101 step's
  gradient ~1.5x, the whole step ~1.2x): XLA:CPU's convolution weight gradient is slow, a matmul's
  is not.
  """

  features: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", backbone_kernel_init, (1, 1, x.shape[-1], self.features), jnp.float32)
    if self.stride > 1:
      x = x[:, ::self.stride, ::self.stride]  # Output size ceil(n / s), as the strided 1x1 conv.
    return jnp.einsum("bhwc,co->bhwo", x.astype(self.dtype), kernel[0, 0].astype(self.dtype))


def _conv(features, kernel, *, stride=1, padding=0, dilation=1, dtype, name):
  if kernel == 1 and padding == 0:
    return PointwiseConv(features, stride=stride, dtype=dtype, name=name)
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)),
                 kernel_dilation=(dilation, dilation), use_bias=False, dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=backbone_kernel_init, name=name)


class Bottleneck(nn.Module):
  """Caffe-style bottleneck: 1x1 (stride) -> 3x3 (dilation) -> 1x1 (x4), residual, ReLU.

  `conv(features, kernel, *, stride, padding, dilation, name)` and `norm(name=...)` build its
  convolutions and normalisations (DeepLabV2 binds their dtype and BatchNorm mode).
  """

  planes: int
  conv: ModuleDef
  norm: ModuleDef
  stride: int = 1
  dilation: int = 1
  downsample: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    out = self.conv(self.planes, 1, stride=self.stride, name="conv1")(x)
    out = nn.relu(self.norm(name="bn1")(out, train))
    out = self.conv(self.planes, 3, padding=self.dilation, dilation=self.dilation, name="conv2")(out)
    out = nn.relu(self.norm(name="bn2")(out, train))
    out = self.conv(self.planes * EXPANSION, 1, name="conv3")(out)
    out = self.norm(name="bn3")(out, train)
    if self.downsample:
      residual = self.conv(self.planes * EXPANSION, 1, stride=self.stride, name="downsample_conv")(x)
      residual = self.norm(name="downsample_bn")(residual, train)
    else:
      residual = x
    return nn.relu(out + residual)


class ResLayer(nn.Module):
  """One ResNet stage: `num_blocks` bottlenecks named block_0..block_{n-1}."""

  planes: int
  num_blocks: int
  conv: ModuleDef
  norm: ModuleDef
  stride: int = 1
  dilation: int = 1
  remat: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    # static_argnums counts the module itself as argument 0: `train` (2) is a Python bool.
    block = nn.remat(Bottleneck, static_argnums=(2,)) if self.remat else Bottleneck
    for i in range(self.num_blocks):
      x = block(self.planes, self.conv, self.norm, stride=self.stride if i == 0 else 1, dilation=self.dilation,
                downsample=(i == 0), name=f"block_{i}")(x, train)
    return x


class ClassifierModule(nn.Module):
  """DeepLab-v2 ASPP head: 3x3 convs (bias) with dilation = padding, the first `branches` summed.

  Parameters for every dilation always exist (conv2d_list_0..3), so all checkpoints load.
  """

  num_classes: int
  dilations: tuple = (6, 12, 18, 24)
  branches: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if not 1 <= self.branches <= len(self.dilations):
      raise ValueError(f"aspp_branches must be in [1, {len(self.dilations)}], got {self.branches}")
    fan_in = x.shape[-1] * 9
    out = None
    for i, d in enumerate(self.dilations):
      conv = nn.Conv(self.num_classes, (3, 3), padding=((d, d), (d, d)), kernel_dilation=(d, d),
                     use_bias=True, dtype=self.dtype, param_dtype=jnp.float32,
                     kernel_init=head_kernel_init, bias_init=_torch_default_bias_init(fan_in),
                     name=f"conv2d_list_{i}")
      if i < self.branches:
        y = conv(x)
        out = y if out is None else out + y
      elif self.is_initializing():
        conv(x)  # Create the unused branches' params (they are in every checkpoint).
    return out


class DeepLabV2(nn.Module):
  """DeepLab-v2 ResNet with a main (layer6, on layer4) and an aux (layer5, on layer3) ASPP head.

  Attributes:
    num_classes: output classes of both heads.
    blocks: bottlenecks per stage; (3, 4, 23, 3) is ResNet-101.
    width: stem channels; stage widths are width * (1, 2, 4, 8), x4 expansion (layer4: 32*width).
    aspp_dilations: dilations (= paddings) of the ASPP branches.
    aspp_branches: how many ASPP branches are summed (2: released checkpoints; 4: intended).
    bn_mode: "train" | "frozen" | "sync" (see layers.BatchNorm).
    bn_group_size: images per statistics group in bn_mode "train".
    dtype: activation/compute dtype (params stay float32; outputs are float32).
    remat: rematerialise every bottleneck in the backward pass (only its input is kept; its
      inner activations are recomputed): the same outputs, gradients and BatchNorm statistics,
      less activation memory for about a third more compute.

  `__call__(images, train=False)`: images float [B, H, W, 3] (already normalised); returns
  (main_logits, aux_logits), float32 [B, H, W, num_classes]. With bn_mode "train"/"sync" and
  train=True, call `apply(..., mutable=["batch_stats"])`.
  """

  num_classes: int
  blocks: tuple = (3, 4, 23, 3)
  width: int = 64
  aspp_dilations: tuple = (6, 12, 18, 24)
  aspp_branches: int = 2
  bn_mode: str = "train"
  bn_group_size: int = 1
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images, train: bool = False):
    if self.bn_mode not in BN_MODES:
      raise ValueError(f"unknown bn_mode {self.bn_mode!r}; expected one of {BN_MODES}")
    if not 1 <= self.aspp_branches <= len(self.aspp_dilations):
      raise ValueError(f"aspp_branches must be in [1, {len(self.aspp_dilations)}], "
                       f"got {self.aspp_branches}")
    if len(self.blocks) != 4:
      raise ValueError(f"blocks must have 4 stages, got {self.blocks}")
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected images [B, H, W, 3], got shape {images.shape}")
    b = images.shape[0]
    if self.bn_mode == "train" and train and b % self.bn_group_size:
      raise ValueError(f"batch size {b} is not divisible by bn_group_size {self.bn_group_size}")
    dtype = jnp.dtype(self.dtype)
    input_hw = images.shape[1:3]
    conv = functools.partial(_conv, dtype=dtype)
    norm = functools.partial(BatchNorm, mode=self.bn_mode, group_size=self.bn_group_size, dtype=dtype)
    common = dict(conv=conv, norm=norm, remat=self.remat)
    w = self.width

    x = images.astype(dtype)
    x = conv(w, 7, stride=2, padding=3, name="conv1")(x)
    x = norm(name="bn1")(x, train)
    x = nn.relu(x)
    x = max_pool_ceil(x, 3, 2, 1)
    x = ResLayer(w, self.blocks[0], name="layer1", **common)(x, train)
    x = ResLayer(2 * w, self.blocks[1], stride=2, name="layer2", **common)(x, train)
    x = ResLayer(4 * w, self.blocks[2], dilation=2, name="layer3", **common)(x, train)
    head = lambda name: ClassifierModule(self.num_classes, tuple(self.aspp_dilations),
                                         self.aspp_branches, dtype=dtype, name=name)
    aux = head("layer5")(x)
    x = ResLayer(8 * w, self.blocks[3], dilation=4, name="layer4", **common)(x, train)
    main = head("layer6")(x)
    main = resize_bilinear_align_corners(main.astype(jnp.float32), input_hw)
    aux = resize_bilinear_align_corners(aux.astype(jnp.float32), input_hw)
    return main, aux


def feature_size(height: int, width: int) -> tuple[int, int]:
  """(h, w) of the stride-8 feature map (layer3/layer4 output) for an input of height x width."""
  from maxsq_jax.models.layers import ceil_mode_output_size

  def one(n):
    n = (n + 2 * 3 - 7) // 2 + 1  # conv1
    n = ceil_mode_output_size(n, 3, 2, 1)  # maxpool
    return (n - 1) // 2 + 1  # layer2's strided 1x1 conv

  return one(height), one(width)
