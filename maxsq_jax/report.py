"""Gathers runs (e.g. several seeds of each experiment) into the paper's tables, mean ± std next to
the paper's numbers, as markdown.

  python -m maxsq_jax.report WORKDIR... [--protocol reference] [--out results.md]
  python -m maxsq_jax.report workdirs/gta5_maxsquare_seed* workdirs/gta5_source_only
  python -m maxsq_jax.report gta5_to_cityscapes:maxsquare=weights/released_maxsquare/evaluation

Each WORKDIR is a training run's workdir (its results.json is the final evaluation, config.json
says which experiment it is), a `python -m maxsq_jax.evaluate` output directory, or a directory
whose subdirectories are runs (the demo's source_only/ and adapt/). A run is placed in its row from
its config: source/target datasets and class count pick the table (GTA5 -> Cityscapes, SYNTHIA ->
Cityscapes, Cityscapes -> NTHU city), stage and target loss pick the row (configs/*.py variants).
`TABLE:VARIANT=PATH` places PATH explicitly (e.g. evaluations of converted released weights,
which have no config.json). Runs of the same row are averaged: mean ± sample std (ddof 1) over n.
WORKDIRs and --out may be local paths or gs://BUCKET/PATH URLs.
Runs on the embedded synthetic benchmark (configs/demo.py, `python -m maxsq_jax.demo_table`) form
"the paper's table in miniature" (and its "losses" variant a table of its own), with each row's gain
over the source-only model of the same seed, its difference from the λ_T = 0 control (bn_only) as a
paired difference across seeds with a 95 % Student-t interval (marked * when the interval excludes 0),
and the paper's GTA5 -> Cityscapes numbers beside it.
Paper numbers: configs/*.py EXPECTED_MIOU (README values) and the per-class rows below (docs/method.md, Published numbers).
"""

import importlib.util
import os

import numpy as np
import scipy.stats
from absl import app, flags

from maxsq_jax import cli, jsonfile, paths
from maxsq_jax.data import classes
from maxsq_jax.data.registry import NTHU_CITIES
from maxsq_jax.errors import CheckpointError

FLAGS = flags.FLAGS
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

TABLES = {
    "gta5_to_cityscapes": "GTA5 → Cityscapes (19 classes)",
    "synthia_to_cityscapes": "SYNTHIA → Cityscapes (16 classes; mIoU-13 over the 13-class subset)",
    "cityscapes_to_crosscity": "Cityscapes → NTHU cross-city (13 classes)",
    "demo": "The paper's table in miniature: the embedded synthetic benchmark (configs/demo.py)",
    "demo_losses": "Where the target loss decides: the class-wise hue shift, every adaptation ending with AdaBN "
                   "(configs/demo.py:losses)",
}
METHODS = {"source_only": "Source", "source_only_multi": "Source (multi-level)", "minent": "MinEnt†",
           "maxsquare": "MaxSquare", "maxsquare_iw": "MaxSquare+IW", "maxsquare_iw_multi": "MaxSquare+IW+Multi",
           "hard": "Hard pseudo-labels", "bn_only": "Target BN statistics only (λ_T = 0)",
           "adabn": "AdaBN (no gradient step)", "adabn_multi": "AdaBN of the multi-level source"}
# The control's name in the "losses" variant, where every adaptation ends with AdaBN.
LOSSES_CONTROL_NAME = "Control (λ_T = 0): source CE, then AdaBN"
# Rows of the demo tables, in the paper's order; the paper's numbers are GTA5 → Cityscapes's.
DEMO_VARIANTS = ("source_only", "source_only_multi", "adabn", "adabn_multi", "bn_only", "minent", "maxsquare",
                 "maxsquare_iw", "maxsquare_iw_multi", "hard")
DEMO_TABLES = ("demo", "demo_losses")
CONTROL = "bn_only"  # The row every demo row is compared with, seed by seed.
SHORT_NAMES = {"sidewalk": "sidew", "building": "build", "vegetation": "veg", "terrain": "terr",
               "person": "pers", "motorcycle": "motor", "bicycle": "bike"}

