r"""The GPU check: everything this project wants to know from a GPU machine, prepared to run in one go.

  bench/device_check.sh --prepare     # here, with the network: the wheels the GPU image lacks -> .whl/
  bench/device_check.sh               # on the GPU machine (offline): the check, within --deadline s
  bench/device_check.sh --smoke       # on a CPU: tiny sizes, the same code paths (tests/test_device_check.py)

The GPU machine's image has Python 3.12, jax/jaxlib 0.11 with the CUDA plugin, flax, optax,
orbax-checkpoint, torch (CUDA), numpy, pillow, tqdm, absl-py and etils, and no network; `--prepare`
downloads the rest of what the package imports on its training path (WHEELS) into .whl/ (git-ignored;
the device tool carries it), and the shell wrapper installs them and the package
(`pip install --no-deps -e .`) before the run.

The run is a sequence of parts, each with a time budget (BUDGET_S) inside the overall --deadline;
a part may also use what earlier parts left over (the later parts' budgets stay reserved), a part
that no longer fits is skipped and reported as such, a part that overruns is killed, so the check
ends in time and says what it did. Each part's output is printed as it comes, and everything
is also written under $OUT (or --out) when set: device_check.log (all output), device_check.json
(every figure) and device_check.md (the tables for bench/RESULTS.md), rewritten after every part.

Parts:
  env         device, driver, versions of everything that matters, JAX's default matmul precision,
              whether `pip install --no-deps -e .` worked, and that the training modules import;
  tests       the tests that make sense on a GPU (model vs the PyTorch implementation, losses,
              objective, the train step lowering the loss, remat, bfloat16 close to float32), with
              JAX_DEFAULT_MATMUL_PRECISION=highest (the tests' tolerances are float32's);
  numerics    the full ResNet-101 DeepLab-v2 (eval mode, converted random weights) against the
              PyTorch implementation on the same GPU: relative error of float32 at JAX's default
              precision and at "highest" (PyTorch with and without TF32), and of bfloat16;
  train_step  bench/train_step.py at the reference sizes (source 1280x720 + target 1024x512), batch 1
              per domain: maxsq_jax float32 and bfloat16 against PyTorch float32 and PyTorch
              autocast-bfloat16 channels_last (images/s, peak device memory, compile time, achieved
              FLOP/s as a fraction of a matmul peak measured in the same process);
  eval        bench/eval.py: full-resolution evaluation (2048x1024 labels) against PyTorch on the GPU;
  remat       the bfloat16 step with every bottleneck rematerialised (config.model.remat), batch 1;
  max_batch   the largest batch per domain that fits, for maxsq_jax bfloat16 (with and without remat)
              and PyTorch autocast-bfloat16: a first guess from the batch-1 peak memory, then up or
              down while time remains (the batches tried and which fitted are reported).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

# What the GPU image lacks of the package's imports (training, evaluation, the tests run here):
# grain and its own needs that are not there, ml-collections, tensorboardX. tensorflow-datasets is
# not among them: only reading a prepared dataset imports it (data/pipeline.py), which the check does
# not do. Versions: the pins of pyproject.toml, else what the CPU machine runs.
WHEELS = ("grain==0.2.18", "array-record==0.8.6", "portpicker==1.6.0", "ml-collections==1.1.0",
          "tensorboardX==2.6.5")
WHEEL_DIR = os.path.join(ROOT, ".whl")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
CARRY_LIMIT = 64 * 2**20  # What the device tool carries: the working tree and .whl together.

PARTS = ("env", "tests", "numerics", "train_step", "eval", "remat", "max_batch")
# Seconds per part on the GPU machine; they add up to the default deadline, 450 s (the device
# tool's call is limited to 10 minutes, a task's device time to 15 in all).
BUDGET_S = {"env": 20, "tests": 60, "numerics": 65, "train_step": 165, "eval": 60, "remat": 35, "max_batch": 45}
# JAX takes 75% of the GPU's memory when it starts; where PyTorch shares its process, it allocates
# as it goes instead.
SHARED_PROCESS_ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
MIN_S = 15  # A part (or one more row of it) is started only with at least this much time left.

REFERENCE_SIZES = "1280x720/1024x512"
GPU_TESTS = ("tests/test_model.py", "tests/test_losses.py", "tests/test_objective.py", "tests/test_train.py")
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OutOfMemoryError")


# ----------------------------------------------------------------------------------------------
# --prepare


def prepare(wheel_dir: str = WHEEL_DIR) -> int:
  """Downloads WHEELS for the image (CPython 3.12, x86-64 manylinux) into wheel_dir; prints sizes."""
  os.makedirs(wheel_dir, exist_ok=True)
  wanted = {_normalise(spec.split("==")[0]) for spec in WHEELS}
  for name in os.listdir(wheel_dir):  # One version of each: two stop the install on the image.
    if name.endswith(".whl") and _normalise(name.split("-")[0]) in wanted:
      os.remove(os.path.join(wheel_dir, name))
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
         "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", wheel_dir, *WHEELS]
  print("$ " + shlex.join(cmd), flush=True)
  subprocess.run(cmd, check=True)
  total = 0
  for name in sorted(os.listdir(wheel_dir)):
    size = os.path.getsize(os.path.join(wheel_dir, name))
    total += size
    print(f"  {name}  {size / 2**20:.2f} MiB")
  tree = _tracked_bytes()
  print(f"wheels: {total / 2**20:.1f} MiB in {wheel_dir}; with the working tree ({tree / 2**20:.1f} MiB of "
        f"tracked files): {(total + tree) / 2**20:.1f} MiB of the device tool's {CARRY_LIMIT / 2**20:.0f} MiB")
  if total + tree > CARRY_LIMIT:
    print("error: over the device tool's limit: carry fewer wheels", file=sys.stderr)
    return 1
  return 0


def _normalise(name: str) -> str:
  return name.lower().replace("-", "_").replace(".", "_")


def _tracked_bytes() -> int:
  try:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
  except (OSError, subprocess.CalledProcessError):
    return 0
  return sum(os.path.getsize(os.path.join(ROOT, f.decode())) for f in files if f and os.path.isfile(os.path.join(ROOT, f.decode())))


# ----------------------------------------------------------------------------------------------
# The run.


class Run:
  """The state of one check: its deadline, log, results, and the files under `out`."""

  def __init__(self, parts, deadline_s: float, out: str | None, smoke: bool):
    self.parts = list(parts)
    self.start = time.monotonic()
    self.deadline = self.start + deadline_s
    self.out, self.smoke = out, smoke
    self.results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "smoke": smoke,
                          "deadline_s": deadline_s, "parts": {}}
    self.sections: dict[str, list[str]] = {}  # Markdown per part, written in PARTS order.
    if out:
      os.makedirs(out, exist_ok=True)
      self._log = open(os.path.join(out, "device_check.log"), "a")
    else:
      self._log = None

  def left(self) -> float:
    return self.deadline - time.monotonic()

  def reserved_after(self, part: str) -> float:
    """The budgets of the parts of this run after `part`."""
    later = self.parts[self.parts.index(part) + 1:] if part in self.parts else []
    return sum(BUDGET_S[p] for p in later) * (4 if self.smoke else 1)

  def timeout(self, part: str) -> float:
    """Seconds `part` may take: its budget, or more when earlier parts left time over (the later
    parts' budgets stay reserved), never past the deadline."""
    budget = BUDGET_S[part] * (4 if self.smoke else 1)
    return min(self.left(), max(budget, self.left() - self.reserved_after(part)))

  def print(self, text: str = "") -> None:
    print(text, flush=True)
    if self._log:
      self._log.write(text + "\n")
      self._log.flush()

  def command(self, cmd, timeout: float, env: dict | None = None) -> tuple[int | None, str]:
    """Runs `cmd`, printing its output as it comes; (exit status or None if killed at `timeout`, output)."""
    import threading
    self.print(f"$ {shlex.join(cmd)}   (at most {timeout:.0f} s)")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    lines = []

    def read():  # Ends at EOF, also when the process group is killed.
      for line in proc.stdout:
        lines.append(line)
        self.print(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
      status = proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, 9)
      proc.wait()
      status = None
    reader.join(timeout=10)
    if status is None:
      self.print(f"[killed after {timeout:.0f} s]")
    return status, "".join(lines)

  def save(self) -> None:
    if not self.out:
      return
    self.results["elapsed_s"] = round(time.monotonic() - self.start, 1)
    with open(os.path.join(self.out, "device_check.json"), "w") as f:
      json.dump(self.results, f, indent=1)
    with open(os.path.join(self.out, "device_check.md"), "w") as f:
      f.write(self.markdown() + "\n")

  def markdown(self) -> str:
    lines = [f"# maxsq_jax device check, {self.results['started']}", "",
             "parts: " + ", ".join(f"{k} {v['status']}" for k, v in self.results["parts"].items()), ""]
    for name in PARTS:
      lines += self.sections.get(name, [])
    return "\n".join(lines)


def part_env(run: Run) -> dict:
  code = r"""
import importlib.metadata as md, json, os, platform, subprocess
out = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
for p in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin", "flax", "optax",
          "orbax-checkpoint", "grain", "array-record", "ml-collections", "tensorboardX", "etils", "protobuf",
          "torch", "numpy", "pillow", "tensorflow-datasets", "maxsq_jax"):
  try:
    out[p] = md.version(p)
  except md.PackageNotFoundError:
    out[p] = None
try:
  out["nvidia-smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                      "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.TimeoutExpired) as e:
  out["nvidia-smi"] = f"unavailable: {e}"
import jax
out["jax_backend"] = jax.default_backend()
out["jax_devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
out["jax_default_matmul_precision"] = str(jax.config.jax_default_matmul_precision)
stats = jax.devices()[0].memory_stats() or {}
out["jax_bytes_limit"] = stats.get("bytes_limit")
import torch
out["torch_cuda"] = torch.cuda.is_available()
if torch.cuda.is_available():
  p = torch.cuda.get_device_properties(0)
  out["torch_device"] = f"{p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, CUDA {torch.version.cuda}"
  out["torch_tf32"] = {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
import maxsq_jax.main, maxsq_jax.train, maxsq_jax.data.pipeline  # The training path imports.
out["training_modules_import"] = True
print("ENV " + json.dumps(out))
"""
  status, text = run.command([sys.executable, "-c", code], timeout=run.timeout("env"))
  line = next((l for l in text.splitlines() if l.startswith("ENV ")), None)
  env = json.loads(line[4:]) if line else {}
  env["editable_install"] = os.environ.get("MAXSQ_EDITABLE_INSTALL", "not tried (run through the shell wrapper)")
  run.results["env"] = env
  run.sections["env"] = ["## Device, driver, versions", "", "```", json.dumps(env, indent=1), "```", ""]
  return {"status": "ok" if status == 0 and line else "failed"}


def part_tests(run: Run) -> dict:
  if run.smoke:
    selection = ["tests/test_losses.py", "-k", "hand_example"]
  else:
    selection = list(GPU_TESTS)
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not integration", *selection]
  status, text = run.command(cmd, timeout=run.timeout("tests"), env={"JAX_DEFAULT_MATMUL_PRECISION": "highest"})
  summary = next((l for l in reversed(text.splitlines()) if " passed" in l or " failed" in l or " error" in l), "")
  run.sections["tests"] = ["## Tests (JAX_DEFAULT_MATMUL_PRECISION=highest)", "", f"`{shlex.join(cmd)}`: {summary or 'no summary'}"
                   + ("" if status is not None else " (killed at its time budget)"), ""]
  return {"status": "ok" if status == 0 else ("killed" if status is None else "failed"), "summary": summary}


def numerics_child(smoke: bool) -> dict:
  """Relative errors of the JAX model against the PyTorch implementation on the same device."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from torch_deeplab import DeeplabMulti, randomize_

  from maxsq_jax.models import DeepLabV2
  from maxsq_jax.models.convert import torch_state_dict_to_variables
  blocks, width, (h, w) = ((1, 1, 1, 1), 8, (41, 33)) if smoke else ((3, 4, 23, 3), 64, (321, 321))
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  tm = randomize_(DeeplabMulti(19, blocks=blocks, width=width), seed=0).eval()
  variables = torch_state_dict_to_variables(tm.state_dict(), 19)
  tm = tm.to(device)
  x = np.random.default_rng(0).normal(0, 50, (1, h, w, 3)).astype(np.float32)
  rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))
  torch_out = {}
  for tf32 in (False, True):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    with torch.no_grad():
      main, _ = tm(torch.from_numpy(x.transpose(0, 3, 1, 2)).to(device))
    torch_out[tf32] = main.float().cpu().numpy().transpose(0, 2, 3, 1).astype(np.float64)
  out = {"model": f"blocks {blocks}, width {width}, eval mode, input {w}x{h}", "device": str(jax.devices()[0].device_kind),
         "torch_tf32_vs_torch_fp32": rel(torch_out[True], torch_out[False])}
  for dtype, precision in (("float32", "highest"), ("float32", "default"), ("bfloat16", "default")):
    model = DeepLabV2(19, blocks=blocks, width=width, dtype=dtype)
    with jax.default_matmul_precision(precision):
      main, _ = jax.jit(model.apply)(variables, jnp.asarray(x))
    out[f"jax_{dtype}_{precision}_vs_torch_fp32"] = rel(main, torch_out[False])
  # The tests' float32 bound, and bfloat16's (8-bit mantissa) for a deep eval-mode network.
  out["pass"] = out["jax_float32_highest_vs_torch_fp32"] < 1e-4 and out["jax_bfloat16_default_vs_torch_fp32"] < 0.05
  return out


def part_numerics(run: Run) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--child", "numerics"] + (["--smoke"] if run.smoke else [])
  status, text = run.command(cmd, timeout=run.timeout("numerics"), env=SHARED_PROCESS_ENV)
  line = next((l for l in text.splitlines() if l.startswith("RESULT ")), None)
  if not line:
    return {"status": "killed" if status is None else "failed"}
  result = json.loads(line[len("RESULT "):])
  run.results["numerics"] = result
  run.sections["numerics"] = [
      "## Model vs the PyTorch implementation on the same device (relative L2 error of the main logits)", "",
      f"{result['model']}, {result['device']}", "", "| comparison | relative error |", "|---|---|",
      *[f"| {k} | {v:.2e} |" for k, v in result.items() if k.endswith("fp32")], "", f"float32 (highest) < 1e-4 and bfloat16 < 0.05: {'PASS' if result['pass'] else 'FAIL'}", ""]
  return {"status": "ok" if result["pass"] else "failed"}


def _sizes(run: Run) -> str:
  return "64x32" if run.smoke else REFERENCE_SIZES


def _model_args(run: Run) -> dict:
  return {"width": 8, "blocks": "1,1,1,1", "steps": 2} if run.smoke else {"width": 64, "blocks": "3,4,23,3", "steps": 10}


def _row(run: Run, framework: str, dtype: str, batch: int, budget: float):
  """One bench/train_step.py row in its own process; the result dict or None (error printed)."""
  import train_step
  timeout = min(budget, run.left())
  if timeout < MIN_S:
    run.print(f"skipped {framework} {dtype} batch {batch}: {timeout:.0f} s left")
    return None, "skipped: no time left"
  run.print(f"train_step row: {framework} {dtype} batch {batch} at {_sizes(run)} (at most {timeout:.0f} s)")
  # JAX may take 95% of the GPU's memory (default 75%), as PyTorch may take all of it.
  result, error = train_step.run_child(framework, _sizes(run), dtype, batch, timeout=timeout,
                                       env={"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"}, **_model_args(run))
  if result is None:
    run.print(f"  failed: {error.strip()[-1500:]}")
  else:
    peak = result.get("peak_device_bytes")
    run.print(f"  {result['images_per_s']:.3f} images/s, step {result['step_s']:.3f} s, compile {result['compile_s']:.1f} s, "
              f"peak device memory {'n/a' if peak is None else f'{peak / 2**20:.0f} MiB'}")
    run.results.setdefault("train_step_rows", []).append(result)
  return result, error


def _train_step_table(run: Run) -> None:
  """The train_step section: every row so far (batch 1, remat, largest batches) in one table."""
  import train_step
  rows = run.results.get("train_step_rows", [])
  if rows:
    title = "## Train step (bench/train_step.py), " + ("smoke sizes" if run.smoke else "reference sizes")
    run.sections["train_step"] = [title, "", train_step.table(rows), ""]
  if "max_batch" in run.results:
    run.sections["train_step"] = run.sections.get("train_step", []) + ["Largest batch per domain (bfloat16): " + "; ".join(
        f"{k}: {v.get('largest_fitting') or v.get('skipped', 'none found')} (tried {v.get('tried', [])})"
        for k, v in run.results["max_batch"].items()), ""]


def part_train_step(run: Run) -> dict:
  rows = (("jax", "bfloat16"), ("torch_channels_last", "bfloat16"), ("jax", "float32"), ("torch", "float32"))
  if run.smoke:  # Each code path once: a JAX row and a PyTorch row.
    # PyTorch's bfloat16 on a CPU without native bfloat16 (e.g. an AMD EPYC without AVX-512) took over 12
    # CPU-minutes for this one row; float32 is native on every x86-64 CPU and runs the same code path.
    rows = (("jax", "bfloat16"), ("torch_channels_last", "float32"))
    run.print("smoke mode: the PyTorch row runs in float32 (bfloat16 is not native on every CPU)")
  done = 0
  end = time.monotonic() + BUDGET_S["train_step"] * (4 if run.smoke else 1)
  for i, (framework, dtype) in enumerate(rows):
    # Its share of what is left of the part's budget, or more if the later parts leave more time.
    share = (end - time.monotonic()) / (len(rows) - i)
    result, _ = _row(run, framework, dtype, 1, budget=max(share, run.left() - run.reserved_after("train_step")))
    done += result is not None
  _train_step_table(run)
  return {"status": "ok" if done == len(rows) else ("partial" if done else "failed"), "rows": done}


def part_eval(run: Run) -> dict:
  if run.smoke:
    args = ["--label_size", "64x32", "--eval_size", "32x16", "--width", "8", "--blocks", "1,1,1,1", "--images", "2",
            "--sets", "full", "--repeats", "1"]
  else:
    args = ["--images", "8", "--sets", "full;full_flip", "--repeats", "3"]
  cmd = [sys.executable, os.path.join(ROOT, "bench", "eval.py"), *args]
  status, text = run.command(cmd, timeout=run.timeout("eval"), env=SHARED_PROCESS_ENV)
  tables = []
  for line in text.splitlines():  # Its tables and the upsampling line, a blank line between tables.
    if line.startswith("|") or line.startswith("full-resolution"):
      tables.append(line)
    elif tables and tables[-1]:
      tables.append("")
  run.results["eval"] = "\n".join(tables)
  run.sections["eval"] = ["## Evaluation at full resolution (bench/eval.py)", "", f"`{shlex.join(cmd[1:])}`", "", *tables, ""]
  return {"status": "ok" if status == 0 else ("killed" if status is None else "failed")}


def part_remat(run: Run) -> dict:
  result, _ = _row(run, "jax_remat", "bfloat16", 1, budget=run.timeout("remat"))
  _train_step_table(run)
  return {"status": "ok" if result else "failed"}


def is_oom(error: str | None) -> bool:
  return bool(error) and any(marker in error for marker in OOM_MARKERS)


def largest_batch(try_batch, peak_1: float, capacity: float, tries: int = 3, headroom: float = 0.9):
  """Searches the largest batch per domain that fits in `capacity` bytes.

  try_batch(b) -> (result or None, error text); peak_1: peak device bytes at batch 1. The first guess
  assumes the peak grows in proportion to the batch (the weights and optimiser state are small next
  to a batch's activations); then up by 1.3x while it fits, down to 0.7x of a batch that does not,
  at most `tries` runs, never a batch already known to fit or not to. Returns (the result of the
  largest batch that fitted or None, [(batch, "fits" | "out of memory" | error)]).
  """
  fits, too_big = 1, None  # Batch 1 fitted (that is where peak_1 comes from).
  batch = max(1, int(headroom * capacity / peak_1))
  best, tried = None, []
  for _ in range(tries):
    if batch <= fits or (too_big is not None and batch >= too_big):
      break
    result, error = try_batch(batch)
    if result is not None:
      best, fits = result, batch
      tried.append((batch, "fits"))
      batch = int(batch * 1.3) if too_big is None else (batch + too_big) // 2
    elif is_oom(error):
      too_big = batch
      tried.append((batch, "out of memory"))
      batch = min(max(fits + 1, int(batch * 0.7)), too_big - 1)
    else:
      tried.append((batch, (error.strip().splitlines() or ["error"])[-1][:200] if error else "error"))
      break
  return best, tried


def part_max_batch(run: Run) -> dict:
  rows = {(r["framework"], r["dtype"], r["batch"]): r for r in run.results.get("train_step_rows", [])}
  found = {}
  for framework in ("torch_channels_last", "jax", "jax_remat"):  # PyTorch's tries compile nothing: first.
    one = rows.get((framework, "bfloat16", 1))
    if one is None and not run.smoke and run.left() > MIN_S:  # A rerun of this part alone: measure batch 1 first.
      one, _ = _row(run, framework, "bfloat16", 1, budget=run.left())
    capacity = one and one.get("device_bytes_limit")
    if not one or not one.get("peak_device_bytes") or not capacity:
      run.print(f"max_batch {framework}: no batch-1 row with device memory figures (a CPU has none): skipped")
      found[framework] = {"skipped": "no device memory figures"}
      continue
    if run.left() < MIN_S:
      found[framework] = {"skipped": "no time left"}
      continue
    # Each try compiles a new program: it may take what is left (the part comes last).
    best, tried = largest_batch(lambda b: _row(run, framework, "bfloat16", b, budget=run.left()),
                                one["peak_device_bytes"], capacity)
    found[framework] = {"largest_fitting": best and best["batch"], "tried": tried}
    run.print(f"max_batch {framework}: tried {tried}")
  run.results["max_batch"] = found
  _train_step_table(run)
  ok = [f for f, v in found.items() if v.get("largest_fitting")]
  return {"status": "ok" if len(ok) == len(found) else ("partial" if ok else "skipped"), "found": found}


PART_FUNCTIONS = {"env": part_env, "tests": part_tests, "numerics": part_numerics, "train_step": part_train_step,
                  "eval": part_eval, "remat": part_remat, "max_batch": part_max_batch}


def check(parts, deadline_s: float, out: str | None, smoke: bool) -> int:
  run = Run(parts, deadline_s, out, smoke)
  run.print(f"maxsq_jax device check{' (CPU smoke mode)' if smoke else ''}: parts {','.join(parts)}, "
            f"deadline {deadline_s:.0f} s, output {out or '(stdout only)'}")
  for name in parts:
    left = run.left()
    if left < MIN_S:
      run.results["parts"][name] = {"status": "skipped", "why": f"{left:.0f} s left"}
      run.print(f"\n== {name}: skipped ({left:.0f} s left)")
      continue
    run.print(f"\n== {name} (budget {BUDGET_S[name]} s, {left:.0f} s left)")
    t = time.monotonic()
    try:
      outcome = PART_FUNCTIONS[name](run)
    except Exception as e:  # A broken part must not stop the others: report it and go on.
      import traceback
      run.print(traceback.format_exc())
      outcome = {"status": "failed", "error": repr(e)}
    outcome["seconds"] = round(time.monotonic() - t, 1)
    run.results["parts"][name] = outcome
    run.print(f"== {name}: {outcome['status']} in {outcome['seconds']} s")
    run.save()
  run.save()
  run.print("\n" + run.markdown())
  run.print(f"device check finished in {time.monotonic() - run.start:.0f} s")
  return 0 if all(v["status"] in ("ok", "skipped") for v in run.results["parts"].values()) else 1


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--prepare", action="store_true", help="download the wheels the GPU image lacks into .whl/")
  p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: the same code paths in about a minute")
  p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
  p.add_argument("--deadline", type=float, default=None, help="seconds for the whole run (default 450; smoke 600)")
  p.add_argument("--out", default=os.environ.get("OUT") or None, help="folder for the log, JSON and tables (default $OUT)")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child == "numerics":
    print("RESULT " + json.dumps(numerics_child(args.smoke)), flush=True)
    return 0
  if args.prepare:
    return prepare()
  parts = args.parts.split(",")
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    p.error(f"unknown parts {unknown}; choose from {','.join(PARTS)}")
  return check(parts, args.deadline or (600 if args.smoke else 450), args.out, args.smoke)


if __name__ == "__main__":
  sys.exit(main())
