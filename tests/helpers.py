"""Helpers shared by the tests (fixtures stay in conftest.py)."""

from absl import flags

from maxsq_jax import cli, errors

_CLI_FLAGS_DEFINED: set[str] = set()


def run_cli_in_process(module, *args):
  """`module.main` with its flags parsed from `args`, in this process, as `python -m MODULE ARGS` runs it:
  a project error raises SystemExit with the tool's exit code after printing one `error:` line."""
  if module.__name__ not in _CLI_FLAGS_DEFINED:
    module.define_flags()
    cli.define_common_flags()
    _CLI_FLAGS_DEFINED.add(module.__name__)
  flags.FLAGS.unparse_flags()
  argv = errors.parse_flags([module.__name__, *map(str, args)])
  return errors.guarded(module.main)(argv)
