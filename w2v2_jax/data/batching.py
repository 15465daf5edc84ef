"""The global batch plan: which utterances form each batch, and at which length, from metadata only.

Every host computes the same plan from the manifest's sizes, so every host produces batches of the
same shape at the same step; host h then reads rows [h*b/H, (h+1)*b/H) of each micro-batch. Shapes
come from a small fixed set of length buckets, so a jitted step compiles once per bucket.

mode "crop" (pretraining; fairseq crops and never pads): an utterance of n samples (n >= min_sample_size,
capped at max_sample_size) goes to the largest bucket <= n and is randomly cropped to it.
mode "pad" (fine-tuning with labels; never crops): the smallest bucket >= n, zero-padded;
utterances longer than the largest bucket (or max_sample_size) are dropped.

Evaluation and transcription (`plan_padded_batches`) pad every utterance to a multiple of one length
granularity instead, longest first, and never drop one.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import itertools
import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)

MODES = ("crop", "pad")


@dataclasses.dataclass(frozen=True)
class PlanEntry:
  """One optimizer step's data: `accumulate` global micro-batches of one bucket.

  bucket_len: samples per row (L); batch_size: rows per global micro-batch (b);
  indices: (accumulate, batch_size) int64 utterance indices; epoch: the epoch it belongs to.
  """
  bucket_len: int
  batch_size: int
  indices: np.ndarray
  epoch: int = 0


class Plan(collections.abc.Sequence):
  """The entries of one epoch, in order, and how many utterances were left out and why.

  dropped: {"too_short", "too_long", "remainder"} -> utterance counts ("remainder": utterances that
  did not fill a last entry of their bucket; 0 when drop_remainder=False).
  """

  def __init__(self, entries: Sequence[PlanEntry], dropped: dict[str, int]):
    self.entries = tuple(entries)
    self.dropped = dict(dropped)

  def __len__(self) -> int:
    return len(self.entries)

  def __getitem__(self, i):
    return self.entries[i]


def bucket_batch_sizes(buckets: Sequence[int], batch_samples: int, multiple_of: int) -> dict[int, int]:
  """Rows per global micro-batch for each bucket: floor(batch_samples / L) rounded down to a multiple
  of `multiple_of` (the total device count). Raises ValueError if a bucket cannot hold `multiple_of`
  rows within `batch_samples`."""
  sizes = {}
  for length in buckets:
    b = (batch_samples // length) // multiple_of * multiple_of
    if b < multiple_of:
      raise ValueError(f"bucket {length}: batch_samples={batch_samples} holds fewer than "
                       f"multiple_of={multiple_of} rows; lower the bucket or raise batch_samples")
    sizes[int(length)] = int(b)
  return sizes


def batch_shapes(buckets: Sequence[int], batch_samples: int, multiple_of: int, accumulate: int = 1,
                 process_count: int = 1) -> list[tuple[int, int, int]]:
  """The (accumulate, rows per host, samples) shape of every bucket's host batch, to warm up a step."""
  return [(accumulate, b // process_count, length)
          for length, b in bucket_batch_sizes(buckets, batch_samples, multiple_of).items()]


def assign_buckets(sizes: np.ndarray, buckets: Sequence[int], *, min_sample_size: int,
                   max_sample_size: int, mode: str) -> tuple[np.ndarray, dict[str, int]]:
  """Bucket index per utterance, -1 for dropped ones -> ((N,) int64, {"too_short", "too_long"} counts)."""
  sizes = np.asarray(sizes, dtype=np.int64)
  b = np.asarray(buckets, dtype=np.int64)
  too_short = sizes < min_sample_size
  if mode == "crop":
    idx = np.searchsorted(b, np.minimum(sizes, max_sample_size), side="right") - 1
    too_short |= idx < 0
    too_long = np.zeros_like(too_short)
  elif mode == "pad":
    idx = np.searchsorted(b, sizes, side="left")
    too_long = ~too_short & ((idx >= len(b)) | (sizes > max_sample_size))
  else:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  idx = np.where(too_short | too_long, -1, idx)
  return idx.astype(np.int64), {"too_short": int(too_short.sum()), "too_long": int(too_long.sum())}


def make_plan(sizes: np.ndarray, *, buckets: Sequence[int], batch_samples: int, min_sample_size: int,
              max_sample_size: int, multiple_of: int, accumulate: int = 1, mode: str = "crop",
              seed: int = 0, epoch: int = 0, drop_remainder: bool = True) -> Plan:
  """The global plan of one epoch, a deterministic function of the arguments.

  sizes: (N,) utterance lengths in samples at the model's rate. Utterances are shuffled with
  np.random.default_rng((seed, epoch)), grouped by bucket in that order and cut into entries of
  `accumulate` x b rows; a bucket's leftover (< accumulate * b utterances) is dropped, or with
  drop_remainder=False completed by wrapping around to the bucket's first utterances. Entries are
  then shuffled so buckets interleave. The number of entries does not depend on `epoch`.
  """
  _check_args(buckets, multiple_of, accumulate, min_sample_size, max_sample_size)
  batch_sizes = bucket_batch_sizes(buckets, batch_samples, multiple_of)
  bucket_of, dropped = assign_buckets(sizes, buckets, min_sample_size=min_sample_size,
                                      max_sample_size=max_sample_size, mode=mode)
  rng = np.random.default_rng((seed, epoch))
  order = rng.permutation(len(bucket_of))
  order = order[bucket_of[order] >= 0]
  entries = []
  dropped["remainder"] = 0
  for k, length in enumerate(buckets):
    b = batch_sizes[int(length)]
    members = order[bucket_of[order] == k]
    per_entry = accumulate * b
    full, rest = divmod(len(members), per_entry)
    if rest and not drop_remainder:
      members = np.concatenate([members, np.resize(members, per_entry - rest)])
      full += 1
    elif rest:
      dropped["remainder"] += rest
    for e in range(full):
      rows = members[e * per_entry:(e + 1) * per_entry].reshape(accumulate, b)
      entries.append(PlanEntry(int(length), b, rows.astype(np.int64), epoch))
  entries = [entries[i] for i in rng.permutation(len(entries))]
  return Plan(entries, dropped)


def host_rows(entry: PlanEntry, process_index: int, process_count: int) -> np.ndarray:
  """Utterance indices of host `process_index`: rows [h*b/H, (h+1)*b/H) -> (accumulate, b/H) int64."""
  lo, hi = host_slice(entry.batch_size, process_index, process_count)
  return entry.indices[:, lo:hi]


def host_slice(batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
  """[lo, hi) global rows of host `process_index` in a micro-batch of `batch_size` rows."""
  if batch_size % process_count:
    raise ValueError(f"batch size {batch_size} is not divisible by process_count={process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} outside [0, {process_count})")
  per_host = batch_size // process_count
  return process_index * per_host, (process_index + 1) * per_host


def padded_length(num_samples: int, bucket_samples: int) -> int:
  """`num_samples` rounded up to a multiple of `bucket_samples` (at least one bucket)."""
  return max(bucket_samples, -(-int(num_samples) // bucket_samples) * bucket_samples)


def plan_padded_batches(lengths: Sequence[int], max_samples: int, bucket_samples: int) -> list[list[int]]:
  """Groups utterances (by position in `lengths`) into inference batches, longest first.

  Each batch holds a power-of-two number of utterances of the same padded length (`padded_length`)
  whose padded size stays within `max_samples`; an utterance longer than that budget gets a batch of
  its own. So no batch needs dummy rows, the shapes that compile are (2^k, multiple of
  bucket_samples), and every utterance is padded to its own bucket whatever it is batched with: a
  group-norm conv encoder (whose statistics include padding, as in the reference) gives the same
  transcript in `w2v2 transcribe`, `w2v2 evaluate` and fine-tuning validation.
  """
  lengths = [int(n) for n in lengths]
  order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
  batches = []
  start = 0
  while start < len(order):
    padded = padded_length(lengths[order[start]], bucket_samples)
    same = start
    while same < len(order) and padded_length(lengths[order[same]], bucket_samples) == padded:
      same += 1
    take = min(max(1, int(max_samples) // padded), same - start)
    take = 1 << (take.bit_length() - 1)
    batches.append(order[start:start + take])
    start += take
  return batches


def crop_offset(seed: int, epoch: int, index: int, num_samples: int, bucket_len: int) -> int:
  """Start of the random `bucket_len` crop of utterance `index` (num_samples long) in `epoch`.

  Drawn from np.random.default_rng((seed, epoch, index)): the same on every host and after a resume.
  """
  span = int(num_samples) - int(bucket_len) + 1
  if span <= 1:
    return 0
  return int(np.random.default_rng((seed, epoch, int(index))).integers(span))


def _check_args(buckets, multiple_of, accumulate, min_sample_size, max_sample_size):
  b = list(buckets)
  if not b or any(x <= 0 for x in b) or any(x >= y for x, y in itertools.pairwise(b)):
    raise ValueError(f"buckets must be positive and strictly increasing, got {buckets}")
  if multiple_of < 1 or accumulate < 1:
    raise ValueError(f"multiple_of ({multiple_of}) and accumulate ({accumulate}) must be >= 1")
  if min_sample_size > max_sample_size:
    raise ValueError(f"min_sample_size {min_sample_size} > max_sample_size {max_sample_size}")
