"""The config a workdir was trained with, and what a restart may change.

`WORKDIR/config.json` is written once, by the run's first start: the config, library versions and
devices of the steps it trained. `WORKDIR/config_history.jsonl` gets one line per start: the step it
started from, the host, versions, devices and the config changes against the previous start.

A restart compares its config with the one in effect (config.json updated by the recorded changes)
before it writes anything. A change of a field that shapes the train state or its meaning
(STATE_FIELDS: the architecture, the classes, the stage, the optimiser's momentum) is an error naming
each field and both values. How long to run and how often to log, evaluate and save
(RUN_CONTROL_FIELDS) may change freely (num_steps up to optim.schedule_steps, which validation
requires: a longer schedule changes the learning rate of the remaining steps, so it is not run
control); any other change needs `config.allow_config_change=True`.
All changes are recorded in the history, never by rewriting config.json.
"""

from __future__ import annotations

import datetime
import json
import platform
import socket

from etils import epath

from maxsq_jax import jsonfile
from maxsq_jax.config_base import upgrade_flat
from maxsq_jax.errors import CheckpointError, ConfigError

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
# Fields whose change makes the checkpoints another model or optimiser (shapes, labels, state meaning).
STATE_FIELDS = ("stage", "model.num_classes", "model.blocks", "model.width", "model.aspp_dilations",
                "model.aspp_branches", "model.bn_mode", "model.bn_group_size", "loss.multi_level",
                "optim.momentum")
# How long to run and how often to log, evaluate and save: changed freely (a run is extended or
# stopped early this way), and still recorded.
RUN_CONTROL_FIELDS = ("num_steps", "log_every", "eval.every", "checkpoint_every", "max_to_keep",
                      "eval.num_vis_images", "compilation_cache_dir", "profile_steps", "storage.stall_warn_s",
                      "storage.deadline_s")
# Fields that say how to handle the restart itself: never compared.
IGNORED_FIELDS = ("allow_config_change",)


def flatten(config: dict, prefix: str = "") -> dict:
  """{"a.b": value} of a nested config dict; tuples as lists (their JSON form)."""
  out = {}
  for key, value in config.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = list(value) if isinstance(value, tuple) else value
  return out


def config_dict(config) -> dict:
  """The JSON form of a ConfigDict (what config.json stores)."""
  return json.loads(config.to_json_best_effort())


def run_info(config) -> dict:
  """config.json's content: the config, library versions, devices."""
  import flax
  import jax
  import jaxlib
  import numpy as np
  import optax
  import orbax.checkpoint as ocp
  return {
      "config": config_dict(config),
      "versions": {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
                   "flax": flax.__version__, "optax": optax.__version__, "orbax": ocp.__version__,
                   "numpy": np.__version__},
      "devices": [str(d) for d in jax.devices()],
      "process_count": jax.process_count(),
  }


def stored_config(path) -> dict:
  """The "config" object of the config.json at `path` (nested, as written); CheckpointError naming the
  file when it has none."""
  info = jsonfile.read(path)
  config = info.get("config") if isinstance(info, dict) else None
  if not isinstance(config, dict) or not config:
    raise CheckpointError(f"{path} has no \"config\" object (damaged, or not a maxsq_jax run's config.json): "
                          "restore it from a copy, or delete it and rerun with the config the run was trained "
                          "with (it is written again)")
  return config


def config_in_effect(workdir) -> dict | None:
  """The flattened config of the workdir's latest start, in the current schema's keys (a workdir
  written under older key names is read as is: config_base.upgrade_flat), or None for a new workdir."""
  workdir = epath.Path(workdir)
  if not (workdir / CONFIG_FILE).exists():
    return None
  stored = upgrade_flat(flatten(stored_config(workdir / CONFIG_FILE)))
  for entry in read_history(workdir):
    stored.update(upgrade_flat({key: new for key, (_, new) in entry.get("changes", {}).items()}))
  return stored


def read_history(workdir) -> list[dict]:
  path = epath.Path(workdir) / HISTORY_FILE
  if not path.exists():
    return []
  entries = []
  for number, line in enumerate(path.read_text().splitlines(), 1):
    if line.strip():
      try:
        entries.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} line {number} is corrupt ({e}); fix or remove that line") from None
  return entries


def changes(config, workdir) -> dict:
  """{field: [value in effect, new value]} of a restart in `workdir`; {} for a new workdir.

  Raises ConfigError naming every state-shaping change, or the changes outside RUN_CONTROL_FIELDS
  when config.allow_config_change is False.
  """
  stored = config_in_effect(workdir)
  if stored is None:
    return {}
  new = flatten(config_dict(config))
  diff = {key: [stored.get(key), new.get(key)] for key in sorted(set(stored) | set(new))
          if key not in IGNORED_FIELDS and stored.get(key) != new.get(key)}
  listing = lambda keys: "; ".join(f"config.{k}: {diff[k][0]!r} in {workdir} -> {diff[k][1]!r} now" for k in keys)
  shaping = [k for k in diff if k in STATE_FIELDS]
  if shaping:
    raise ConfigError(f"the workdir's checkpoints were trained with another model or optimiser: {listing(shaping)}. "
                      "Use a new --workdir for this config (or go back to the stored values).")
  other = [k for k in diff if k not in RUN_CONTROL_FIELDS]
  if other and not config.get("allow_config_change", False):
    raise ConfigError(f"the config differs from the one {workdir} was trained with: {listing(other)}. Go back to "
                      "the stored values, or pass --config.allow_config_change=True to resume with the new ones "
                      f"(recorded in {HISTORY_FILE}).")
  return diff


def record_start(config, workdir, step: int, diff: dict) -> None:
  """Writes config.json on the first start and appends this start to config_history.jsonl (process 0)."""
  workdir = epath.Path(workdir)
  info = run_info(config)
  if not (workdir / CONFIG_FILE).exists():
    jsonfile.write(workdir / CONFIG_FILE, info)
  entry = {"step": int(step), "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "host": socket.gethostname(), "changes": diff, "versions": info["versions"],
           "devices": info["devices"], "process_count": info["process_count"]}
  path = workdir / HISTORY_FILE
  previous = path.read_text() if path.exists() else ""
  jsonfile.write_text_atomic(path, previous + json.dumps(entry) + "\n")
