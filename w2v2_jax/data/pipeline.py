"""The Grain input pipeline: the global batch plan -> this host's fixed-shape numpy batches.

Each element is this host's share of one plan entry (A = accumulate micro-batches, b_host rows, L
samples):
  audio         float32 (A, b_host, L)  16 kHz mono, cropped (mode "crop") or zero-padded ("pad")
  padding_mask  bool    (A, b_host, L)  True = padding (all False in crop mode)
  row_ids       int32   (A, b_host)     global row within the global micro-batch: h * b_host + i
  labels        object  (A, b_host)     transcripts as str (only for a source with labels)
  stats         dict str -> int         this host's counters since the previous batch (`STAT_KEYS`)

A row whose utterance cannot be used (see `audio.REASONS`, plus "too_short"/"too_long" for a decoded
length the plan did not expect) is logged and replaced by a copy of the next good row of the same
global micro-batch (cyclically, reading another host's row if need be), so shapes stay fixed and
the global batch does not depend on the host layout. If no row of a micro-batch is good, the whole
entry is skipped on every host alike. Counters count this host's own rows; summed over hosts they
equal a single-host run's. Randomness (shuffle, crops) is a function of (seed, epoch, index) only,
so `get_state()` / `set_state()` resume bit-exactly.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import logging
import sys
import threading
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from w2v2_jax.data import audio as audio_lib
from w2v2_jax.data import augment as augment_lib
from w2v2_jax.data import batching
from w2v2_jax.data.manifest import Manifest
from w2v2_jax.data.source import Source, as_source

log = logging.getLogger(__name__)

TOO_SHORT = "too_short"
TOO_LONG = "too_long"
SHORT_TOLERANCE = 0.005   # fraction of the source's size a decoded length may fall short by
# Per-batch counters: rows skipped per reason, then rows resampled / downmixed (used), rows replaced
# by a copy of another row, and plan entries skipped because a micro-batch had no usable row.
STAT_KEYS = audio_lib.REASONS + (TOO_SHORT, TOO_LONG, "resampled", "downmixed", "replaced",
                                 "skipped_entries")


def zero_stats() -> dict[str, int]:
  return {k: 0 for k in STAT_KEYS}


@dataclasses.dataclass(frozen=True)
class PlanArgs:
  """The arguments of batching.make_plan other than sizes and epoch (see there)."""
  buckets: tuple[int, ...]
  batch_samples: int
  min_sample_size: int
  max_sample_size: int
  multiple_of: int
  accumulate: int = 1
  mode: str = "crop"
  seed: int = 0
  drop_remainder: bool = True


class _EpochEntries(collections.abc.Sequence):
  """Index i -> (epoch, entry): entry i % n of epoch start_epoch + i // n; n entries per epoch.

  Plans are computed lazily (thread-safe) and only the last few are kept.
  """

  def __init__(self, sizes: np.ndarray, args: PlanArgs, epochs: int | None, start_epoch: int):
    self._sizes = np.asarray(sizes, dtype=np.int64)
    self._args = args
    self._start_epoch = start_epoch
    self._lock = threading.Lock()
    self._plans: dict[int, batching.Plan] = {}
    first = self.plan(start_epoch)
    self.entries_per_epoch = len(first)
    self.dropped = first.dropped
    if not self.entries_per_epoch:
      raise ValueError(f"the plan is empty: {len(self._sizes)} utterances, dropped {first.dropped}; "
                       "check buckets, min/max_sample_size and batch_samples")
    self._len = sys.maxsize if epochs is None else self.entries_per_epoch * epochs

  def plan(self, epoch: int) -> batching.Plan:
    with self._lock:
      plan = self._plans.get(epoch)
      if plan is None:
        plan = batching.make_plan(self._sizes, epoch=epoch, **dataclasses.asdict(self._args))
        self._plans[epoch] = plan
        for old in sorted(self._plans)[:-3]:
          del self._plans[old]
      return plan

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int):
    if not 0 <= i < self._len:
      raise IndexError(i)
    epoch = self._start_epoch + i // self.entries_per_epoch
    return self.plan(epoch)[i % self.entries_per_epoch]


@dataclasses.dataclass
class _Row:
  """One loaded, cropped or padded row: audio (L,), its valid length, label; or an error reason."""
  audio: np.ndarray | None = None
  valid: int = 0
  label: str | None = None
  info: audio_lib.AudioInfo | None = None
  reason: str | None = None
  detail: str = ""


class _LoadEntry:
  """Plan entry -> this host's batch dict, or {"skipped": True, "stats"} when a micro-batch is unusable."""

  def __init__(self, source: Source, args: PlanArgs, process_index: int, process_count: int,
               sample_rate: int, normalize: bool, augment: augment_lib.AugmentConfig | None = None):
    self._source = source
    self._augment = augment if augment is not None and augment.enabled else None
    self._args = args
    self._process_index = process_index
    self._process_count = process_count
    self._sample_rate = sample_rate
    self._normalize = normalize
    self._warned = set()
    self._warned_lock = threading.Lock()

  def __call__(self, entry: batching.PlanEntry) -> dict[str, Any]:
    lo, hi = batching.host_slice(entry.batch_size, self._process_index, self._process_count)
    num_micro, length = entry.indices.shape[0], entry.bucket_len
    stats = zero_stats()
    audio = np.zeros((num_micro, hi - lo, length), np.float32)
    padding = np.ones((num_micro, hi - lo, length), bool)
    labels = np.empty((num_micro, hi - lo), object) if self._source.label_key else None
    for a in range(num_micro):
      rows = self._fill_rows(entry, entry.indices[a], lo, hi, stats)
      if rows is None:
        stats["skipped_entries"] += 1
        log.warning("data: skipping a plan entry of epoch %d: no usable row in a micro-batch of %d "
                    "(bucket %d samples)", entry.epoch, entry.batch_size, length)
        return {"skipped": True, "stats": stats}
      for i, row in enumerate(rows):
        audio[a, i, :row.valid] = row.audio[:row.valid]
        padding[a, i, :row.valid] = False
        if labels is not None:
          labels[a, i] = row.label
    row_ids = np.broadcast_to(np.arange(lo, hi, dtype=np.int32), (num_micro, hi - lo)).copy()
    batch = {"audio": audio, "padding_mask": padding, "row_ids": row_ids, "stats": stats}
    if labels is not None:
      batch["labels"] = labels
    return batch

  def _fill_rows(self, entry: batching.PlanEntry, indices: np.ndarray, lo: int, hi: int,
                 stats: dict[str, int]) -> list[_Row] | None:
    """Rows lo..hi-1 of one global micro-batch (indices (b,)), each bad row replaced by the next good
    row (cyclically over all b rows, loading other hosts' rows only when needed); None if none is good.
    Counts this host's rows into `stats`."""
    b = len(indices)
    cache: dict[int, _Row] = {}

    def row(r: int) -> _Row:
      r %= b
      if r not in cache:
        cache[r] = self._load_row(int(indices[r]), entry.epoch, entry.bucket_len)
      return cache[r]

    for r in range(lo, hi):
      self._count(row(r), stats, int(indices[r]))
    out = []
    for r in range(lo, hi):
      good = next((row(r + s) for s in range(b) if row(r + s).reason is None), None)
      if good is None:
        return None
      stats["replaced"] += int(good is not row(r))
      out.append(good)
    return out

  def _load_row(self, index: int, epoch: int, length: int) -> _Row:
    try:
      # With augmentation the waveform is normalised after it (a gain or added noise must not survive it).
      ex = self._source.load(index, sample_rate=self._sample_rate,
                             normalize=self._normalize and self._augment is None)
    except audio_lib.AudioError as e:
      return _Row(reason=e.reason, detail=f"{e.reason} ({e.detail})" if e.detail else e.reason)
    audio, n = ex.audio, int(ex.audio.shape[0])
    problem = self._short_of_record(n, index, ex.info) or self._length_problem(n, length)
    if problem is not None:
      return _Row(info=ex.info, reason=problem[0], detail=problem[1])
    if self._augment is not None:
      audio = self._augmented(audio, epoch, index, length)
      n = int(audio.shape[0])
    args = self._args
    if args.mode == "crop":
      off = batching.crop_offset(args.seed, epoch, index, n, length)
      return _Row(audio[off:off + length], length, ex.label, ex.info)
    return _Row(audio, n, ex.label, ex.info)

  def _short_of_record(self, n: int, index: int, info: audio_lib.AudioInfo) -> tuple[str, str] | None:
    """("truncated", detail) when the decoder returned fewer samples than the source's size says.

    The size may count samples at the pipeline's rate (`w2v2 manifest` writes those) or, for a file at
    another rate, its own frames (fairseq's manifests). Allowed: one sample of resampling rounding, and
    0.5% (lossy formats' header counts can be estimates, and their decoders differ by a frame)."""
    declared = int(self._source.sizes[index])
    readings = [declared]
    if info.resampled:
      readings.append(audio_lib.resampled_length(declared, info.orig_sample_rate, self._sample_rate))
    if n + max(1, SHORT_TOLERANCE * min(readings)) < min(readings):
      return audio_lib.TRUNCATED, f"truncated (decoded {n} samples; the source says {declared})"
    return None

  def _length_problem(self, n: int, length: int) -> tuple[str, str] | None:
    """(reason, detail) when an utterance of n samples cannot fill a row of `length` (crop: shorter than
    it or than min_sample_size; pad: shorter than min_sample_size or longer than it); None when it can."""
    args = self._args
    if args.mode == "crop":
      if n < max(length, args.min_sample_size):
        return TOO_SHORT, f"too_short ({n} samples < bucket {length})"
      return None
    if n < args.min_sample_size:
      return TOO_SHORT, f"too_short ({n} samples < {args.min_sample_size})"
    if n > length:
      return TOO_LONG, f"too_long ({n} samples > bucket {length})"
    return None

  def _augmented(self, audio: np.ndarray, epoch: int, index: int, length: int) -> np.ndarray:
    """The utterance through `augment` (drawn per epoch and utterance); the speed change is kept only
    when the result still fits the row (`_length_problem`)."""
    cfg = self._augment
    rng = augment_lib.utterance_rng(self._args.seed, epoch, index)
    factor = augment_lib.speed_factor(cfg, rng)
    if factor != 1.0:
      faster = augment_lib.change_speed(audio, factor)
      if self._length_problem(int(faster.shape[0]), length) is None:
        audio = faster
    audio = augment_lib.augment(audio, cfg, rng, self._sample_rate)
    return audio_lib.normalize_waveform(audio) if self._normalize else audio

  def _count(self, row: _Row, stats: dict[str, int], index: int) -> None:
    """Count one of this host's rows; warn once per utterance and reason."""
    if row.info is not None:
      stats["resampled"] += int(row.info.resampled)
      stats["downmixed"] += int(row.info.downmixed)
    if row.reason is None:
      return
    stats[row.reason] += 1
    key = (index, row.reason)
    with self._warned_lock:
      first = key not in self._warned
      self._warned.add(key)
    log.log(logging.WARNING if first else logging.DEBUG, "data: replacing %s: %s",
            self._source.describe(index), row.detail or row.reason)


