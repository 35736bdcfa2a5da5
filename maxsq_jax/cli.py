"""The start of every command-line tool: its flags, the common ones, absl parsing and one-line errors.

Each tool module has `define_flags()` (its own flags, defined only when it runs as a program, so that
importing several tools in one process defines nothing twice) and `main(argv)`; both its `python -m`
form and its `[project.scripts]` entry point (pyproject.toml) call `run(main, define_flags)`.
"""

from __future__ import annotations

import sys
from typing import Callable

from absl import app, flags

from maxsq_jax import errors

HELP_FLAGS = frozenset({"--help", "-?", "--helpshort", "--helpfull", "--helpxml"})


def define_common_flags() -> None:
  """The flags every tool takes (--verbose); defined once per process, by whichever tool comes first."""
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, "Show the traceback of an error, not only its one-line message "
                      f"(also: {errors.VERBOSE_ENV}=1).")


def run(main: Callable, define_flags: Callable[[], None]) -> None:
  """Defines the tool's flags and the common ones, parses sys.argv and runs `main(argv)`; a project
  error ends the process with one `error:` line (errors.exit_with)."""
  define_flags()
  define_common_flags()
  # `--help` lists the flags of the program named by sys.argv[0]: for an entry point (maxsq-train) that
  # is not the module that defined them, so they are declared that program's own, and its usage text
  # is the tool module's docstring.
  if main.__module__ != "__main__":
    sys.modules["__main__"].__doc__ = sys.modules[main.__module__].__doc__
  module = sys.argv[0] if main.__module__ == "__main__" else main.__module__
  for flag in flags.FLAGS.get_flags_for_module(module) + [flags.FLAGS["verbose"]]:
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  app.run(errors.guarded(main), flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return errors.parse_flags(argv)
  except SystemExit as e:
    # absl prints the usage for --help and exits 1; help that was asked for is not a failure.
    raise SystemExit(0 if HELP_FLAGS.intersection(argv) else e.code) from None
