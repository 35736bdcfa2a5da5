"""Conversion of the reference's PyTorch DeepLab-v2 weights to `DeepLabV2` variables.

Reads the three layouts of docs/method.md's weight files (state dicts of torch tensors or numpy arrays):
  1. the DeepLab-v2 init `DeepLab_resnet_pretrained_init-f81d91e8.pth`: keys prefixed `Scale.`;
     its `layer5` is a 21-class PASCAL classifier on layer4 and is skipped, as the reference does;
  2. training checkpoints `{epoch, iteration, state_dict, optimizer, best_MIou}` whose state_dict
     keys carry `module.` (pass the outer dict or its `state_dict`);
  3. a bare state dict.

Name mapping (PyTorch key below the prefix -> flax variable path), see docs/models.md:
  conv1.weight                         -> params/conv1/kernel          (OIHW -> HWIO)
  bn1.{weight,bias}                    -> params/bn1/{scale,bias}
  bn1.{running_mean,running_var}       -> batch_stats/bn1/{mean,var}
  layer{k}.{i}.conv{j}.weight          -> params/layer{k}/block_{i}/conv{j}/kernel
  layer{k}.{i}.bn{j}.*                 -> .../layer{k}/block_{i}/bn{j}/*
  layer{k}.0.downsample.0.weight       -> params/layer{k}/block_0/downsample_conv/kernel
  layer{k}.0.downsample.1.*            -> .../layer{k}/block_0/downsample_bn/*
  layer{5,6}.conv2d_list.{n}.{weight,bias} -> params/layer{5,6}/conv2d_list_{n}/{kernel,bias}
  *.num_batches_tracked                -> skipped
"""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from maxsq_jax import jsonfile, paths
from maxsq_jax.errors import WeightsError

TOP_LEVEL = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "layer5", "layer6")
HEADS = ("layer5", "layer6")
NUM_ASPP_BRANCHES = 4
REPORT_FILE = "conversion_report.json"
VARIABLES_DIR = "variables"

_BN_FIELDS = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}
_RE_STEM_CONV = re.compile(r"^conv1\.weight$")
_RE_STEM_BN = re.compile(r"^bn1\.(\w+)$")
_RE_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.(conv[123]|bn[123]|downsample\.0|downsample\.1)\.(\w+)$")
_RE_HEAD = re.compile(r"^layer([56])\.conv2d_list\.(\d+)\.(weight|bias)$")


class ConversionError(WeightsError):
  """A state dict that does not fit the DeepLabV2 architecture (unknown key, wrong shape, ...)."""


# ----------------------------------------------------------------------------------------------
# Expected variable shapes: the model's own, traced abstractly (no computation, no memory).


@functools.lru_cache(maxsize=8)
def _variable_shapes(num_classes: int, blocks: tuple[int, ...], width: int) -> dict:
  from maxsq_jax.models.deeplab import DeepLabV2
  model = DeepLabV2(num_classes, blocks=blocks, width=width)
  # Variable shapes do not depend on the image size; 16x16 is the smallest the stride-8 net keeps 2x2.
  variables = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))
  return {path: tuple(v.shape) for path, v in flax.traverse_util.flatten_dict(variables).items()}


