"""MetricsWriter (TensorBoard events without TF, JSON lines, console line) and Averager."""
import io
import json
import logging
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from w2v2_jax.train import metrics as metrics_lib
from w2v2_jax.progress import format_eta
from w2v2_jax.train.metrics import Averager, MetricsWriter


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def _read_records(path):
  """TFRecord payloads of an event file, checking both CRCs of every record."""
  data, records, pos = path.read_bytes(), [], 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == metrics_lib._masked_crc(header)
    payload = data[pos + 12:pos + 12 + length]
    footer = data[pos + 12 + length:pos + 16 + length]
    assert struct.unpack("<I", footer)[0] == metrics_lib._masked_crc(payload)
    records.append(payload)
    pos += 16 + length
  return records


def test_crc32c_known_value():
  assert metrics_lib.crc32c(b"123456789") == 0xE3069283
  assert metrics_lib.crc32c(b"") == 0


def _write_run(tmp_path, **kwargs):
  clock, stream = FakeClock(), io.StringIO()
  writer = MetricsWriter(tmp_path, total_steps=100, log_every=10, stream=stream, is_primary=True,
                         clock=clock, **kwargs)
  for step in (10, 20, 30):
    clock.now += 5.0
    writer.write(step, {"train/loss": 4.0 - step / 10, "train/accuracy": np.float32(step / 100),
                        "train/prob_perplexity": jnp.float32(300.0 + step), "train/lr": 5e-4 * step / 100},
                 audio_seconds=160.0)
  writer.close()
  return stream.getvalue()


