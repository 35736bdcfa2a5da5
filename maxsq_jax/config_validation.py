"""`validate(config, device_count)`: every field of the schema (config_base.py) checked before any work.

Keys: every key of the config is one of the schema's and every schema key is there (`schema_problems`;
a mistyped key is named with the closest real one). Enumerations (with the closest allowed value suggested), integer and float ranges, finiteness, and
relations between fields (batch sizes divisible by the device count, a poly schedule at least as long
as the run). All problems are reported together in one ConfigError, each naming the key, the value
and what is allowed.
"""

from __future__ import annotations

import math
from typing import Any

from maxsq_jax.data import registry
from maxsq_jax.errors import ConfigError, did_you_mean

STAGES = ("source_only", "adapt", "source_then_adapt", "adabn", "source_then_adabn")
ADABN_ACCUMULATIONS = ("cumulative", "momentum")
BN_MODES = ("train", "frozen", "sync")
DTYPES = ("float32", "bfloat16")
DATA_NORMALIZATIONS = ("bgr_mean", "rgb_mean_std")
LOSS_NORMALIZATIONS = ("reference", "pixel")
OPTIM_RULES = ("reference", "nominal")  # optim.RULES (not imported: that pulls in optax and the model).
NUM_CLASSES = (19, 16, 13)
PROTOCOLS = ("reference", "reference_flip", "full", "full_flip")


def schema_keys() -> list[str]:
  """Every dotted key of the schema, sections included ("optim", "optim.lr", ...), read from
  config_base.base_config() so that a field added there is known here."""
  from maxsq_jax.config_base import base_config
  return _keys(base_config())


def _keys(node, prefix: str = "") -> list[str]:
  keys = []
  for key, value in node.items():
    keys.append(prefix + key)
    if hasattr(value, "items"):
      keys.extend(_keys(value, f"{prefix}{key}."))
  return keys


def unknown_key_hint(key: str, known: list[str]) -> str:
  """' (did you mean X?)' for an unknown dotted key: a known key with the same last part (`lr` ->
  'optim.lr'), else the closest spelling, else ''."""
  leaf = key.rsplit(".", 1)[-1]
  same_leaf = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
  return f" (did you mean {same_leaf[0]!r}?)" if same_leaf else did_you_mean(key, known)


def schema_problems(config) -> list[str]:
  """The keys of `config` that the schema does not have (each with the closest key) and the schema's
  keys that `config` lacks, as `config.KEY: what is wrong` strings; [] when the keys match. Below a
  key that is reported, nothing more is."""
  from maxsq_jax.config_base import RENAMED
  known = schema_keys()
  present = _keys(config)
  parent = lambda key: key.rsplit(".", 1)[0] if "." in key else None
  problems = []
  for key in present:
    if key in known or parent(key) not in (None, *known):
      continue
    if key in RENAMED:
      problems.append(f"config.{key}: this key is now config.{RENAMED[key]} (the evaluation settings are "
                      "grouped in config.eval)")
    else:
      problems.append(f"config.{key}: no such config key{unknown_key_hint(key, known)}")
  missing = [k for k in known if k not in present and parent(k) in (None, *present)]
  if missing:
    problems.append(f"config lacks {', '.join(missing)}: start from maxsq_jax.config_base.base_config()")
  return problems


