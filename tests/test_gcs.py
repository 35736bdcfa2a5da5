"""gs:// workdirs against a real Cloud Storage server (fake-gcs-server, tests/gcs_server.py): the demo
writes every output to the bucket and nothing to a local `gs:` folder; evaluate, report and
init_from read from the bucket; a run killed at a random step resumes bit-identically; bad URLs,
missing buckets and an unanswering server fail at start-up with one line naming the URL; the server
stopped mid-run for 20 s (ridden through, bit-identical) and past a short deadline (one error line,
the rerun resumes bit-identically); the host log in the bucket; a finished demo rerun evaluates nothing."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from maxsq_jax import paths
from tests.gcs_server import list_files
from tests.helpers import (
  REFERENCE_OVERRIDES,
  ROOT,
  checkpoint_weights,
  load_npz,
  run_cli_in_process,
  run_tiny,
  tiny_command,
  tiny_config,
  tiny_env,
  weights_of,
)
from tests.test_multihost import committed_steps

pytestmark = pytest.mark.integration


def data_flags(data_root) -> list[str]:
  return [f"--config.data.source_dir={data_root}/synthetic_source",
          f"--config.data.target_dir={data_root}/synthetic_target"]


def run_module(module: str, *args, cwd, timeout=600) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], env=dict(os.environ, JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def demo_on_bucket(tiny_data_root, gcs_bucket, tmp_path_factory):
  """(URL, stdout, local working directory) of the tiny demo trained with --workdir=gs://..."""
  url = f"{gcs_bucket}/demo"
  cwd = tmp_path_factory.mktemp("demo_cwd")
  proc = run_module("maxsq_jax.main", f"--config={ROOT}/configs/demo.py:tiny", f"--workdir={url}",
                    *data_flags(tiny_data_root), cwd=cwd)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return url, proc.stdout, cwd


