"""Evaluation on a domain's eval split under several protocols, in one pass over the data: the
`Evaluator` that training calls and that `python -m maxsq_jax.evaluate` (evaluate.py, the command) runs.

Protocols (`config.eval.protocols`, docs/method.md and docs/evaluation.md):
  "reference"       images and labels resized to `config.eval.size` (labels nearest): the
                    reference's protocol (1024x512 for Cityscapes).
  "full"            the same forward pass at `eval.size`; its softmax is upsampled bilinearly with
                    align_corners=True (the model's own upsampling convention) to each label's
                    original size (e.g. 2048x1024), then argmax; labels are not resized.
  "<either>_flip"   the softmax is the average of the image's and its mirror image's (mirrored back).
All protocols share the forward passes (one per image, two if any protocol flips). The first
protocol is the headline: its mIoU is `results["miou"]` and `results["<tag>_miou"]`.

Every example is evaluated exactly once across hosts (padding examples are masked). Per batch the
device computes one int32 confusion matrix per protocol; the host sums them in int64 at the end
(no host sync inside the loop). mIoU follows metrics.py (nanmean over classes present in the
labels or the predictions); 16-class runs also report mIoU-13.

Writes (process 0) into `workdir`:
  eval/step_<N>/results.json, results.md           all protocols: mIoU (-13), per-class IoU, accuracy
  eval/step_<N>/confusion.npy                       headline protocol's [C, C] int64 confusion
  eval/step_<N>/confusion_<protocol>.npy, .png      every protocol's confusion, and as a heat map
  eval/step_<N>/pred_<i>.png                        image | label | prediction (headline, eval size)
  eval/step_<N>/errors_<i>.png                      errors coloured by missed | predicted class
  eval/step_<N>/class_errors_<i>.png                per-class TP (green) / FN (red) / FP (blue) maps
  results.json, results.md                          copies of the latest evaluation
and to TensorBoard / metrics.jsonl (via `writer`): eval_<tag>/miou (headline), eval_<tag>/iou/<class>,
eval_<tag>/<protocol>/{miou, miou_13, pixel_accuracy, iou/<class>}, the text table and the pictures.
"""

import dataclasses
import queue
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from maxsq_jax import jsonfile, metrics as metrics_lib, paths, visualize
from maxsq_jax.data import classes

RESOLUTIONS = ("reference", "full")
PROTOCOL_NAMES = ("reference", "reference_flip", "full", "full_flip")


@dataclasses.dataclass(frozen=True)
class Protocol:
  name: str
  full: bool  # Labels at their original size (predictions upsampled to it).
  flip: bool  # Softmax averaged with the mirrored image's.

  def describe(self, eval_size, canvas) -> str:
    if self.full:
      where = f"labels at original size (up to {canvas[0]}x{canvas[1]}), prediction at {eval_size[0]}x{eval_size[1]} upsampled"
    else:
      where = f"images and labels at {eval_size[0]}x{eval_size[1]}"
    return where + (", + flip" if self.flip else "")


def parse_protocols(names, flip_all: bool = False) -> tuple[Protocol, ...]:
  """Protocols from names like "reference", "full_flip"; flip_all=True (config.eval.flip) turns each into its flip variant."""
  if isinstance(names, str):
    names = [n.strip() for n in names.split(",") if n.strip()]
  out, seen = [], set()
  for name in names:
    base, _, suffix = name.partition("_")
    if base not in RESOLUTIONS or suffix not in ("", "flip"):
      raise ValueError(f"unknown evaluation protocol {name!r} (config.eval.protocols); use any of {PROTOCOL_NAMES}")
    flip = suffix == "flip" or flip_all
    protocol = Protocol(f"{base}_flip" if flip else base, full=(base == "full"), flip=flip)
    if protocol.name not in seen:
      seen.add(protocol.name)
      out.append(protocol)
  if not out:
    raise ValueError("config.eval.protocols is empty; give at least one of " + ", ".join(PROTOCOL_NAMES))
  return tuple(out)


