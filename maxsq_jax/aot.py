"""Compile a config's train and evaluation steps for a Cloud TPU slice on any machine, and say what fits.

  python -m maxsq_jax.aot --config=configs/gta5_to_cityscapes.py --topology=v5e-8 --batch_per_chip=1 \
      [--config.model.dtype=bfloat16] [--out=aot/gta5_v5e8] [--max_batch]

No TPU is needed: libtpu (`pip install -e '.[tpu]'`) compiles for a description of the slice's chips
(tpu_topologies.py) while jax runs on the CPU. The steps are built by the functions training and
evaluation use (train.state_program, train.jit_train_step, evaluator.jit_eval_step) from shapes only, on
a mesh over every chip of the slice, with the global batch, the shardings and each host's share as
on the pod; nothing is allocated and no data is read.

Printed, and written to OUT/aot.json and OUT/aot.md (each program's HLO text to OUT/<program>.hlo.txt):
per program (`train`: the config's training step, its adaptation stage for source_then_adapt; `eval`:
the evaluation step at config.eval.size) the bytes per chip (arguments, temporaries, outputs, code,
total) against the chip's HBM (`fits`, headroom), FLOPs and bytes accessed, a roofline lower bound on
the step time and the images/s it allows, the collectives, and the compile time. These are the
compiler's figures, not measurements. `--max_batch` finds the largest batch per chip whose train step
fits (`largest_fitting`).
"""

from __future__ import annotations

import os
import sys
import time

import ml_collections
from absl import flags
from ml_collections import config_flags

from maxsq_jax import aot_analysis, cli, tpu_topologies
from maxsq_jax.errors import ConfigError, MaxsqError

FLAGS = flags.FLAGS
PROGRAMS = ("train", "eval")


class CompileError(MaxsqError):
  """The TPU compiler rejected a program (for a reason other than memory)."""


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:variant]).",
                                  lock_config=True)
  flags.DEFINE_string("topology", None, "The TPU slice, as an accelerator type: v4-8, v4-32, v5e-4 (= v5litepod-4), "
                      "v5e-8, v5p-8, v6e-8, ...")
  flags.DEFINE_integer("num_slices", 1, "Slices joined over the data-center network (multi-slice).")
  flags.DEFINE_integer("batch_per_chip", 0, "Sets config.batch_size, config.eval.batch_size and "
                       "config.adabn.batch_size to this many images per chip (0: the config's global batch sizes).")
  flags.DEFINE_string("programs", "train,eval", "Which steps to compile: train, eval or both.")
  flags.DEFINE_string("out", "", "Directory for aot.json, aot.md and each program's HLO text (empty: print only).")
  flags.DEFINE_bool("max_batch", False, "Also find the largest batch per chip whose train step fits.")
  flags.DEFINE_integer("max_batch_cap", 64, "--max_batch stops searching at this batch per chip.")
  flags.mark_flags_as_required(["config", "topology"])


def use_cpu_platform(tpu_slice: tpu_topologies.Slice) -> None:
  """jax on the CPU, so that libtpu is asked for topology descriptions only, never for a TPU client; and
  no wait for the cloud metadata server (absent off a TPU VM, where libtpu would wait 10+ minutes)."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # What a TPU VM's metadata would say; without them libtpu logs two warnings (the slice's shape and
  # hosts are set explicitly by tpu_topologies.topology either way).
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", tpu_slice.cloud_name)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # libtpu takes a machine-wide lock file on load; compiling needs no TPU, so processes may share it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import jax
  jax.config.update("jax_platforms", "cpu")


def require_libtpu() -> None:
  try:
    import libtpu  # noqa: F401
  except ImportError:
    import jax
    raise ConfigError(f"libtpu is not installed: it compiles for TPUs. Install it with `pip install -e '.[tpu]'` "
                      f"(jax[tpu]=={jax.__version__}, which pins the matching libtpu)") from None


def with_batch_per_chip(config, batch_per_chip: int, num_chips: int) -> ml_collections.ConfigDict:
  """A copy of `config` with its global batch sizes (training, evaluation, AdaBN) set to `batch_per_chip`
  images on each chip."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.batch_size = config.eval.batch_size = config.adabn.batch_size = batch_per_chip * num_chips
  return config


