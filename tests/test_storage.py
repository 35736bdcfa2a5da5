"""Uploads that ride out an outage (storage.Uploader: retried with backoff, a warning line while the
destination does not answer and a line when it does again) and the host log (host_log.HostLog: the
console output, errors included, in WORKDIR/logs/host_<i>.log), on local directories."""

import os
import re
import sys

import pytest

from maxsq_jax import host_log, storage
from maxsq_jax.errors import ConfigError


def test_an_upload_is_retried_until_the_destination_answers_with_a_warning_and_a_recovery_line(tmp_path, capsys):
  local = tmp_path / "metrics.jsonl"
  local.write_text("one\n")
  blocker = tmp_path / "bucket"
  blocker.write_text("a file where the destination folder should be: every write fails")
  uploader = storage.Uploader(blocker, stall_warn_s=0.5)
  uploader.put(local, blocker / "run" / "metrics.jsonl")
  assert not uploader.flush(2.5)  # Tried at 0 s and 2 s: both failed.
  local.write_text("one\ntwo\n")  # Written on meanwhile: the newest content goes up.
  blocker.unlink()
  (blocker / "run").mkdir(parents=True)
  assert uploader.flush(10)
  assert (blocker / "run" / "metrics.jsonl").read_text() == "one\ntwo\n"
  assert uploader.close(1) == []
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 2, err
  assert re.match(rf"warning: storage {re.escape(str(blocker))} has not answered for \d+ s \(", err[0]), err[0]
  assert err[0].endswith("training goes on, and uploads are retried")
  assert err[1].startswith(f"storage {blocker} answers again after ")


def test_close_reports_what_is_not_up_and_a_deleted_staging_file_is_not_retried(tmp_path):
  uploader = storage.Uploader(tmp_path / "missing_parent_file", stall_warn_s=60)
  (tmp_path / "missing_parent_file").write_text("")
  uploader.put(tmp_path / "never_written", tmp_path / "dest")  # Nothing to copy: done at once.
  uploader.put(__file__, tmp_path / "missing_parent_file" / "x")
  assert uploader.close(0.5) == [str(tmp_path / "missing_parent_file" / "x")]
  assert not (tmp_path / "dest").exists()


def test_the_host_log_keeps_the_console_output_and_the_error_line_and_a_rerun_appends(tmp_path, capsys):
  workdir = tmp_path / "run"
  with host_log.HostLog(workdir, 3):
    print("[step 1] loss=2")
    print("a warning", file=sys.stderr)
  with pytest.raises(ConfigError):
    with host_log.HostLog(workdir, 3):
      print("second start")
      raise ConfigError("config.x=1: must be 2")
  text = (workdir / "logs" / "host_3.log").read_text()
  lines = text.splitlines()
  assert lines[0].startswith("=== ") and lines[1:3] == ["[step 1] loss=2", "a warning"]
  assert lines[3].startswith("=== ") and lines[4:] == ["second start", "error: config.x=1: must be 2"]
  out, err = capsys.readouterr()  # The console got what it always got.
  assert out == "[step 1] loss=2\nsecond start\n" and err == "a warning\n"
  assert sys.stdout is not None and not isinstance(sys.stdout, host_log._Tee)
  assert os.path.basename(host_log.log_path("gs://b/run", 0)) == "host_0.log"
