"""Benchmark of evaluation throughput, full resolution included (maxsq_jax.evaluator.Evaluator).

  python bench/eval.py [--label_size 2048x1024] [--eval_size 1024x512] [--width 64] [--blocks 3,4,23,3]
                       [--images 8] [--batch 1] [--dtype float32] [--sets reference;full;full_flip;all]
                       [--no_torch]

For each protocol set (`;`-separated; "all" = reference, reference_flip, full, full_flip) it reports
the eval step's compile time, the device throughput (images/s of the jitted step on device-resident
batches) and the end-to-end throughput of `Evaluator.confusions` over an in-memory split of random
images at --label_size (host resize to eval size, full-resolution label padding, transfer and the
step, with the evaluator's background loading). It also times the full-resolution upsampling alone
(eval-size softmax -> label size): the per-image gather used by the evaluator vs the interpolation
matrices of models.layers. Beside it, in the same run, the reference's full-resolution evaluation
in PyTorch on its CUDA device when it has one (forward, F.interpolate to the label size, argmax,
bincount; with and without flip) and
the ratio of the "full" / "full_flip" device throughput to it. Run by hand; not part of the tests.
"""

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

ALL = ("reference", "reference_flip", "full", "full_flip")


def parse_size(text):
  w, h = text.lower().split("x")
  return int(w), int(h)


def timed(fn, repeats):
  import jax
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return float(np.mean(times))


def upsample_bench(eval_size, label_size, batch, classes, repeats):
  import jax
  import jax.numpy as jnp

  from maxsq_jax.evaluator import upsample_bilinear_align_corners
  from maxsq_jax.models.layers import resize_bilinear_align_corners
  (w, h), (lw, lh) = eval_size, label_size
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(batch, h, w, classes)), jnp.float32)
  hw = jnp.asarray(np.tile([[lh, lw]], (batch, 1)), jnp.int32)
  gather = jax.jit(lambda x, hw: jnp.argmax(upsample_bilinear_align_corners(x, hw, (lh, lw)), -1))
  matrix = jax.jit(lambda x: jnp.argmax(resize_bilinear_align_corners(x, (lh, lw)), -1))
  return {"gather_s": timed(lambda: gather(x, hw), repeats), "matrix_s": timed(lambda: matrix(x), repeats)}