def _abstract(tree, sharding):
  import jax
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def train_program(config, mesh):
  """(jitted train step, its abstract arguments) of `config` on `mesh`: for a source_then_adapt config, its
  adaptation stage (the larger step: source and target images); for source_then_adabn, its source stage."""
  import jax

  from maxsq_jax import objective as objective_lib, train
  from maxsq_jax.data import pipeline
  if config.stage == "adabn":
    raise ConfigError("config.stage='adabn' takes no gradient step, so it has no train step to compile: "
                      "use --programs=eval")
  if config.stage == "source_then_adapt":
    config = train.adapt_stage_config(config, "source_only")
  elif config.stage == "source_then_adabn":
    config = train.source_stage_config(config)
  model = train.build_model(config)
  width, height = config.data.source_size
  init, sharding, tx, schedule = train.state_program(config, model, mesh, (1, height, width, 3))
  state = _abstract(jax.eval_shape(init, jax.random.key(config.seed)), sharding)
  domains = ("source", "target") if config.stage == "adapt" else ("source",)
  batches = [pipeline.train_batch_spec(config, domain, mesh) for domain in domains]
  step = train.jit_train_step(config, model, objective_lib.make_objective(config.loss), tx, schedule, mesh, sharding)
  return step, (state, *batches)


def eval_canvas(config) -> tuple[int, int]:
  """(W, H) of the full-resolution labels the eval step is compiled for: config.eval.full_size, else the
  target dataset's label size (data/registry.py)."""
  from maxsq_jax.data import registry
  if tuple(config.eval.full_size):
    return tuple(config.eval.full_size)
  dataset = registry.get(config.data.target)
  if dataset.synthetic:
    return tuple(config.data.synthetic_size)
  if dataset.label_size is None:
    raise ConfigError(f"config.eval.protocols has a full-resolution protocol and the labels of {config.data.target} "
                      "have no single size: set --config.eval.full_size=W,H (the largest label) to compile it")
  return dataset.label_size


def eval_program(config, mesh):
  """(jitted evaluation step, its abstract arguments) of `config` on `mesh`, at config.eval.size."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from maxsq_jax import evaluator, train
  from maxsq_jax.data import pipeline
  model = train.build_model(config)
  protocols = evaluator.parse_protocols(config.eval.protocols, config.eval.flip)
  canvas = eval_canvas(config) if any(p.full for p in protocols) else None
  width, height = config.eval.size
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, height, width, 3)), train=False))
  variables = _abstract(variables, NamedSharding(mesh, P()))
  step = evaluator.jit_eval_step(model, config.model.num_classes, protocols,
                                 None if canvas is None else (canvas[1], canvas[0]), mesh)
  batch = pipeline.eval_batch_spec(config, mesh, canvas)
  return step, (variables["params"], variables.get("batch_stats", {}), batch)


def compile_program(build, config, mesh, tpu_slice, name: str, config_name: str, hlo_path=None) -> dict:
  """Compiles `build(config, mesh)` and reads its figures (`report`); a program that does not fit the chip's
  memory is reported (fits: false), any other compiler error raises CompileError. `hlo_path`: where to
  write the compiled program's HLO text (to read its buffers and collectives by hand)."""
  start = time.perf_counter()
  step, args = build(config, mesh)
  try:
    compiled = step.lower(*args).compile()
  except Exception as e:  # jax's JaxRuntimeError; its type is not public API.
    message = str(e)
    needed = aot_analysis.out_of_memory_bytes(message)
    if needed is None:
      first = message.strip().splitlines()[0] if message.strip() else type(e).__name__
      raise CompileError(f"the TPU compiler rejected the {name} step of {config_name} for "
                         f"{tpu_slice.describe()}: {first}") from e
    entry = report(tpu_slice, mesh, name, config, time.perf_counter() - start, out_of_memory=needed[0])
    # The compiler lists the program's largest allocations (operator, shape, size): what to shrink.
    entry["compiler_out_of_memory_report"] = message.strip().splitlines()[:80]
    return entry
  if hlo_path is not None:
    hlo_path.write_text(compiled.as_text())
  return report(tpu_slice, mesh, name, config, time.perf_counter() - start, compiled=compiled)


