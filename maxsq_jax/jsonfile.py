"""JSON files of a workdir (config.json, results.json, summary.json, ...): written atomically, read
with errors that name the file. Paths may be local or gs:// (etils.epath).

A write goes to a temporary name in the same directory and is then renamed over the target, so a
process killed mid-write leaves either the old file or the new one, never a truncated one (on
gs://, where an upload is all or nothing, it goes to the target directly).
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath

from maxsq_jax import paths
from maxsq_jax.errors import CheckpointError


def write_text_atomic(path, text: str) -> None:
  """Writes `text` to `path` through a temporary file renamed over it."""
  path = epath.Path(path)
  if paths.is_remote(path):
    # A Cloud Storage object appears whole when its upload completes, or not at all: no rename
    # (which the storage API does as a copy and a delete).
    path.write_text(text)
    return
  temporary = path.parent / f".{path.name}.tmp-{os.getpid()}"
  temporary.write_text(text)
  temporary.replace(path)


def write(path, value: Any, indent: int | None = 2) -> None:
  """Writes `value` as JSON to `path`, atomically."""
  write_text_atomic(path, json.dumps(value, indent=indent))


def read(path) -> Any:
  """The JSON value in `path`; CheckpointError naming the file when it is missing, truncated or corrupt."""
  path = epath.Path(path)
  try:
    text = path.read_text()
  except FileNotFoundError:
    raise CheckpointError(f"{path} does not exist") from None
  except UnicodeDecodeError as e:
    raise CheckpointError(f"{path} is not a JSON text file ({e}); it is corrupt") from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is truncated or corrupt ({e}); restore it from a copy, or delete it "
                          "and re-run the step that writes it") from None