def test_event_file_readable_by_tensorboard(tmp_path):
  event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  _write_run(tmp_path)
  files = os.listdir(tmp_path / "tensorboard")
  assert len(files) == 1 and "tfevents" in files[0]
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  acc.Reload()
  assert set(acc.Tags()["scalars"]) >= {"train/loss", "train/accuracy", "train/prob_perplexity",
                                        "train/lr", "perf/sec_per_step", "perf/audio_sec_per_sec"}
  loss = acc.Scalars("train/loss")
  assert [e.step for e in loss] == [10, 20, 30]
  np.testing.assert_allclose([e.value for e in loss], [3.0, 2.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose([e.value for e in acc.Scalars("perf/audio_sec_per_sec")], [32.0] * 3)
  np.testing.assert_allclose([e.value for e in acc.Scalars("perf/sec_per_step")], [0.5] * 3)


def test_event_file_framing_without_tensorboard(tmp_path):
  _write_run(tmp_path)
  (name,) = os.listdir(tmp_path / "tensorboard")
  records = _read_records(tmp_path / "tensorboard" / name)
  assert len(records) == 4                      # file_version + one event per write
  assert b"brain.Event:2" in records[0]
  assert all(b"train/loss" in r for r in records[1:])


def test_resume_starts_with_session_start(tmp_path):
  event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  _write_run(tmp_path)                          # first run logged steps 10, 20, 30
  clock = FakeClock()
  with MetricsWriter(tmp_path, total_steps=100, log_every=10, stream=io.StringIO(), is_primary=True,
                     initial_step=20, clock=clock) as writer:   # resumed from a checkpoint at 20
    clock.now += 5.0
    writer.write(30, {"train/loss": 9.0})
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(10, 3.0), (20, 2.0), (30, 9.0)]


def test_jsonl_lines_parse(tmp_path):
  _write_run(tmp_path)
  with MetricsWriter(tmp_path, total_steps=100, log_every=10, stream=io.StringIO(),
                     is_primary=True) as writer:                 # appends to the same file
    writer.write(40, {"train/loss": float("nan"), "train/grad_norm": float("inf")})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  rows = [json.loads(l, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}")) for l in lines]
  assert [r["step"] for r in rows] == [10, 20, 30, 40]
  assert all(isinstance(r["time"], float) for r in rows)
  assert rows[0]["train/loss"] == 3.0 and rows[2]["train/prob_perplexity"] == 330.0
  assert rows[1]["perf/audio_sec_per_sec"] == 32.0
  assert rows[3]["train/loss"] == "NaN" and rows[3]["train/grad_norm"] == "Infinity"


def test_console_line_and_eta(tmp_path):
  out = _write_run(tmp_path).splitlines()
  assert len(out) == 3
  last = out[-1]
  assert last.startswith("step  30/100 ( 30.0%)")
  for part in ("loss 1.000", "acc 0.300", "ppl 330.0", "lr 1.50e-04", "32.0 audio-s/s", "0.500 s/step",
               "ETA 00:00:35"):
    assert part in last, (part, last)


def test_eta_uses_moving_average_and_skips_compile_interval(tmp_path):
  clock = FakeClock()
  writer = MetricsWriter(tmp_path, total_steps=10_000, log_every=100, stream=io.StringIO(),
                         is_primary=True, clock=clock, ema=0.5)
  clock.now += 600.0                        # first interval: compilation, 6 s/step
  writer.write(100, {})
  assert writer.sec_per_step == 6.0
  clock.now += 100.0                        # 1 s/step replaces it outright
  writer.write(200, {})
  assert writer.sec_per_step == 1.0
  clock.now += 300.0                        # 3 s/step: moving average (weight 0.5) -> 2 s/step
  writer.write(300, {})
  assert writer.sec_per_step == 2.0
  assert writer.eta_seconds(300) == 2.0 * 9_700
  assert writer.progress_line(300, {}).endswith("ETA 05:23:20")
  writer.close()


def test_format_eta():
  assert format_eta(0) == "00:00:00"
  assert format_eta(59.6) == "00:01:00"
  assert format_eta(3661) == "01:01:01"
  assert format_eta(100 * 3600 + 5) == "100:00:05"        # hours do not wrap at a day
  for unknown in (None, float("nan"), float("inf"), -1):
    assert format_eta(unknown) == "--:--:--"


def test_console_goes_to_logging_without_stream(tmp_path, caplog):
  with caplog.at_level(logging.INFO, logger="w2v2_jax.train.metrics"):
    with MetricsWriter(tmp_path, total_steps=10, log_every=1, is_primary=True) as writer:
      writer.write(1, {"loss": 2.5})
  assert any("step  1/10" in r.getMessage() and "loss 2.500" in r.getMessage() for r in caplog.records)


def test_non_primary_writes_nothing(tmp_path, caplog):
  stream = io.StringIO()
  workdir = tmp_path / "run"
  with caplog.at_level(logging.INFO, logger="w2v2_jax.train.metrics"):
    with MetricsWriter(workdir, total_steps=10, log_every=1, stream=stream, is_primary=False) as writer:
      writer.write(1, {"loss": 1.0})
      writer.flush()
  writer2 = MetricsWriter(workdir, total_steps=10, log_every=1, is_primary=False)
  writer2.write(1, {"loss": 1.0})
  writer2.close()
  assert not workdir.exists()
  assert stream.getvalue() == ""
  assert not [r for r in caplog.records if r.name == "w2v2_jax.train.metrics"]


def test_should_write():
  writer = MetricsWriter("/nonexistent", total_steps=25, log_every=10, is_primary=False)
  assert [s for s in range(1, 26) if writer.should_write(s)] == [10, 20, 25]


def test_remote_file_is_rewritten_on_flush(tmp_path):
  path = metrics_lib.epath.Path(tmp_path / "m.jsonl")
  f = metrics_lib._AppendFile(path, remote_flush_secs=3600.0, remote=True)
  f.write(b"a\n")
  f.flush()                                  # first flush writes
  f.write(b"b\n")
  f.flush()                                  # rate-limited: nothing new yet
  assert path.read_bytes() == b"a\n"
  f.close()                                  # close always writes everything
  assert path.read_bytes() == b"a\nb\n"


def test_averager_means_sums_and_one_fetch():
  avg = Averager(sum_keys=("sample_size", "audio_seconds"))
  assert avg.result() == {}
  for i in range(1, 5):
    avg.add({"train/loss": jnp.float32(i), "train/sample_size": jnp.int32(10 * i),
             "audio_seconds": 4.0, "lr": 1e-4, "per_device": jnp.full((2,), float(i))})
  assert avg.count == 4
  out = avg.result()
  assert out == {"train/loss": 2.5, "train/sample_size": 100.0, "audio_seconds": 16.0,
                 "lr": pytest.approx(1e-4, rel=1e-12), "per_device": 2.5}
  assert all(isinstance(v, float) for v in out.values())
  assert avg.count == 0 and avg.result() == {}
  avg.add({"a": jnp.float32(1.0)})
  with pytest.raises(ValueError):
    avg.add({"b": jnp.float32(1.0)})


def test_averager_keeps_values_on_device_until_result():
  avg = Averager()
  for i in range(3):
    avg.add({"x": jnp.float32(i)})
  assert isinstance(avg._device["x"], jax.Array)          # an on-device running total, not a float
  assert avg.result(reset=False) == {"x": 1.0}
  assert avg.result() == {"x": 1.0}


def test_progress_bar_lines_rate_and_eta():
  import io
  from w2v2_jax.progress import ProgressBar
  now = [100.0]
  stream = io.StringIO()                      # not a terminal: a line per 10 % and one at the end
  bar = ProgressBar("synthesising", stream=stream, clock=lambda: now[0])
  bar(20, 120)                                # resumed: 20 items were done by an earlier run
  for done in range(21, 121):
    now[0] += 0.5                             # 2 items/s from here
    bar(done, 120)
  lines = stream.getvalue().splitlines()
  assert lines[0] == f"synthesising [{'#' * 5}{'.' * 25}] 20/120 0.0/s ETA --:--:--"
  assert lines[-1] == f"synthesising [{'#' * 30}] 120/120 2.0/s ETA 00:00:00"
  assert len(lines) == 10                     # deciles 1..9 once each, then the final line
  mid = next(line for line in lines if " 60/120 " in line)
  assert mid.endswith("2.0/s ETA 00:00:30")
