"""Benchmark of one training step (a source and a target image per step, MaxSquare adaptation):
maxsq_jax's jitted step vs the same step in PyTorch (bench/torch_reference.py), side by side.

  python bench/train_step.py [--sizes 1280x720/1024x512,128x64] [--width 64] [--blocks 3,4,23,3]
                             [--dtypes float32,bfloat16] [--frameworks jax,torch] [--steps 3]
                             [--batch 1] [--breakdown]

Each (framework, size, dtype) runs in its own process (so peak memory is its own), on the default
device: JAX's (a GPU when jax sees one), PyTorch's CUDA device when torch sees one, else the CPU.
Reported: images/s (2 * batch images per step), step time (mean of --steps after one warm-up step),
compile time (JAX: lower + compile; PyTorch: eager, first step), peak memory (device peak where the
runtime reports one: JAX's memory_stats, torch.cuda.max_memory_allocated; else the process's peak
RSS), the step's FLOPs from XLA's cost analysis (the same work per image pair is counted for
PyTorch), achieved FLOP/s, and the device's measured matmul peak in the same process (a square
float32 / bfloat16 matmul: 4096 on a CPU, 8192 on a GPU). PyTorch "bfloat16" is autocast to bfloat16
(parameters float32), as maxsq_jax's bfloat16 activations. Frameworks: jax (as shipped), jax_remat
(config.model.remat: every bottleneck rematerialised), the ablations of `use_conv_variant`, torch and
torch_channels_last. `--breakdown` also times the JAX forward pass, the forward + loss and forward +
backward on their own. Run by hand (bench/device_check.py runs it on a GPU); not part of the tests.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parse_size(text):
  w, h = text.lower().split("x")
  return int(w), int(h)


def parse_sizes(text):
  """"WxH" (source and target image the same size) or "SWxSH/TWxTH" -> ((sw, sh), (tw, th))."""
  parts = text.split("/")
  return parse_size(parts[0]), parse_size(parts[-1])


# ----------------------------------------------------------------------------------------------
# JAX.


def jax_peak_flops(dtype_name: str, repeats: int = 3) -> float:
  """FLOP/s of the fastest of `repeats` square matmuls (random data) in `dtype_name` on JAX's device."""
  import jax
  import jax.numpy as jnp
  n = 4096 if jax.default_backend() == "cpu" else 8192
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype_name))
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def _cost_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def _device_memory():
  """(peak bytes in use, bytes the allocator may use) of JAX's device, or Nones (a CPU reports none)."""
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use"), stats.get("bytes_limit")


def _temp_bytes(compiled):
  """XLA's own count of the compiled step's temporary buffers (activations kept for the backward)."""
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # Not every backend implements it.
    return None
  return getattr(analysis, "temp_size_in_bytes", None)


