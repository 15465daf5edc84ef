"""Training metrics: TensorBoard event files (no TensorFlow), JSON lines, and a console progress line.

`Averager` collects the per-step metrics a train step returns (device scalars) without waiting for
them; once per log step `Averager.result()` fetches them all in one transfer and reduces them.
`MetricsWriter.write(step, scalars)` then records the values, on process 0 only, in
  <workdir>/tensorboard/events.out.tfevents.*   TensorBoard's TFRecord-framed `Event` protos,
                                                encoded here by hand (a few lines; no TF, no torch);
  <workdir>/metrics.jsonl                       one JSON object per write: step, time, scalars;
  the console                                   step/total, loss, acc, ppl, lr, audio-s/s,
                                                s/step and ETA, through `logging` or a given stream.
After a resume the steps between the last checkpoint and the interruption appear twice in
metrics.jsonl (keep the last line per step); the event file starts with a SessionLog START just
after the resumed step, which tells TensorBoard to drop the stale tail of the previous run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import struct
import time
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from w2v2_jax.progress import format_eta

log = logging.getLogger(__name__)

TB_DIR = "tensorboard"
JSONL_NAME = "metrics.jsonl"


# -- TensorBoard event files -----------------------------------------------------------------

def _crc32c_table() -> list:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), the checksum of TFRecord framing."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _tfrecord(payload: bytes) -> bytes:
  """One TFRecord: length, masked CRC of the length, payload, masked CRC of the payload."""
  length = struct.pack("<Q", len(payload))
  return length + struct.pack("<I", _masked_crc(length)) + payload + struct.pack("<I", _masked_crc(payload))


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1          # int64 fields: negatives as 10-byte two's complement, like protobuf
  out = bytearray()
  while True:
    low, n = n & 0x7F, n >> 7
    out.append(low | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
  return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _event(step: int, wall_time: float, *, scalars: Optional[Mapping[str, float]] = None,
           file_version: Optional[str] = None, session_start: bool = False) -> bytes:
  """A serialized tensorflow.Event (fields: 1 wall_time, 2 step, 3 file_version, 5 summary,
  7 session_log); summary values use field 1 tag and field 2 simple_value (float32)."""
  out = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(int(step))
  if file_version is not None:
    out += _length_delimited(3, file_version.encode())
  if scalars:
    values = b"".join(
        _length_delimited(1, _length_delimited(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
        for tag, value in scalars.items())
    out += _length_delimited(5, values)
  if session_start:
    out += _length_delimited(7, b"\x08\x01")      # SessionLog{status: START}
  return out


class _AppendFile:
  """An append-only file. Object stores (gs://...) cannot append: there the whole content is
  kept and rewritten at most every `remote_flush_secs` and on close."""

  def __init__(self, path: epath.Path, remote_flush_secs: float, remote: Optional[bool] = None):
    self.path = path
    self.remote = "://" in str(path) if remote is None else remote
    self._remote_flush_secs = remote_flush_secs
    self._last_flush = -math.inf
    if self.remote:
      self._content = bytearray(path.read_bytes()) if path.exists() else bytearray()
      self._file = None
    else:
      self._file = open(os.fspath(path), "ab")  # pylint: disable=consider-using-with

  def write(self, data: bytes) -> None:
    if self.remote:
      self._content += data
    else:
      self._file.write(data)

  def flush(self, force: bool = False) -> None:
    if not self.remote:
      self._file.flush()
    elif force or time.monotonic() - self._last_flush >= self._remote_flush_secs:
      self.path.write_bytes(bytes(self._content))
      self._last_flush = time.monotonic()

  def close(self) -> None:
    self.flush(force=True)
    if self._file is not None:
      self._file.close()
      self._file = None


# -- formatting ------------------------------------------------------------------------------

def _json_number(v: float) -> Any:
  """Strict JSON has no NaN/Infinity: write those as the strings Python's json would print."""
  if math.isfinite(v):
    return v
  return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")


# Console fields: (label, keys looked up in order -- the part after the last '/' counts --, format).
CONSOLE_FIELDS = (
    ("loss", ("loss",), "{:.3f}"),
    ("acc", ("accuracy", "acc"), "{:.3f}"),
    ("ppl", ("prob_perplexity", "ppl"), "{:.1f}"),
    ("lr", ("learning_rate", "lr"), "{:.2e}"),
)


def _to_float(v: Any) -> float:
  """A host or device scalar -> float (arrays: their mean). Runs on process 0 only, so a global
  array must be replicated (use `Averager.result()` for anything else)."""
  if isinstance(v, jax.Array) and not v.is_fully_addressable:
    if not v.is_fully_replicated:
      raise ValueError("MetricsWriter.write needs host values or replicated arrays; "
                       "reduce sharded metrics with Averager.result() on every process")
    v = v.addressable_data(0)
  return float(np.mean(np.asarray(v, np.float64)))


def _pick(scalars: Mapping[str, float], names: Iterable[str]) -> Optional[float]:
  for name in names:
    for key, value in scalars.items():
      if key == name or key.rsplit("/", 1)[-1] == name:
        return value
  return None


# -- writer ----------------------------------------------------------------------------------

class MetricsWriter:
  """Writes scalars to TensorBoard event files, metrics.jsonl and a console line (process 0 only).

  Args:
    workdir: run directory (local, or a URL etils.epath can open, e.g. gs://...).
    total_steps: the run's last step, for the progress fraction and the ETA.
    log_every: the intended logging interval (`should_write`).
    stream: where the console line goes; default: `logging.info` on this module's logger.
    is_primary: whether this process writes; default `jax.process_index() == 0`.
    initial_step: the step training starts from (the restored step on resume); timing of the first
      write counts steps from it.
    ema: weight of the newest interval in the moving average of seconds per step behind the ETA.
    remote_flush_secs: on object stores (gs://), rewrite the files at most this often (and on close).
    clock: monotonic clock (seconds), injectable for tests.
  """

  def __init__(self, workdir: Any, *, total_steps: int, log_every: int, stream: Optional[TextIO] = None,
               is_primary: Optional[bool] = None, initial_step: int = 0, ema: float = 0.1,
               remote_flush_secs: float = 60.0, clock: Callable[[], float] = time.monotonic):
    self.total_steps = int(total_steps)
    self.log_every = max(int(log_every), 1)
    self.stream = stream
    self.is_primary = jax.process_index() == 0 if is_primary is None else bool(is_primary)
    self._ema_weight = float(ema)
    self._clock = clock
    self._last_step = int(initial_step)
    self._last_time = clock()
    self._intervals = 0
    self._sec_per_step: Optional[float] = None
    self._events = self._jsonl = None
    if not self.is_primary:
      return
    root = epath.Path(workdir)
    (root / TB_DIR).mkdir(parents=True, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
    self._events = _AppendFile(root / TB_DIR / name, remote_flush_secs)
    self._events.write(_tfrecord(_event(0, time.time(), file_version="brain.Event:2")))
    if initial_step > 0:
      # TensorBoard drops earlier events at steps >= a SessionLog START's step: the previous run's
      # tail after the checkpoint, which this run is about to redo.
      self._events.write(_tfrecord(_event(initial_step + 1, time.time(), session_start=True)))
    self._jsonl = _AppendFile(root / JSONL_NAME, remote_flush_secs)
    self._events.flush()

  def should_write(self, step: int) -> bool:
    """True every `log_every` steps and at the last step."""
    return step % self.log_every == 0 or step == self.total_steps

  def reset_timer(self, step: Optional[int] = None) -> None:
    """Restart interval timing now (e.g. after compilation or a restore) from `step`."""
    if step is not None:
      self._last_step = int(step)
    self._last_time = self._clock()

  @property
  def sec_per_step(self) -> Optional[float]:
    """The moving average of seconds per step (None before the first write)."""
    return self._sec_per_step

  def _time_interval(self, step: int, audio_seconds: Optional[float]) -> Dict[str, float]:
    now = self._clock()
    steps = step - self._last_step
    perf = {}
    if steps > 0:
      dt = now - self._last_time
      per_step = dt / steps
      self._intervals += 1
      # The first interval holds compilation: it seeds the average and the second replaces it.
      if self._intervals <= 2 or self._sec_per_step is None:
        self._sec_per_step = per_step
      else:
        self._sec_per_step += self._ema_weight * (per_step - self._sec_per_step)
      perf["perf/sec_per_step"] = per_step
      if audio_seconds is not None and dt > 0:
        perf["perf/audio_sec_per_sec"] = float(audio_seconds) / dt
    self._last_step, self._last_time = step, now
    return perf

  def eta_seconds(self, step: int) -> Optional[float]:
    """Seconds left to `total_steps` at the averaged step time (None before the first write)."""
    if self._sec_per_step is None:
      return None
    return max(self.total_steps - step, 0) * self._sec_per_step

  def write(self, step: int, scalars: Mapping[str, Any], *, audio_seconds: Optional[float] = None) -> None:
    """Records `scalars` (floats, numpy or jax scalars) at `step`.

    `audio_seconds`: seconds of audio the whole run (all processes) consumed since the previous
    write, for the audio-s/s throughput. Adds perf/sec_per_step (and perf/audio_sec_per_sec).
    """
    if not self.is_primary:
      return
    step = int(step)
    values = {str(k): _to_float(v) for k, v in scalars.items()}
    values.update(self._time_interval(step, audio_seconds))
    self._events.write(_tfrecord(_event(step, time.time(), scalars=values)))
    record = {"step": step, "time": time.time()}
    record.update({k: _json_number(v) for k, v in values.items()})
    self._jsonl.write((json.dumps(record) + "\n").encode())
    self._events.flush()
    self._jsonl.flush()
    self._console(step, values)

  def progress_line(self, step: int, values: Mapping[str, float]) -> str:
    """The console line for `values` at `step` (uses the current step-time average)."""
    width = len(str(self.total_steps))
    pct = 100.0 * step / self.total_steps if self.total_steps else 0.0
    parts = [f"step {step:>{width}d}/{self.total_steps} ({pct:5.1f}%)"]
    for label, names, fmt in CONSOLE_FIELDS:
      value = _pick(values, names)
      if value is not None:
        parts.append(f"{label} {fmt.format(value)}")
    rate = values.get("perf/audio_sec_per_sec")
    if rate is not None:
      parts.append(f"{rate:.1f} audio-s/s")
    if self._sec_per_step is not None:
      parts.append(f"{self._sec_per_step:.3f} s/step")
    parts.append(f"ETA {format_eta(self.eta_seconds(step))}")
    return " | ".join(parts)

  def _console(self, step: int, values: Mapping[str, float]) -> None:
    line = self.progress_line(step, values)
    if self.stream is not None:
      self.stream.write(line + "\n")
      self.stream.flush()
    else:
      log.info("%s", line)

  def flush(self) -> None:
    """Forces everything written so far to storage (also rewrites remote files)."""
    for f in (self._events, self._jsonl):
      if f is not None:
        f.flush(force=True)

  def close(self) -> None:
    """Flushes and closes the files; later writes are errors."""
    for f in (self._events, self._jsonl):
      if f is not None:
        f.close()
    self._events = self._jsonl = None

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# -- averaging between log steps ---------------------------------------------------------------

@jax.jit
def _tree_add(a, b):
  return jax.tree.map(lambda x, y: x + y, a, b)


def _host_view(x: Any) -> Any:
  """A leaf -> something jax.device_get can fetch on this process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.is_fully_replicated:
      return x.addressable_data(0)
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return multihost_utils.process_allgather(x, tiled=True)
  return x


class Averager:
  """Accumulates per-step metrics between log steps; one device-to-host transfer per `result()`.

  `add(metrics)` sums the jax-array values into device-side totals (one small jitted add,
  dispatched asynchronously, so the host never waits on the device) and everything else (floats,
  numpy values) on the host in float64. `result()` fetches the device totals and returns floats:
  the mean over the added steps, except for the keys in `sum_keys` (matched on the whole key or
  its part after the last '/'), which are summed (sample sizes, audio seconds, counts).
  Array-valued metrics (e.g. identical per-device copies) are averaged over their elements after
  the reduction over steps. Every dict must have the same keys. In a multi-process run all
  processes call `add` and `result` alike.
  """

  def __init__(self, sum_keys: Iterable[str] = ()):
    self.sum_keys = frozenset(sum_keys)
    self.reset()

  def reset(self) -> None:
    """Forgets everything added."""
    self._device: Optional[Dict[str, Any]] = None
    self._host: Dict[str, np.ndarray] = {}
    self._keys: Optional[list] = None
    self._on_device: set = set()
    self.count = 0

  def add(self, metrics: Mapping[str, Any]) -> None:
    """Adds one step's metrics (device arrays, numpy values or floats)."""
    if self._keys is None:
      self._keys = list(metrics)
      self._on_device = {k for k, v in metrics.items() if isinstance(v, jax.Array)}
    elif set(metrics) != set(self._keys):
      raise ValueError(f"metric keys changed: {sorted(self._keys)} -> {sorted(metrics)}")
    # Where a key accumulates is fixed by its first value: jax arrays on device, the rest on host.
    device = {k: jnp.asarray(v) for k, v in metrics.items() if k in self._on_device}
    for k, v in metrics.items():
      if k not in self._on_device:
        v = np.asarray(v, np.float64)
        self._host[k] = self._host[k] + v if k in self._host else v
    if device:
      self._device = device if self._device is None else _tree_add(self._device, device)
    self.count += 1

  def _is_sum(self, key: str) -> bool:
    return key in self.sum_keys or key.rsplit("/", 1)[-1] in self.sum_keys

  def result(self, reset: bool = True) -> Dict[str, float]:
    """The reduced metrics as Python floats ({} if nothing was added); resets unless told not to."""
    if not self.count:
      return {}
    totals = dict(self._host)
    if self._device:
      keys = list(self._device)
      totals.update(zip(keys, jax.device_get([_host_view(self._device[k]) for k in keys])))
    out = {}
    for key in self._keys:
      value = float(np.mean(np.asarray(totals[key], np.float64)))
      out[key] = value if self._is_sum(key) else value / self.count
    if reset:
      self.reset()
    return out
