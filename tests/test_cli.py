"""The command-line tools: each `[project.scripts]` entry point resolves to its module's `command`,
`--help` (entry-point and `python -m` forms) exits 0 and explains every flag the tool defines, and all
tool modules import together in one process."""

import ast
import importlib
import inspect
import os
import re
import subprocess
import sys
import tomllib

import pytest

from tests.helpers import ROOT

with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
  SCRIPTS = tomllib.load(f)["project"]["scripts"]


def defined_flags(module) -> list[str]:
  """Names of the flags that module.define_flags() defines, read from its source."""
  tree = ast.parse(inspect.getsource(module.define_flags))
  return [node.args[0].value for node in ast.walk(tree)
          if isinstance(node, ast.Call) and getattr(node.func, "attr", "").startswith("DEFINE_")]


def run_python(*args) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_every_tool_has_an_entry_point():
  assert set(SCRIPTS) == {"maxsq-train", "maxsq-evaluate", "maxsq-report", "maxsq-prepare", "maxsq-synthetic",
                          "maxsq-convert", "maxsq-analyze-loss", "maxsq-demo-table", "maxsq-aot"}
  for target in SCRIPTS.values():
    module_name, function = target.split(":")
    module = importlib.import_module(module_name)
    assert callable(getattr(module, function)), target
    assert len(defined_flags(module)) >= 2, target


@pytest.mark.integration
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_explains_every_flag(script):
  module_name, function = SCRIPTS[script].split(":")
  names = defined_flags(importlib.import_module(module_name)) + ["verbose"]
  # What the installed script runs (pip writes `sys.exit(command())` with argv[0] = the script's name).
  entry_point = run_python("-c", f"import sys; sys.argv = [{script!r}, '--help']; "
                                 f"from {module_name} import {function}; sys.exit({function}())")
  as_module = run_python("-m", module_name, "--help")
  for proc in (entry_point, as_module):
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in names:
      # `  --name: explanation` (booleans: `--[no]name`), with an explanation.
      assert re.search(rf"^  --(\[no\])?{name}: \S", proc.stdout, re.M), (script, name, proc.stdout)
  module_doc_line = importlib.import_module(module_name).__doc__.strip().splitlines()[0]
  assert module_doc_line in entry_point.stdout


@pytest.mark.integration
def test_all_tool_modules_import_together():
  """Importing several tools (as a test or a notebook does) defines none of their flags twice."""
  modules = sorted({target.split(":")[0] for target in SCRIPTS.values()})
  code = ("import importlib\nfrom absl import flags\n"
          f"for name in {modules!r}:\n  importlib.import_module(name)\n"
          "assert 'verbose' not in flags.FLAGS and 'workdir' not in flags.FLAGS\nprint('OK')\n")
  proc = run_python("-c", code)
  assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr[-3000:]