def torch_full_resolution(eval_size, label_size, batch, blocks, width, classes, repeats):
  """Images/s of the reference's full-resolution evaluation in PyTorch (docs/method.md, Evaluation): eval-mode
  forward at eval size, bilinear (align_corners=True) upsampling of the logits to the label size,
  argmax, confusion by bincount; and the same with flip (mirror-averaged softmax)."""
  import torch
  import torch.nn.functional as F
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  from torch_deeplab import DeeplabMulti
  (w, h), (lw, lh) = eval_size, label_size
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  model = DeeplabMulti(classes, blocks=tuple(blocks), width=width).eval().to(device)
  rng = np.random.default_rng(0)
  image = torch.from_numpy(rng.normal(0, 50, (batch, 3, h, w)).astype(np.float32)).to(device)
  label = torch.from_numpy(rng.integers(-1, classes, (batch, lh, lw)).astype(np.int64)).to(device)

  def evaluate(flip):
    with torch.no_grad():
      prob = F.softmax(model(image)[0], dim=1)
      if flip:
        prob = (prob + torch.flip(F.softmax(model(torch.flip(image, [3]))[0], dim=1), [3])) / 2
      prob = F.interpolate(prob, size=(lh, lw), mode="bilinear", align_corners=True)
      prediction = prob.argmax(1)
      valid = label >= 0
      # .cpu() waits for the device, as the evaluator's confusion matrix does.
      return torch.bincount(label[valid] * classes + prediction[valid], minlength=classes ** 2).cpu()

  out = {}
  for flip in (False, True):
    evaluate(flip)
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      evaluate(flip)
      times.append(time.perf_counter() - t)
    out["full_flip" if flip else "full"] = batch / float(np.mean(times))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--label_size", default="2048x1024")
  p.add_argument("--eval_size", default="1024x512")
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--blocks", default="3,4,23,3")
  p.add_argument("--images", type=int, default=8)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--sets", default="reference;full;full_flip;all")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--no_torch", action="store_true", help="skip the PyTorch full-resolution comparison")
  args = p.parse_args()

  import jax
  import jax.numpy as jnp
  from train_step import device_description, versions

  from maxsq_jax import evaluator as evaluator_lib, train
  from maxsq_jax.config_base import base_config
  from maxsq_jax.data import pipeline

  label_size, eval_size = parse_size(args.label_size), parse_size(args.eval_size)
  rng = np.random.default_rng(0)
  lw, lh = label_size
  source = [{"image": rng.integers(0, 256, (lh, lw, 3)).astype(np.uint8),
             "label": rng.integers(-1, 19, (lh, lw)).astype(np.int32), "index": np.int32(i)}
            for i in range(args.images)]
  c = base_config()
  c.model.blocks, c.model.width, c.model.dtype = tuple(int(b) for b in args.blocks.split(",")), args.width, args.dtype
  c.eval.num_vis_images = 0
  mesh = train.create_mesh()
  model = train.build_model(c)
  variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, 64, 64, 3)), train=False))(jax.random.key(0))
  rows = []
  for protocol_set in args.sets.split(";"):
    c.eval.protocols = ALL if protocol_set == "all" else tuple(protocol_set.split(","))
    eval_set = pipeline.EvalData(source, batches_per_host=-(-args.images // args.batch), per_host_batch=args.batch,
                                 size=eval_size, normalization="bgr_mean")
    evaluator = evaluator_lib.Evaluator(c, model, mesh, eval_set)
    batch = next(evaluator.eval_set.batches(mesh))
    t = time.perf_counter()
    compiled = evaluator._step.lower(variables["params"], variables["batch_stats"], batch).compile()
    compile_s = time.perf_counter() - t
    step_s = timed(lambda: compiled(variables["params"], variables["batch_stats"], batch), args.repeats)
    evaluator.confusions(variables["params"], variables["batch_stats"])  # Warm (and cache) the jit.
    t = time.perf_counter()
    evaluator.confusions(variables["params"], variables["batch_stats"])
    e2e_s = time.perf_counter() - t
    rows.append((",".join(c.eval.protocols), compile_s, args.batch / step_s, args.images / e2e_s))
    print(f"done: {protocol_set}", file=sys.stderr, flush=True)
  up = upsample_bench(eval_size, label_size, args.batch, 19, args.repeats)
  blocks = tuple(int(b) for b in args.blocks.split(","))
  torch_ips = {} if args.no_torch else torch_full_resolution(eval_size, label_size, args.batch, blocks, args.width, 19,
                                                             args.repeats)

  print(f"{time.strftime('%Y-%m-%d')}, {device_description()}, versions {versions()}")
  print(f"command: python bench/eval.py {' '.join(sys.argv[1:])}")
  print(f"model: DeepLab-v2 blocks {args.blocks}, width {args.width}, {args.dtype}; {args.images} images, "
        f"labels {args.label_size}, eval size {args.eval_size}, batch {args.batch}\n")
  print("| protocols | compile s | device images/s | end-to-end images/s |")
  print("|---|---|---|---|")
  for name, compile_s, device_ips, e2e_ips in rows:
    print(f"| {name} | {compile_s:.1f} | {device_ips:.3f} | {e2e_ips:.3f} |")
  single = {name: device_ips for name, _, device_ips, _ in rows if "," not in name}
  if torch_ips:
    print("\n| protocol | maxsq_jax device images/s | PyTorch images/s | JAX / PyTorch |")
    print("|---|---|---|---|")
    for name, ips in torch_ips.items():
      ours = single.get(name)
      print(f"| {name} | {ours if ours is None else f'{ours:.3f}'} | {ips:.3f} | "
            f"{'-' if ours is None else f'{ours / ips:.2f}x'} |")
  print(f"\nfull-resolution upsampling + argmax alone ({args.eval_size} -> {args.label_size}, 19 classes, batch {args.batch}): "
        f"gather {up['gather_s'] * 1e3:.0f} ms, interpolation matrices {up['matrix_s'] * 1e3:.0f} ms")


if __name__ == "__main__":
  main()
