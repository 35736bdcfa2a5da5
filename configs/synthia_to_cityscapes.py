"""SYNTHIA-RAND-CITYSCAPES -> Cityscapes, 16 classes: the rows of the paper's SYNTHIA table.

Command (one row; workdirs as the adaptation rows' init_from expects):
  python -m maxsq_jax.main --config=configs/synthia_to_cityscapes.py:<variant> --workdir=workdirs/synthia_<variant>

  variant              stage        starts from                         expected mIoU-16 / mIoU-13
  source_only          source_only  weights/deeplab_resnet101_init      30.1 / 34.3
  source_only_multi    source_only  weights/deeplab_resnet101_init      (the Multi row's starting point)
  minent               adapt        workdirs/synthia_source_only        38.0 / 44.5  (MinEnt†)
  maxsquare (default)  adapt        workdirs/synthia_source_only        39.3 / 45.8
  maxsquare_iw         adapt        workdirs/synthia_source_only        40.4 / 46.9
  maxsquare_iw_multi   adapt        workdirs/synthia_source_only_multi  41.4 / 48.2

16 outputs (the 19 Cityscapes classes without terrain, truck and train); evaluation reports mIoU over
the 16 and over the 13 of them that the older papers use. SYNTHIA train (ids 0-8999) at 1280x760,
Cityscapes at 1024x512; every other setting is the GTA5 table's (configs/gta5_to_cityscapes.py).
docs/experiments.md says what each row runs and which settings are assumed.

Hardware: the reference's single GPU at batch 1 per domain; one accelerator with >= 16 GB (about
11-16 GB at 1280x760). Expected numbers are the old README's; we have not reproduced them.

Smallest TPU slice at its batch (1 per domain): v5e-1 (16 GiB), by estimate: not compiled itself; the
GTA5 step at 1280x720 compiles to 11.8 GiB per v5e chip in float32 (bench/RESULTS.md), and 1280x760
source images add about 5 % of the source activations. Check with python -m maxsq_jax.aot.
"""

from maxsq_jax import paper_table

VARIANTS = paper_table.VARIANTS
DEFAULT_VARIANT = paper_table.DEFAULT_VARIANT

# (mIoU over 16 classes, mIoU over 13 classes).
EXPECTED_MIOU = {
    "source_only": (30.1, 34.3),
    "minent": (38.0, 44.5),
    "maxsquare": (39.3, 45.8),
    "maxsquare_iw": (40.4, 46.9),
    "maxsquare_iw_multi": (41.4, 48.2),
}


def get_config(arg: str | None = None):
  """The ConfigDict of one row; `arg` is one of VARIANTS (None: DEFAULT_VARIANT)."""
  return paper_table.get_config(arg, config_file="configs/synthia_to_cityscapes.py", source="synthia",
                                num_classes=16, source_size=(1280, 760))
