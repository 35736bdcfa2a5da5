"""The reference's training step in PyTorch, written from METHOD.md (§2, §3, §5), for bench/train_step.py.

Model: tests/torch_deeplab.py's DeeplabMulti (the reference's DeepLab-v2, both heads computed and
upsampled with align_corners=True, as the reference's forward does). One step, as solve_gta5.py:
  source forward -> CE(main, ignore -1) -> backward;
  target forward -> lambda_T * MaxSquare(main) = -lambda_T/2 * mean(softmax^2) -> backward;
  SGD (momentum 0.9, weight decay 5e-4 coupled), backbone at lr, heads (layer5, layer6) at 10 lr,
  poly lr set before the step, stem BN affine frozen; BatchNorm in train mode (per-batch statistics).
"""

import os
import sys

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


def make_step(model, lr=2.5e-4, lambda_target=0.1, schedule_steps=29760, power=0.9):
  heads = [p for n, p in model.named_parameters() if n.startswith(("layer5", "layer6"))]
  backbone = [p for n, p in model.named_parameters() if not n.startswith(("layer5", "layer6")) and p.requires_grad]
  optimizer = torch.optim.SGD([{"params": backbone, "lr": lr}, {"params": heads, "lr": 10 * lr}],
                              lr=lr, momentum=0.9, weight_decay=5e-4)

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
