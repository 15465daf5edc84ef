"""Span masks (time and channel) and contrastive negative sampling for wav2vec 2.0, in pure JAX.

Follows fairseq's `compute_mask_indices` (mask_type "static", no_overlap False) and the negative
sampling of `Wav2Vec2Model.sample_negatives`, rewritten for fixed shapes: every function here is
jittable, has no host callbacks and no data-dependent shapes. Arrays (rng, masks) may be traced;
the hyper-parameters (probabilities, lengths, counts, flags) are static Python values, checked in
Python when the function is called or traced, so a bad value fails before anything compiles.

Units: "frames" are the conv encoder's output steps (20 ms each for the default stack); "channels"
are feature channels. Masks are bool, True = masked (or, for `padding_mask`, True = padding).
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np


# ----------------------------------------------------------------------------- argument checks

def _check_prob(name: str, value) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
    raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
  return float(value)


def _check_int(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def _check_bool_2d(name: str, array) -> jnp.ndarray:
  array = jnp.asarray(array)
  if array.ndim != 2 or array.dtype != jnp.bool_:
    raise ValueError(f"{name} must be a 2-D bool array (B, T), got shape {array.shape} "
                     f"and dtype {array.dtype}")
  return array


def _check_span_args(mask_prob, mask_length, min_masks, width: int, axis: str):
  mask_prob = _check_prob("mask_prob", mask_prob)
  mask_length = _check_int("mask_length", mask_length, 1)
  min_masks = _check_int("min_masks", min_masks, 0)
  if mask_length > width:
    raise ValueError(f"sequence too short: mask_length={mask_length} is longer than the "
                     f"{axis} axis ({width})")
  return mask_prob, mask_length, min_masks


# ----------------------------------------------------------------------------- random draws
# Drawn flat and reshaped: XLA:CPU compiles threefry over a 1-D shape several times faster than
# over a 2-D or 3-D one (0.5 s against 1.5 s for a (4, 40, 4) randint on a 2-core machine).

def _uniform(rng, shape) -> jnp.ndarray:
  """U[0, 1) float32 of `shape`."""
  return jax.random.uniform(rng, (int(np.prod(shape)),)).reshape(shape)


def _randint(rng, shape, maxval) -> jnp.ndarray:
  """Uniform int32 in [0, maxval) of `shape`; `maxval` (>= 1) broadcasts against `shape`."""
  size = int(np.prod(shape))
  maxval = jnp.broadcast_to(maxval, shape).reshape(size)
  return jax.random.randint(rng, (size,), 0, maxval).reshape(shape)


# ----------------------------------------------------------------------------- span sampling

def max_spans(width: int, mask_prob: float, mask_length: int, min_masks: int) -> int:
  """Static upper bound on the spans of one row of at most `width` valid steps (a Python int).

  num_spans = max(min_masks, int(mask_prob * T_b / mask_length + u)), u < 1, T_b <= width.
  """
  return max(min_masks, int(mask_prob * width / mask_length + 1))


def _sample_span_mask(rng, lengths: jnp.ndarray, width: int, mask_prob: float, mask_length: int,
                      min_masks: int, shared_u: bool
                      ) -> Tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Spans of `compute_mask_indices` for rows of `lengths` valid steps, painted on `width` steps.

  Args:
    rng: PRNG key.
    lengths: (B,) int, valid steps T_b of each row (0 <= T_b <= width).
    shared_u: draw the rounding noise u once for the batch (fairseq/HF with no padding mask) rather
      than once per row.

  Returns:
    mask: (B, width) bool, union of the row's spans, restricted to positions < T_b.
    starts: (B, S) int32, S = `max_spans(width, ...)`, span starts in the order drawn; only the
      first `num_spans[b]` of row b are used, the rest are arbitrary.
    num_spans: (B,) int32, spans used per row.
  """
  batch = lengths.shape[0]
  num_max = max_spans(width, mask_prob, mask_length, min_masks)
  # Candidate starts: [0, T_b - L) normally, [0, num_spans + 1) for short rows; num_spans <= S.
  num_candidates = max(width, num_max + 1)
  key_u, key_starts = jax.random.split(rng)

  u = _uniform(key_u, (1,) if shared_u else (batch,))
  num_spans = jnp.floor(lengths * (mask_prob / mask_length) + u).astype(jnp.int32)
  num_spans = jnp.clip(num_spans, min_masks, num_max)
  # fairseq: min_len = L; if sz - min_len <= num_mask: min_len = sz - num_mask - 1;
  # starts = choice(sz - min_len, num_mask, replace=False).
  start_range = jnp.where(lengths - mask_length > num_spans, lengths - mask_length, num_spans + 1)

  # The top S of iid uniform scores over the allowed candidates is a uniformly random ordered
  # sample without replacement, so its first num_spans[b] entries are a uniform random subset.
  scores = _uniform(key_starts, (batch, num_candidates))
  allowed = jnp.arange(num_candidates)[None, :] < start_range[:, None]
  _, starts = jax.lax.top_k(jnp.where(allowed, scores, -1.0), num_max)
  starts = starts.astype(jnp.int32)
  used = jnp.arange(num_max)[None, :] < num_spans[:, None]

  # Paint [s, s + L) with +1 at s and -1 at s + L, then a running sum; clip to `width` so spans
  # starting past the end paint nothing.
  rows = jnp.broadcast_to(jnp.arange(batch)[:, None], starts.shape)
  delta = jnp.zeros((batch, width + 1), jnp.int32)
  delta = delta.at[rows, jnp.minimum(starts, width)].add(used.astype(jnp.int32))
  delta = delta.at[rows, jnp.minimum(starts + mask_length, width)].add(-used.astype(jnp.int32))
  covered = jnp.cumsum(delta, axis=1)[:, :width] > 0
  mask = covered & (jnp.arange(width)[None, :] < lengths[:, None])
  return mask, starts, num_spans


