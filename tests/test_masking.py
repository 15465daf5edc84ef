"""Tests of w2v2_jax.masking: span masks (fairseq compute_mask_indices semantics) and negatives."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import stats

from w2v2_jax import masking

# One jitted function per public entry point; jax caches one executable per static configuration,
# so hypothesis examples that share a configuration do not recompile.
span_mask_jit = jax.jit(masking.span_mask, static_argnames=(
    "mask_prob", "mask_length", "min_masks", "require_same_masks"))
channel_mask_jit = jax.jit(masking.channel_mask, static_argnames=(
    "batch_size", "num_channels", "mask_prob", "mask_length", "min_masks"))
negatives_jit = jax.jit(masking.sample_negatives, static_argnames=(
    "num_negatives", "cross_sample_negatives"))
sample_spans_jit = jax.jit(masking._sample_span_mask, static_argnames=(
    "width", "mask_prob", "mask_length", "min_masks", "shared_u"))
equalize_many = jax.jit(jax.vmap(masking._equalize_counts, in_axes=(0, None)))

# Static span configurations (width T, mask_prob, mask_length, min_masks): the pretraining default,
# short spans without a minimum, every frame a span, and a sequence barely longer than a span
# (fairseq's short-row rule). Hypothesis varies only traced inputs within one, so each compiles once.
SPAN_CONFIGS = [(40, 0.65, 10, 2), (16, 0.3, 3, 0), (16, 1.0, 1, 2), (12, 0.65, 10, 2)]
SETTINGS = settings(deadline=None, max_examples=30, derandomize=True)


@functools.partial(jax.jit, static_argnames=("mask_prob", "mask_length", "min_masks"))
def span_masks_free_and_same(rng, padding, mask_prob, mask_length, min_masks):
  """Both require_same_masks settings from one rng, in one compilation."""
  kwargs = dict(mask_prob=mask_prob, mask_length=mask_length, min_masks=min_masks)
  return (masking.span_mask(rng, padding, require_same_masks=False, **kwargs),
          masking.span_mask(rng, padding, require_same_masks=True, **kwargs))


def padding_from_lengths(lengths, width):
  return np.arange(width)[None, :] >= np.asarray(lengths)[:, None]


def paint(starts, num_spans, mask_length, length, width):
  """Independent numpy painting: union of [s, s + L) over the used starts, cut at `length`."""
  row = np.zeros(width, bool)
  for s in starts[:num_spans]:
    row[s:min(s + mask_length, length)] = True
  return row


def runs(row):
  """Maximal runs of True in a 1-D bool array, as (start, stop) pairs."""
  padded = np.concatenate([[False], row, [False]]).astype(np.int8)
  edges = np.flatnonzero(np.diff(padded))
  return list(zip(edges[::2], edges[1::2]))


def start_range(length, num_spans, mask_length):
  """fairseq: starts in [0, T_b - L), or [0, num_spans + 1) when T_b - L <= num_spans."""
  return length - mask_length if length - mask_length > num_spans else num_spans + 1


# ----------------------------------------------------------------------------- span_mask

@st.composite
def span_cases(draw):
  width, mask_prob, mask_length, min_masks = draw(st.sampled_from(SPAN_CONFIGS))
  lengths = draw(st.lists(st.integers(0, width), min_size=4, max_size=4))
  return dict(width=width, mask_prob=mask_prob, mask_length=mask_length, min_masks=min_masks,
              lengths=lengths, seed=draw(st.integers(0, 2**31 - 1)))


@SETTINGS
@given(span_cases())
def test_span_mask_properties(case):
  width, length_l, mask_prob = case["width"], case["mask_length"], case["mask_prob"]
  lengths = np.array(case["lengths"])
  padding = padding_from_lengths(lengths, width)
  free, same = map(np.asarray, span_masks_free_and_same(
      jax.random.key(case["seed"]), padding, mask_prob=mask_prob, mask_length=length_l,
      min_masks=case["min_masks"]))
  assert free.shape == same.shape == (4, width) and free.dtype == same.dtype == np.bool_

  assert not (free & padding).any() and not (same & padding).any()
  # The flag does not change the spans drawn from one rng; equalising only unmasks frames, down
  # to exactly the batch minimum in every row.
  assert not (same & ~free).any()
  np.testing.assert_array_equal(same.sum(1), np.full(4, free.sum(1).min()))

  num_max = masking.max_spans(width, mask_prob, length_l, case["min_masks"])
  for row, length in zip(free, lengths):
    count = row.sum()
    assert count <= min(length, num_max * length_l)
    if case["min_masks"] >= 1 and length >= 1:
      # A short row draws from [0, num_spans + 1): its first start is 0 or 1.
      assert count >= min(length_l, length - 1)
    if case["min_masks"] >= 1 and length - length_l > num_max:
      assert count >= length_l
    for start, stop in runs(row):
      assert stop - start >= length_l or stop == length, (start, stop, length)


@SETTINGS
@given(span_cases())
def test_span_starts_and_painting_match_numpy(case):
  """Each row is the union of its drawn spans; starts are distinct and inside fairseq's range."""
  width, length_l, mask_prob = case["width"], case["mask_length"], case["mask_prob"]
  min_masks, lengths = case["min_masks"], np.array(case["lengths"])
  mask, starts, num_spans = map(np.asarray, sample_spans_jit(
      jax.random.key(case["seed"]), jnp.asarray(lengths, jnp.int32), width=width,
      mask_prob=mask_prob, mask_length=length_l, min_masks=min_masks, shared_u=False))
  num_max = masking.max_spans(width, mask_prob, length_l, min_masks)
  assert starts.shape == (4, num_max)
  for b, length in enumerate(lengths):
    n = num_spans[b]
    x = mask_prob * length / length_l
    assert max(min_masks, math.floor(x - 1e-4)) <= n <= max(min_masks, math.floor(x) + 1)
    used = starts[b, :n]
    assert len(set(used.tolist())) == n  # without replacement
    assert ((used >= 0) & (used < start_range(length, n, length_l))).all()
    np.testing.assert_array_equal(mask[b], paint(used, n, length_l, length, width))


