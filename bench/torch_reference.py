"""The reference's training step in PyTorch, for bench/train_step.py.

Model: tests/torch_deeplab.py's DeeplabMulti (the reference's DeepLab-v2, both heads computed and
upsampled with align_corners=True, as the reference's forward does). One step, as solve_gta5.py:
  source forward -> CE(main, ignore -1) -> backward;
  target forward -> lambda_T * MaxSquare(main) = -lambda_T/2 * mean(softmax^2) -> backward;
  SGD (momentum 0.9, weight decay 5e-4 coupled), backbone at lr, heads (layer5, layer6) at 10 lr,
  poly lr set before the step, stem BN affine frozen; BatchNorm in train mode (per-batch statistics).

`rule="reference"` builds the optimiser as the authors' code does (also used by tests/test_optim.py):
the backbone group is `get_1x_lr_params_NOscale`'s walk (each tensor once per enclosing module) and
the step is PyTorch 1.0's SGD (`SGD10`); `rule="nominal"` lists every tensor once under today's
`torch.optim.SGD`.
"""

import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from torch_deeplab import DeeplabMulti  # noqa: E402


def build(num_classes=19, blocks=(3, 4, 23, 3), width=64, channels_last=False):
  model = DeeplabMulti(num_classes, blocks=tuple(blocks), width=width).train()
  for p in model.bn1.parameters():  # The reference freezes the stem BN's affine parameters.
    p.requires_grad_(False)
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
  return model


class SGD10(torch.optim.Optimizer):
  """torch.optim.SGD's step as in PyTorch 1.0.0 (unchanged up to 1.4), momentum without dampening:
  per listed entry, the decay is added into p.grad in place, then one momentum buffer per tensor."""

  def __init__(self, params, lr, momentum, weight_decay):
    super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

  @torch.no_grad()
  def step(self):
    for group in self.param_groups:
      for p in group["params"]:
        if p.grad is None:
          continue
        d_p = p.grad
        d_p.add_(p, alpha=group["weight_decay"])
        state = self.state[p]
        if "momentum_buffer" not in state:
          buf = state["momentum_buffer"] = d_p.clone()
        else:
          buf = state["momentum_buffer"]
          buf.mul_(group["momentum"]).add_(d_p)
        p.add_(buf, alpha=-group["lr"])


def backbone_listing(model):
  """The reference's `get_1x_lr_params_NOscale`: every module under conv1, bn1, layer1..layer4 yields
  its (recursive) parameters, so a tensor is listed once per module that encloses it."""
  for top in (model.conv1, model.bn1, model.layer1, model.layer2, model.layer3, model.layer4):
    for module in top.modules():
      for p in module.parameters():
        if p.requires_grad:
          yield p


def head_listing(model):
  """The reference's `get_10x_lr_params`: layer5's and layer6's parameters, each once."""
  yield from model.layer5.parameters()
  yield from model.layer6.parameters()


def make_optimizer(model, lr=2.5e-4, rule="nominal"):
  """The two param groups (backbone at lr, heads at 10 lr), SGD momentum 0.9, weight decay 5e-4."""
  if rule == "reference":
    groups = [{"params": list(backbone_listing(model)), "lr": lr}, {"params": list(head_listing(model)), "lr": 10 * lr}]
    with warnings.catch_warnings():  # The duplicates are the point; today's torch warns about them.
      warnings.filterwarnings("ignore", message=".*duplicate parameters.*")
      return SGD10(groups, lr=lr, momentum=0.9, weight_decay=5e-4)
  heads = [p for n, p in model.named_parameters() if n.startswith(("layer5", "layer6"))]
  backbone = [p for n, p in model.named_parameters() if not n.startswith(("layer5", "layer6")) and p.requires_grad]
  return torch.optim.SGD([{"params": backbone, "lr": lr}, {"params": heads, "lr": 10 * lr}],
                         lr=lr, momentum=0.9, weight_decay=5e-4)


def make_step(model, lr=2.5e-4, lambda_target=0.1, schedule_steps=29760, power=0.9, rule="nominal"):
  optimizer = make_optimizer(model, lr, rule)

  def step(i, source_image, source_label, target_image):
    scale = (1 - i / schedule_steps) ** power
    optimizer.param_groups[0]["lr"] = lr * scale
    optimizer.param_groups[1]["lr"] = 10 * lr * scale
    optimizer.zero_grad(set_to_none=True)
    main, _ = model(source_image)
    loss_seg = F.cross_entropy(main, source_label, ignore_index=-1)
    loss_seg.backward()
    main_t, _ = model(target_image)
    prob = F.softmax(main_t, dim=1)
    loss_target = -lambda_target * torch.mean(prob ** 2) / 2
    loss_target.backward()
    optimizer.step()
    return loss_seg.detach(), loss_target.detach()

  return step