class BatchIterator:
  """Iterator over this host's batches, with a JSON-able checkpoint state.

  totals: counters accumulated over the batches returned so far (part of the state).
  entries_per_epoch / plan_dropped: the plan's size and the utterances it leaves out per epoch.
  """

  def __init__(self, grain_iter, entries: _EpochEntries):
    self._it = grain_iter
    self.entries_per_epoch = entries.entries_per_epoch
    self.plan_dropped = dict(entries.dropped)
    self.totals = zero_stats()

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> dict[str, Any]:
    pending = zero_stats()
    skipped = 0
    while True:
      try:
        element = next(self._it)
      except StopIteration:
        _add(self.totals, pending)
        raise
      if not element.get("skipped"):
        break
      _add(pending, element["stats"])
      skipped += 1
      if skipped > self.entries_per_epoch:
        raise RuntimeError(f"data: {skipped} plan entries in a row had no usable audio: "
                           f"counters {pending}; is the data readable?")
    _add(element["stats"], pending)
    _add(self.totals, element["stats"])
    return element

  def get_state(self) -> dict[str, Any]:
    """A JSON-able dict: the Grain iterator's state and the totals."""
    return {"grain": self._it.get_state(), "totals": dict(self.totals)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._it.set_state(state["grain"])
    self.totals = {**zero_stats(), **state.get("totals", {})}


def make_iterator(source: Source | Manifest | str, *, buckets: Sequence[int], batch_samples: int,
                  min_sample_size: int, max_sample_size: int, multiple_of: int, accumulate: int = 1,
                  mode: str = "crop", seed: int = 0, drop_remainder: bool = True,
                  process_index: int = 0, process_count: int = 1, sample_rate: int = 16000,
                  normalize: bool = False, num_threads: int = 8, prefetch: int = 16,
                  epochs: int | None = None, start_epoch: int = 0,
                  augment: augment_lib.AugmentConfig | None = None) -> BatchIterator:
  """This host's batches over `epochs` epochs (None = forever), a new plan per epoch.

  source: a Source (e.g. ManifestSource(m, label="ltr"), TfdsSource), a Manifest or a .tsv path.
  Plan arguments: see batching.make_plan (`multiple_of` = total device count, a multiple of
  `process_count`). num_threads decode entries in parallel, up to `prefetch` entries ahead
  (num_threads=0: synchronous). Results do not depend on num_threads / prefetch. augment: waveform
  augmentation (`data/augment.py`), drawn per epoch and utterance, before normalisation.
  """
  source = as_source(source)
  if multiple_of % process_count:
    raise ValueError(f"multiple_of={multiple_of} must be divisible by process_count={process_count}")
  args = PlanArgs(tuple(int(b) for b in buckets), int(batch_samples), int(min_sample_size),
                  int(max_sample_size), int(multiple_of), int(accumulate), mode, int(seed),
                  bool(drop_remainder))
  entries = _EpochEntries(source.sizes, args, epochs, start_epoch)
  log.info("data: %d utterances, %d plan entries per epoch, dropped per epoch %s, host %d of %d",
           len(source), entries.entries_per_epoch, entries.dropped, process_index, process_count)
  if augment is not None and augment.enabled:
    log.info("data: augmentation %s", augment_lib.describe(augment))
  loader = _LoadEntry(source, args, process_index, process_count, sample_rate, normalize, augment)
  dataset = grain.MapDataset.source(entries).map(loader)
  read_options = grain.ReadOptions(num_threads=max(num_threads, 1),
                                   prefetch_buffer_size=prefetch if num_threads else 0)
  return BatchIterator(iter(dataset.to_iter_dataset(read_options)), entries)


def _add(into: dict[str, int], other: dict[str, int]) -> None:
  for k, v in other.items():
    into[k] = into.get(k, 0) + int(v)