def test_mask_prob_zero_masks_nothing():
  padding = padding_from_lengths([30, 12], 30)
  out = span_mask_jit(jax.random.key(0), padding, mask_prob=0.0, mask_length=5, min_masks=2)
  assert out.shape == (2, 30) and not np.asarray(out).any()
  assert not np.asarray(masking.channel_mask(jax.random.key(0), 3, 64, 0.0, 8, 2)).any()


def test_non_suffix_padding_is_never_masked():
  padding = np.random.default_rng(0).random((4, 40)) < 0.2
  free, same = map(np.asarray, span_masks_free_and_same(
      jax.random.key(3), padding, mask_prob=0.65, mask_length=10, min_masks=2))
  assert free.any() and same.any()
  assert not (free & padding).any() and not (same & padding).any()


def expected_masked_fraction(width, mask_prob, mask_length):
  """Exact E[masked fraction] of a full row: a frame t is missed iff no start hits its window."""
  x = mask_prob * width / mask_length
  frac_part = x - math.floor(x)
  total = 0.0
  for n, p_n in ((math.floor(x), 1 - frac_part), (math.floor(x) + 1, frac_part)):
    r = start_range(width, n, mask_length)
    for t in range(width):
      w = max(0, min(t, r - 1) - max(0, t - mask_length + 1) + 1)  # starts covering t
      total += p_n * (1 - math.comb(r - w, n) / math.comb(r, n))
  return total / width


def test_masked_fraction_matches_fairseq_default():
  width, batch = 500, 2048
  expected = expected_masked_fraction(width, 0.65, 10)
  assert 0.48 < expected < 0.50  # the ~49% of the paper
  padding = np.zeros((batch, width), bool)
  out = np.asarray(span_mask_jit(jax.random.key(42), padding, mask_prob=0.65, mask_length=10,
                                 min_masks=2, require_same_masks=False))
  fraction = out.mean()
  assert 0.47 < fraction < 0.51
  # Per-row fractions have sd ~0.03, so the mean of 2048 rows has sd < 0.001.
  assert abs(fraction - expected) < 0.004, (fraction, expected)
  # fairseq draws starts from [0, T - L): the last frame of a long row is never masked.
  assert not out[:, -1].any() and out[:, -2].any()


def test_span_starts_are_uniform():
  # Long rows: n in {3, 4} starts from [0, 50).  Short rows (T_b - L <= n): 2 starts from [0, 3).
  for length, mask_length, num_bins in ((60, 10, 50), (12, 10, 3)):
    lengths = jnp.full((4000,), length, jnp.int32)
    _, starts, num_spans = map(np.asarray, sample_spans_jit(
        jax.random.key(7), lengths, width=length, mask_prob=0.65, mask_length=mask_length,
        min_masks=2, shared_u=False))
    used = starts[np.arange(starts.shape[1])[None, :] < num_spans[:, None]]
    counts = np.bincount(used, minlength=num_bins)
    assert counts.size == num_bins  # nothing outside the range
    assert stats.chisquare(counts).pvalue > 1e-3, counts