def test_demo_writes_every_output_to_the_bucket(demo_on_bucket):
  url, stdout, cwd = demo_on_bucket
  files = list_files(url)
  assert {"summary.json"} <= files
  assert not any(".tmp-" in f for f in files)  # JSON files are uploaded whole, no temporary left.
  for stage, final in (("source_only", 4), ("adapt", 3)):
    mine = {f[len(stage) + 1:] for f in files if f.startswith(f"{stage}/")}
    assert {"config.json", "metrics.jsonl", "results.json", "results.md"} <= mine, sorted(mine)
    assert any(f.startswith("tensorboard/events.out.tfevents.") for f in mine), sorted(mine)
    assert {f"eval/step_{final}/{name}" for name in ("results.json", "results.md", "confusion.npy", "pred_0.png",
                                                     "confusion_reference.png")} <= mine
    assert {f"checkpoints/{s}/commit_success.txt" for s in (2, final)} <= mine
    assert any(f.startswith(f"checkpoints/{final}/state/") for f in mine)
    assert any(f.startswith(f"checkpoints/{final}/data/process_0-of-1.json") for f in mine)
  # The files hold what a local run writes: the final training metrics, the final evaluation.
  from etils import epath
  adapt = epath.Path(url) / "adapt"
  records = [json.loads(line) for line in (adapt / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "train/loss" in r] == [2, 3]
  results = json.loads((adapt / "results.json").read_text())
  assert results["step"] == 3
  summary = json.loads((epath.Path(url) / "summary.json").read_text())
  assert summary["adapted_target_miou"] == results["target_miou"]
  assert f"Initialised weights from {url}/source_only" in stdout  # init_from=gs://... of stage 2.
  # Nothing was written to a local folder named after the URL.
  assert not any("gs:" in name for _, dirs, names in os.walk(cwd) for name in dirs + names)
  assert not os.path.exists(os.path.join(ROOT, "gs:"))


def test_tensorboard_events_in_the_bucket_hold_the_scalars(demo_on_bucket):
  url, _, _ = demo_on_bucket
  from etils import epath
  from tensorboardX.proto import event_pb2
  # A new event file after each flush, each uploaded once: one per metrics write and one per evaluation.
  names = sorted(list_files(f"{url}/adapt/tensorboard"))
  assert len(names) >= 3 and all(n.startswith("events.out.tfevents.") for n in names), names
  tags = []
  for name in names:
    data = (epath.Path(url) / "adapt" / "tensorboard" / name).read_bytes()
    offset = 0
    while offset < len(data):  # TFRecord: length (8 bytes), its crc (4), payload, payload crc (4).
      length = int.from_bytes(data[offset:offset + 8], "little")
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      tags += [(v.tag, event.step) for v in event.summary.value]
      offset += 16 + length
  # Every scalar is in exactly one file: the files continue each other, none repeats another.
  assert ("train/loss", 2) in tags and ("train/loss", 3) in tags and ("eval_target/miou", 3) in tags
  assert len([t for t in tags if t[0] == "train/loss"]) == 2


def test_each_host_log_is_in_the_bucket_with_the_last_line(demo_on_bucket):
  url, stdout, _ = demo_on_bucket
  from etils import epath
  assert "logs/host_0.log" in list_files(url)
  log = (epath.Path(url) / "logs" / "host_0.log").read_text()
  assert log.startswith("=== ") and "=== stage 2/2" in log
  assert log.rstrip().splitlines()[-1] == stdout.rstrip().splitlines()[-1]  # The summary line.


def test_evaluate_and_report_read_the_bucket(demo_on_bucket, tmp_path):
  url, _, _ = demo_on_bucket
  from etils import epath
  trained = json.loads((epath.Path(url) / "adapt" / "results.json").read_text())
  proc = run_module("maxsq_jax.evaluate", f"--checkpoint={url}", cwd=tmp_path)  # The demo's two-stage workdir.
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert proc.stdout.startswith(f"note: {url} is a two-stage run (source_only, adapt); evaluating {url}/adapt ")
  assert f"results: {url}/adapt/evaluation/results.md" in proc.stdout
  evaluated = json.loads((epath.Path(url) / "adapt" / "evaluation" / "results.json").read_text())
  # The run's own config.json (read from the bucket) and its last checkpoint give the same numbers.
  assert evaluated["checkpoint"] == f"{url}/adapt" and evaluated["checkpoint_step"] == 3
  assert evaluated["protocols"] == trained["protocols"]

  out = f"{url}/report.md"
  proc = run_module("maxsq_jax.report", url, f"--out={out}", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # The runs table has one row per run found under the URL, ending with its mIoU.
  rows = {line.split(" | ")[0][2:]: line for line in proc.stdout.splitlines() if line.startswith(f"| {url}/")}
  assert set(rows) == {f"{url}/adapt", f"{url}/source_only"}, rows
  assert rows[f"{url}/adapt"].endswith(f"| {100 * trained['miou']:.1f} |")
  assert proc.stdout == epath.Path(out).read_text() + "\n"  # --out on the bucket: what was printed.
  assert not any("gs:" in name for name in os.listdir(tmp_path))


def test_init_from_a_bucket_loads_that_runs_weights(demo_on_bucket, tiny_data_root):
  url, _, _ = demo_on_bucket
  import jax

  from maxsq_jax import train
  config = tiny_config(tiny_data_root, stage="adapt", init_from=f"{url}/source_only")
  mesh = train.create_mesh()
  model = train.build_model(config)
  state, *_ = train.initial_state(config, model, mesh, (1, 32, 48, 3))
  loaded = train.load_init_weights(state, config.init_from)
  expected = checkpoint_weights(f"{url}/source_only", 4)
  import flax
  got = flax.traverse_util.flatten_dict({"params": jax.device_get(loaded.params),
                                         "batch_stats": jax.device_get(loaded.batch_stats)}, sep="/")
  assert set(got) == set(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(np.asarray(got[key]), value, err_msg=key)


def test_convert_torch_writes_converted_weights_to_a_bucket(gcs_bucket, tmp_path, capsys):
  torch = pytest.importorskip("torch")
  from maxsq_jax.models import convert
  from maxsq_jax.tools import convert_torch
  from tests.torch_deeplab import DeeplabMulti, randomize_
  pth = tmp_path / "bare.pth"
  torch.save(randomize_(DeeplabMulti(3, blocks=(1, 1, 1, 1), width=4)).state_dict(), pth)
  url = f"{gcs_bucket}/weights_{os.getpid()}"
  run_cli_in_process(convert_torch, pth, url, "--num_classes", 3)
  run_cli_in_process(convert_torch, pth, tmp_path / "local", "--num_classes", 3)
  assert convert.is_converted_dir(url) and not convert.is_converted_dir(f"{gcs_bucket}/nothing")
  assert convert.read_conversion_report(url)["layout"] == "bare"
  from_bucket, from_disk = convert.load_converted_variables(url), convert.load_converted_variables(tmp_path / "local")
  import flax
  flat_bucket = flax.traverse_util.flatten_dict(from_bucket, sep="/")
  flat_disk = flax.traverse_util.flatten_dict(from_disk, sep="/")
  assert set(flat_bucket) == set(flat_disk) and len(flat_disk) > 20
  for key, value in flat_disk.items():
    np.testing.assert_array_equal(flat_bucket[key], value, err_msg=key)
  # A non-empty bucket directory is refused like a local one; --overwrite replaces it.
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_info:
    run_cli_in_process(convert_torch, pth, url, "--num_classes", 3)
  assert exit_info.value.code == 2 and f"{url} is not empty; pass --overwrite" in capsys.readouterr().err
  run_cli_in_process(convert_torch, pth, url, "--num_classes", 3, "--overwrite")


def test_sigkill_at_a_random_step_of_a_bucket_run_then_rerun_is_bit_identical(tiny_data_root, compilation_cache,
                                                                             reference_run, gcs_bucket, tmp_path):
  from tests.test_multihost import sigkill_after_a_random_checkpoint
  _, reference_final = reference_run  # The same config, 1 device, local workdir, uninterrupted.
  url = f"{gcs_bucket}/killed_{os.getpid()}"
  kill_after = sigkill_after_a_random_checkpoint(tiny_data_root, url, compilation_cache, tmp_path, tmp_path)
  from etils import epath
  metrics = epath.Path(url) / "metrics.jsonl"
  before = metrics.read_text() if metrics.exists() else ""
  run_tiny(tiny_data_root, url, tmp_path / "restarted.npz", cache_dir=compilation_cache, **REFERENCE_OVERRIDES)
  restarted = load_npz(tmp_path / "restarted.npz")
  assert int(restarted["step"]) == 5
  for key, value in weights_of(reference_final).items():
    np.testing.assert_array_equal(value, restarted[key], err_msg=f"{key} (killed after step {kill_after})")
  # The rerun continued the bucket's metrics.jsonl (objects cannot be appended to: downloaded, extended).
  after = metrics.read_text()
  assert after.startswith(before) and len(after) > len(before)
  assert [json.loads(line)["step"] for line in after.splitlines() if "train/loss" in line][-1] == 5
  assert not any("gs:" in name for name in os.listdir(tmp_path))


# Bad URLs: one line naming the URL, before any training step.


def test_missing_bucket_fails_before_training_with_one_line(tiny_data_root, gcs_bucket, tmp_path):
  proc = run_module("maxsq_jax.main", f"--config={ROOT}/configs/demo.py:tiny", "--workdir=gs://no-such-bucket/run",
                    *data_flags(tiny_data_root), cwd=tmp_path)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: --workdir=gs://no-such-bucket/run: the bucket gs://no-such-bucket does not exist (or this account "
      "cannot see it); create it (gcloud storage buckets create gs://no-such-bucket) or fix the URL")
  assert "Traceback" not in proc.stderr and "[step" not in proc.stdout
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("server", ["closed port", "silent listener"])
def test_unanswering_server_is_an_error_naming_the_url(server, monkeypatch, gcs_bucket):
  import socket
  with socket.socket() as listener:
    listener.bind(("127.0.0.1", 0))
    if server == "silent listener":  # Accepts connections (the kernel does) but never answers.
      listener.listen(8)
    dead = f"http://127.0.0.1:{listener.getsockname()[1]}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", dead)
    with pytest.raises(paths.PathError, match=rf"^--workdir=gs://maxsq-test/run: the storage server {dead} does "
                       r"not answer \(3 tries; .+\); check the network, or STORAGE_EMULATOR_HOST if it is set$"):
      paths.check_reachable("gs://maxsq-test/run", "--workdir", timeout_s=0.5)


def test_bucket_checks_pass_for_a_bucket_and_ignore_local_paths(gcs_bucket, tmp_path):
  paths.check_reachable(f"{gcs_bucket}/any/run", "--workdir")
  paths.check_reachable(str(tmp_path / "not_yet"), "--workdir")


# Storage that stops answering mid-run (the server stopped, connections refused).


def start_reference_run(data_root, url, cache_dir, log_path, **overrides) -> subprocess.Popen:
  """The reference run (tests/helpers.py) on `url`, its output in `log_path`, once it has logged step 2."""
  from tests.test_multihost import wait_for_text
  with open(log_path, "w") as log:
    proc = subprocess.Popen(tiny_command(data_root, url, log_path.parent / "out.npz", **REFERENCE_OVERRIDES,
                                         **overrides), env=tiny_env(1, cache_dir), cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
  wait_for_text(log_path, "[step 2]", [proc])
  return proc


def assert_equal_weights(expected: dict, actual: dict, what: str):
  for key, value in weights_of(expected).items():
    np.testing.assert_array_equal(value, actual[key], err_msg=f"{key} ({what})")


def test_a_20_s_storage_outage_is_ridden_through_with_a_warning_and_bit_identical_parameters(
    tiny_data_root, compilation_cache, reference_run, gcs_server, gcs_bucket, tmp_path):
  url = f"{gcs_bucket}/outage_{os.getpid()}"
  log = tmp_path / "run.log"
  # An evaluation at step 3, during the outage: its files are uploaded in the background too.
  proc = start_reference_run(tiny_data_root, url, compilation_cache, log, **{"storage.stall_warn_s": 5.0,
                                                                             "eval.every": 3})
  gcs_server.stop()
  try:
    time.sleep(20)
  finally:
    gcs_server.start()
  proc.wait(timeout=600)
  text = log.read_text()
  assert proc.returncode == 0, text[-3000:]
  warnings = [line for line in text.splitlines() if line.startswith(f"warning: storage {url}")]  # Not after a bar.
  assert warnings and "retrying until config.storage.deadline_s=600 s" in warnings[0], text[-3000:]
  assert f"storage {url}/checkpoints answers again: " in text
  assert_equal_weights(reference_run[1], load_npz(tmp_path / "out.npz"), "after a 20 s outage")
  # A save that failed in the outage was made up for by the next step's: the final one is committed.
  assert committed_steps(url)[-1] == 5
  assert {"eval/step_3/results.json", "eval/step_3/pred_0.png", "eval/step_5/results.json"} <= list_files(url)


def test_storage_silent_past_the_deadline_stops_the_run_with_one_line_and_the_rerun_resumes(
    tiny_data_root, compilation_cache, reference_run, gcs_server, gcs_bucket, tmp_path):
  url = f"{gcs_bucket}/deadline_{os.getpid()}"
  log = tmp_path / "run.log"
  deadline = {"storage.deadline_s": 20.0, "storage.stall_warn_s": 5.0}
  proc = start_reference_run(tiny_data_root, url, compilation_cache, log, **deadline)
  before = committed_steps(url)
  gcs_server.stop()
  try:
    stopped = time.monotonic()
    proc.wait(timeout=20 + 60)
    took = time.monotonic() - stopped
  finally:
    gcs_server.start()
    if proc.poll() is None:
      proc.kill()
  text = log.read_text()
  assert proc.returncode == 1, text[-3000:]
  errors = [line for line in text.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in text.split("[step 2]")[1], text[-3000:]
  assert errors[0].startswith(f"error: storage {url}/checkpoints has not answered for ")
  assert "config.storage.deadline_s=20)" in errors[0] and errors[0].endswith(
      "Rerun the same command when storage answers: it resumes from the newest committed checkpoint.")
  known = errors[0].split("known to be committed is ")[1].split()[:2]  # ["step", "N"], or ["none", "yet"].
  assert took < 20 + 60
  # The checkpoints committed before the outage are intact: the rerun verifies and resumes from the newest.
  after = committed_steps(url)
  assert set(before) <= set(after) and max(after) < 5, (before, after)
  assert known == ["none", "yet"] and not before or int(known[1]) in after, (known, before, after)
  proc = run_tiny(tiny_data_root, url, tmp_path / "rerun.npz", cache_dir=compilation_cache, **REFERENCE_OVERRIDES,
                  **deadline)
  assert f"Resumed from {url}/checkpoints at step {max(after)}" in proc.stdout
  assert_equal_weights(reference_run[1], load_npz(tmp_path / "rerun.npz"), "rerun after the deadline")


def test_rerunning_the_finished_demo_neither_trains_nor_evaluates_and_is_quiet(demo_on_bucket, tiny_data_root):
  url, first_stdout, cwd = demo_on_bucket
  proc = run_module("maxsq_jax.main", f"--config={ROOT}/configs/demo.py:tiny", f"--workdir={url}",
                    *data_flags(tiny_data_root), cwd=cwd)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for stage, step in (("source_only", 4), ("adapt", 3)):
    assert (f"{url}/{stage} is finished: step {step} was evaluated before, its results are in "
            f"{url}/{stage}/results.json") in proc.stdout
  assert "evaluation at step" not in proc.stdout and "[step" not in proc.stdout
  assert proc.stdout.rstrip().splitlines()[-1] == first_stdout.rstrip().splitlines()[-1]  # The same summary.
  # Orbax's notes on reading a gs:// checkpoint (harmless) are not shown.
  assert "_CHECKPOINT_METADATA" not in proc.stderr and "read_only=True" not in proc.stderr, proc.stderr[-3000:]