class _Checker:
  """Collects problems as `key=value: what is allowed` strings."""

  def __init__(self, config):
    self.config = config
    self.problems: list[str] = []

  def get(self, key: str) -> Any:
    node = self.config
    for part in key.split("."):
      node = node[part]
    return node

  def fail(self, key: str, value, allowed: str) -> None:
    self.problems.append(f"config.{key}={value!r}: {allowed}")

  def choice(self, key: str, allowed) -> None:
    value = self.get(key)
    if value not in allowed:
      self.fail(key, value, f"use one of {', '.join(map(str, allowed))}{did_you_mean(value, allowed)}")

  def integer(self, key: str, low: int, high: int | None = None, value=None) -> bool:
    value = self.get(key) if value is None else value
    if isinstance(value, bool) or not isinstance(value, int):
      self.fail(key, value, "must be an integer")
      return False
    if value < low or (high is not None and value > high):
      self.fail(key, value, f"must be >= {low}" if high is None else f"must be in [{low}, {high}]")
      return False
    return True

  def number(self, key: str, low: float, high: float | None = None, low_open: bool = False,
             high_open: bool = False) -> None:
    value = self.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      self.fail(key, value, "must be a number")
      return
    if not math.isfinite(value):
      self.fail(key, value, "must be finite")
      return
    too_low = value <= low if low_open else value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
      lo = f"{'(' if low_open else '['}{low}"
      hi = f"{high}{')' if high_open else ']'}" if high is not None else "inf)"
      self.fail(key, value, f"must be in {lo}, {hi}")

  def size(self, key: str) -> None:
    value = self.get(key)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
      self.fail(key, value, "must be (width, height), two integers >= 1")


