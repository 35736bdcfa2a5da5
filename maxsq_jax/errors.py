"""The project's error types, and the one-line `error: ...` report that every command-line tool gives.

Errors a user can fix (a bad config value, a broken dataset file, an unreadable checkpoint, a weights
file that is not one) are `MaxsqError`s whose message names the key / file / directory and the fix.
The CLIs print such an error as one line on stderr and exit with its `exit_code` (2 for a config or
usage error, 1 otherwise); `--verbose` or the environment variable MAXSQ_VERBOSE=1 adds the
traceback. A full disk, wherever it is met, is one DiskFullError naming the disk and the path
(full_disk.py). Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import sys
import traceback
from typing import Callable, NoReturn, Sequence

VERBOSE_ENV = "MAXSQ_VERBOSE"


class MaxsqError(Exception):
  """A failure the user can fix; the message says what and how."""
  exit_code = 1


class ConfigError(MaxsqError, ValueError):
  """A config key or value (or a command-line flag) is invalid."""
  exit_code = 2


class DataError(MaxsqError):
  """A dataset folder, file or data-stream position is missing or broken."""


class CheckpointError(MaxsqError):
  """A workdir, checkpoint or results file cannot be used (missing, corrupt, locked, other config)."""


class WeightsError(MaxsqError, ValueError):
  """A weights file or converted-weights directory cannot be read or does not fit the model."""


class DiskFullError(MaxsqError):
  """The disk (or quota) that a file was being written to is full."""


def did_you_mean(value, allowed: Sequence) -> str:
  """' (did you mean X?)' for the closest allowed string to `value`, or '' when none is close."""
  matches = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.6)
  return f" (did you mean {matches[0]!r}?)" if matches else ""


# Where TensorStore and Orbax append the JSON spec of an array store to a message (dozens of lines).
_SPEC_MARKERS = ("<TensorStore(", "TensorStore({", "[tensorstore_spec=", "[source locations=")


def brief(error: BaseException, limit: int = 300) -> str:
  """'Type: message' of `error` for a one-line report: its first non-empty line, without the JSON spec
  of an array store that TensorStore appends, at most `limit` characters of message."""
  text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
  for marker in _SPEC_MARKERS:
    text = text.split(marker)[0]
  text = text.rstrip(" :;,(")
  if len(text) > limit:
    text = text[:limit] + "..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def verbose_requested(argv: Sequence[str] | None = None) -> bool:
  """True if `--verbose` is on the command line or MAXSQ_VERBOSE is set to a true value."""
  argv = sys.argv if argv is None else argv
  if any(a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1") for a in argv):
    return True
  return os.environ.get(VERBOSE_ENV, "").lower() not in ("", "0", "false", "no")


def exit_with(error: BaseException, exit_code: int | None = None, argv: Sequence[str] | None = None) -> NoReturn:
  """Prints `error: MESSAGE` (one line; the traceback first when verbose) and exits."""
  if verbose_requested(argv):
    traceback.print_exception(error)
  message = " ".join(str(error).splitlines()) or type(error).__name__
  print(f"error: {message}", file=sys.stderr, flush=True)
  code = exit_code if exit_code is not None else getattr(error, "exit_code", 1)
  # os._exit would skip flushing; SystemExit lets `finally` blocks (e.g. waiting for saves) run.
  raise SystemExit(code)


def guarded(main: Callable) -> Callable:
  """Wraps a CLI's main(argv) so that the project's errors, and a full disk, end the process with one line."""

  def run(*args, **kwargs):
    from maxsq_jax import full_disk
    quiet = None if verbose_requested() else full_disk.Quiet()
    with quiet or contextlib.nullcontext():
      try:
        return main(*args, **kwargs)
      except MaxsqError as e:
        if quiet:  # The error line is the last thing printed: no shutdown noise after it.
          quiet.ending = True
        exit_with(e)
      except Exception as e:
        full = full_disk.error(e, quiet.path if quiet else None)
        if full is None:
          raise
        if quiet:
          quiet.ending = True
        exit_with(full)

  run.__doc__ = main.__doc__
  return run


def unknown_config_key(argv: Sequence[str]) -> str | None:
  """The message for the first `--config.KEY=...` whose KEY is not in the schema, or None."""
  from maxsq_jax.config_base import RENAMED
  from maxsq_jax.config_validation import schema_keys, unknown_key_hint
  known = schema_keys()
  for arg in argv:
    if arg.startswith("--config."):
      key = arg[len("--config."):].split("=", 1)[0]
      if key in RENAMED and key not in known:
        return (f"--config.{key}: this key is now --config.{RENAMED[key]} (the evaluation settings are "
                "grouped in config.eval, maxsq_jax/config_base.py)")
      if key not in known:
        return f"--config.{key}: no such config key{unknown_key_hint(key, known)}; the schema is maxsq_jax/config_base.py"
  return None


def _project_error(error: BaseException | None) -> MaxsqError | None:
  """The MaxsqError that `error` is, or was raised while handling (absl wraps a flag parser's
  ValueError in its own IllegalFlagValueError); None if there is none."""
  while error is not None and not isinstance(error, MaxsqError):
    error = error.__cause__ or error.__context__
  return error


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing (pass as `app.run(main, flags_parser=parse_flags)`), with a bad flag or
  config override reported as one `error:` line (exit code 2) instead of a traceback."""
  from absl import flags
  try:
    return flags.FLAGS(list(argv))
  except Exception as e:  # flags.Error, or the config flag's KeyError/AttributeError/TypeError.
    if _project_error(e) is not None:  # A config file's error (cli.define_config_flag) names the file.
      exit_with(_project_error(e), argv=argv)
    message = unknown_config_key(argv)
    if message is None:
      cause = e.__cause__ or e.__context__
      message = str(e) if isinstance(e, flags.Error) or cause is None else f"{e} ({cause})"
    exit_with(ConfigError(message), argv=argv)