def report(tpu_slice, mesh, name: str, config, compile_s: float, compiled=None, out_of_memory=None) -> dict:
  """The aot.json entry of one compiled program (`compiled`), or of one the compiler found too large
  (`out_of_memory`: the bytes per chip it said it needed)."""
  chip = tpu_slice.chip
  devices = mesh.devices.size
  global_batch = config.eval.batch_size if name == "eval" else config.batch_size
  entry = {"topology": tpu_slice.accelerator_type, "libtpu_topology": tpu_slice.topology_name,
           "num_slices": tpu_slice.num_slices, "device_kind": mesh.devices.flat[0].device_kind,
           "num_chips": tpu_slice.num_chips, "num_hosts": tpu_slice.num_hosts, "num_devices": devices,
           "global_batch": global_batch, "batch_per_chip": global_batch / tpu_slice.num_chips,
           "hbm_bytes_per_chip": chip.hbm_bytes, "compile_s": round(compile_s, 1)}
  if compiled is None:
    entry.update(bytes_per_chip={"arguments": None, "temporaries": None, "outputs": None, "code": None,
                                 "total": out_of_memory},
                 fits=False, headroom_bytes=chip.hbm_bytes - out_of_memory, flops_per_step=None, flops_per_chip=None,
                 bytes_accessed_per_step=None, bytes_accessed_per_chip=None, roofline_step_s=None,
                 roofline_images_per_s=None, estimated_step_s=None, collectives=None)
  else:
    memory = aot_analysis.memory(compiled)
    cost = aot_analysis.costs(compiled)
    bound = aot_analysis.roofline_s(cost["flops"], cost["bytes_accessed"], chip.peak_flops, chip.hbm_bytes_per_s)
    entry.update(bytes_per_chip=memory, fits=memory["total"] <= chip.hbm_bytes,
                 headroom_bytes=chip.hbm_bytes - memory["total"],
                 flops_per_step=cost["flops"] * devices, flops_per_chip=cost["flops"],
                 bytes_accessed_per_step=cost["bytes_accessed"] * devices,
                 bytes_accessed_per_chip=cost["bytes_accessed"], roofline_step_s=bound,
                 roofline_images_per_s=global_batch / bound if bound > 0 else None,
                 estimated_step_s=cost["estimated_s"], collectives=aot_analysis.collectives(compiled.as_text()))
  if not entry["fits"]:
    entry["what_would_fit"] = _suggestions(config)
  return entry


def _suggestions(config) -> list[str]:
  out = []
  if config.model.dtype == "float32":
    out.append("--config.model.dtype=bfloat16")
  if not config.model.remat:
    out.append("--config.model.remat=True")
  out.append("a smaller batch per chip (--max_batch finds the largest that fits)")
  return out


