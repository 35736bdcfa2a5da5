"""Cloud TPU slices as users name them (accelerator types such as `v4-32`, `v5litepod-8`, `v6e-8`) mapped
to libtpu's topology descriptions, and each chip generation's published figures (aot.py).

An accelerator type `GEN-N` counts TensorCores for v4 and v5p (2 per chip: v4-8 is 4 chips) and chips
for v5e and v6e. Devices are one per chip, as jax sees them on the pod (v4 and v5p in megacore mode).
Hosts: one per 4 chips (chips_per_host_bounds 2x2x1), except the single-host 8-chip v5e/v6e VM.

Chip figures are from Google's Cloud TPU documentation (`Chip.source`): HBM per chip, peak bf16
matrix FLOP/s and HBM bandwidth. They feed a roofline lower bound on the step time, never a measurement.
"""

from __future__ import annotations

import dataclasses
import math
import re

from maxsq_jax.errors import ConfigError

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  generation: str  # As in accelerator types: "v4", "v5e", "v5p", "v6e".
  libtpu_name: str  # The generation as libtpu's topology strings name it ("v5e:2x4").
  hbm_bytes: int
  peak_flops: float  # Dense bf16 matrix FLOP/s per chip (float32 matmuls run at a fraction of it).
  hbm_bytes_per_s: float
  source: str  # Where the figures are published.
  counts_cores: bool  # The accelerator type's number counts TensorCores (2 per chip), not chips.
  dims: int  # 3 for the 3-D torus generations (v4, v5p), 2 for v5e and v6e.
  single_host_chips: int  # The largest slice that is one host (one VM, one jax process).


CHIPS = {
    "v4": Chip("v4", "v4", 32 * GIB, 275e12, 1200e9, "https://cloud.google.com/tpu/docs/v4", True, 3, 4),
    "v5e": Chip("v5e", "v5e", 16 * GIB, 197e12, 819e9, "https://cloud.google.com/tpu/docs/v5e", False, 2, 8),
    "v5p": Chip("v5p", "v5p", 95 * GIB, 459e12, 2765e9, "https://cloud.google.com/tpu/docs/v5p", True, 3, 4),
    "v6e": Chip("v6e", "v6e", 32 * GIB, 918e12, 1640e9, "https://cloud.google.com/tpu/docs/v6e", False, 2, 8),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}
CLOUD_NAMES = {"v5e": "v5litepod"}

# Slice shapes (chips along each axis) by chip count, as Cloud TPU offers them.
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
              256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Slice:
  """One or more identical TPU slices: what `topology()` asks libtpu to describe."""
  accelerator_type: str  # As given, normalised ("v5e-8").
  chip: Chip
  shape: tuple[int, ...]  # Chips along each axis of one slice.
  host_bounds: tuple[int, ...]  # Chips per host along each axis.
  num_slices: int = 1

  @property
  def chips_per_slice(self) -> int:
    return math.prod(self.shape)

  @property
  def num_chips(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def num_hosts(self) -> int:
    return self.num_slices * self.chips_per_slice // math.prod(self.host_bounds)

  @property
  def cloud_name(self) -> str:
    """The accelerator type as Cloud TPU's API spells it (v5e is "v5litepod-N")."""
    generation, count = self.accelerator_type.split("-")
    return f"{CLOUD_NAMES.get(generation, generation)}-{count}"

  @property
  def topology_name(self) -> str:
    """libtpu's topology string, e.g. "v4:2x2x4"."""
    return f"{self.chip.libtpu_name}:{'x'.join(map(str, self.shape))}"

  def describe(self) -> str:
    slices = f"{self.num_slices} x " if self.num_slices > 1 else ""
    return (f"{slices}{self.accelerator_type} ({self.topology_name}: {self.num_chips} chips on {self.num_hosts} "
            f"host{'s' if self.num_hosts > 1 else ''})")


def known_names() -> list[str]:
  """Every accelerator type `parse` accepts, for error messages."""
  names = []
  for gen, chip in CHIPS.items():
    shapes = _SHAPES_3D if chip.dims == 3 else _SHAPES_2D
    names += [f"{gen}-{chips * 2 if chip.counts_cores else chips}" for chips in shapes]
  return names


def parse(name: str, num_slices: int = 1) -> Slice:
  """The slice of accelerator type `name` ("v4-32", "v5litepod-16", "v5e-8", "v6e-8", ...): `num_slices`
  of them (multi-slice, over the data-center network). An unknown name is a ConfigError listing the known."""
  match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip().lower())
  generation = ALIASES.get(match.group(1), match.group(1)) if match else None
  if generation not in CHIPS:
    raise ConfigError(f"--topology={name!r}: unknown TPU accelerator type; use one of {', '.join(known_names())} "
                      "(v5litepod-N is v5e-N)")
  chip = CHIPS[generation]
  count = int(match.group(2))
  chips = count // 2 if chip.counts_cores else count
  shapes = _SHAPES_3D if chip.dims == 3 else _SHAPES_2D
  if (chip.counts_cores and count % 2) or chips not in shapes:
    sizes = ", ".join(f"{generation}-{c * 2 if chip.counts_cores else c}" for c in shapes)
    raise ConfigError(f"--topology={name!r}: {generation} slices come in {sizes}"
                      + (" (the number counts TensorCores, 2 per chip)" if chip.counts_cores else ""))
  if num_slices < 1:
    raise ConfigError(f"--num_slices={num_slices}: give 1 or more")
  shape = shapes[chips]
  if chips <= chip.single_host_chips:
    host_bounds = shape
  else:
    host_bounds = (2, 2, 1) if chip.dims == 3 else (2, 2)
  return Slice(f"{generation}-{count}", chip, shape, host_bounds, num_slices)


def topology(tpu_slice: Slice):
  """libtpu's compile-only description of the slice (jax.experimental.topologies); its `.devices` are
  one per chip. Needs libtpu (the `tpu` extra) and the CPU platform (aot.use_cpu_platform)."""
  from jax.experimental import topologies
  bounds = tuple(tpu_slice.host_bounds) + (1,) * (3 - len(tpu_slice.host_bounds))
  kwargs = {"chips_per_host_bounds": bounds}
  if tpu_slice.chip.counts_cores:
    kwargs["chip_config_name"] = "megacore"  # One device per chip, as on the pod.
  if tpu_slice.num_slices > 1:
    kwargs["num_slices"] = tpu_slice.num_slices
  return topologies.get_topology_desc(tpu_slice.topology_name, "tpu", **kwargs)
