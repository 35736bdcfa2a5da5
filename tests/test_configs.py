"""Every config file in configs/ builds; the paper-experiment configs carry the spec's hyper-parameters."""

import glob
import importlib.util
import os

import ml_collections
import pytest

from maxsq_jax import objective, run_config
from maxsq_jax.config_base import RENAMED, base_config, upgrade_flat
from tests.helpers import before_eval_section

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
                      if os.path.basename(p) != "__init__.py")
PAPER_FILES = ("gta5_to_cityscapes.py", "synthia_to_cityscapes.py", "cityscapes_to_crosscity.py")


def load(path):
  name = "config_under_test_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def cases():
  out = []
  for path in CONFIG_FILES:
    module = load(path)
    for variant in getattr(module, "VARIANTS", (None,)):
      out.append(pytest.param(path, variant, id=f"{os.path.basename(path)}:{variant}"))
  return out


def paper(name, variant):
  return load(os.path.join(CONFIG_DIR, name)).get_config(variant)


def keys(d, prefix=""):
  out = set()
  for k, v in d.items():
    out.add(prefix + k)
    if isinstance(v, (dict, ml_collections.ConfigDict)):
      out |= keys(v, prefix + k + ".")
  return out


def test_keys_of_the_flat_eval_settings_are_renamed_into_the_eval_section():
  schema = run_config.flatten(run_config.config_dict(base_config()))
  assert set(RENAMED.values()) == {k for k in schema if k.startswith("eval.")}
  assert not set(RENAMED) & set(schema)
  config = load(os.path.join(CONFIG_DIR, "demo.py")).get_config("tiny")
  current = run_config.flatten(run_config.config_dict(config))
  assert upgrade_flat(run_config.flatten(before_eval_section(run_config.config_dict(config)))) == current


def test_paper_configs_exist():
  names = {os.path.basename(p) for p in CONFIG_FILES}
  assert set(PAPER_FILES) <= names


@pytest.mark.parametrize("path,variant", cases())
def test_every_variant_builds(path, variant):
  config = load(path).get_config(variant)
  assert isinstance(config, ml_collections.ConfigDict)
  if os.path.basename(path) in PAPER_FILES:
    # Only fields of the schema, and a loss the objective accepts.
    assert keys(config.to_dict()) == keys(base_config().to_dict())
    objective.make_objective(config.loss)
    config.lock()
    # The paper's rows train with the authors' optimiser (source-only pre-training included).
    assert config.optim.rule == "reference"
  elif os.path.basename(path) == "demo.py":
    assert config.optim.rule == "nominal"  # The README's demo table was measured with it.


@pytest.mark.parametrize("name", PAPER_FILES)
def test_unknown_variant_is_an_error_listing_variants(name):
  module = load(os.path.join(CONFIG_DIR, name))
  with pytest.raises(ValueError) as e:
    module.get_config("maxsqaure")
  for v in module.VARIANTS:
    assert v in str(e.value)


@pytest.mark.parametrize("name", PAPER_FILES)
def test_docstring_and_default(name):
  """Each paper config's docstring gives the command, the hardware and every expected mIoU; docs/experiments.md
  describes every row."""
  module = load(os.path.join(CONFIG_DIR, name))
  doc = module.__doc__
  assert f"python -m maxsq_jax.main --config=configs/{name}:" in doc and "--workdir=" in doc
  assert "Hardware" in doc and "GB" in doc
  expected = [v for value in module.EXPECTED_MIOU.values()
              for v in (value.values() if isinstance(value, dict) else value if isinstance(value, tuple) else [value])]
  assert len(expected) >= 5
  for value in expected:
    assert f"{value:.1f}" in doc
  with open(os.path.join(os.path.dirname(CONFIG_DIR), "docs", "experiments.md")) as f:
    experiments = f.read()
  assert f"configs/{name}" in experiments
  for v in module.VARIANTS:
    assert f"`{v.partition('_')[2] if name == 'cityscapes_to_crosscity.py' else v}`" in experiments
  assert module.get_config(None).to_dict() == module.get_config(module.DEFAULT_VARIANT).to_dict()