def test_equalize_unmasks_uniformly():
  mask = np.zeros((2, 20), bool)
  mask[0, 3:13] = True  # 10 masked frames, 3 must survive
  mask[1, [0, 5, 9]] = True
  out = np.asarray(equalize_many(jax.random.split(jax.random.key(5), 3000), jnp.asarray(mask)))
  assert (out.sum(-1) == 3).all() and not (out & ~mask).any()
  np.testing.assert_array_equal(out[:, 1], np.broadcast_to(mask[1], (3000, 20)))
  kept = out[:, 0, 3:13].sum(0)  # expected 900 each
  assert stats.chisquare(kept).pvalue > 1e-3, kept


# ----------------------------------------------------------------------------- channel_mask

def test_channel_mask_spans_per_row():
  batch, channels, length_l = 256, 768, 64
  out = np.asarray(channel_mask_jit(jax.random.key(1), batch_size=batch, num_channels=channels,
                                    mask_prob=0.5, mask_length=length_l, min_masks=0))
  assert out.shape == (batch, channels) and out.dtype == np.bool_
  assert len({row.tobytes() for row in out}) > batch // 2  # each row has its own mask
  for row in out:
    assert all(stop - start >= length_l for start, stop in runs(row))  # never clipped: R = C - L
    assert length_l <= row.sum() <= 6 * length_l  # exactly 6 spans: 0.5 * 768 / 64 = 6
  expected = expected_masked_fraction(channels, 0.5, length_l)
  assert abs(out.mean() - expected) < 0.02, (out.mean(), expected)


# ----------------------------------------------------------------------------- negatives

@st.composite
def negative_cases(draw):
  """A (3, 13) mask whose rows are random, empty, single-frame or full; (K, X) from a few."""
  rows = []
  for _ in range(3):
    kind = draw(st.sampled_from(["random", "random", "none", "single", "all"]))
    if kind == "random":
      rows.append(draw(st.lists(st.booleans(), min_size=13, max_size=13)))
    else:
      row = [kind == "all"] * 13
      if kind == "single":
        row[draw(st.integers(0, 12))] = True
      rows.append(row)
  num_neg, cross = draw(st.sampled_from([(4, 0), (3, 2), (0, 2)]))
  return dict(mask=np.array(rows), num_negatives=num_neg, cross=cross,
              seed=draw(st.integers(0, 2**31 - 1)))