def use_conv_variant(variant: str) -> None:
  """Ablations of the model (same parameters and function, other implementations):
  "jax": the model as shipped (1x1 convs as matmuls: deeplab.PointwiseConv);
  "jax_nnconv": every conv an nn.Conv (the first implementation);
  "jax_dw9": as shipped + the 3x3 backbone convs' weight gradient as 9 shifted matmuls (custom VJP);
  "jax_im2col": as shipped + the 3x3 backbone convs with >= 256 channels as one im2col matmul."""
  if variant == "jax_remat":  # The shipped convolutions; the remat is config.model.remat.
    variant = "jax"
  import functools

  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from jax import lax

  from maxsq_jax.models import deeplab
  shipped = deeplab._conv

  def nnconv(features, kernel, *, stride=1, padding=0, dilation=1, dtype, name):
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((padding, padding), (padding, padding)),
                   kernel_dilation=(dilation, dilation), use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                   kernel_init=deeplab.backbone_kernel_init, name=name)

  def conv_same(x, w, d):
    return lax.conv_general_dilated(x, w, (1, 1), ((d, d), (d, d)), rhs_dilation=(d, d),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))

  @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
  def conv_dw9(x, w, d):
    return conv_same(x, w, d)

  def fwd(x, w, d):
    return conv_same(x, w, d), (x, w)

  def bwd(d, res, dy):
    x, w = res
    dx = jax.vjp(lambda x: conv_same(x, w, d), x)[1](dy)[0]
    xp = jnp.pad(x, ((0, 0), (d, d), (d, d), (0, 0)))
    h, wd = dy.shape[1:3]
    dw = jnp.stack([jnp.stack([jnp.einsum("bhwc,bhwo->co", xp[:, i * d:i * d + h, j * d:j * d + wd], dy)
                               for j in range(3)]) for i in range(3)])
    return dx, dw.astype(w.dtype)

  conv_dw9.defvjp(fwd, bwd)

  def conv_im2col(x, w, d):
    h, wd = x.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (d, d), (d, d), (0, 0)))
    cols = jnp.concatenate([xp[:, i * d:i * d + h, j * d:j * d + wd] for i in range(3) for j in range(3)], axis=-1)
    return jnp.einsum("bhwk,ko->bhwo", cols, w.reshape(-1, w.shape[-1]))

  class Conv3x3(nn.Module):
    """A stride-1 'same' 3x3 convolution (the backbone's conv2) computed by `compute(x, kernel, dilation)`."""
    features: int
    compute: object
    dilation: int = 1
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
      kernel = self.param("kernel", deeplab.backbone_kernel_init, (3, 3, x.shape[-1], self.features), jnp.float32)
      return self.compute(x.astype(self.dtype), kernel.astype(self.dtype), self.dilation)

  def replacing_3x3(compute, min_features=0):
    def conv(features, kernel, *, stride=1, padding=0, dilation=1, dtype, name):
      if kernel == 3 and stride == 1 and padding == dilation and features >= min_features:
        return Conv3x3(features, compute, dilation, dtype=dtype, name=name)
      return shipped(features, kernel, stride=stride, padding=padding, dilation=dilation, dtype=dtype, name=name)
    return conv

  deeplab._conv = {"jax": shipped, "jax_nnconv": nnconv, "jax_dw9": replacing_3x3(conv_dw9),
                   "jax_im2col": replacing_3x3(conv_im2col, min_features=256)}[variant]


