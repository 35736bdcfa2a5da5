"""PyTorch reference of the reference's `DeeplabMulti` (docs/method.md, Model and weight files), used only by tests.

Written from the spec: Caffe-style ResNet bottlenecks (stride on the first 1x1 conv), ceil-mode
max pool, dilations 2/4 in layer3/4, downsample on the first block of every stage, two ASPP heads
(layer5 on layer3, layer6 on layer4) with the early return that sums only the first two branches
(`aspp_branches=2`; 4 gives the intended sum), align_corners=True upsampling, returns (main, aux).
Key names match the released state dicts (`conv1.weight`, `layer3.22.bn2.running_var`,
`layer6.conv2d_list.3.bias`, ...). Configurable depth/width/classes for fast tests.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=dilation, bias=False,
                           dilation=dilation)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    residual = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
      residual = self.downsample(x)
    return self.relu(out + residual)


class ClassifierModule(nn.Module):

  def __init__(self, inplanes, dilations, num_classes, branches=2):
    super().__init__()
    self.branches = branches
    self.conv2d_list = nn.ModuleList([
        nn.Conv2d(inplanes, num_classes, kernel_size=3, stride=1, padding=d, dilation=d, bias=True)
        for d in dilations
    ])
    for m in self.conv2d_list:
      m.weight.data.normal_(0, 0.01)

  def forward(self, x):
    out = self.conv2d_list[0](x)
    for i in range(self.branches - 1):
      out = out + self.conv2d_list[i + 1](x)
    return out


class DeeplabMulti(nn.Module):

  def __init__(self, num_classes, blocks=(3, 4, 23, 3), width=64, aspp_branches=2,
               dilations=(6, 12, 18, 24)):
    super().__init__()
    self.inplanes = width
    self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=True)
    self.layer1 = self._make_layer(width, blocks[0])
    self.layer2 = self._make_layer(width * 2, blocks[1], stride=2)
    self.layer3 = self._make_layer(width * 4, blocks[2], stride=1, dilation=2)
    self.layer4 = self._make_layer(width * 8, blocks[3], stride=1, dilation=4)
    self.layer5 = ClassifierModule(width * 16, dilations, num_classes, aspp_branches)
    self.layer6 = ClassifierModule(width * 32, dilations, num_classes, aspp_branches)

  def _make_layer(self, planes, blocks, stride=1, dilation=1):
    downsample = nn.Sequential(
        nn.Conv2d(self.inplanes, planes * 4, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(planes * 4))
    layers = [Bottleneck(self.inplanes, planes, stride, dilation=dilation, downsample=downsample)]
    self.inplanes = planes * 4
    for _ in range(1, blocks):
      layers.append(Bottleneck(self.inplanes, planes, dilation=dilation))
    return nn.Sequential(*layers)

  def forward(self, x):
    size = x.shape[2:]
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer3(self.layer2(self.layer1(x)))
    aux = F.interpolate(self.layer5(x), size=size, mode="bilinear", align_corners=True)
    main = F.interpolate(self.layer6(self.layer4(x)), size=size, mode="bilinear", align_corners=True)
    return main, aux


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
  """Random conv weights (He-scaled), BN affine and non-trivial running statistics, in place."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        if m.bias is not None:
          m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
      elif isinstance(m, nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(0.5 + 0.5 * torch.rand(c, generator=g))
        m.bias.copy_(0.2 * torch.randn(c, generator=g))
        m.running_mean.copy_(0.3 * torch.randn(c, generator=g))
        m.running_var.copy_(0.5 + torch.rand(c, generator=g))
        m.num_batches_tracked.fill_(1234)
  return model