# Per-class IoU (%) of MaxSquare+IW+Multi [3rd-party survey table, consistent with the
# README mIoU]; per-class rows of the other methods were not found.
PAPER_PER_CLASS = {
    ("gta5_to_cityscapes", "maxsquare_iw_multi"): (
        89.4, 43.0, 82.1, 30.5, 21.3, 30.3, 34.7, 24.0, 85.3, 39.4, 78.2, 63.0, 22.9, 84.6, 36.4, 43.0, 5.5, 34.7, 33.5),
    ("synthia_to_cityscapes", "maxsquare_iw_multi"): (
        82.9, 40.7, 80.3, 10.2, 0.8, 25.8, 12.8, 18.2, 82.5, 82.2, 53.1, 18.0, 79.0, 31.4, 10.4, 35.6),
}


def _load_config_module(name: str):
  path = os.path.join(CONFIG_DIR, f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"report_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def paper_miou(table: str, variant: str):
  """The paper's mIoU (%) of a row: a float, (mIoU-16, mIoU-13) for SYNTHIA, or None."""
  try:
    expected = _load_config_module(table).EXPECTED_MIOU
  except (FileNotFoundError, AttributeError):
    return None
  if table == "cityscapes_to_crosscity":
    city, _, method = variant.partition("_")
    return expected.get(city, {}).get(method)
  return expected.get(variant)


# ----------------------------------------------------------------------------------------------
# Finding and identifying runs.


def identify(config: dict) -> tuple[str, str]:
  """(table, variant) of a run from its config dict; table "other" for runs outside the paper."""
  data, loss = config.get("data", {}), config.get("loss", {})
  num_classes = config.get("model", {}).get("num_classes")
  multi = bool(loss.get("multi_level"))
  if config.get("stage") == "source_only":
    method = "source_only_multi" if multi else "source_only"
  elif config.get("stage") == "adabn":
    method = "adabn_multi" if multi else "adabn"
  else:
    method = {"entropy": "minent", "max_square": "maxsquare", "iw_max_square": "maxsquare_iw",
              "hard_pseudo_label": "hard"}.get(
        loss.get("target"), str(loss.get("target")))
    if method == "maxsquare_iw" and multi:
      method = "maxsquare_iw_multi"
    elif multi:
      method += "_multi"
    if loss.get("lambda_target") == 0:  # No target loss: only the target pass's BatchNorm statistics.
      method = "bn_only"
  source, target = data.get("source"), data.get("target")
  if source == "gta5" and target == "cityscapes" and num_classes == 19:
    return "gta5_to_cityscapes", method
  if source == "synthia" and target == "cityscapes" and num_classes == 16:
    return "synthia_to_cityscapes", method
  if source == "cityscapes" and target in NTHU_CITIES and num_classes == 13:
    return "cityscapes_to_crosscity", f"{target}_{method}"
  if source == "synthetic_source" and target == "synthetic_target":
    return ("demo_losses" if config.get("adabn", {}).get("after_adapt") else "demo"), method
  return "other", f"{source} → {target}, {num_classes} classes, {method}"


def _results_file(path):
  """path/results.json or path/evaluation/results.json (epath.Path), or None."""
  for candidate in (path / "results.json", path / "evaluation" / "results.json"):
    if candidate.is_file():
      return candidate
  return None


def find_runs(arguments) -> list[dict]:
  """[{"path", "results", "config" (dict or None), "table", "variant"}] for the given arguments (local
  paths or gs:// URLs)."""
  runs = []
  for argument in arguments:
    forced = None
    head = argument.split("=", 1)[0]
    if "=" in argument and ":" in head and "/" not in head:
      forced, argument = argument.split("=", 1)
      forced = tuple(forced.split(":", 1))
    root = paths.resolve(argument, "WORKDIR")
    paths.check_reachable(root, "WORKDIR")
    found = [(argument, root)]
    if _results_file(root) is None:
      children = sorted(root.iterdir()) if root.is_dir() else []
      found = [(f"{argument.rstrip('/')}/{p.name}", p) for p in children if p.is_dir() and _results_file(p)]
      if not found:
        raise CheckpointError(f"{argument}: no results.json in it, in its evaluation/ or in its subdirectories "
                              "(train a run, or evaluate one with python -m maxsq_jax.evaluate)")
    for shown, path in found:
      results_file = _results_file(path)
      results = jsonfile.read(results_file)
      if not isinstance(results, dict) or "miou" not in results:  # Every evaluation writes its headline mIoU.
        raise CheckpointError(f"{results_file} holds no evaluation (no \"miou\"): it is damaged or not a results "
                              "file; evaluate the run again (python -m maxsq_jax.evaluate) or leave it out")
      config = None
      for candidate in (path / "config.json", results_file.parent / "config.json"):
        if candidate.is_file():
          config = jsonfile.read(candidate).get("config")
          break
      if forced:
        table, variant = forced
      elif config is not None:
        table, variant = identify(config)
      else:
        table, variant = "other", path.name
      runs.append({"path": shown, "results": results, "config": config, "table": table, "variant": variant})
  return runs


# ----------------------------------------------------------------------------------------------
# Numbers.


def _protocol_results(results: dict, protocol: str | None) -> dict | None:
  protocols = results.get("protocols")
  if protocols is None:  # An older results.json: one protocol.
    return results if protocol in (None, results.get("protocol", "reference")) else None
  return protocols.get(protocol or results.get("protocol"))


def mean_std(values) -> tuple[float, float, int]:
  values = [v for v in values if v is not None]
  if not values:
    return float("nan"), float("nan"), 0
  arr = 100 * np.asarray(values, np.float64)
  return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else float("nan"), len(arr)


def fmt(mean: float, std: float, n: int) -> str:
  if n == 0 or np.isnan(mean):
    return "–"
  return f"{mean:.1f}" if n < 2 else f"{mean:.1f} ± {std:.1f}"


def _paper(value) -> str:
  return "–" if value is None else f"{value:.1f}"


def _delta(mean, n, paper) -> str:
  if paper is None or n == 0 or np.isnan(mean):
    return "–"
  return f"{mean - paper:+.1f}"


def _group(runs, table) -> dict:
  groups: dict = {}
  for run in runs:
    if run["table"] == table:
      groups.setdefault(run["variant"], []).append(run)
  return groups


def _stat(group, protocol, key="miou"):
  values = []
  for run in group:
    r = _protocol_results(run["results"], protocol)
    values.append(None if r is None else r.get(key))
  return mean_std(values)


def _per_class_stat(group, protocol, names):
  out = []
  for name in names:
    values = []
    for run in group:
      r = _protocol_results(run["results"], protocol)
      values.append(None if r is None else r.get("per_class_iou", {}).get(name))
    out.append(mean_std(values))
  return out


def _per_class_table(table, groups, protocol, names, variants, extra_columns=()) -> list[str]:
  header = [SHORT_NAMES.get(n, n) for n in names] + ["mIoU"] + [c for c, _ in extra_columns]
  lines = ["| method | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
  for variant in variants:
    group = groups.get(variant)
    label = METHODS.get(variant.partition("_")[2] if table == "cityscapes_to_crosscity" else variant, variant)
    if table == "cityscapes_to_crosscity":
      label = f"{variant.partition('_')[0].capitalize()} {label}"
    elif table == "demo_losses" and variant == CONTROL:
      label = LOSSES_CONTROL_NAME
    if group:
      cells = [fmt(*s) for s in _per_class_stat(group, protocol, names)]
      cells.append(fmt(*_stat(group, protocol)))
      cells += [fmt(*_stat(group, protocol, key)) for _, key in extra_columns]
      lines.append(f"| {label} (ours, n={len(group)}) | " + " | ".join(cells) + " |")
    paper_row = PAPER_PER_CLASS.get((table, variant))
    if paper_row is not None:
      expected = paper_miou(table, variant)
      tail = list(expected) if isinstance(expected, tuple) else [expected]
      lines.append(f"| {label} (paper) | " + " | ".join(f"{v:.1f}" for v in paper_row) + " | "
                   + " | ".join(_paper(v) for v in tail) + " |")
  return lines


def _variants_of(table: str, groups) -> list[str]:
  try:
    known = list(_load_config_module(table).VARIANTS)
  except (FileNotFoundError, AttributeError):
    known = []
  return known + sorted(v for v in groups if v not in known)


def paired_interval(differences, confidence: float = 0.95) -> tuple[float, float, float, int]:
  """(mean, low, high, n) of paired differences d_1..d_n (e.g. one per seed): the Student-t interval
  mean ± t_{(1+confidence)/2, n−1} · s / √n, s the sample std (ddof 1). low = high = nan for n < 2."""
  d = np.asarray([v for v in differences if v is not None], np.float64)
  n = len(d)
  if n == 0:
    return float("nan"), float("nan"), float("nan"), 0
  mean = float(d.mean())
  if n < 2:
    return mean, float("nan"), float("nan"), n
  half = float(scipy.stats.t.ppf((1 + confidence) / 2, n - 1) * d.std(ddof=1) / np.sqrt(n))
  return mean, mean - half, mean + half, n


def _miou_by_seed(group, protocol) -> dict:
  """{seed: mIoU fraction} of a row's runs (runs without a seed or a result left out)."""
  out = {}
  for run in group:
    r = _protocol_results(run["results"], protocol)
    seed = (run["config"] or {}).get("seed")
    if r is not None and r.get("miou") is not None and seed is not None:
      out[seed] = r["miou"]
  return out


def _versus_control(group, control, protocol) -> str:
  """The row minus the control, paired by seed, in points: "+1.2 [+0.4, +2.0] (n=4) *" (* when the 95 %
  interval excludes 0); "–" without common seeds."""
  mine, theirs = _miou_by_seed(group, protocol), _miou_by_seed(control, protocol)
  seeds = sorted(set(mine) & set(theirs))
  mean, low, high, n = paired_interval([100 * (mine[s] - theirs[s]) for s in seeds])
  if n == 0:
    return "–"
  if n < 2:
    return f"{mean:+.1f} (n=1)"
  mark = " *" if low > 0 or high < 0 else ""
  return f"{mean:+.1f} [{low:+.1f}, {high:+.1f}] (n={n}){mark}"


def _seed_gains(runs, group, protocol, table="demo") -> tuple[float, float, int]:
  """Mean ± std over seeds of (row − the source-only run of the same seed and kind), in points."""
  sources = {}
  for run in runs:
    if run["table"] == table and run["variant"] in ("source_only", "source_only_multi"):
      sources[(run["variant"], (run["config"] or {}).get("seed"))] = run
  gains = []
  for run in group:
    config = run["config"] or {}
    source = sources.get(("source_only_multi" if config.get("loss", {}).get("multi_level") else "source_only",
                          config.get("seed")))
    mine, theirs = _protocol_results(run["results"], protocol), source and _protocol_results(source["results"], protocol)
    if mine and theirs and mine.get("miou") is not None and theirs.get("miou") is not None:
      gains.append(mine["miou"] - theirs["miou"])
  return mean_std(gains)


def _signed(text: str) -> str:
  return text if text == "–" or text.startswith("-") else "+" + text


def _demo_table(runs, groups, protocol, table="demo") -> list[str]:
  lines = [f"## {TABLES[table]}", "",
           "Gain: the row minus the source-only model it started from (same seed), mean ± std over seeds. "
           "vs control: the row minus the λ_T = 0 control (bn_only) of the same seed, mean over seeds [95 % "
           "Student-t interval of these paired differences]; * marks an interval that excludes 0. "
           "The paper's numbers are GTA5 → Cityscapes with a ResNet-101, shown for the ordering only.", "",
           "| method | n | target mIoU (ours) | gain (ours) | vs control | paper mIoU | paper gain |",
           "|---|---|---|---|---|---|---|"]
  variants = list(DEMO_VARIANTS) + sorted(v for v in groups if v not in DEMO_VARIANTS)
  paper_source = paper_miou("gta5_to_cityscapes", "source_only")
  control = groups.get(CONTROL, [])
  for variant in variants:
    group = groups.get(variant, [])
    if not group:
      continue
    paper = paper_miou("gta5_to_cityscapes", variant)
    gain = "–" if variant.startswith("source_only") else _signed(fmt(*_seed_gains(runs, group, protocol, table)))
    versus = "–" if variant == CONTROL else _versus_control(group, control, protocol)
    paper_gain = "–" if paper is None or variant.startswith("source_only") else f"{paper - paper_source:+.1f}"
    label = LOSSES_CONTROL_NAME if table == "demo_losses" and variant == CONTROL else METHODS.get(variant, variant)
    lines.append(f"| {label} | {len(group)} | {fmt(*_stat(group, protocol))} | {gain} | {versus} | "
                 f"{_paper(paper)} | {paper_gain} |")
  lines += ["", "Per-class IoU (%):", ""]
  lines += _per_class_table(table, groups, protocol, classes.CLASS_NAMES_19, [v for v in variants if v in groups])
  lines.append("")
  return lines


def render(runs, protocol: str | None = None) -> str:
  """The markdown report for `runs` (from find_runs) under `protocol` (None: each run's headline)."""
  shown = protocol or "each run's headline protocol"
  lines = ["# Results", "",
           f"mIoU (%) on the target's evaluation split, protocol: **{shown}**. Ours: mean ± sample std over n runs "
           "(seeds); paper: the reference README (MinEnt† is its re-implementation) and, per class, a "
           "third-party table (docs/method.md); Δ = ours − paper.", ""]

  groups = _group(runs, "gta5_to_cityscapes")
  if groups:
    lines += [f"## {TABLES['gta5_to_cityscapes']}", "", "| method | n | mIoU (ours) | paper | Δ |", "|---|---|---|---|---|"]
    variants = _variants_of("gta5_to_cityscapes", groups)
    for variant in variants:
      mean, std, n = _stat(groups.get(variant, []), protocol)
      paper = paper_miou("gta5_to_cityscapes", variant)
      if n == 0 and paper is None:
        continue
      lines.append(f"| {METHODS.get(variant, variant)} | {n} | {fmt(mean, std, n)} | {_paper(paper)} | "
                   f"{_delta(mean, n, paper)} |")
    lines += ["", "Per-class IoU (%):", ""]
    lines += _per_class_table("gta5_to_cityscapes", groups, protocol, classes.CLASS_NAMES_19,
                              [v for v in variants if v in groups or ("gta5_to_cityscapes", v) in PAPER_PER_CLASS])
    lines.append("")

  groups = _group(runs, "synthia_to_cityscapes")
  if groups:
    lines += [f"## {TABLES['synthia_to_cityscapes']}", "",
              "| method | n | mIoU-16 (ours) | paper | Δ | mIoU-13 (ours) | paper | Δ |", "|---|---|---|---|---|---|---|---|"]
    variants = _variants_of("synthia_to_cityscapes", groups)
    for variant in variants:
      group = groups.get(variant, [])
      m16, s16, n = _stat(group, protocol)
      m13, s13, n13 = _stat(group, protocol, "miou_13")
      paper = paper_miou("synthia_to_cityscapes", variant) or (None, None)
      if n == 0 and paper[0] is None:
        continue
      lines.append(f"| {METHODS.get(variant, variant)} | {n} | {fmt(m16, s16, n)} | {_paper(paper[0])} | "
                   f"{_delta(m16, n, paper[0])} | {fmt(m13, s13, n13)} | {_paper(paper[1])} | {_delta(m13, n13, paper[1])} |")
    lines += ["", "Per-class IoU (%):", ""]
    lines += _per_class_table("synthia_to_cityscapes", groups, protocol, classes.class_names(16),
                              [v for v in variants if v in groups or ("synthia_to_cityscapes", v) in PAPER_PER_CLASS],
                              extra_columns=(("mIoU-13", "miou_13"),))
    lines.append("")

  groups = _group(runs, "cityscapes_to_crosscity")
  if groups:
    methods = ("source_only", "maxsquare", "maxsquare_iw")
    lines += [f"## {TABLES['cityscapes_to_crosscity']}", "",
              "| city | " + " | ".join(f"{METHODS[m]} (ours) | paper" for m in methods) + " |",
              "|---|" + "---|---|" * len(methods)]
    for city in NTHU_CITIES:
      if not any(f"{city}_{m}" in groups for m in methods):
        continue
      cells = []
      for m in methods:
        mean, std, n = _stat(groups.get(f"{city}_{m}", []), protocol)
        cells += [fmt(mean, std, n) + (f" (n={n})" if n else ""), _paper(paper_miou("cityscapes_to_crosscity", f"{city}_{m}"))]
      lines.append(f"| {city.capitalize()} | " + " | ".join(cells) + " |")
    others = sorted(v for v in groups if v.partition("_")[2] not in methods)
    if others:
      lines += ["", "Other cross-city rows: " + "; ".join(f"{v}: {fmt(*_stat(groups[v], protocol))}" for v in others)]
    lines += ["", "Per-class IoU (%) (no per-class numbers were published):", ""]
    lines += _per_class_table("cityscapes_to_crosscity", groups, protocol, classes.class_names(13), sorted(groups))
    lines.append("")

  for table in DEMO_TABLES:
    groups = _group(runs, table)
    if groups:
      lines += _demo_table(runs, groups, protocol, table)

  groups = _group(runs, "other")
  if groups:
    lines += ["## Other runs (no paper numbers)", "", "| run | n | mIoU (ours) |", "|---|---|---|"]
    for variant in sorted(groups):
      lines.append(f"| {variant} | {len(groups[variant])} | {fmt(*_stat(groups[variant], protocol))} |")
    lines.append("")

  # Every protocol side by side (the resolution/flip effect), then the runs themselves.
  all_protocols = []
  for run in runs:
    for name in run["results"].get("protocols", {}):
      if name not in all_protocols:
        all_protocols.append(name)
  if all_protocols:
    lines += ["## All evaluation protocols (mIoU %, mean ± std)", "",
              "| table | row | n | " + " | ".join(all_protocols) + " |", "|---|---|---|" + "---|" * len(all_protocols)]
    keyed: dict = {}
    for run in runs:
      keyed.setdefault((run["table"], run["variant"]), []).append(run)
    for (table, variant), group in keyed.items():
      lines.append(f"| {table} | {variant} | {len(group)} | "
                   + " | ".join(fmt(*_stat(group, p)) for p in all_protocols) + " |")
    lines.append("")
  lines += ["## Runs", "", "| path | table | row | step | protocol | mIoU |", "|---|---|---|---|---|---|"]
  for run in runs:
    r = _protocol_results(run["results"], protocol)
    step = run["results"].get("step")
    planned = (run["config"] or {}).get("num_steps")
    step_text = f"{step}" + (f" of {planned} (unfinished?)" if planned and step is not None and step < planned else "")
    used = protocol or run["results"].get("protocol", "reference")
    miou = "–" if r is None or r.get("miou") is None else f"{100 * r['miou']:.1f}"
    lines.append(f"| {run['path']} | {run['table']} | {run['variant']} | {step_text} | {used} | {miou} |")
  lines.append("")
  return "\n".join(lines)


def define_flags() -> None:
  """The command line's flags (cli.run defines them when this module runs as a program)."""
  flags.DEFINE_string("protocol", None, "Evaluation protocol to tabulate (reference, reference_flip, full, "
                      "full_flip; default: each run's headline protocol).")
  flags.DEFINE_string("out", None, "Also write the markdown to this file (a local path or a gs:// URL).")


def main(argv) -> None:
  """argv[1:]: run workdirs, evaluation outputs, or TABLE:VARIANT=PATH."""
  if len(argv) < 2:
    raise app.UsageError("name the runs: WORKDIR... (run workdirs, evaluation outputs, or TABLE:VARIANT=PATH)")
  runs = find_runs(argv[1:])
  out = paths.resolve(FLAGS.out, "--out") if FLAGS.out else None
  text = render(runs, FLAGS.protocol)
  print(text)
  if out is not None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


def command() -> None:
  """`maxsq-report` (pyproject.toml), the same as `python -m maxsq_jax.report`."""
  cli.run(main, define_flags)


if __name__ == "__main__":
  command()