def _equalize_counts(rng, mask: jnp.ndarray, target=None) -> jnp.ndarray:
  """Unmask uniformly random masked frames of each row of `mask` (B, T) down to `target` frames
  (default: the batch minimum)."""
  if target is None:
    target = jnp.min(jnp.sum(mask, axis=1))
  keys = jnp.where(mask, _uniform(rng, mask.shape), 2.0)  # masked frames sort first
  ranks = jnp.argsort(jnp.argsort(keys, axis=1), axis=1)
  return mask & (ranks < target)


def span_mask(rng, padding_mask, mask_prob: float, mask_length: int, min_masks: int = 2,
              require_same_masks: bool = True) -> jnp.ndarray:
  """Time mask of wav2vec 2.0 pretraining (fairseq `compute_mask_indices`, static spans).

  Per row b with T_b valid frames (the count of False entries of `padding_mask[b]`):
  num_spans = max(min_masks, int(mask_prob * T_b / mask_length + u)), u ~ U[0, 1) drawn per row;
  span starts are drawn without replacement, uniformly from [0, T_b - mask_length), or from
  [0, num_spans + 1) when T_b - mask_length <= num_spans (fairseq's short-row rule). Each span covers
  frames [s, s + mask_length); spans may overlap; frames at or past T_b and padding frames are never
  masked. Like fairseq, the last valid frame is never masked unless the short-row rule applies.
  mask_prob=0.65, mask_length=10 masks about 49% of the frames of long rows.

  Spans are placed by position in [0, T_b): padding is expected to be a suffix; padding elsewhere
  is still never masked, but then the spans are not shifted around it.

  With `require_same_masks`, uniformly random masked frames of each row are unmasked until every
  row has the batch's minimum masked count, so one very short row lowers the masking of the whole
  batch (a fully padded row leaves nothing masked anywhere), as in fairseq. For one rng the spans
  do not depend on `require_same_masks`: equalising only removes frames.
  mask_prob == 0 disables masking (all False, whatever min_masks).

  Args:
    rng: PRNG key.
    padding_mask: (B, T) bool, True = padding frame.
    mask_prob: static float in [0, 1]; mask_prob / mask_length is the per-frame probability of
      starting a span (the paper's p), so spans total about mask_prob * T_b frames before overlap.
    mask_length: static int >= 1, span length in frames; must not exceed T.
    min_masks: static int >= 0, minimum number of spans per row.
    require_same_masks: static bool.

  Returns:
    (B, T) bool, True = masked frame.
  """
  padding_mask = _check_bool_2d("padding_mask", padding_mask)
  batch, width = padding_mask.shape
  mask_prob, mask_length, min_masks = _check_span_args(mask_prob, mask_length, min_masks, width,
                                                       "time")
  if mask_prob == 0.0 or batch == 0:
    return jnp.zeros((batch, width), jnp.bool_)
  key_spans, key_same = jax.random.split(rng)
  lengths = jnp.sum(~padding_mask, axis=1).astype(jnp.int32)
  mask, _, _ = _sample_span_mask(key_spans, lengths, width, mask_prob, mask_length, min_masks,
                                 shared_u=False)
  mask = mask & ~padding_mask
  if require_same_masks:
    mask = _equalize_counts(key_same, mask)
  return mask


