"""What a compiled program needs and costs, read from the compiler (aot.py): bytes per chip, FLOPs and bytes
accessed, the collectives in its HLO, and a roofline lower bound on its step time.

Every figure here is the compiler's estimate for one chip's share of the SPMD program (XLA compiles one
program per device), not a measurement.
"""

from __future__ import annotations

import collections
import math
import re

# Bytes per element of the HLO element types that appear in these programs.
_ELEMENT_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                  "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_SHAPE = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")
# The TPU compiler's out-of-memory message, e.g. "Used 20.51G of 15.48G hbm."
_USED_OF = re.compile(r"Used ([0-9.]+)([KMGT]?) of ([0-9.]+)([KMGT]?) hbm")
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def collectives(hlo_text: str) -> dict:
  """{op: {"count", "bytes"}} of the collective operations in a compiled module's HLO text; bytes are
  those of each operation's result, per chip."""
  out = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
  for line in hlo_text.splitlines():
    instruction = _instruction(line)
    if instruction is None:
      continue
    result_type, op = instruction
    entry = out[op]
    entry["count"] += 1
    for element, dims in _SHAPE.findall(result_type):
      size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
      entry["bytes"] += size * _ELEMENT_BYTES.get(element, 4)
  return dict(out)


def _instruction(line: str) -> tuple[str, str] | None:
  """(result type, collective op) of an HLO instruction line `%name = TYPE op(...)`, for collectives only.
  TYPE is a shape or a parenthesised tuple of shapes (whose layouts hold parentheses too); an async
  collective counts once, at its `-start`."""
  _, sep, rest = line.partition(" = ")
  if not sep:
    return None
  rest = rest.lstrip()
  if rest.startswith("("):
    depth = 0
    for end, char in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(char, 0)
      if depth == 0:
        break
    result_type, rest = rest[:end + 1], rest[end + 1:]
  else:
    result_type, _, rest = rest.partition(" ")
  op = rest.lstrip().split("(", 1)[0].strip()
  op = op[:-len("-start")] if op.endswith("-start") else op
  return (result_type, op) if op in COLLECTIVES else None


def memory(compiled) -> dict:
  """Bytes per chip of a compiled program: {"arguments", "temporaries", "outputs", "code", "total"};
  `total` counts outputs that alias (donated) arguments once."""
  analysis = compiled.memory_analysis()
  arguments, outputs = int(analysis.argument_size_in_bytes), int(analysis.output_size_in_bytes)
  temporaries, code = int(analysis.temp_size_in_bytes), int(analysis.generated_code_size_in_bytes)
  aliased = int(analysis.alias_size_in_bytes)
  return {"arguments": arguments, "temporaries": temporaries, "outputs": outputs, "code": code,
          "total": arguments + outputs - aliased + temporaries + code}


def out_of_memory_bytes(message: str) -> tuple[int, int] | None:
  """(bytes needed, bytes available) from the TPU compiler's out-of-memory error, or None."""
  match = _USED_OF.search(message)
  if not match:
    return None
  used, used_unit, limit, limit_unit = match.groups()
  return int(float(used) * _UNITS[used_unit]), int(float(limit) * _UNITS[limit_unit])


def costs(compiled) -> dict:
  """{"flops", "bytes_accessed", "estimated_s"} per chip from the compiler's cost analysis; the
  compiler's own time estimate only where it is positive and finite (else None)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # One entry per program in some jax versions.
    analysis = analysis[0] if analysis else {}
  analysis = analysis or {}
  estimate = analysis.get("optimal_seconds")
  valid = estimate is not None and math.isfinite(estimate) and estimate > 0
  return {"flops": float(analysis.get("flops", 0.0)), "bytes_accessed": float(analysis.get("bytes accessed", 0.0)),
          "estimated_s": float(estimate) if valid else None}


def roofline_s(flops: float, bytes_accessed: float, peak_flops: float, bytes_per_s: float) -> float:
  """A lower bound on one chip's step time: max(FLOPs / peak FLOP/s, bytes / HBM bandwidth)."""
  return max(flops / peak_flops, bytes_accessed / bytes_per_s)
