"""Entry point: `python -m maxsq_jax.main --config=configs/demo.py --workdir=workdirs/demo [--config.x=y]`.

Rerunning with the same workdir resumes from its latest checkpoint. Nothing in an existing workdir
is deleted except the oldest checkpoints beyond `config.max_to_keep`.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from maxsq_jax import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags (cli.run defines them when this module runs as a program)."""
  config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:variant]).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, evaluations and pictures: a local "
                      "path or a gs://BUCKET/PATH URL.")
  flags.DEFINE_string("coordinator_address", "", "Multi-host: HOST:PORT of process 0's coordinator "
                      "(not needed on Cloud TPU pods and SLURM, which are detected).")
  flags.DEFINE_integer("num_processes", 0, "Multi-host: number of processes (with --coordinator_address).")
  flags.DEFINE_integer("process_id", -1, "Multi-host: this process's index (with --coordinator_address).")
  flags.DEFINE_integer("startup_timeout_s", 0, "Multi-host: seconds to wait for all processes to join before "
                       "exiting with an error that names the missing ones (0: $MAXSQ_STARTUP_TIMEOUT_S, else 300).")
  flags.DEFINE_integer("heartbeat_timeout_s", 0, "Multi-host: seconds without a sign of life from a process before "
                       "the others stop with an error naming it (0: $MAXSQ_HEARTBEAT_TIMEOUT_S, else "
                       "45).")
  flags.mark_flags_as_required(["config", "workdir"])
  flags.register_validator("workdir", lambda path: path is None or bool(path.strip()),
                           message="--workdir is empty: name the run's directory, e.g. --workdir=workdirs/demo")


# How the demo's last line names a built-in target loss.
LOSS_NAMES = {"max_square": "max-squares", "iw_max_square": "image-wise max-squares", "entropy": "entropy",
              "iw_entropy": "image-wise entropy", "hard_pseudo_label": "hard pseudo-labels"}


def summary_line(summary: dict, target: str = "max_square", lambda_target: float = 0.1,
                 stage: str = "source_then_adapt") -> str:
  """The demo's last line: both target mIoUs in percent with one decimal, the second named by the target
  loss that ran (`target`: a built-in or package.module:function), or AdaBN (stage "source_then_adabn")."""
  from maxsq_jax import losses
  if stage == "source_then_adabn":
    name = "AdaBN"
  elif lambda_target == 0:
    name = "adapted (no target loss)"
  else:
    name = LOSS_NAMES.get(losses.canonical_target_name(str(target)), f"adapted ({target})")
  return (f"source-only target mIoU: {100 * summary['source_only_target_miou']:.1f}  "
          f"{name} target mIoU: {100 * summary['adapted_target_miou']:.1f}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Orbax and grain log every save and restore at INFO through absl; keep the console for progress.
  logging.set_verbosity(logging.WARNING)
  from maxsq_jax import distributed, storage
  storage.quiet_client_logs()
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                         startup_timeout_s=FLAGS.startup_timeout_s, heartbeat_timeout_s=FLAGS.heartbeat_timeout_s)
  import jax

  # Imported after flag parsing: jax reads XLA_FLAGS at import.
  from maxsq_jax import config_validation, host_log, paths
  config = FLAGS.config
  config_validation.validate(config, jax.device_count())
  workdir = paths.resolve(FLAGS.workdir, "--workdir")
  paths.check_reachable(workdir, "--workdir")
  paths.make_dir(workdir, "--workdir")
  with host_log.HostLog(workdir, jax.process_index(), config.storage.stall_warn_s, config.storage.deadline_s):
    _train_and_report(config, workdir)


def _train_and_report(config, workdir) -> None:
  import jax

  from maxsq_jax import train
  results = train.train_and_evaluate(config, workdir)
  if jax.process_index() == 0:
    if config.stage in ("source_then_adapt", "source_then_adabn"):
      source_domain = results["source_only"].get("source_miou")
      if source_domain is not None:
        print(f"(the domain gap: the source-only model scores {100 * source_domain:.1f} mIoU on the source "
              f"domain's own val split)", flush=True)
      print(summary_line(results, config.loss.target, config.loss.lambda_target, config.stage), flush=True)
    else:
      print(f"target mIoU at step {results['step']}: {100 * results['target_miou']:.1f}", flush=True)


def command() -> None:
  """`maxsq-train` (pyproject.toml), the same as `python -m maxsq_jax.main`."""
  cli.run(main, define_flags)


if __name__ == "__main__":
  command()