def channel_mask(rng, batch_size: int, num_channels: int, mask_prob: float, mask_length: int,
                 min_masks: int = 0) -> jnp.ndarray:
  """Channel mask of fine-tuning (fairseq/HF "mask_channel"): spans over the feature axis.

  Same span rule as `span_mask` with T_b = num_channels for every row. As in fairseq and Hugging
  Face (which call `compute_mask_indices` without a padding mask here), the rounding noise u, hence
  the number of spans, is shared by the batch; the span starts are drawn per row. No
  require_same_masks. The caller zeroes the masked channels at every time step of the row.

  Args:
    rng: PRNG key.
    batch_size: static int >= 0.
    num_channels: static int >= 1, C.
    mask_prob, mask_length, min_masks: static, as in `span_mask` but over channels.

  Returns:
    (B, C) bool, True = masked channel.
  """
  batch_size = _check_int("batch_size", batch_size, 0)
  num_channels = _check_int("num_channels", num_channels, 1)
  mask_prob, mask_length, min_masks = _check_span_args(mask_prob, mask_length, min_masks,
                                                       num_channels, "channel")
  if mask_prob == 0.0 or batch_size == 0:
    return jnp.zeros((batch_size, num_channels), jnp.bool_)
  lengths = jnp.full((batch_size,), num_channels, jnp.int32)
  mask, _, _ = _sample_span_mask(rng, lengths, num_channels, mask_prob, mask_length, min_masks,
                                 shared_u=True)
  return mask


# ----------------------------------------------------------------------------- negatives

def _draw_other(rng, rank: jnp.ndarray, count, shape) -> jnp.ndarray:
  """Ranks uniform in [0, count) except `rank`: draw in [0, count - 1), add 1 where >= rank."""
  drawn = _randint(rng, shape, jnp.maximum(count - 1, 1))
  return drawn + (drawn >= rank).astype(drawn.dtype)