def upsample_bilinear_align_corners(x, out_hw, canvas_hw):
  """Per-image bilinear upsampling with align_corners=True onto a padded canvas.

  x: float [B, h, w, C]; out_hw: int [B, 2] each image's output (height, width) <= canvas_hw
  (static (H, W)). Returns [B, H, W, C]; values outside an image's own size are don't-care (its
  label is -1 there). Same weights as `models.layers.resize_bilinear_align_corners` (PyTorch's
  float32 source coordinates), computed by gathers: 4 reads per output, no [H, h] matrices.
  """
  _, h, w, _ = x.shape
  height, width = canvas_hw

  def coords(in_size, out_size, n):
    out_size = out_size.astype(jnp.float32)
    scale = jnp.where(out_size > 1, jnp.float32(in_size - 1) / jnp.maximum(out_size - 1, 1), 0.0)
    src = jnp.arange(n, dtype=jnp.float32) * scale
    i0 = jnp.clip(jnp.floor(src).astype(jnp.int32), 0, in_size - 1)
    i1 = jnp.minimum(i0 + 1, in_size - 1)
    w1 = jnp.clip(src - i0.astype(jnp.float32), 0.0, 1.0)
    return i0, i1, w1

  def one(image, hw):
    i0, i1, w1 = coords(h, hw[0], height)
    rows = image[i0] * (1 - w1)[:, None, None] + image[i1] * w1[:, None, None]
    j0, j1, v1 = coords(w, hw[1], width)
    return rows[:, j0] * (1 - v1)[None, :, None] + rows[:, j1] * v1[None, :, None]

  return jax.vmap(one)(x, out_hw)


def make_eval_step(model, num_classes: int, protocols, canvas_hw=None):
  """eval_step(params, batch_stats, batch) -> (confusions [P, C, C] int32, predictions [B, h, w] int32).

  `predictions` are the headline protocol's at eval size (for pictures). Full-resolution protocols
  read batch["label_full"] [B, H, W] and batch["full_hw"] [B, 2]; `canvas_hw` = (H, W).
  """
  protocols = tuple(protocols)
  any_flip = any(p.flip for p in protocols)
  if any(p.full for p in protocols) and canvas_hw is None:
    raise ValueError("full-resolution protocols need canvas_hw")

  def eval_step(params, batch_stats, batch):
    variables = {"params": params, "batch_stats": batch_stats}
    main, _ = model.apply(variables, batch["image"], train=False)
    probs = {False: jax.nn.softmax(main.astype(jnp.float32), axis=-1)}
    if any_flip:
      mirrored, _ = model.apply(variables, batch["image"][:, :, ::-1], train=False)
      probs[True] = 0.5 * (probs[False] + jax.nn.softmax(mirrored.astype(jnp.float32), axis=-1)[:, :, ::-1])
    mask = batch.get("mask")
    confusions = []
    for p in protocols:
      if p.full:
        upsampled = upsample_bilinear_align_corners(probs[p.flip], batch["full_hw"], canvas_hw)
        prediction, label = jnp.argmax(upsampled, axis=-1).astype(jnp.int32), batch["label_full"]
      else:
        prediction, label = jnp.argmax(probs[p.flip], axis=-1).astype(jnp.int32), batch["label"]
      confusions.append(metrics_lib.confusion_matrix(prediction, label, num_classes, mask))
    headline = jnp.argmax(probs[protocols[0].flip], axis=-1).astype(jnp.int32)
    return jnp.stack(confusions), headline

  return eval_step


def jit_eval_step(model, num_classes: int, protocols, canvas_hw, mesh):
  """`make_eval_step` jitted on the mesh: confusions replicated, predictions split over "data"."""
  return jax.jit(make_eval_step(model, num_classes, protocols, canvas_hw),
                 out_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))))


