"""Runs the tiny demo config in a fresh process (so XLA_FLAGS can force N CPU devices) and writes the
final parameters to OUT.npz. Used by the sharding and resume tests.

  python tests/train_tiny.py DATA_ROOT WORKDIR OUT.npz [key=value ...]

Multi-process runs set MAXSQ_COORDINATOR_ADDRESS / MAXSQ_NUM_PROCESSES / MAXSQ_PROCESS_ID; only
process 0 writes OUT.npz.
"""

import ast
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv):
  data_root, workdir, out = argv[:3]
  overrides = {}
  for item in argv[3:]:
    key, value = item.split("=", 1)
    try:
      overrides[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key] = value
  import flax
  import jax

  from maxsq_jax import distributed, storage
  storage.quiet_client_logs()  # As maxsq_jax.main does.
  distributed.initialize()
  import numpy as np

  from maxsq_jax import train
  from tests.helpers import tiny_config
  config = tiny_config(data_root, **overrides)
  results = train.train_and_evaluate(config, workdir)
  # The state is replicated: every process holds all of it, also when other hosts' devices exist.
  state = jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), results["state"])
  if jax.process_index() != 0:
    return
  flat = flax.traverse_util.flatten_dict({"params": state.params, "batch_stats": state.batch_stats}, sep="/")
  np.savez(out, step=np.asarray(state.step), miou=results["target_miou"], devices=jax.device_count(),
           **{k: np.asarray(v) for k, v in flat.items()})


if __name__ == "__main__":
  main(sys.argv[1:])