def sample_negatives(rng, mask, num_negatives: int, cross_sample_negatives: int = 0
                     ) -> jnp.ndarray:
  """Indices of the distractors of every masked frame, into the flattened (B * T) frame axis.

  Row b, frame t has flat index b * T + t (like Hugging Face's `sampled_negative_indices`). For each
  masked frame (b, t):
    - entries [0, num_negatives): drawn with replacement, uniformly from the OTHER masked frames of
      row b (fairseq: rank in [0, n_b - 1), plus 1 where >= the frame's own rank);
    - entries [num_negatives, num_negatives + cross_sample_negatives): drawn with replacement,
      uniformly from all masked frames of the batch except (b, t) itself. (fairseq shifts by the
      within-row index t instead, so it can draw the frame itself and never draws row 0's frame t.)
  Where there is no other frame to draw from (n_b <= 1, or a single masked frame in the batch for
  cross-sample ones), the entry is the frame's own index: the loss gives a negative identical to the
  positive a logit of -inf, so it drops out. Unmasked frames get their own index in every entry, a
  deterministic filler: callers must weight those frames out of the loss.

  Args:
    rng: PRNG key.
    mask: (B, T) bool, True = masked frame (the positives); never includes padding.
    num_negatives: static int >= 0, K, negatives from the same row.
    cross_sample_negatives: static int >= 0, X, negatives from the whole batch.

  Returns:
    (B, T, K + X) int32 flat frame indices.
  """
  mask = _check_bool_2d("mask", mask)
  num_negatives = _check_int("num_negatives", num_negatives, 0)
  cross_sample_negatives = _check_int("cross_sample_negatives", cross_sample_negatives, 0)
  if num_negatives + cross_sample_negatives < 1:
    raise ValueError("num_negatives + cross_sample_negatives must be >= 1, got "
                     f"{num_negatives} + {cross_sample_negatives}")
  batch, width = mask.shape
  flat = batch * width
  own = jnp.arange(flat, dtype=jnp.int32).reshape(batch, width)
  key_row, key_cross = jax.random.split(rng)
  parts = []

  if num_negatives:
    counts = jnp.sum(mask, axis=1, dtype=jnp.int32)  # (B,) n_b
    ranks = jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1  # rank of each masked frame in its row
    # table[b, r] = flat index of the r-th masked frame of row b (rank -> position).
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], (batch, width))
    table = jnp.zeros((batch, width), jnp.int32).at[
        rows, jnp.where(mask, ranks, width)].set(own, mode="drop")
    drawn = _draw_other(key_row, ranks[..., None], counts[:, None, None],
                        (batch, width, num_negatives))
    negatives = jnp.take_along_axis(table, drawn.reshape(batch, width * num_negatives),
                                    axis=1, mode="clip")
    valid = mask[..., None] & (counts[:, None, None] > 1)
    parts.append(jnp.where(valid, negatives.reshape(drawn.shape), own[..., None]))

  if cross_sample_negatives:
    flat_mask = mask.reshape(flat)
    total = jnp.sum(flat_mask, dtype=jnp.int32)
    ranks = jnp.cumsum(flat_mask, dtype=jnp.int32) - 1
    table = jnp.zeros((flat,), jnp.int32).at[
        jnp.where(flat_mask, ranks, flat)].set(own.reshape(flat), mode="drop")
    drawn = _draw_other(key_cross, ranks[:, None], total, (flat, cross_sample_negatives))
    negatives = jnp.take(table, drawn, mode="clip")
    valid = flat_mask[:, None] & (total > 1)
    negatives = jnp.where(valid, negatives, own.reshape(flat, 1))
    parts.append(negatives.reshape(batch, width, cross_sample_negatives))

  return jnp.concatenate(parts, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- layout-independent draws
# The data-parallel train step draws its masks and negatives with one key per utterance (folded from
# the step key and the utterance's global row index), so the same global batch gets the same masks and
# negatives whether it is split over 1 device or 64. The functions below are the row-keyed forms.

def _row(fn, row_keys, *arrays):
  """Apply `fn(key, *row_arrays_with_batch_1)` to every row with its own key; stack the rows."""
  return jax.vmap(lambda k, *xs: fn(k, *(x[None] for x in xs))[0])(row_keys, *arrays)


def row_span_mask(row_keys, padding_mask, mask_prob: float, mask_length: int, min_masks: int = 2,
                  require_same_masks: bool = True, axis_name: Optional[str] = None) -> jnp.ndarray:
  """`span_mask` with one PRNG key per row: row b's mask depends only on row_keys[b] and its padding.

  With `require_same_masks`, rows are equalised to the minimum masked count over the batch and, when
  `axis_name` is given (inside shard_map/pmap), over every device's batch (`lax.pmin`), so the result
  does not depend on how the global batch is split across devices.

  Args:
    row_keys: (B,) PRNG keys (typed keys or raw uint32 key data with a leading B axis).
    padding_mask: (B, T) bool, True = padding frame.
    Other arguments as `span_mask`.

  Returns:
    (B, T) bool, True = masked frame.
  """
  padding_mask = _check_bool_2d("padding_mask", padding_mask)
  batch, width = padding_mask.shape
  if mask_prob == 0 or batch == 0:       # the arguments are validated by span_mask below
    return jnp.zeros((batch, width), jnp.bool_)
  split = jax.vmap(jax.random.split)(row_keys)
  mask = _row(lambda k, p: span_mask(k, p, mask_prob, mask_length, min_masks, False),
              split[:, 0], padding_mask)
  if not require_same_masks:
    return mask
  target = jnp.min(jnp.sum(mask, axis=1))
  if axis_name is not None:
    target = jax.lax.pmin(target, axis_name)
  return row_equalize(split[:, 1], mask, target)


def row_equalize(row_keys, mask, target) -> jnp.ndarray:
  """Unmask uniformly random masked frames of each row of `mask` (B, T) until it has `target` masked
  frames (rows with fewer keep theirs), row b drawing with row_keys[b]."""
  return _row(lambda k, m: _equalize_counts(k, m, target), row_keys, mask)


def row_negatives(row_keys, mask, num_negatives: int) -> jnp.ndarray:
  """`sample_negatives` (in-utterance negatives only) with one PRNG key per row.

  Returns (B, T, K) int32 flat indices into the (B * T) frames, as `sample_negatives`.
  """
  mask = _check_bool_2d("mask", mask)
  num_negatives = _check_int("num_negatives", num_negatives, 1)
  batch, width = mask.shape
  local = _row(lambda k, m: sample_negatives(k, m, num_negatives), row_keys, mask)
  return local + (jnp.arange(batch, dtype=jnp.int32) * width)[:, None, None]