def run_jax(size, dtype_name, width, blocks, steps, batch, breakdown, variant="jax"):
  """size: the --sizes entry ("WxH" or "SWxSH/TWxTH")."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from maxsq_jax import objective as objective_lib, optim, train, train_step as step_lib
  from maxsq_jax.config_base import base_config
  use_conv_variant(variant)

  c = base_config()
  c.model.blocks, c.model.width, c.model.dtype = tuple(blocks), width, dtype_name
  c.model.bn_group_size = 1
  # Each tensor stepped once on both sides (torch_reference.make_step's default), as when
  # bench/RESULTS.md was measured; the "reference" rule adds only elementwise work per tensor.
  c.optim.rule = "nominal"
  c.model.remat = variant == "jax_remat"
  model = train.build_model(c)
  (w, h), (tw, th) = parse_sizes(size)
  rng = np.random.default_rng(0)
  source = {"image": jnp.asarray(rng.normal(0, 50, (batch, h, w, 3)), jnp.float32),
            "label": jnp.asarray(rng.integers(-1, 19, (batch, h, w)), jnp.int32)}
  target = {"image": jnp.asarray(rng.normal(0, 50, (batch, th, tw, 3)), jnp.float32)}
  baseline = rss_mb()
  t0 = time.perf_counter()
  params_shape = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))["params"]
  tx, schedule = optim.make_optimizer(c.optim, schedule_steps=c.optim.schedule_steps, params=params_shape,
                                      multi_level=False, aspp_branches=c.model.aspp_branches)
  state = jax.jit(lambda r: step_lib.init_state(model, tx, r, (1, 64, 64, 3)))(jax.random.key(0))
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  step = jax.jit(step_lib.make_train_step(model, objective_lib.make_objective(c.loss), tx, schedule, "adapt"),
                 donate_argnums=(0,))
  t0 = time.perf_counter()
  lowered = step.lower(state, source, target)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  flops = _cost_flops(compiled)
  state, metrics = compiled(state, source, target)  # Warm-up.
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = compiled(state, source, target)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  step_s = float(np.mean(times))
  out = {"framework": variant, "size": size, "dtype": dtype_name, "batch": batch, "step_s": step_s,
         "step_s_min": float(np.min(times)), "step_s_median": float(np.median(times)),
         "images_per_s": 2 * batch / step_s, "compile_s": compile_s,
         "init_s": init_s, "flops": flops, "peak_device_bytes": _device_memory()[0],
         "device_bytes_limit": _device_memory()[1],
         "xla_temp_bytes": _temp_bytes(compiled), "device": str(jax.devices()[0].device_kind),
         "peak_rss_mb": rss_mb(), "baseline_rss_mb": baseline, "loss": float(metrics["loss"])}
  if breakdown:
    out["breakdown"] = jax_breakdown(model, objective_lib.make_objective(c.loss), state, source, target, steps)
  out["matmul_peak_flops"] = jax_peak_flops("bfloat16" if dtype_name == "bfloat16" else "float32")
  return out


def jax_breakdown(model, objective, state, source, target, steps):
  """Seconds of: forward (source, train mode), forward + loss, value_and_grad of the whole loss."""
  import jax
  import numpy as np

  def forward(params, batch_stats, images):
    (main, _), _ = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                               mutable=["batch_stats"])
    return main

  def fwd_loss(params, batch_stats, s, t):
    (main, aux), upd = model.apply({"params": params, "batch_stats": batch_stats}, s["image"], train=True,
                                   mutable=["batch_stats"])
    loss, _ = objective.source_loss(main, aux, s["label"])
    (main_t, aux_t), _ = model.apply({"params": params, "batch_stats": upd["batch_stats"]}, t["image"], train=True,
                                     mutable=["batch_stats"])
    target_loss, _ = objective.target_loss(main_t, aux_t)
    return loss + target_loss

  fns = {"forward_1_image": (jax.jit(forward), (state.params, state.batch_stats, source["image"])),
         "forward_loss_2_images": (jax.jit(fwd_loss), (state.params, state.batch_stats, source, target)),
         "forward_backward_2_images": (jax.jit(jax.grad(fwd_loss)), (state.params, state.batch_stats, source, target))}
  out = {}
  for name, (fn, args) in fns.items():
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
      t = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - t)
    out[name] = float(np.mean(times))
  return out


# ----------------------------------------------------------------------------------------------
# PyTorch.


def _torch_sync(device) -> None:
  import torch
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def torch_peak_flops(dtype_name: str, device, repeats: int = 3) -> float:
  """FLOP/s of the fastest of `repeats` square matmuls (random data) in `dtype_name` on `device`."""
  import torch
  n = 8192 if device.type == "cuda" else 4096
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
  a = torch.randn((n, n), dtype=dtype, device=device)
  a @ a
  _torch_sync(device)
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    a @ a
    _torch_sync(device)
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def run_torch(size, dtype_name, width, blocks, steps, batch, channels_last):
  import numpy as np
  import torch

  from bench import torch_reference
  torch.manual_seed(0)
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  (w, h), (tw, th) = parse_sizes(size)
  baseline = rss_mb()
  model = torch_reference.build(19, blocks, width, channels_last=channels_last).to(device)
  step = torch_reference.make_step(model)
  rng = np.random.default_rng(0)
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  put = lambda a: torch.from_numpy(a).to(device)
  src = put(rng.normal(0, 50, (batch, 3, h, w)).astype(np.float32)).contiguous(memory_format=fmt)
  lbl = put(rng.integers(-1, 19, (batch, h, w)).astype(np.int64))
  tgt = put(rng.normal(0, 50, (batch, 3, th, tw)).astype(np.float32)).contiguous(memory_format=fmt)
  autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=(dtype_name == "bfloat16"))
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats(device)
  t0 = time.perf_counter()
  with autocast:
    step(0, src, lbl, tgt)
  _torch_sync(device)
  first_s = time.perf_counter() - t0
  times = []
  for i in range(steps):
    t = time.perf_counter()
    with autocast:
      losses = step(i + 1, src, lbl, tgt)
    float(losses[0])
    times.append(time.perf_counter() - t)
  step_s = float(np.mean(times))
  cuda = device.type == "cuda"
  return {"framework": "torch" + ("_channels_last" if channels_last else ""), "size": size,
          "dtype": dtype_name, "batch": batch, "step_s": step_s, "step_s_min": float(np.min(times)),
          "step_s_median": float(np.median(times)),
          "images_per_s": 2 * batch / step_s, "compile_s": first_s, "peak_rss_mb": rss_mb(),
          "peak_device_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
          "device_bytes_limit": torch.cuda.get_device_properties(device).total_memory if cuda else None,
          "device": torch.cuda.get_device_name(device) if cuda else "cpu",
          "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
          "baseline_rss_mb": baseline, "threads": torch.get_num_threads(), "loss": float(losses[0]),
          "matmul_peak_flops": torch_peak_flops(dtype_name, device)}


# ----------------------------------------------------------------------------------------------
# Driver.


def child(args):
  size = args.size
  blocks = tuple(int(b) for b in args.blocks.split(","))
  if args.child.startswith("jax"):
    out = run_jax(size, args.dtype, args.width, blocks, args.steps, args.batch, args.breakdown, args.child)
  else:
    out = run_torch(size, args.dtype, args.width, blocks, args.steps, args.batch, args.child == "torch_channels_last")
  out.update({"width": args.width, "blocks": list(blocks)})
  print("RESULT " + json.dumps(out), flush=True)


def run_child(framework, size, dtype, batch, *, steps=3, width=64, blocks="3,4,23,3", breakdown=False,
              timeout=None, env=None):
  """Runs one row in its own process; returns (result dict, None) or (None, the end of its stderr).
  A row that runs past `timeout` seconds is killed and reported as an error."""
  cmd = [sys.executable, os.path.abspath(__file__), "--child", framework, "--size", size, "--dtype", dtype,
         "--width", str(width), "--blocks", blocks, "--steps", str(steps), "--batch", str(batch)]
  if breakdown:
    cmd.append("--breakdown")
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})
  except subprocess.TimeoutExpired as e:
    stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
    return None, f"{stderr[-2000:]}\ntimed out after {timeout:.0f} s"
  line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
  if line is None:
    return None, proc.stderr[-3000:]
  return json.loads(line[len("RESULT "):]), None


def versions() -> dict:
  import importlib.metadata as md
  out = {"python": platform.python_version()}
  for p in ("jax", "jaxlib", "flax", "torch", "numpy"):
    try:
      out[p] = md.version(p)
    except md.PackageNotFoundError:
      pass
  return out


def device_description() -> str:
  import jax
  d = jax.devices()[0]
  cpu = ""
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return f"{d.platform}:{d.device_kind} ({cpu}, {os.cpu_count()} cores visible)"


def table(results) -> str:
  lines = ["| framework | size | dtype | batch | images/s | step s | compile s | peak mem MB | GFLOP/step | "
           "achieved GFLOP/s | matmul peak GFLOP/s | % of peak |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  # One work count per (size, dtype) for every row: XLA's count of the shipped step ("jax") per image
  # pair, times the row's batch, so that achieved FLOP/s compares the same work (the variants' own
  # counts include their rewrites' extra ops, remat's its recomputation).
  per_pair = {}
  for r in sorted(results, key=lambda r: r["framework"] != "jax"):
    if r["framework"].startswith("jax") and r.get("flops"):
      per_pair.setdefault((r["size"], r["dtype"]), r["flops"] / r["batch"])
  for r in results:
    # The same work in another dtype where the row's own has no JAX count (the smoke's float32 PyTorch row).
    f = (per_pair.get((r["size"], r["dtype"])) or per_pair.get((r["size"], "float32"))
         or next((v for (size, _), v in per_pair.items() if size == r["size"]), None))
    f = f * r["batch"] if f else (r.get("flops") or float("nan"))
    achieved = f / r["step_s"]
    mem = r.get("peak_device_bytes")
    mem_text = f"{mem / 2**20:.0f} (device)" if mem else f"{r['peak_rss_mb'] - r['baseline_rss_mb']:.0f} (RSS)"
    lines.append(f"| {r['framework']} | {r['size']} | {r['dtype']} | {r['batch']} | {r['images_per_s']:.3f} | "
                 f"{r['step_s']:.3f} | {r['compile_s']:.1f} | {mem_text} | {f / 1e9:.1f} | {achieved / 1e9:.1f} | "
                 f"{r['matmul_peak_flops'] / 1e9:.0f} | {100 * achieved / r['matmul_peak_flops']:.0f} |")
  lines += ["", "| size | dtype | batch | JAX / PyTorch images/s |", "|---|---|---|---|"]
  for r in results:
    if not r["framework"].startswith("jax"):
      continue
    for t in results:
      if (t["framework"].startswith("torch") and t["size"] == r["size"] and t["dtype"] == r["dtype"]
          and t["batch"] == r["batch"]):
        lines.append(f"| {r['size']} | {r['dtype']} | {r['batch']} | {r['framework']}: "
                     f"{r['images_per_s'] / t['images_per_s']:.2f}x vs {t['framework']} |")
  for r in results:
    if "breakdown" in r:
      b = r["breakdown"]
      lines += ["", f"{r['framework']} breakdown {r['size']} {r['dtype']} (s): " + ", ".join(f"{k} {v:.3f}" for k, v in b.items())
                + f", full step {r['step_s']:.3f}"]
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sizes", default="128x64",
                 help="comma-separated WxH, or SWxSH/TWxTH for different source and target sizes (the reference's: "
                      "1280x720/1024x512)")
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--blocks", default="3,4,23,3")
  p.add_argument("--dtypes", default="float32")
  p.add_argument("--frameworks", default="jax,torch",
                 help="jax (as shipped), jax_nnconv, jax_dw9, jax_im2col (ablations: "
                      "use_conv_variant), torch, torch_channels_last")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--batch", type=int, default=1, help="images per domain per step")
  p.add_argument("--breakdown", action="store_true")
  p.add_argument("--json", default=None, help="also write the raw results here")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  p.add_argument("--size", default=None, help=argparse.SUPPRESS)
  p.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    return child(args)
  results = []
  load_start = os.getloadavg()
  for size in args.sizes.split(","):
    for dtype in args.dtypes.split(","):
      for fw in args.frameworks.split(","):
        result, error = run_child(fw, size, dtype, args.batch, steps=args.steps, width=args.width,
                                  blocks=args.blocks, breakdown=args.breakdown)
        if result is None:
          print(f"{fw} {size} {dtype} failed:\n{error}", file=sys.stderr)
          continue
        results.append(result)
        print(f"done: {fw} {size} {dtype}: {result['images_per_s']:.3f} images/s", file=sys.stderr, flush=True)
  header = (f"{time.strftime('%Y-%m-%d')}, {device_description()}, versions {versions()}\n"
            f"command: python bench/train_step.py {' '.join(sys.argv[1:])}\n"
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}\n"
            f"load average (1 min) at start / end: {load_start[0]:.1f} / {os.getloadavg()[0]:.1f} (a shared machine: "
            f"other processes compete for the cores)\n"
            f"model: DeepLab-v2 blocks ({args.blocks}), width {args.width}, 19 classes; one source + one target "
            f"image per step per --batch; MaxSquare (lambda 0.1) + source CE; SGD momentum, poly lr\n")
  print(header)
  print(table(results))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"header": header, "results": results}, f, indent=1)


if __name__ == "__main__":
  main()
