"""Converts a reference PyTorch DeepLab-v2 .pth to a maxsq_jax converted-weights directory.

  python -m maxsq_jax.tools.convert_torch INPUT.pth OUTPUT_DIR [--num_classes 19] [--overwrite]

INPUT.pth: the DeepLab-v2 init (`DeepLab_resnet_pretrained_init-f81d91e8.pth`), a reference training
checkpoint (`gta5final.pth`, `..._maxsquarebest.pth`) or a bare state dict; a tensor holding NaN or
inf is an error naming it. OUTPUT_DIR receives `variables/` (orbax StandardCheckpointer) and
`conversion_report.json` (with a CRC-32 of every array, checked whenever the folder is read; a
local path or a gs://BUCKET/PATH URL); use it as
`--config.init_from=OUTPUT_DIR`. Heads whose class count differs from --num_classes (and the
init's PASCAL `layer5`) are skipped and get a fresh init when training starts.
"""

from __future__ import annotations

import os

from absl import app, flags

from maxsq_jax import cli, paths
from maxsq_jax.errors import ConfigError, WeightsError
from maxsq_jax.models import convert

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags (cli.run defines them when this module runs as a program)."""
  flags.DEFINE_integer("num_classes", 19, "Classes of the model: heads of another class count are skipped.")
  flags.DEFINE_bool("overwrite", False, "Replace the variables/ and report of a non-empty OUTPUT_DIR.")
  flags.DEFINE_bool("allow_missing", False, "Accept state dicts lacking backbone variables (they get a fresh "
                    "init when training starts).")


def format_report(report: dict) -> str:
  lines = [
      f"layout: {report['layout']} (prefix {report['prefix']!r}); blocks {tuple(report['blocks'])}, "
      f"width {report['width']}, num_classes {report['num_classes']}",
      f"used: {len(report['used'])} keys",
      f"skipped: {len(report['skipped'])} keys",
  ]
  reasons: dict[str, list[str]] = {}
  for key, why in report["skipped"].items():
    reasons.setdefault(why, []).append(key)
  for why, keys in reasons.items():
    lines.append(f"  {len(keys)} x {why}: e.g. {keys[0]}")
  lines.append(f"missing (fresh init when training starts): {len(report['missing'])} variables")
  modules = sorted({p.rsplit("/", 1)[0] for p in report["missing"]})
  for m in modules:
    lines.append(f"  {m}")
  return "\n".join(lines)


def load_pth(path: str):
  """The object stored in a .pth file, unpickled with PyTorch's weights-only loader: tensors,
  containers, numbers and strings (plus the few numpy scalar types that training checkpoints hold,
  e.g. `best_MIou`). A file that would construct any other object, or run code, is refused."""
  import numpy as np
  import torch
  numpy_scalars = [np._core.multiarray.scalar, np.dtype, np.dtypes.Float64DType, np.dtypes.Float32DType,
                   np.dtypes.Int64DType, np.dtypes.Int32DType]
  try:
    with torch.serialization.safe_globals(numpy_scalars):
      return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # A hostile or garbled file fails anywhere in the unpickler (IndexError, ...).
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise WeightsError(f"{path} is not a PyTorch weights file that can be loaded safely ({reason}). Expected a "
                       ".pth of tensors (a state dict or a training checkpoint); objects other than tensors, "
                       "containers and numbers are refused, so no code stored in the file runs.") from e


def convert_file(input_path: str, output_dir: str, num_classes: int = 19, overwrite: bool = False,
                 allow_missing: bool = False) -> None:
  """Converts INPUT.pth into OUTPUT_DIR (must be empty or absent, unless `overwrite`) and prints the report."""
  out = paths.resolve(output_dir, "OUTPUT_DIR")
  paths.check_reachable(out, "OUTPUT_DIR")
  if out.exists():
    if not out.is_dir():
      raise ConfigError(f"{out} exists and is not a directory")
    if any(out.iterdir()) and not overwrite:
      raise ConfigError(f"{out} is not empty; pass --overwrite to replace its converted weights")
  previous = out / convert.VARIABLES_DIR
  if os.path.islink(os.fspath(previous)) or (previous.exists() and not previous.is_dir()):
    raise ConfigError(f"{previous} is a symbolic link or a file, not a folder the converter wrote: --overwrite "
                      "replaces only such a folder and never deletes through a link; move it away, or choose "
                      "another OUTPUT_DIR")
  if not os.path.isfile(input_path):
    raise WeightsError(f"no such file: {input_path}")
  try:
    import torch  # noqa: F401
  except ImportError:
    raise WeightsError("reading .pth files needs PyTorch: pip install torch==2.13.0 "
                       "(a CPU wheel; a looser pin downloads the CUDA packages)") from None

  obj = load_pth(input_path)
  try:
    variables, report = convert.torch_state_dict_to_variables(
        obj, num_classes, return_report=True, strict=not allow_missing)
  except WeightsError as e:
    raise WeightsError(f"{input_path}: {e}") from e
  report["input"] = os.path.abspath(input_path)
  print(format_report(report))
  if overwrite and previous.exists():
    previous.rmtree()
  convert.save_converted_variables(out, variables, report)
  print(f"wrote {out}/{convert.VARIABLES_DIR} and {out}/{convert.REPORT_FILE}")


def main(argv) -> None:
  if len(argv) != 3:
    raise app.UsageError(f"give INPUT.pth and OUTPUT_DIR (got {len(argv) - 1} arguments: {argv[1:]})")
  convert_file(argv[1], argv[2], FLAGS.num_classes, FLAGS.overwrite, FLAGS.allow_missing)


def command() -> None:
  """`maxsq-convert` (pyproject.toml), the same as `python -m maxsq_jax.tools.convert_torch`."""
  cli.run(main, define_flags)


if __name__ == "__main__":
  command()
