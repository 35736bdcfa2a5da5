"""The full configuration schema, with the reference code's defaults.

Every experiment config in `configs/` starts from `base_config()` and changes fields; the train loop
reads only fields defined here. A key that is not here is an error naming it, whether a config file
adds it or the command line sets it (config_validation.schema_problems, cli.ConfigFileParser).
Sizes are (width, height), as in the reference's `--crop_size 1280,720`.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Returns the schema with GTA5 -> Cityscapes MaxSquare defaults (docs/method.md)."""
  c = ml_collections.ConfigDict()
  c.seed = 12345
  # "source_only": CE on source only. "adapt": CE on source + target loss. "source_then_adapt":
  # source-only into WORKDIR/source_only for `pretrain.num_steps`, then adapt from it into
  # WORKDIR/adapt, and print both target mIoUs (the demo). "adabn": AdaBN (config.adabn) of the
  # init_from model, no gradient step. "source_then_adabn": source-only, then AdaBN from it into
  # WORKDIR/adabn.
  c.stage = "adapt"
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.num_steps = 80000
  c.pretrain.schedule_steps = 200000

  c.model = ml_collections.ConfigDict()
  c.model.num_classes = 19
  c.model.blocks = (3, 4, 23, 3)  # Bottlenecks per stage: ResNet-101.
  c.model.width = 64  # Channels of the stem; stage widths are width*(1,2,4,8), x4 expansion.
  c.model.aspp_dilations = (6, 12, 18, 24)
  # The released checkpoints were trained with an early return that sums only the first two
  # ASPP branches (docs/method.md, Model); 4 gives the DeepLab-v2 that was intended.
  c.model.aspp_branches = 2
  # "train": batch statistics over groups of `bn_group_size` images (1 = per image, as the
  # reference at batch 1 per GPU), running stats updated; "frozen": running statistics, gamma/beta
  # still trained; "sync": statistics over the whole global batch across devices.
  c.model.bn_mode = "train"
  c.model.bn_group_size = 1
  c.model.dtype = "float32"  # Activation dtype: float32 or bfloat16 (parameters stay float32).
  # Recompute each bottleneck's activations in the backward pass instead of keeping them: same
  # numbers, less activation memory, ~1/3 more compute. Off: on XLA:CPU it saves no memory
  # (bench/RESULTS.md); for large batches on accelerators.
  c.model.remat = False

  c.data = ml_collections.ConfigDict()
  # Dataset names: data/registry.py (gta5, synthia, cityscapes, rome, rio, tokyo, taipei,
  # synthetic_source, synthetic_target, folder: your own images and labels, docs/datasets.md).
  c.data.source = "gta5"
  c.data.target = "cityscapes"
  # A tfds data_dir holding the prepared dataset (`python -m maxsq_jax.data.prepare`), or the
  # dataset's own downloaded folder; docs/datasets.md.
  c.data.source_dir = "data/tfds"
  c.data.target_dir = "data/tfds"
  c.data.source_split = "train"
  c.data.target_split = "train"
  c.data.source_size = (1280, 720)  # (W, H) after resize.
  c.data.target_size = (1024, 512)
  c.data.random_mirror = True
  c.data.gaussian_blur = True
  # The reference's optional random scale + crop instead of the plain resize (training only): the
  # limiting side scaled to U[lo, hi] x its size in source_size/target_size, zero-padded, cropped.
  c.data.random_scale_crop = False
  c.data.scale_range = (0.5, 2.0)
  c.data.normalization = "bgr_mean"  # "bgr_mean" (reference) or "rgb_mean_std".
  c.data.workers = 0  # grain worker processes per host (0: in the main process).
  c.data.threads = 2  # Threads per process (main or worker) loading batches ahead (0: none).
  c.data.prefetch = 2
  # On resume, data positions that cannot be restored into this pipeline (e.g. another data.workers)
  # are an error; True restarts the streams from their first batch instead (with a warning).
  c.data.restart_streams = False
  c.data.generate_synthetic = True  # Create a missing synthetic_* dataset instead of failing.
  # Synthetic-dataset generation (only read when a synthetic dataset is missing).
  c.data.synthetic_num_train = 400
  c.data.synthetic_num_val = 100
  c.data.synthetic_size = (128, 64)
  # > 0: the target domain's class-wise hue shift, in degrees (data/synthetic.py: a shift BatchNorm
  # cannot absorb). Give such a dataset its own data dirs: an existing folder is never regenerated.
  c.data.synthetic_class_hue_deg = 0.0

  c.loss = ml_collections.ConfigDict()
  c.loss.target = "max_square"  # Built-in name or "package.module:function".
  c.loss.lambda_target = 0.1
  c.loss.lambda_seg = 0.1  # Weight of the aux (layer3) head terms when multi_level.
  c.loss.multi_level = False
  c.loss.iw_ratio = 0.2
  c.loss.threshold = 0.95
  c.loss.normalization = "reference"  # "reference" (code) or "pixel" (paper: no 1/C).

  # AdaBN (Li et al., "Revisiting Batch Normalization for Practical Domain Adaptation"; maxsq_jax/adabn.py):
  # the model's BatchNorm running statistics re-estimated on target train images, parameters unchanged.
  c.adabn = ml_collections.ConfigDict()
  c.adabn.num_images = -1  # Target train images to use (-1: all); only whole batches of batch_size are used.
  c.adabn.batch_size = 8  # GLOBAL images per forward pass; must divide by the device count.
  # "cumulative": each statistic is the average over all batches (AdaBN); "momentum": the layers'
  # own running update (momentum 0.1) from the model's statistics, as a target pass in training does.
  c.adabn.accumulation = "cumulative"
  # Stage "adapt": AdaBN of the final model before its final checkpoint and evaluation, so that every
  # adaptation (the lambda_T = 0 control included) is evaluated with target statistics of the same kind
  # and only its parameters, i.e. its losses, tell it apart (configs/demo.py:losses).
  c.adabn.after_adapt = False

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2.5e-4
  c.optim.momentum = 0.9
  c.optim.weight_decay = 5e-4
  c.optim.poly_power = 0.9
  c.optim.head_lr_mult = 10.0
  c.optim.schedule_steps = 29760  # iter_max of the poly schedule.
  # "reference": the authors' optimiser as it ran (backbone tensors listed 3-4 times in the param
  # group, PyTorch <= 1.4 SGD per entry); "nominal": every tensor stepped once (docs/fidelity.md).
  c.optim.rule = "reference"

  c.batch_size = 1  # GLOBAL images per domain per step; must divide by the device count.
  c.num_steps = 29750  # Steps to run (iter_stop); may be < schedule_steps (the reference: 29,750 of 29,760).
  c.log_every = 50
  c.checkpoint_every = 1000
  c.max_to_keep = 3
  # Weights to start from when the workdir has no checkpoint: a converted-weights dir
  # (tools.convert_torch) or another run's workdir; "" trains from scratch.
  c.init_from = ""
  # Resuming a workdir with a config that differs from the one it was trained with is an error
  # unless this is True; the changes are then recorded in WORKDIR/config_history.jsonl. Changes
  # of the fields that shape the train state (the model, classes, stage, BN layout, multi-level heads,
  # momentum: run_config.STATE_FIELDS) are always errors.
  c.allow_config_change = False
  # jax's persistent compilation cache: restarts (a preempted pod, a rerun) load the compiled steps from
  # here instead of compiling again. A local path ("~" expanded; per host) or a gs:// URL shared by every
  # host and every VM that replaces one; "" turns it off. JAX_COMPILATION_CACHE_DIR, when set, wins.
  c.compilation_cache_dir = "~/.cache/maxsq_jax/jax"
  # "FIRST:LAST" (e.g. "10:15"): a jax.profiler trace of those steps into WORKDIR/tensorboard/ for
  # TensorBoard's profile plugin (maxsq_jax/profiling.py); "": none.
  c.profile_steps = ""

  # Evaluation: of the target's eval split every `every` steps and at the end (0: at the end only),
  # with the evaluate CLI, the loss analysis and the report.
  c.eval = ml_collections.ConfigDict()
  c.eval.every = 2975
  c.eval.batch_size = 8  # GLOBAL; must divide by the device count.
  c.eval.split = "val"  # Target split that is evaluated and reported.
  c.eval.source_split = ""  # If set (e.g. "val"), the source split is evaluated too (the gap).
  c.eval.size = (1024, 512)  # Images and labels resized to this for the reference protocol.
  c.eval.num_images = -1  # -1: the whole eval split.
  c.eval.num_vis_images = 4  # Examples drawn as pictures (eval/step_<N>/pred_<i>.png, ...) per evaluation.
  c.eval.flip = False  # True: every protocol of eval.protocols is evaluated with flip only.
  # Evaluation protocols, all computed in one pass over the eval split from the same forward
  # passes (one per image, two when a protocol flips). "reference": images and labels resized to
  # eval.size (docs/method.md, Evaluation); "full": predictions at eval.size, their softmax upsampled
  # (bilinear, align_corners=True as the model's own upsampling) to the labels' original size;
  # "_flip": the softmax averaged with that of the mirrored image. The first one is the headline
  # ("miou" in results.json, the number the demo prints); results files report them all.
  c.eval.protocols = ("reference", "reference_flip", "full", "full_flip")
  c.eval.full_size = ()  # (W, H) canvas for full-resolution labels; (): the first eval label's size.

  # A gs:// workdir on storage that stops answering. Metrics, TensorBoard files and host logs are
  # uploaded in the background and retried; a warning after `stall_warn_s` seconds without an
  # answer. A checkpoint that is not committed within `deadline_s` seconds stops every host with one
  # error line (the previous checkpoint is kept; rerun to resume).
  c.storage = ml_collections.ConfigDict()
  c.storage.stall_warn_s = 30.0
  c.storage.deadline_s = 600.0
  return c


# Flat keys of configs stored before the evaluation settings moved into `config.eval` -> their key
# now. Workdirs keep their config.json as written; readers upgrade it with `upgrade_flat`.
RENAMED = {
    "eval_every": "eval.every",
    "eval_batch_size": "eval.batch_size",
    "data.eval_split": "eval.split",
    "data.source_eval_split": "eval.source_split",
    "data.eval_size": "eval.size",
    "data.num_eval_images": "eval.num_images",
    "num_vis_images": "eval.num_vis_images",
    "eval_flip": "eval.flip",
    "eval_protocols": "eval.protocols",
    "eval_full_size": "eval.full_size",
}


def upgrade_flat(flat: dict) -> dict:
  """A flattened stored config ({"a.b": value}) with its keys renamed to the current schema (RENAMED)."""
  return {RENAMED.get(key, key): value for key, value in flat.items()}
