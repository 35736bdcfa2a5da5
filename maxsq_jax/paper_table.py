"""The rows of the paper's synthetic -> Cityscapes tables (GTA5 and SYNTHIA sources), one function for both.

configs/gta5_to_cityscapes.py and configs/synthia_to_cityscapes.py each call `get_config` with their
source dataset; base_config() already holds the reference's adaptation settings (GTA5 -> Cityscapes,
batch 1, SGD 0.9, lr 2.5e-4 with heads 10x, weight decay 5e-4, poly 0.9, 29,750 of 29,760 steps,
lambda_T 0.1, IW ratio 0.2), so a row states only what differs. docs/experiments.md describes each row.
"""

import ml_collections

from maxsq_jax.config_base import base_config

VARIANTS = ("source_only", "source_only_multi", "minent", "maxsquare", "maxsquare_iw", "maxsquare_iw_multi")
DEFAULT_VARIANT = "maxsquare"
TARGET_LOSSES = {"minent": "entropy", "maxsquare": "max_square", "maxsquare_iw": "iw_max_square",
                 "maxsquare_iw_multi": "iw_max_square"}

# Conventional locations; override with --config.init_from=... on the command line.
DEEPLAB_INIT = "weights/deeplab_resnet101_init"


def source_workdir(source: str, multi: bool = False) -> str:
  """Where the source-only row of `source` trains (the adaptation rows' init_from)."""
  return f"workdirs/{source}_source_only{'_multi' if multi else ''}"


def get_config(arg: str | None, *, config_file: str, source: str, num_classes: int,
               source_size: tuple[int, int]) -> ml_collections.ConfigDict:
  """The ConfigDict of row `arg` (one of VARIANTS; None or "": DEFAULT_VARIANT) of `config_file`'s table:
  `source` (a data/registry.py name) -> Cityscapes with `num_classes` outputs, source images resized
  to `source_size` (W, H)."""
  variant = DEFAULT_VARIANT if arg in (None, "") else arg
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {arg!r} of {config_file}; choose one of: {', '.join(VARIANTS)}.")
  multi = variant.endswith("_multi")
  c = base_config()
  c.model.num_classes = num_classes
  c.data.source = source
  c.data.source_size = source_size
  c.loss.multi_level = multi
  if variant.startswith("source_only"):
    c.stage = "source_only"
    c.num_steps = 80_000  # The reference README's --iter_stop 80000 of --iter_max 200000.
    c.optim.schedule_steps = 200_000
    c.eval.every = 5_000  # The reference's pretraining "epoch" (min(len, 5000) iterations).
    c.checkpoint_every = 5_000
    c.init_from = DEEPLAB_INIT
    return c
  c.loss.target = TARGET_LOSSES[variant]
  c.checkpoint_every = 2_975  # Once per epoch of the 2975 Cityscapes train images, as the evaluation.
  c.init_from = source_workdir(source, multi)
  if multi:
    c.loss.lambda_target = 0.09
    c.data.target_size = c.eval.size = (1280, 640)
  return c