def _prefetch(iterator, size: int = 2):
  """Runs `iterator` (host loading + transfer to device) in a thread, `size` batches ahead."""
  q: queue.Queue = queue.Queue(maxsize=size)
  done = object()
  stop = threading.Event()

  def work():
    try:
      for item in iterator:
        while not stop.is_set():
          try:
            q.put(item, timeout=0.5)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
      q.put(done)
    except BaseException as e:  # Re-raised in the consumer.
      q.put(e)

  thread = threading.Thread(target=work, daemon=True)
  thread.start()
  try:
    while True:
      item = q.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()


def _describe_examples(examples) -> str:
  while not hasattr(examples, "description") and hasattr(examples, "_examples"):
    examples = examples._examples
  return getattr(examples, "description", type(examples).__name__)


class Evaluator:
  """Compiles the eval step once per run and evaluates (params, batch_stats) on the eval split."""

  def __init__(self, config, model, mesh, eval_set):
    self.config, self.mesh = config, mesh
    self.num_classes = config.model.num_classes
    self.names = classes.class_names(self.num_classes)
    self.protocols = parse_protocols(config.eval.protocols, config.eval.flip)
    self.canvas = None  # (W, H) of full-resolution labels.
    if any(p.full for p in self.protocols):
      full_size = tuple(config.eval.full_size) or None
      eval_set = dataclasses.replace(eval_set, full_resolution=True, full_size=full_size)
      self.canvas = tuple(eval_set.full_canvas())
    self.eval_set = eval_set
    canvas_hw = None if self.canvas is None else (self.canvas[1], self.canvas[0])
    self._step = jit_eval_step(model, self.num_classes, self.protocols, canvas_hw, mesh)

  def confusions(self, params, batch_stats, num_pictures: int = 0):
    """({protocol name: [C, C] int64 confusion}, [(image, label, prediction)] of up to
    `num_pictures` real examples of this host, headline protocol, eval size)."""
    per_batch, examples = [], []
    for batch in _prefetch(self.eval_set.batches(self.mesh)):
      confusion, predictions = self._step(params, batch_stats, batch)
      per_batch.append(confusion)
      if len(examples) < num_pictures:
        examples.extend(_local_examples(batch, predictions, num_pictures - len(examples)))
    total = np.zeros((len(self.protocols), self.num_classes, self.num_classes), np.int64)
    for confusion in jax.device_get(per_batch):
      total += np.asarray(confusion, np.int64)
    return {p.name: total[i] for i, p in enumerate(self.protocols)}, examples

  def __call__(self, params, batch_stats, workdir: str, step: int, writer=None, tag: str = "target",
               extra: dict | None = None) -> dict:
    """Returns {"step", "miou" and "<tag>_miou" (fractions, headline protocol), "per_class_iou"
    {name: fraction|None}, "pixel_accuracy", "confusion" [C][C], "protocols" {name: {...}}, ...};
    16-class runs add "miou_13" and "<tag>_miou_13". `tag` names the evaluated domain; `extra`
    (JSON-ready) is added to the results (e.g. which checkpoint was evaluated)."""
    want_pictures = self.config.eval.num_vis_images if jax.process_index() == 0 else 0
    confusions, examples = self.confusions(params, batch_stats, want_pictures)
    results = {**self.results(confusions, step, tag), **(extra or {})}
    if jax.process_index() == 0:
      workdir = paths.resolve(workdir)
      out_dir = workdir / "eval" / f"step_{step}"
      write_results(results, confusions, out_dir, latest_dir=workdir)
      pictures = self.pictures(examples)
      for kind, images in pictures.items():
        for i, picture in enumerate(images):
          visualize.save_png(out_dir / f"{kind}_{i}.png", picture)
      for name, confusion in confusions.items():
        visualize.save_png(out_dir / f"confusion_{name}.png",
                           visualize.confusion_image(confusion, self.names))
      primary = self.protocols[0]
      table = metrics_lib.iou_table(confusions[primary.name], self.names, title=(
          f"{tag} evaluation at step {step}: {results['num_images']} images, {primary.name} protocol "
          f"({primary.describe(self.eval_set.size, self.canvas)})"))
      lines = [table, ""] + [f"  {name:<15} mIoU {_pct(r['miou'])}"
                             + (f"  mIoU-13 {_pct(r['miou_13'])}" if "miou_13" in r else "")
                             for name, r in results["protocols"].items()]
      print("\n".join(lines), flush=True)
      if writer is not None:
        self._log(writer, step, tag, results, confusions, pictures, "\n".join(lines))
    return results

  def results(self, confusions: dict, step: int, tag: str) -> dict:
    primary = self.protocols[0]
    protocols = {}
    for p in self.protocols:
      protocols[p.name] = {"labels": "original size" if p.full else "eval size", "flip": p.flip,
                           "description": p.describe(self.eval_set.size, self.canvas),
                           **metrics_lib.summarize(confusions[p.name], self.names),
                           "confusion": confusions[p.name].tolist()}
    head = protocols[primary.name]
    results = {"step": int(step), "tag": tag, "miou": head["miou"], f"{tag}_miou": head["miou"]}
    if "miou_13" in head:
      results.update({"miou_13": head["miou_13"], f"{tag}_miou_13": head["miou_13"]})
    results.update({
        "protocol": primary.name, "per_class_iou": head["per_class_iou"],
        "pixel_accuracy": head["pixel_accuracy"], "num_images": len(self.eval_set.examples),
        "split": _describe_examples(self.eval_set.examples), "num_classes": self.num_classes,
        "class_names": list(self.names), "eval_size": list(self.eval_set.size),
        "full_size": list(self.canvas) if self.canvas else None, "flip": primary.flip,
        "confusion": head["confusion"], "protocols": protocols})
    return results

  def pictures(self, examples) -> dict:
    normalization = self.config.data.normalization
    out = {"pred": [], "errors": [], "class_errors": []}
    for image, label, prediction in examples:
      out["pred"].append(visualize.enlarge(
          visualize.prediction_panel(image, label, prediction, self.num_classes, normalization)))
      out["errors"].append(visualize.enlarge(visualize.error_panel(label, prediction, self.num_classes)))
      out["class_errors"].append(visualize.class_error_grid(label, prediction, self.num_classes, self.names))
    return out

  def _log(self, writer, step, tag, results, confusions, pictures, text):
    scalars = {"miou": results["miou"], "pixel_accuracy": results["pixel_accuracy"],
               **{f"iou/{n}": v for n, v in results["per_class_iou"].items()}}
    if "miou_13" in results:
      scalars["miou_13"] = results["miou_13"]
    for name, r in results["protocols"].items():
      scalars.update({f"{name}/miou": r["miou"], f"{name}/pixel_accuracy": r["pixel_accuracy"],
                      **{f"{name}/iou/{n}": v for n, v in r["per_class_iou"].items()}})
      if "miou_13" in r:
        scalars[f"{name}/miou_13"] = r["miou_13"]
    # Classes absent from labels and predictions have no IoU: not logged (no NaN in metrics.jsonl).
    writer.scalars(step, {k: v for k, v in scalars.items() if v is not None}, prefix=f"eval_{tag}/", echo=False)
    writer.text(step, f"eval_{tag}/iou_table", text)
    for kind, images in pictures.items():
      name = {"pred": "prediction"}.get(kind, kind)
      for i, picture in enumerate(images):
        writer.image(step, f"eval_{tag}/{name}_{i}", picture)
    for name, confusion in confusions.items():
      writer.image(step, f"eval_{tag}/confusion_{name}", visualize.confusion_image(confusion, self.names))
    writer.flush()