def largest_fitting(fits_at, cap: int) -> tuple[int, int | None, list[int]]:
  """(largest batch per chip that fits, the first that does not (None: none up to `cap`), batches tried).

  `fits_at(b)` -> (fits, bytes per chip) compiles batch b per chip. The bytes are close to linear in the
  batch, so two compiles (1 and 2) predict the largest fitting batch from the line; one compile confirms
  it and one more the next batch failing, stepping by one only where the line was off."""
  tried = []

  def fits(b):
    tried.append(b)
    return fits_at(b)

  fits_1, bytes_1 = fits(1)
  if not fits_1:
    return 0, 1, tried
  if cap == 1:
    return 1, None, tried
  fits_2, bytes_2 = fits(2)
  if not fits_2:
    return 1, 2, tried
  limit = fits_at.hbm_bytes
  slope = bytes_2 - bytes_1
  predicted = cap if slope <= 0 else int((limit - (bytes_1 - slope)) // slope)
  b = min(max(predicted, 2), cap)
  known = {1: True, 2: True}
  while True:
    if b not in known:
      known[b] = fits(b)[0]
    if known[b]:
      if b >= cap:
        return cap, None, tried
      if b + 1 not in known:
        known[b + 1] = fits(b + 1)[0]
      if not known[b + 1]:
        return b, b + 1, tried
      b += 1
    else:
      b -= 1


def markdown(results: dict) -> str:
  """aot.md: one table per compiled program and the --max_batch search."""
  lines = [f"# `{results['config']}` compiled for {results['slice']}", "",
           "The compiler's figures for one chip's share of the SPMD program; not measurements. The roofline "
           "is a lower bound on the step time: max(FLOPs / peak bf16 FLOP/s, bytes accessed / HBM bandwidth), "
           f"with the chip's published figures ({results['chip_source']}).", ""]
  for name in PROGRAMS:
    entry = results.get(name)
    if entry is None:
      continue
    lines += [f"## {name} step", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in _summary(entry)]
    lines.append("")
    if "compiler_out_of_memory_report" in entry:
      lines += ["The compiler's out-of-memory report (its largest allocations):", "", "```",
                *entry["compiler_out_of_memory_report"], "```", ""]
  if "max_batch" in results:
    search = results["max_batch"]
    lines += ["## Largest batch per chip (train step)", "",
              f"Largest that fits: **{search['largest_fitting']}**; first that does not: "
              f"{search['first_failing'] or 'none up to the cap of ' + str(search['cap'])}.", "",
              "| batch per chip | total GiB per chip | fits | compile s |", "|---|---|---|---|"]
    for c in search["compiles"]:
      lines.append(f"| {c['batch_per_chip']} | {_gib(c['total_bytes'])} | {c['fits']} | {c['compile_s']} |")
    lines.append("")
  return "\n".join(lines)


def _gib(value) -> str:
  return "n/a" if value is None else f"{value / tpu_topologies.GIB:.2f}"


def _summary(entry: dict) -> list[tuple[str, str]]:
  """(label, value) rows of one program's entry, for the console and aot.md."""
  b = entry["bytes_per_chip"]
  rows = [("slice", f"{entry['topology']} ({entry['libtpu_topology']}), {entry['device_kind']}: {entry['num_chips']} "
                    f"chips, {entry['num_hosts']} host(s), {entry['num_devices']} devices"),
          ("global batch", f"{entry['global_batch']} ({entry['batch_per_chip']:g} per chip)"),
          ("GiB per chip", f"{_gib(b['total'])} of {_gib(entry['hbm_bytes_per_chip'])}: arguments {_gib(b['arguments'])}, "
                           f"temporaries {_gib(b['temporaries'])}, outputs {_gib(b['outputs'])}, code {_gib(b['code'])}"),
          ("fits", f"{'yes' if entry['fits'] else 'NO'} (headroom {_gib(entry['headroom_bytes'])} GiB)")]
  if entry["flops_per_step"] is not None:
    rows += [("GFLOP per step", f"{entry['flops_per_step'] / 1e9:,.0f} ({entry['flops_per_chip'] / 1e9:,.0f} per chip)"),
             ("GB accessed per chip", f"{entry['bytes_accessed_per_chip'] / 1e9:,.1f}"),
             ("roofline bound", f"step >= {1e3 * entry['roofline_step_s']:.1f} ms, <= "
                                f"{entry['roofline_images_per_s']:.1f} images/s per domain (a bound, not a speed)"),
             ("compiler's estimate", "none" if entry["estimated_step_s"] is None
              else f"{1e3 * entry['estimated_step_s']:.1f} ms"),
             ("collectives", ", ".join(f"{op} x{c['count']} ({c['bytes'] / 2**20:.1f} MiB)"
                                       for op, c in entry["collectives"].items()) or "none")]
  if not entry["fits"]:
    rows.append(("what would fit", "; ".join(entry["what_would_fit"])))
  rows.append(("compile time", f"{entry['compile_s']} s on this machine"))
  return rows


def main(argv):
  from absl import app
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  tpu_slice = tpu_topologies.parse(FLAGS.topology, FLAGS.num_slices)
  programs = [p.strip() for p in FLAGS.programs.split(",") if p.strip()]
  if not programs or set(programs) - set(PROGRAMS):
    raise ConfigError(f"--programs={FLAGS.programs!r}: use train, eval or train,eval")
  if FLAGS.batch_per_chip < 0 or FLAGS.max_batch_cap < 1:
    raise ConfigError("--batch_per_chip must be >= 0 and --max_batch_cap >= 1")
  use_cpu_platform(tpu_slice)
  require_libtpu()
  from maxsq_jax import config_validation, jsonfile, paths, train
  config = FLAGS.config
  if FLAGS.batch_per_chip:
    config = with_batch_per_chip(config, FLAGS.batch_per_chip, tpu_slice.num_chips)
  try:
    config_validation.validate(config, tpu_slice.num_chips)
  except ConfigError as e:
    raise ConfigError(f"{e} (on {tpu_slice.describe()})") from None
  mesh = train.create_mesh(tpu_topologies.topology(tpu_slice).devices)
  results = {"config": _config_argument(), "slice": tpu_slice.describe(), "chip_source": tpu_slice.chip.source}
  print(f"Compiling {', '.join(programs)} of {results['config']} for {tpu_slice.describe()} ...", flush=True)
  out = None
  if FLAGS.out:
    out = paths.resolve(FLAGS.out, "--out")
    out.mkdir(parents=True, exist_ok=True)
  for name in programs:
    build = train_program if name == "train" else eval_program
    entry = compile_program(build, config, mesh, tpu_slice, name, results["config"],
                            hlo_path=None if out is None else out / f"{name}.hlo.txt")
    results[name] = entry
    print(f"\n{name} step:\n" + "\n".join(f"  {k:<20} {v}" for k, v in _summary(entry)), flush=True)
  if FLAGS.max_batch:
    compiled = {}
    if "train" in results:  # Already compiled at this batch: not again.
      compiled[config.batch_size // tpu_slice.num_chips] = results["train"]
    results["max_batch"] = _search(config, mesh, tpu_slice, results["config"], FLAGS.max_batch_cap, compiled)
  if out is not None:
    jsonfile.write(out / "aot.json", results, indent=1)
    jsonfile.write_text_atomic(out / "aot.md", markdown(results))
    print(f"\nWrote {out}/aot.json and aot.md", flush=True)


def _search(config, mesh, tpu_slice, config_name: str, cap: int, compiled: dict) -> dict:
  """--max_batch: `largest_fitting` over train-step compiles; `compiled` {batch per chip: entry} are reused."""
  compiles = []

  def fits_at(batch_per_chip):
    entry = compiled.get(batch_per_chip) or compile_program(
        train_program, with_batch_per_chip(config, batch_per_chip, tpu_slice.num_chips), mesh, tpu_slice, "train",
        config_name)
    total = entry["bytes_per_chip"]["total"]
    compiles.append({"batch_per_chip": batch_per_chip, "total_bytes": total, "fits": entry["fits"],
                     "compile_s": entry["compile_s"]})
    print(f"  batch {batch_per_chip} per chip: {_gib(total)} GiB per chip, "
          f"{'fits' if entry['fits'] else 'does not fit'} ({entry['compile_s']} s)", flush=True)
    return entry["fits"], total

  fits_at.hbm_bytes = tpu_slice.chip.hbm_bytes
  print(f"\nLargest batch per chip of the train step (cap {cap}):", flush=True)
  largest, failing, _ = largest_fitting(fits_at, cap)
  print(f"  largest that fits: {largest}; first that does not: {failing or f'none up to {cap}'}", flush=True)
  return {"largest_fitting": largest, "first_failing": failing, "cap": cap, "compiles": compiles}


def _config_argument() -> str:
  """The --config value as given (file and variant)."""
  for arg in sys.argv[1:]:
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
  return "config"


def command() -> None:
  """`maxsq-aot` (pyproject.toml), the same as `python -m maxsq_jax.aot`."""
  cli.run(main, define_flags)


if __name__ == "__main__":
  command()