@pytest.mark.parametrize("variant", load(os.path.join(CONFIG_DIR, "gta5_to_cityscapes.py")).VARIANTS)
def test_gta5_and_synthia_rows_differ_only_in_the_source(variant):
  """One helper builds both tables: a row differs between them only in the source dataset, its image
  size, the class count and the source model it starts from."""
  gta5, synthia = paper("gta5_to_cityscapes.py", variant), paper("synthia_to_cityscapes.py", variant)
  for c, source, classes, size in ((gta5, "gta5", 19, (1280, 720)), (synthia, "synthia", 16, (1280, 760))):
    assert (c.data.source, c.model.num_classes, c.data.source_size) == (source, classes, size)
    assert c.init_from == ("weights/deeplab_resnet101_init" if variant.startswith("source_only")
                           else f"workdirs/{source}_source_only" + ("_multi" if "multi" in variant else ""))
    c.data.source, c.model.num_classes, c.data.source_size, c.init_from = "x", 0, (0, 0), ""
  assert gta5.to_dict() == synthia.to_dict()


@pytest.mark.parametrize("name", ["gta5_to_cityscapes.py", "synthia_to_cityscapes.py"])
def test_source_pretraining(name):
  for variant, multi in [("source_only", False), ("source_only_multi", True)]:
    c = paper(name, variant)
    assert c.stage == "source_only"
    assert c.num_steps == 80_000 and c.optim.schedule_steps == 200_000
    assert c.loss.multi_level is multi and c.loss.lambda_seg == 0.1
  assert paper("gta5_to_cityscapes.py", "source_only").data.source_size == (1280, 720)
  assert paper("synthia_to_cityscapes.py", "source_only").data.source_size == (1280, 760)


@pytest.mark.parametrize("name,classes,source", [("gta5_to_cityscapes.py", 19, "gta5"),
                                                 ("synthia_to_cityscapes.py", 16, "synthia")])
def test_adaptation_rows(name, classes, source):
  expected_target = {"minent": "entropy", "maxsquare": "max_square", "maxsquare_iw": "iw_max_square",
                     "maxsquare_iw_multi": "iw_max_square"}
  for variant, target in expected_target.items():
    c = paper(name, variant)
    assert c.stage == "adapt"
    assert c.model.num_classes == classes
    assert c.data.source == source and c.data.target == "cityscapes"
    assert c.loss.target == target
    assert c.num_steps == 29_750 and c.optim.schedule_steps == 29_760
    assert c.eval.every == 2_975 and c.optim.rule == "reference"
    assert c.batch_size == 1
    assert c.optim.lr == 2.5e-4 and c.optim.momentum == 0.9 and c.optim.weight_decay == 5e-4
    assert c.optim.poly_power == 0.9 and c.optim.head_lr_mult == 10.0
    assert c.loss.iw_ratio == 0.2 and c.loss.normalization == "reference"
    assert c.init_from  # Adaptation always starts from a source model.
    if variant == "maxsquare_iw_multi":
      assert c.loss.multi_level is True
      assert c.loss.lambda_target == 0.09 and c.loss.lambda_seg == 0.1 and c.loss.threshold == 0.95
      assert c.data.target_size == (1280, 640)
      assert "multi" in c.init_from
    else:
      assert c.loss.multi_level is False
      assert c.loss.lambda_target == 0.1
      assert c.data.target_size == (1024, 512)
      assert c.eval.size == (1024, 512)


def test_crosscity_rows():
  name = "cityscapes_to_crosscity.py"
  module = load(os.path.join(CONFIG_DIR, name))
  assert len(module.VARIANTS) == 12
  for city in ("rome", "rio", "tokyo", "taipei"):
    for method, target in [("maxsquare", "max_square"), ("maxsquare_iw", "iw_max_square")]:
      c = module.get_config(f"{city}_{method}")
      assert c.stage == "adapt" and c.loss.target == target
      assert c.model.num_classes == 13
      assert c.data.source == "cityscapes" and c.data.target == city
      assert c.data.source_size == c.data.target_size == c.eval.size == (1024, 512)
      assert c.eval.split == "test"
      assert c.loss.threshold == 0.98 and c.loss.lambda_target == 0.1 and c.loss.iw_ratio == 0.2
      assert c.num_steps == 29_750 and c.optim.schedule_steps == 29_760 and not c.loss.multi_level
    c = module.get_config(f"{city}_source_only")
    assert c.stage == "source_only" and c.model.num_classes == 13 and c.data.target == city
  # One source model for all cities: the source_only variants differ only in the evaluated city.
  a, b = module.get_config("rome_source_only").to_dict(), module.get_config("tokyo_source_only").to_dict()
  for d in (a, b):
    d["data"].pop("target"), d["data"].pop("target_dir")
  assert a == b
