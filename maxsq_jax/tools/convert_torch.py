"""Converts a reference PyTorch DeepLab-v2 .pth to a maxsq_jax converted-weights directory.

  python -m maxsq_jax.tools.convert_torch INPUT.pth OUTPUT_DIR [--num_classes 19] [--overwrite]

INPUT.pth: the DeepLab-v2 init (`DeepLab_resnet_pretrained_init-f81d91e8.pth`), a reference training
checkpoint (`gta5final.pth`, `..._maxsquarebest.pth`) or a bare state dict. OUTPUT_DIR receives
`variables/` (orbax StandardCheckpointer) and `conversion_report.json` (a local path or a
gs://BUCKET/PATH URL); use it as
`--config.init_from=OUTPUT_DIR`. Heads whose class count differs from --num_classes (and the
init's PASCAL `layer5`) are skipped and get a fresh init when training starts.
"""

from __future__ import annotations

import argparse
import os
import sys

from maxsq_jax import paths
from maxsq_jax.errors import ConfigError, MaxsqError, WeightsError, exit_with
from maxsq_jax.models import convert


def _parse(argv):
  p = argparse.ArgumentParser(prog="python -m maxsq_jax.tools.convert_torch",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("input", help="PyTorch .pth file")
  p.add_argument("output_dir", help="directory to write (must be empty or absent)")
  p.add_argument("--num_classes", type=int, default=19, help="classes of the model (default 19)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace the variables/ and report of a non-empty OUTPUT_DIR")
  p.add_argument("--verbose", action="store_true", help="show the traceback of an error")
  p.add_argument("--allow_missing", action="store_true",
                 help="accept state dicts lacking backbone variables (they get a fresh init)")
  return p.parse_args(argv)


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


def run(args) -> None:
  out = paths.resolve(args.output_dir, "OUTPUT_DIR")
  paths.check_reachable(out, "OUTPUT_DIR")
  if out.exists():
    if not out.is_dir():
      raise ConfigError(f"{out} exists and is not a directory")
    if any(out.iterdir()) and not args.overwrite:
      raise ConfigError(f"{out} is not empty; pass --overwrite to replace its converted weights")
  if not os.path.isfile(args.input):
    raise WeightsError(f"no such file: {args.input}")
  try:
    import torch  # noqa: F401
  except ImportError:
    raise WeightsError("reading .pth files needs PyTorch: pip install torch==2.13.0 "
                       "(a CPU wheel; a looser pin downloads the CUDA packages)") from None

  obj = load_pth(args.input)
  try:
    variables, report = convert.torch_state_dict_to_variables(
        obj, args.num_classes, return_report=True, strict=not args.allow_missing)
  except WeightsError as e:
    raise WeightsError(f"{args.input}: {e}") from e
  report["input"] = os.path.abspath(args.input)
  print(format_report(report))
  if args.overwrite:
    if (out / convert.VARIABLES_DIR).exists():
      (out / convert.VARIABLES_DIR).rmtree()
  convert.save_converted_variables(out, variables, report)
  print(f"wrote {out}/{convert.VARIABLES_DIR} and {out}/{convert.REPORT_FILE}")


def main(argv=None) -> int:
  args = _parse(argv)
  try:
    run(args)
  except MaxsqError as e:
    exit_with(e, argv=argv)
  return 0


if __name__ == "__main__":
  sys.exit(main())
