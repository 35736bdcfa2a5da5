"""The start of every command-line tool: its flags, the common ones, absl parsing and one-line errors.

Each tool module has `define_flags()` (its own flags, defined only when it runs as a program, so that
importing several tools in one process defines nothing twice) and `main(argv)`; both its `python -m`
form and its `[project.scripts]` entry point (pyproject.toml) call `run(main, define_flags)`.
A `--config=FILE[:VARIANT]` flag (ml_collections' config_flags) reads its file with
`ConfigFileParser`: every problem of the file is one `error:` line naming it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import traceback
from typing import Callable

from absl import app, flags
from ml_collections import config_dict
from ml_collections.config_flags import config_flags  # Its parser class is not re-exported.

from maxsq_jax import errors
from maxsq_jax.errors import ConfigError

HELP_FLAGS = frozenset({"--help", "-?", "--helpshort", "--helpfull", "--helpxml"})


def define_common_flags() -> None:
  """The flags every tool takes (--verbose), defined once per process by whichever tool comes first;
  and every config-file flag defined so far reads its file with ConfigFileParser."""
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, "Show the traceback of an error, not only its one-line message "
                      f"(also: {errors.VERBOSE_ENV}=1).")
  for name, flag in flags.FLAGS._flags().items():
    if type(flag.parser) is config_flags.ConfigFileFlagParser:
      flag.parser = ConfigFileParser(name, lock_config=True)


class ConfigFileParser(config_flags.ConfigFileFlagParser):
  """ml_collections' parser of `--config=FILE[:VARIANT]` (it calls FILE's `get_config(VARIANT)` and
  locks the result), with every problem a ConfigError naming the file: a file that is not there, an
  exception while loading it or in `get_config` (its last line, and the line of FILE it came from),
  a result that is not a ConfigDict, and keys that the schema does not have or lacks
  (config_validation.schema_problems)."""

  def parse(self, argument):
    path, has_variant, variant = argument.partition(":")
    where = f"--{self.name}={argument}"
    if not os.path.isfile(path):
      what = "is a directory" if os.path.isdir(path) else "does not exist"
      raise ConfigError(f"{where}: {path} {what}; give a config file, e.g. configs/demo.py or configs/demo.py:tiny")
    try:
      loader = importlib.machinery.SourceFileLoader(f"{self.name}_config", path)
      module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
      sys.modules[loader.name] = module
      loader.exec_module(module)
      if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"{where}: {path} has no get_config() function; a config file defines get_config(arg) "
                          "returning maxsq_jax.config_base.base_config() with its changes")
      config = module.get_config(*([variant] if has_variant else []))
    except ConfigError:
      raise
    except Exception as e:  # Anything a user's Python file raises: named by the file and its line.
      raise ConfigError(f"{where}: {_raised_in(e, path)}") from e
    if not isinstance(config, config_dict.ConfigDict):
      raise ConfigError(f"{where}: get_config() returned {type(config).__name__}, not a ConfigDict; start from "
                        "maxsq_jax.config_base.base_config()")
    from maxsq_jax import config_validation
    problems = config_validation.schema_problems(config)
    if problems:
      raise ConfigError(f"{where}: {'; '.join(problems)} (set in {path}; the schema is maxsq_jax/config_base.py)")
    config.lock()
    return config


def _raised_in(error: Exception, path: str) -> str:
  """'PATH line N (SOURCE): Type: message' of an exception raised while running config file PATH: the
  last line of its traceback, and the line of PATH it passed through last."""
  if isinstance(error, SyntaxError) and error.filename and os.path.samefile(error.filename, path):
    line, source = error.lineno, (error.text or "").strip()
  else:
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if os.path.exists(f.filename) and os.path.samefile(f.filename, path)]
    line, source = (frames[-1].lineno, frames[-1].line) if frames else (None, "")
  shown = source and not source.startswith("raise ")  # A raise statement repeats the message.
  at = f" line {line}" + (f" ({source})" if shown else "") if line else ""
  message = " ".join(str(error).split()) if not isinstance(error, SyntaxError) else error.msg
  return f"{path}{at}: {type(error).__name__}: {message}"


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