def _pct(value) -> str:
  return "  n/a" if value is None else f"{100 * value:5.1f}"


def _local_examples(batch, predictions, limit):
  """(image, label, prediction) numpy triples of this host's first `limit` real examples of a batch."""
  def local(array):
    return np.concatenate([np.asarray(s.data) for s in sorted(
        array.addressable_shards, key=lambda s: s.index[0].start or 0)], axis=0)
  images, labels, preds, mask = (local(batch["image"]), local(batch["label"]), local(predictions),
                                 local(batch["mask"]))
  return [(images[i], labels[i], preds[i]) for i in range(len(images)) if mask[i]][:limit]


def results_markdown(results: dict) -> str:
  """The results of one evaluation as markdown: protocol summary, per-class IoU, pictures."""
  protocols = results["protocols"]
  names = results["class_names"]
  has13 = any("miou_13" in r for r in protocols.values())
  w, h = results["eval_size"]
  lines = [f"# Evaluation of `{results['tag']}` at step {results['step']}", "",
           f"{results['num_images']} images of {results['split']}; {results['num_classes']} classes; "
           f"eval size {w}x{h}"
           + (f"; full-resolution canvas {results['full_size'][0]}x{results['full_size'][1]}"
              if results.get("full_size") else "")
           + f". Headline protocol: `{results['protocol']}`. Files: `eval/step_{results['step']}/`.", "",
           "| protocol | what | mIoU | " + ("mIoU-13 | " if has13 else "") + "pixel acc | mean acc |",
           "|---|---|---|" + ("---|" if has13 else "") + "---|---|"]
  for name, r in protocols.items():
    lines.append(f"| {name} | {r['description']} | {_pct(r['miou']).strip()} | "
                 + (f"{_pct(r.get('miou_13')).strip()} | " if has13 else "")
                 + f"{_pct(r['pixel_accuracy']).strip()} | {_pct(r['mean_accuracy']).strip()} |")
  lines += ["", "## Per-class IoU (%)", "",
            "| class | " + " | ".join(protocols) + " | GT pixels (" + next(iter(protocols)) + ") |",
            "|---|" + "---|" * (len(protocols) + 1)]
  first = next(iter(protocols.values()))
  for n in names:
    lines.append(f"| {n} | " + " | ".join(_pct(r["per_class_iou"][n]).strip() for r in protocols.values())
                 + f" | {first['gt_pixels'][n]} |")
  lines += ["", "IoU = TP/(TP+FP+FN) over the dataset's confusion matrix; mIoU = mean over classes present "
            "in the labels or the predictions (n/a: absent from both)."
            + (" mIoU-13: IoUs over the 16 classes, averaged over the 13 of SUBSET_13." if has13 else ""), "",
            "Pictures (headline protocol, eval size): `pred_<i>.png` (image | label | prediction), "
            "`errors_<i>.png` (errors coloured by missed | predicted class), `class_errors_<i>.png` "
            "(per class: true positive green, missed red, false positive blue), `confusion_<protocol>.png`.", ""]
  return "\n".join(lines)


def write_results(results: dict, confusions: dict, out_dir, latest_dir=None) -> None:
  """results.json, results.md and confusion_<protocol>.npy (+ confusion.npy, the headline) in out_dir;
  results.json/.md also into `latest_dir` (the workdir) when given. Directories: local or gs://."""
  out_dir = paths.resolve(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  saved = {f"confusion_{name}.npy": confusion for name, confusion in confusions.items()}
  saved["confusion.npy"] = confusions[results["protocol"]]
  for name, confusion in saved.items():
    with (out_dir / name).open("wb") as f:
      np.save(f, np.asarray(confusion, np.int64))
  markdown = results_markdown(results)
  for directory in [out_dir] + ([paths.resolve(latest_dir)] if latest_dir else []):
    jsonfile.write(directory / "results.json", results, indent=1)
    jsonfile.write_text_atomic(directory / "results.md", markdown)