def expected_shapes(num_classes: int, blocks, width: int) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{(collection, *path): shape} of every variable of `DeepLabV2(num_classes, blocks, width)` (all
  NUM_ASPP_BRANCHES branches of both heads exist whatever aspp_branches is)."""
  return dict(_variable_shapes(int(num_classes), tuple(int(b) for b in blocks), int(width)))


# ----------------------------------------------------------------------------------------------
# Helpers.


def _to_numpy(v) -> np.ndarray:
  if hasattr(v, "detach"):  # torch.Tensor, without importing torch
    v = v.detach().cpu()
    if str(v.dtype) == "torch.bfloat16":
      v = v.float()
    v = v.numpy()
  return np.asarray(v)


def _path_str(path: tuple[str, ...]) -> str:
  return "/".join(path)


def _listing(names: list[str], shown: int = 5) -> str:
  """The first `shown` of `names`, and how many more."""
  more = f" and {len(names) - shown} more" if len(names) > shown else ""
  return ", ".join(names[:shown]) + more


def _unwrap(obj) -> tuple[Mapping, str, str]:
  """Returns (state dict below the prefix, layout name, prefix)."""
  if not isinstance(obj, Mapping):
    raise ConversionError(f"expected a state dict (a mapping), got {type(obj).__name__}")
  layout = None
  if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    obj = obj["state_dict"]
    layout = "checkpoint"
  if not obj:
    raise ConversionError("the state dict is empty")
  for k in obj:
    if not isinstance(k, str):
      raise ConversionError(f"state-dict key {k!r} is not a string")
  firsts = {k.split(".", 1)[0] for k in obj}
  if firsts & set(TOP_LEVEL):
    prefix = ""
  elif len(firsts) == 1 and all("." in k for k in obj):
    # One leading component on every key (`Scale.`, `module.`): dropped, as the reference does.
    prefix = firsts.pop() + "."
  else:
    raise ConversionError(
        "cannot recognise the state-dict layout: keys neither start with the model's top-level "
        f"names {TOP_LEVEL} nor share one prefix; first keys: {sorted(obj)[:5]}")
  if layout is None:
    layout = {"": "bare", "Scale.": "scale_init", "module.": "checkpoint"}.get(prefix, "prefixed")
  sd = {}
  for k, v in obj.items():
    if not k.startswith(prefix):
      raise ConversionError(f"unknown key {k!r}: the other keys carry the prefix {prefix!r}")
    sd[k[len(prefix):]] = v
  return sd, layout, prefix


def _map_key(key: str):
  """PyTorch key (prefix removed) -> (flax path, kind) or None if unknown.

  kind: "conv" (OIHW -> HWIO), "vector", "counter" (num_batches_tracked).
  """
  if _RE_STEM_CONV.match(key):
    return ("params", "conv1", "kernel"), "conv"
  m = _RE_STEM_BN.match(key)
  if m:
    field = m.group(1)
    if field == "num_batches_tracked":
      return None, "counter"
    if field in _BN_FIELDS:
      col, name = _BN_FIELDS[field]
      return (col, "bn1", name), "vector"
    return None
  m = _RE_BLOCK.match(key)
  if m:
    k, i, mod, field = m.groups()
    mod = {"downsample.0": "downsample_conv", "downsample.1": "downsample_bn"}.get(mod, mod)
    base = (f"layer{k}", f"block_{int(i)}", mod)
    if mod.startswith("conv") or mod == "downsample_conv":
      return ((("params",) + base + ("kernel",)), "conv") if field == "weight" else None
    if field == "num_batches_tracked":
      return None, "counter"
    if field in _BN_FIELDS:
      col, name = _BN_FIELDS[field]
      return (col,) + base + (name,), "vector"
    return None
  m = _RE_HEAD.match(key)
  if m:
    head, n, field = m.groups()
    if int(n) >= NUM_ASPP_BRANCHES:
      return None
    path = ("params", f"layer{head}", f"conv2d_list_{int(n)}")
    return (path + ("kernel",), "conv") if field == "weight" else (path + ("bias",), "vector")
  return None


def torch_key(path: tuple[str, ...]) -> str:
  """The reference's state-dict key of the parameter at flax `path` (below the "params" collection).

  E.g. ("layer1", "block_0", "downsample_conv", "kernel") -> "layer1.0.downsample.0.weight": the
  inverse of the conversion's key mapping (checked against it), so the dotted prefixes of the
  result are the PyTorch modules that enclose the tensor in the reference's model.
  """
  fields = {"kernel": "weight", "scale": "weight", "bias": "bias"}
  modules = []
  for name in path[:-1]:
    indexed = re.fullmatch(r"(block|conv2d_list)_(\d+)", name)
    if indexed:
      modules += [indexed.group(2)] if indexed.group(1) == "block" else ["conv2d_list", indexed.group(2)]
    elif name in ("downsample_conv", "downsample_bn"):
      modules += ["downsample", "0" if name == "downsample_conv" else "1"]
    else:
      modules.append(name)
  key = ".".join(modules + [fields.get(path[-1], path[-1])])
  mapped = _map_key(key)
  if mapped is None or mapped[0] != ("params",) + tuple(path):
    raise ValueError(f"parameter {_path_str(path)} has no counterpart in the reference's model")
  return key


def _infer_blocks(keys) -> tuple[int, ...]:
  counts = []
  for k in range(1, 5):
    idx = set()
    for key in keys:
      m = re.match(rf"^layer{k}\.(\d+)\.", key)
      if m:
        idx.add(int(m.group(1)))
    if not idx:
      raise ConversionError(f"cannot infer the number of blocks: no `layer{k}.*` keys")
    if idx != set(range(len(idx))):
      raise ConversionError(f"layer{k} block indices are not contiguous from 0: {sorted(idx)}")
    counts.append(len(idx))
  return tuple(counts)


# ----------------------------------------------------------------------------------------------
# Public API.


def torch_state_dict_to_variables(state_dict, num_classes: int, *, blocks=None,
                                  return_report: bool = False, strict: bool = True):
  """Converts a reference PyTorch state dict to `DeepLabV2` variables.

  Args:
    state_dict: a state dict (torch tensors or numpy arrays) in any layout of docs/method.md's weight files:
      `Scale.`-prefixed init, a `{state_dict: {module.*: ...}, ...}` checkpoint (or its
      `state_dict`), or bare keys.
    num_classes: classes of the model to build. A head (`layer5`/`layer6`) whose class count
      differs is skipped (reported) and left to the caller's fresh init, as is the init's
      `layer5` (the reference loader always skips it).
    blocks: expected blocks per stage; inferred from the keys when None (then must match).
    return_report: also return the report dict.
    strict: raise if a backbone (non-head) variable is missing from the state dict.

  Returns:
    `{'params': ..., 'batch_stats': ...}` nested dicts of float32 numpy arrays, holding only the
    converted variables (fill the rest with `merge_into(fresh_init, converted)`), and with
    `return_report` also the report: {layout, prefix, num_classes, blocks, width, used: [keys],
    skipped: {key: why}, missing: [flax paths]}.

  Raises:
    ConversionError (a ValueError) naming the key on an unknown key or a shape mismatch, and naming
    every converted tensor that holds NaN or infinite values.
  """
  sd, layout, prefix = _unwrap(state_dict)
  inferred = _infer_blocks(sd)
  if blocks is not None and tuple(blocks) != inferred:
    raise ConversionError(f"blocks {tuple(blocks)} requested but the state dict has {inferred}")
  blocks = inferred
  if "conv1.weight" not in sd:
    raise ConversionError(f"missing key {prefix}conv1.weight: cannot infer the width")
  width = int(_to_numpy(sd["conv1.weight"]).shape[0])
  shapes = expected_shapes(num_classes, blocks, width)

  # Heads to skip: class count != num_classes, or the init's PASCAL layer5.
  skip_heads = {}
  for head in HEADS:
    head_keys = [k for k in sd if k.startswith(head + ".")]
    if not head_keys:
      continue
    if layout == "scale_init" and head == "layer5":
      skip_heads[head] = ("the DeepLab-v2 init's layer5 is its PASCAL classifier on layer4; the "
                          "reference loader skips it")
      continue
    counts = {int(_to_numpy(sd[k]).shape[0]) for k in head_keys}
    if counts != {num_classes}:
      skip_heads[head] = f"head has {sorted(counts)} classes, the model {num_classes}"

  flat, used, skipped, nonfinite = {}, [], {}, []
  for key, value in sd.items():
    full_key = prefix + key
    head = key.split(".", 1)[0]
    if head in skip_heads and _map_key(key) is not None:
      skipped[full_key] = skip_heads[head]
      continue
    mapped = _map_key(key)
    if mapped is None:
      raise ConversionError(f"unknown key {full_key!r}: not a DeepLabV2 (DeeplabMulti) variable")
    path, kind = mapped
    if kind == "counter":
      skipped[full_key] = "num_batches_tracked is not used"
      continue
    if path not in shapes:
      raise ConversionError(
          f"unexpected key {full_key!r} (-> {_path_str(path)}) for blocks={blocks}, width={width}")
    arr = _to_numpy(value).astype(np.float32)
    if kind == "conv":
      if arr.ndim != 4:
        raise ConversionError(f"key {full_key!r}: expected a 4-d OIHW weight, got shape {arr.shape}")
      arr = np.ascontiguousarray(arr.transpose(2, 3, 1, 0))
    if arr.shape != shapes[path]:
      want = shapes[path]
      if kind == "conv":
        want = (want[3], want[2], want[0], want[1])
        got = _to_numpy(value).shape
      else:
        got = arr.shape
      raise ConversionError(f"shape mismatch for key {full_key!r}: got {tuple(got)}, the model "
                            f"(num_classes={num_classes}, blocks={blocks}, width={width}) "
                            f"expects {tuple(want)}")
    flat[path] = arr
    used.append(full_key)
    if not np.isfinite(arr).all():
      nonfinite.append(f"{full_key} ({arr.size - int(np.isfinite(arr).sum())} of {arr.size} values)")
  if nonfinite:
    raise ConversionError(f"{len(nonfinite)} tensor(s) hold NaN or infinite values: {_listing(nonfinite)}. The "
                          "weights are damaged or come from a run that diverged: convert another file")

  missing = [p for p in shapes if p not in flat]
  missing_backbone = [p for p in missing if p[1] not in HEADS]
  if strict and missing_backbone:
    raise ConversionError(
        f"{len(missing_backbone)} backbone variables are missing from the state dict, e.g. "
        f"{[_path_str(p) for p in missing_backbone[:5]]} (pass strict=False to allow)")

  variables = flax.traverse_util.unflatten_dict(flat)
  variables.setdefault("params", {})
  variables.setdefault("batch_stats", {})
  if not return_report:
    return variables
  report = {
      "layout": layout,
      "prefix": prefix,
      "num_classes": int(num_classes),
      "blocks": list(blocks),
      "width": width,
      "used": used,
      "skipped": skipped,
      "missing": [_path_str(p) for p in missing],
  }
  return variables, report


def merge_into(init_variables, converted, *, return_filled: bool = False):
  """Fills `init_variables` (a fresh `model.init`) with the `converted` variables.

  Every converted leaf must exist in `init_variables` with the same shape (ConversionError
  otherwise, naming the path); the leaves the conversion did not provide (skipped heads) keep their
  fresh-init values. Converted leaves are cast to the init's dtype. Returns nested dicts (and,
  with `return_filled`, the list of paths taken from the init).
  """
  init_flat = flax.traverse_util.flatten_dict(init_variables)
  conv_flat = flax.traverse_util.flatten_dict(converted)
  for path, v in conv_flat.items():
    if path not in init_flat:
      raise ConversionError(f"converted variable {_path_str(path)} does not exist in the model "
                            "(different blocks/width?)")
    if tuple(np.shape(v)) != tuple(np.shape(init_flat[path])):
      raise ConversionError(f"shape mismatch for {_path_str(path)}: converted {tuple(np.shape(v))}, "
                            f"model {tuple(np.shape(init_flat[path]))}")
  out, filled = {}, []
  for path, v in init_flat.items():
    if path in conv_flat:
      out[path] = np.asarray(conv_flat[path], dtype=np.dtype(v.dtype))
    else:
      out[path] = v
      filled.append(_path_str(path))
  merged = flax.traverse_util.unflatten_dict(out)
  return (merged, filled) if return_filled else merged


def is_converted_dir(path) -> bool:
  """Whether `path` (local or gs://) holds variables/ and conversion_report.json."""
  path = paths.resolve(path)
  return (path / VARIABLES_DIR).is_dir() and (path / REPORT_FILE).is_file()


def _checksums(variables) -> dict[str, int]:
  """{"params/conv1/kernel": CRC-32 of the array's bytes} of nested dicts of arrays."""
  from maxsq_jax.checkpoint_integrity import crc32
  return {_path_str(path): crc32(np.ascontiguousarray(np.asarray(value)).tobytes())
          for path, value in flax.traverse_util.flatten_dict(variables).items()}


def save_converted_variables(output_dir, variables, report: dict) -> None:
  """Writes `output_dir/variables` (orbax) and `output_dir/conversion_report.json` (local or gs://),
  the report with a CRC-32 of every array ("checksums"), checked when the folder is read."""
  import orbax.checkpoint as ocp

  output_dir = paths.resolve(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(output_dir / VARIABLES_DIR, variables, force=True)
  ckptr.wait_until_finished()
  ckptr.close()
  (output_dir / REPORT_FILE).write_text(json.dumps({**report, "checksums": _checksums(variables)}, indent=1))


def _warn(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def load_converted_variables(path, init_variables=None, warn: Callable[[str], None] = _warn):
  """Loads the variables written by `python -m maxsq_jax.tools.convert_torch`, verified.

  Returns the converted variables (nested dicts of arrays; skipped heads absent), or, given
  `init_variables` (a fresh `model.init`), those merged into it with `merge_into`.
  Raises FileNotFoundError naming `path` if it is not a converted-weights directory, and
  ConversionError naming it if its arrays cannot be read, do not match the CRC-32s of its report,
  or hold NaN or infinite values. A folder converted before reports held checksums is read with a
  warning (`warn`, default stderr).
  """
  path = paths.resolve(path)
  if not is_converted_dir(path):
    raise FileNotFoundError(
        f"{path} is not a converted-weights directory (expected {VARIABLES_DIR}/ and {REPORT_FILE} "
        "written by `python -m maxsq_jax.tools.convert_torch INPUT.pth OUTPUT_DIR`)")
  import orbax.checkpoint as ocp

  again = f"convert the .pth again (python -m maxsq_jax.tools.convert_torch INPUT.pth {path} --overwrite)"
  report = read_conversion_report(path)
  ckptr = ocp.StandardCheckpointer()
  try:
    restored = ckptr.restore(path / VARIABLES_DIR)
  except Exception as e:  # Damaged files fail anywhere in Orbax/TensorStore.
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    raise ConversionError(f"{path}/{VARIABLES_DIR} cannot be read ({type(e).__name__}: {first}): the folder is "
                          f"damaged; {again}") from None
  finally:
    ckptr.close()
  flat = {p: np.asarray(v) for p, v in flax.traverse_util.flatten_dict(restored).items()}
  expected = report.get("checksums") if isinstance(report, dict) else None
  if expected is None:
    warn(f"warning: {path} was converted before converted weights carried checksums: its arrays are not "
         f"verified; {again} to add them.")
  else:
    actual = _checksums(flax.traverse_util.unflatten_dict(flat))
    bad = [name for name in sorted(set(actual) | set(expected)) if actual.get(name) != expected.get(name)]
    if bad:
      raise ConversionError(f"{path}/{VARIABLES_DIR}: {len(bad)} array(s) do not match the checksums in "
                            f"{REPORT_FILE}: {_listing(bad)}; the folder is damaged: {again}")
  nonfinite = [_path_str(p) for p, v in flat.items() if not np.isfinite(v).all()]
  if nonfinite:
    raise ConversionError(f"{path}/{VARIABLES_DIR}: {len(nonfinite)} array(s) hold NaN or infinite values: "
                          f"{_listing(nonfinite)}; convert a file whose weights are finite")
  variables = flax.traverse_util.unflatten_dict(flat)
  if init_variables is not None:
    return merge_into(init_variables, variables)
  return variables


def read_conversion_report(path) -> dict:
  return jsonfile.read(paths.resolve(path) / REPORT_FILE)