@SETTINGS
@given(negative_cases())
def test_negatives_properties(case):
  mask, num_neg, cross = case["mask"], case["num_negatives"], case["cross"]
  batch, width = mask.shape
  out = np.asarray(negatives_jit(jax.random.key(case["seed"]), jnp.asarray(mask),
                                 num_negatives=num_neg, cross_sample_negatives=cross))
  assert out.shape == (batch, width, num_neg + cross) and out.dtype == np.int32
  flat_mask = mask.reshape(-1)
  own = np.arange(batch * width).reshape(batch, width)
  for b in range(batch):
    for t in range(width):
      neg = out[b, t]
      if not mask[b, t]:
        assert (neg == own[b, t]).all()  # deterministic filler
        continue
      within, across = neg[:num_neg], neg[num_neg:]
      if mask[b].sum() > 1:
        assert (within // width == b).all() and flat_mask[within].all()
        assert (within != own[b, t]).all()
      else:
        assert (within == own[b, t]).all()
      if mask.sum() > 1:
        assert flat_mask[across].all() and (across != own[b, t]).all()
      else:
        assert (across == own[b, t]).all()


def test_negatives_of_span_mask_avoid_padding():
  padding = padding_from_lengths([40, 31, 12, 25], 40)
  _, mask = span_masks_free_and_same(jax.random.key(0), padding, mask_prob=0.65, mask_length=10,
                                     min_masks=2)
  out = np.asarray(negatives_jit(jax.random.key(1), mask, num_negatives=10,
                                 cross_sample_negatives=3))
  flat_mask, flat_pad = np.asarray(mask).reshape(-1), padding.reshape(-1)
  picked = out[np.asarray(mask)]
  assert picked.size and flat_mask[picked].all() and not flat_pad[picked].any()


def test_negatives_are_uniform_over_other_masked_frames():
  mask = np.zeros((3, 30), bool)
  positions = [1, 2, 3, 10, 11, 20, 29]
  mask[0, positions] = True
  mask[1, [4, 5]] = True
  mask[2, 7] = True  # a lone masked frame: no within-row negative exists
  draws = 1200
  out = np.asarray(negatives_jit(jax.random.key(11), jnp.asarray(mask), num_negatives=draws,
                                 cross_sample_negatives=draws))
  np.testing.assert_array_equal(out[2, 7, :draws], np.full(draws, 67))
  # Within-row: each of the 7 frames picks each of its 6 others ~200 times (42 cells).
  table = np.array([[np.sum(out[0, t, :draws] == s) for s in positions if s != t]
                    for t in positions])
  assert table.sum() == len(positions) * draws
  assert stats.chisquare(table.reshape(-1)).pvalue > 1e-3, table
  # Cross-sample: each of the 10 masked frames of the batch picks the 9 others uniformly.
  masked_flat = np.flatnonzero(mask.reshape(-1))
  cross = out.reshape(-1, 2 * draws)[masked_flat, draws:]
  table = np.array([[np.sum(row == s) for s in masked_flat if s != f]
                    for f, row in zip(masked_flat, cross)])
  assert table.sum() == masked_flat.size * draws
  assert stats.chisquare(table.reshape(-1)).pvalue > 1e-3, table


# ----------------------------------------------------------------------------- jit / static shapes

def test_jit_does_not_recompile_for_new_rng_or_data():
  traces = {"span": 0, "channel": 0, "neg": 0}

  def counted(name, fn):
    def wrapper(*args):
      traces[name] += 1
      return fn(*args)
    return jax.jit(wrapper)

  span = counted("span", functools.partial(masking.span_mask, mask_prob=0.65, mask_length=10))
  channel = counted("channel", lambda rng: masking.channel_mask(rng, 4, 128, 0.5, 16))
  neg = counted("neg", functools.partial(masking.sample_negatives, num_negatives=5,
                                         cross_sample_negatives=1))
  for seed, lengths in ((0, [100, 80, 60]), (1, [100, 100, 20])):
    rng = jax.random.key(seed)
    mask = span(rng, jnp.asarray(padding_from_lengths(lengths, 100)))
    assert mask.shape == (3, 100)
    assert neg(rng, mask).shape == (3, 100, 6)
    assert channel(rng).shape == (4, 128)
  assert traces == {"span": 1, "channel": 1, "neg": 1}
  assert span._cache_size() == channel._cache_size() == neg._cache_size() == 1


# ----------------------------------------------------------------------------- validation

PAD = np.zeros((2, 20), bool)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(mask_prob=1.5), r"mask_prob.*1\.5"),
    (dict(mask_prob=-0.1), r"mask_prob.*-0\.1"),
    (dict(mask_prob=float("nan")), r"mask_prob.*nan"),
    (dict(mask_length=0), r"mask_length.*0"),
    (dict(mask_length=2.5), r"mask_length.*2\.5"),
    (dict(mask_length=25), r"mask_length=25.*\(20\)"),
    (dict(min_masks=-1), r"min_masks.*-1"),
    (dict(padding_mask=np.zeros((2, 20), np.int32)), r"padding_mask.*int32"),
    (dict(padding_mask=np.zeros((2, 20, 1), bool)), r"padding_mask.*\(2, 20, 1\)"),
])
def test_span_mask_rejects_bad_arguments(kwargs, pattern):
  args = dict(padding_mask=PAD, mask_prob=0.65, mask_length=10, min_masks=2)
  args.update(kwargs)
  with pytest.raises(ValueError, match=pattern):
    masking.span_mask(jax.random.key(0), **args)
  with pytest.raises(ValueError, match=pattern):  # also at trace time, before compiling
    jax.jit(lambda rng: masking.span_mask(rng, **args))(jax.random.key(0))


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(batch_size=-1), r"batch_size.*-1"),
    (dict(num_channels=0), r"num_channels.*0"),
    (dict(mask_prob=2.0), r"mask_prob.*2\.0"),
    (dict(mask_length=0), r"mask_length.*0"),
    (dict(mask_length=65), r"mask_length=65.*\(64\)"),
    (dict(min_masks=-3), r"min_masks.*-3"),
])
def test_channel_mask_rejects_bad_arguments(kwargs, pattern):
  args = dict(batch_size=2, num_channels=64, mask_prob=0.5, mask_length=10, min_masks=0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=pattern):
    masking.channel_mask(jax.random.key(0), **args)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(num_negatives=-1), r"num_negatives.*-1"),
    (dict(cross_sample_negatives=-2), r"cross_sample_negatives.*-2"),
    (dict(num_negatives=0, cross_sample_negatives=0), r"0 \+ 0"),
    (dict(mask=np.zeros((2, 20), np.float32)), r"mask.*float32"),
    (dict(mask=np.zeros((20,), bool)), r"mask.*\(20,\)"),
])
def test_sample_negatives_rejects_bad_arguments(kwargs, pattern):
  args = dict(mask=PAD, num_negatives=10, cross_sample_negatives=0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=pattern):
    masking.sample_negatives(jax.random.key(0), **args)