def validate(config, device_count: int | None = None, training: bool = True) -> None:
  """Raises ConfigError listing every invalid field of `config`; `device_count` (the global number
  of devices, when known) checks that the batch sizes split evenly over the devices (the training
  batch only when `training`)."""
  problems = schema_problems(config)
  if problems:  # The field checks below would stop at a missing key.
    raise ConfigError("; ".join(problems) + "; the schema is maxsq_jax/config_base.py")
  c = _Checker(config)
  c.choice("stage", STAGES)
  c.integer("seed", -2**63)
  c.integer("num_steps", 1)
  c.integer("optim.schedule_steps", 1)
  if isinstance(config.num_steps, int) and config.optim.schedule_steps < config.num_steps:
    c.fail("optim.schedule_steps", config.optim.schedule_steps,
           f"must be >= config.num_steps ({config.num_steps}): the poly schedule's learning rate would be 0 "
           "for the last steps")
  if config.stage in ("source_then_adapt", "source_then_adabn"):
    c.integer("pretrain.num_steps", 1)
    c.integer("pretrain.schedule_steps", 1)
    if config.pretrain.schedule_steps < config.pretrain.num_steps:
      c.fail("pretrain.schedule_steps", config.pretrain.schedule_steps,
             f"must be >= config.pretrain.num_steps ({config.pretrain.num_steps})")
  for key in ("log_every", "checkpoint_every", "max_to_keep", "batch_size", "eval.batch_size"):
    c.integer(key, 1)
  for key in ("eval.every", "eval.num_vis_images"):
    c.integer(key, 0)

  c.choice("model.num_classes", NUM_CLASSES)
  blocks = config.model.blocks
  if (not isinstance(blocks, (tuple, list)) or len(blocks) != 4
      or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in blocks)):
    c.fail("model.blocks", blocks, "must be 4 integers >= 1 (bottlenecks per ResNet stage)")
  c.integer("model.width", 1)
  dilations = config.model.aspp_dilations
  if (not isinstance(dilations, (tuple, list)) or not dilations
      or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dilations)):
    c.fail("model.aspp_dilations", dilations, "must be one or more integers >= 1")
  else:
    c.integer("model.aspp_branches", 1, len(dilations))
  c.choice("model.bn_mode", BN_MODES)
  c.integer("model.bn_group_size", 1)
  c.choice("model.dtype", DTYPES)

  c.choice("data.source", registry.NAMES)
  c.choice("data.target", registry.NAMES)
  for key in ("data.source_size", "data.target_size", "eval.size", "data.synthetic_size"):
    c.size(key)
  if tuple(config.eval.full_size) != ():
    c.size("eval.full_size")
  lo_hi = config.data.scale_range
  if (not isinstance(lo_hi, (tuple, list)) or len(lo_hi) != 2
      or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in lo_hi) or not 0 < lo_hi[0] <= lo_hi[1]):
    c.fail("data.scale_range", lo_hi, "must be (low, high) with 0 < low <= high")
  c.choice("data.normalization", DATA_NORMALIZATIONS)
  for key in ("data.workers", "data.threads", "data.prefetch"):
    c.integer(key, 0)
  if config.eval.num_images != -1:
    c.integer("eval.num_images", 1)
  c.integer("data.synthetic_num_train", 1)
  c.integer("data.synthetic_num_val", 1)
  c.number("data.synthetic_class_hue_deg", 0, 180)
  if config.adabn.num_images != -1:
    c.integer("adabn.num_images", 1)
  c.integer("adabn.batch_size", 1)
  c.choice("adabn.accumulation", ADABN_ACCUMULATIONS)
  if not isinstance(config.adabn.after_adapt, bool):
    c.fail("adabn.after_adapt", config.adabn.after_adapt, "must be True or False")
  if config.stage == "adabn" and not config.init_from:
    c.fail("init_from", config.init_from, "stage 'adabn' re-estimates the statistics of a trained model: name it "
           "(a run's workdir or converted weights)")

  _check_target_loss(c)
  c.number("loss.lambda_target", 0)
  c.number("loss.lambda_seg", 0)
  c.number("loss.iw_ratio", 0, 1, low_open=True)
  c.number("loss.threshold", 0, 1)
  c.choice("loss.normalization", LOSS_NORMALIZATIONS)

  c.number("optim.lr", 0, low_open=True)
  c.number("optim.momentum", 0, 1, high_open=True)
  c.number("optim.weight_decay", 0)
  c.number("optim.poly_power", 0)
  c.number("optim.head_lr_mult", 0, low_open=True)
  c.choice("optim.rule", OPTIM_RULES)
  c.number("storage.stall_warn_s", 0, low_open=True)
  c.number("storage.deadline_s", 0, low_open=True)

  protocols = config.eval.protocols
  if isinstance(protocols, str) or not protocols:
    c.fail("eval.protocols", protocols, f"must be a non-empty tuple of {', '.join(PROTOCOLS)}")
  else:
    for name in protocols:
      if name not in PROTOCOLS:
        c.fail("eval.protocols", tuple(protocols), f"{name!r} is not one of {', '.join(PROTOCOLS)}"
               f"{did_you_mean(name, PROTOCOLS)}")

  if not isinstance(config.compilation_cache_dir, str):
    c.fail("compilation_cache_dir", config.compilation_cache_dir, "must be a directory or gs:// URL, or '' (off)")
  from maxsq_jax import profiling  # Here, not at the top: it imports jax.
  try:
    profiling.parse_steps(config.profile_steps)
  except ConfigError as e:
    c.problems.append(str(e))

  if device_count is not None:
    for key in ("batch_size", "eval.batch_size", "adabn.batch_size") if training else ("eval.batch_size",):
      value = c.get(key)
      if isinstance(value, int) and value >= 1 and value % device_count:
        c.fail(key, value, f"is the GLOBAL batch and must be divisible by the number of devices ({device_count})")
  if (config.model.bn_mode == "train" and isinstance(config.batch_size, int)
      and isinstance(config.model.bn_group_size, int) and config.model.bn_group_size >= 1
      and config.batch_size % config.model.bn_group_size):
    c.fail("model.bn_group_size", config.model.bn_group_size,
           f"must divide config.batch_size ({config.batch_size}) in bn_mode 'train'")
  if c.problems:
    raise ConfigError("; ".join(c.problems))


def _check_target_loss(c: _Checker) -> None:
  """A built-in name, or a user's "module:function" that imports and, traced on abstract logits,
  returns a float scalar (losses.check_target_loss)."""
  from maxsq_jax import losses  # Imports a user's "module:function" loss, which must be importable.
  value = c.config.loss.target
  try:
    fn = losses.resolve_target_loss(value)
  except ValueError as e:  # Its message lists the built-ins and suggests the closest.
    c.fail("loss.target", value, str(e))
    return
  if fn in losses.BUILTIN_TARGET_LOSSES.values():
    return
  from maxsq_jax import objective
  num_classes = c.config.model.num_classes if c.config.model.num_classes in NUM_CLASSES else NUM_CLASSES[0]
  try:
    losses.check_target_loss(fn, objective.target_loss_options(c.config.loss, fn), num_classes)
  except ValueError as e:
    c.fail("loss.target", value, str(e))
