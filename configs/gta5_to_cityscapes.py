"""GTA5 -> Cityscapes, 19 classes: the rows of the paper's main table.

Command (one row; workdirs as the adaptation rows' init_from expects):
  python -m maxsq_jax.main --config=configs/gta5_to_cityscapes.py:<variant> --workdir=workdirs/gta5_<variant>

  variant              stage        starts from                         expected mIoU (README)
  source_only          source_only  weights/deeplab_resnet101_init      36.9
  source_only_multi    source_only  weights/deeplab_resnet101_init      (the Multi row's starting point)
  minent               adapt        workdirs/gta5_source_only           42.2  (MinEnt†)
  maxsquare (default)  adapt        workdirs/gta5_source_only           44.3
  maxsquare_iw         adapt        workdirs/gta5_source_only           45.2
  maxsquare_iw_multi   adapt        workdirs/gta5_source_only_multi     46.4

Source images at 1280x720, Cityscapes at 1024x512 (the Multi row: 1280x640, also evaluated there).
docs/experiments.md says what each row runs and which reference flags it follows.

Hardware: the reference's single GPU at batch 1 per domain; one accelerator with >= 16 GB (ResNet-101
at 1280x720 in training needs about 11-16 GB). Expected numbers are the reference's README values on
Cityscapes val at 1024x512; we have not reproduced them.

Smallest TPU slice at its batch (1 per domain): v5e-1, one v5e chip of 16 GiB. Compiled ahead of time
for v5e-8 at one image per chip (python -m maxsq_jax.aot; bench/RESULTS.md, the compiler's figures):
the MaxSquare train step needs 11.8 GiB per chip in float32, 6.7 GiB in bfloat16.
"""

from maxsq_jax import paper_table

VARIANTS = paper_table.VARIANTS
DEFAULT_VARIANT = paper_table.DEFAULT_VARIANT

EXPECTED_MIOU = {
    "source_only": 36.9,
    "minent": 42.2,
    "maxsquare": 44.3,
    "maxsquare_iw": 45.2,
    "maxsquare_iw_multi": 46.4,
}


def get_config(arg: str | None = None):
  """The ConfigDict of one row; `arg` is one of VARIANTS (None: DEFAULT_VARIANT)."""
  return paper_table.get_config(arg, config_file="configs/gta5_to_cityscapes.py", source="gta5", num_classes=19,
                                source_size=(1280, 720))
