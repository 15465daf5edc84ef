"""Tests for w2v2_jax.losses against independent torch / numpy references."""

import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from w2v2_jax import losses


# ----------------------------------------------------------------------------
# Contrastive loss


def make_batch(seed, batch=3, frames=24, dim=16, groups=2, vocab=3, k=10, cross_sample=False, tiny=True):
  """Random context/targets/codes/mask/negatives, consistent like the model's.

  Few codewords (vocab**groups = 9 combinations) so that negatives sharing
  the positive's codes happen often. Targets are looked up from one table
  per code combination, so equal codes give bit-identical vectors.
  """
  rng = np.random.default_rng(seed)
  codes = rng.integers(0, vocab, (batch, frames, groups))
  table = rng.normal(size=(vocab**groups, dim)).astype(np.float32)
  if tiny:  # a tiny target vector: exercises the norm clamp
    table[-1] *= 1e-10
  combo = np.zeros((batch, frames), np.int64)
  for g in range(groups):
    combo = combo * vocab + codes[..., g]
  targets = table[combo]
  context = rng.normal(size=(batch, frames, dim)).astype(np.float32)
  context[0, 1] = 0.0  # all logits equal (unless a negative is -inf)
  mask = rng.random((batch, frames)) < 0.5
  mask[:, :3] = True  # >= 2 masked frames per row; frame (0,1) masked
  codes[0, 1] = (0, 0)  # keep frame (0,1)'s negatives distinct from it
  targets[0, 1] = table[0]
  for b in range(batch):
    for t in range(frames):
      if combo[b, t] == 0 and (b, t) != (0, 1):
        codes[b, t] = (0, 1)
        targets[b, t] = table[1]

  negatives = rng.integers(-7, batch * frames + 7, (batch, frames, k))
  flat_masked = np.flatnonzero(mask)
  for b in range(batch):
    row = np.flatnonzero(mask[b]) + b * frames
    pool_all = flat_masked if cross_sample else row
    for t in np.flatnonzero(mask[b]):
      pool = pool_all[pool_all != b * frames + t]
      negatives[b, t] = rng.choice(pool, size=k, replace=True)
  return dict(
    context=context,
    targets=targets,
    codes=codes.astype(np.int32),
    mask=mask,
    negatives=negatives.astype(np.int32),
  )


def torch_contrastive(context, targets, mask, negatives, temp=0.1):
  """fairseq-style reference on masked frames only: gathered vectors,
  torch cosine_similarity, -inf for bit-identical negatives, summed CE."""
  batch, frames, dim = context.shape
  c = torch.tensor(context.reshape(-1, dim), requires_grad=True)
  q = torch.tensor(targets.reshape(-1, dim), requires_grad=True)
  m = torch.tensor(mask.reshape(-1))
  neg = torch.tensor(negatives.reshape(batch * frames, -1)[mask.reshape(-1)], dtype=torch.long)
  x = c[m]
  y = q[m]
  negs = q[neg]  # (N,K,F)
  cands = torch.cat([y[:, None], negs], dim=1)
  logits = F.cosine_similarity(x[:, None], cands, dim=-1) / temp
  neg_is_pos = (y[:, None] == negs).all(-1)
  logits = torch.cat([logits[:, :1], logits[:, 1:].masked_fill(neg_is_pos, -math.inf)], 1)
  loss = F.cross_entropy(logits, torch.zeros(len(x), dtype=torch.long), reduction="sum")
  loss.backward()
  return dict(
    logits=logits.detach().numpy(),
    loss=loss.item(),
    grad_context=c.grad.numpy().reshape(context.shape),
    grad_targets=q.grad.numpy().reshape(targets.shape),
  )


_contrastive = jax.jit(losses.contrastive, static_argnames="cross_sample")
_ctc = jax.jit(losses.ctc, static_argnames=("blank_id", "zero_infinity"))


def run_contrastive(data, cross_sample=False, temp=0.1):
  return _contrastive(
    data["context"],
    data["targets"],
    data["codes"],
    data["mask"],
    data["negatives"],
    temp,
    cross_sample=cross_sample,
  )


@pytest.mark.parametrize("cross_sample", [False, True])
def test_contrastive_matches_torch(cross_sample):
  data = make_batch(0, cross_sample=cross_sample)
  out = run_contrastive(data, cross_sample)
  ref = torch_contrastive(data["context"], data["targets"], data["mask"], data["negatives"])
  logits = np.asarray(out["logits"])[data["mask"]]
  assert np.isneginf(ref["logits"]).sum() > 5  # duplicates were exercised
  np.testing.assert_array_equal(np.isneginf(logits), np.isneginf(ref["logits"]))
  finite = np.isfinite(ref["logits"])
  np.testing.assert_allclose(logits[finite], ref["logits"][finite], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["loss"], ref["loss"], rtol=1e-5)
  assert out["sample_size"] == data["mask"].sum()
  assert out["count"] == data["mask"].sum()
  assert out["logits"].dtype == jnp.float32
  # Unmasked frames carry filler negatives: everything stays finite there.
  assert np.all(np.isfinite(np.asarray(out["logits"])[..., 0]))


def test_contrastive_gradients_match_torch():
  # No tiny targets here: their gradients are ~1e8 and fp32 cancellation
  # noise would dominate the comparison.
  data = make_batch(1, tiny=False)
  ref = torch_contrastive(data["context"], data["targets"], data["mask"], data["negatives"])

  def loss_fn(context, targets):
    return losses.contrastive(context, targets, data["codes"], data["mask"], data["negatives"])["loss"]

  gc, gq = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(data["context"], data["targets"])
  np.testing.assert_allclose(gc, ref["grad_context"], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gq, ref["grad_targets"], rtol=1e-4, atol=1e-4)


def test_in_row_and_cross_sample_paths_agree():
  data = make_batch(2)
  a = run_contrastive(data, cross_sample=False)
  b = run_contrastive(data, cross_sample=True)
  m = data["mask"]
  np.testing.assert_allclose(np.asarray(a["logits"])[m], np.asarray(b["logits"])[m], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)


def test_all_negatives_identical_gives_zero_loss_and_finite_grads():
  data = make_batch(3)
  codes = data["codes"].copy()
  targets = data["targets"].copy()
  codes[1] = codes[1, 0]  # every frame of row 1 has the same codes...
  targets[1] = targets[1, 0]  # ...and so the same target vector
  mask = data["mask"]

  def loss_fn(context, targets, m):
    return losses.contrastive(context, targets, codes, m, data["negatives"])["loss"]

  only_row1 = np.zeros_like(mask)
  only_row1[1] = mask[1]
  value_and_grad = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
  value, grads = value_and_grad(data["context"], targets, only_row1)
  assert value == 0.0
  for g in grads:
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g) == 0.0)

  value, grads = value_and_grad(data["context"], targets, mask)
  assert np.isfinite(value) and value > 0
  for g in grads:
    assert np.all(np.isfinite(g))
  logits = np.asarray(_contrastive(data["context"], targets, codes, mask, data["negatives"])["logits"])
  assert np.all(np.isneginf(logits[1][mask[1]][:, 1:]))


def test_accuracy_matches_numpy():
  data = make_batch(4)
  out = run_contrastive(data)
  ref = torch_contrastive(data["context"], data["targets"], data["mask"], data["negatives"])["logits"]
  # Frame (0,1) has a zero context vector: its logits are all equal.
  row01 = np.asarray(out["logits"])[0, 1]
  assert np.all(row01 == row01[0])
  amax = np.argmax(ref, axis=-1) == 0
  amin = np.argmin(ref, axis=-1) == 0
  assert (amax & amin).sum() >= 1
  assert out["correct"] == amax.sum() - (amax & amin).sum()
  assert out["count"] == len(ref)


def test_cosine_matches_torch_for_tiny_vectors():
  # torch clamps each norm at 1e-8 separately (not the product): check the
  # positive logit for vectors of very different scales.
  scales = [1e-12, 1e-9, 1e-6, 1.0, 1e3]
  pairs = [(a, b) for a in scales for b in scales]
  rng = np.random.default_rng(5)
  base = rng.normal(size=(2, 8)).astype(np.float32)
  ctx = np.stack([a * base[0] for a, _ in pairs])[None]
  tgt = np.stack([b * base[1] for _, b in pairs])[None]
  n = len(pairs)
  codes = np.arange(n, dtype=np.int32)[None, :, None]
  mask = np.ones((1, n), bool)
  negatives = np.zeros((1, n, 1), np.int32) + (np.arange(n)[None, :, None] + 1) % n
  out = _contrastive(ctx, tgt, codes, mask, negatives, 1.0)
  ref = F.cosine_similarity(torch.tensor(ctx[0]), torch.tensor(tgt[0]), dim=-1)
  np.testing.assert_allclose(np.asarray(out["logits"])[0, :, 0], ref.numpy(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# Diversity, feature penalty, total


def test_diversity():
  assert losses.diversity(640.0, 640) == 0.0
  np.testing.assert_allclose(losses.diversity(2.0, 640), 638 / 640, rtol=1e-7)
  assert losses.diversity(jnp.float32(640.0), 640).dtype == jnp.float32


def test_feature_penalty():
  rng = np.random.default_rng(6)
  feats = rng.normal(size=(3, 11, 5)).astype(np.float32)
  np.testing.assert_allclose(losses.feature_penalty(feats), np.mean(feats.astype(np.float64) ** 2), rtol=1e-6)
  pad = np.zeros((3, 11), bool)
  pad[1, 7:] = True
  pad[2, 3:] = True
  feats_garbage = feats.copy()
  feats_garbage[pad] = 1e3
  expect = np.mean(feats.astype(np.float64)[~pad] ** 2)
  np.testing.assert_allclose(losses.feature_penalty(feats_garbage, pad), expect, rtol=1e-6)
  np.testing.assert_allclose(
    losses.feature_penalty(feats, np.zeros((3, 11), bool)), losses.feature_penalty(feats), rtol=1e-6
  )
  half = feats.astype(jnp.bfloat16)
  assert losses.feature_penalty(half).dtype == jnp.float32


def test_bits():
  np.testing.assert_allclose(losses.bits(jnp.float32(math.log(2.0) * 3)), 3.0, rtol=1e-6)


# ----------------------------------------------------------------------------
# CTC


def torch_ctc(logits, frame_lens, labels, label_lens, blank=0):
  logp = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), -1)
  return F.ctc_loss(
    logp.transpose(0, 1),
    torch.tensor(labels, dtype=torch.long),
    torch.tensor(frame_lens),
    torch.tensor(label_lens),
    blank=blank,
    reduction="none",
    zero_infinity=True,
  ).numpy()


def make_ctc_batch(seed, frame_lens, label_rows, frames=16, max_labels=8, vocab=6):
  rng = np.random.default_rng(seed)
  batch = len(frame_lens)
  logits = 3 * rng.normal(size=(batch, frames, vocab)).astype(np.float32)
  frame_pad = np.arange(frames)[None] >= np.asarray(frame_lens)[:, None]
  labels = np.zeros((batch, max_labels), np.int32)
  label_pad = np.ones((batch, max_labels), bool)
  for b, row in enumerate(label_rows):
    labels[b, : len(row)] = row
    label_pad[b, : len(row)] = False
    # Fill padding with the last label: a naive "repeat" flag would
    # wrongly see a repeated label at the end.
    labels[b, len(row) :] = row[-1] if len(row) else 3
  return logits, frame_pad, labels, label_pad


def test_ctc_matches_torch():
  frame_lens = [16, 12, 5, 5, 7, 3, 9]
  label_rows = [
    [1, 2, 3, 4, 5],
    [2, 2, 3, 3, 1, 1],  # repeats need blanks: 9 frames needed
    [1, 1, 1],  # needs exactly 5 frames: possible
    [1, 1, 1, 1],  # needs 7 frames > 5: impossible
    [1, 2, 3, 4, 5, 1, 2, 3],  # 8 labels > 7 frames: impossible
    [],  # empty label sequence
    [4, 4],
  ]
  logits, frame_pad, labels, label_pad = make_ctc_batch(8, frame_lens, label_rows)
  out = _ctc(logits, frame_pad, labels, label_pad)
  ref = torch_ctc(logits, frame_lens, labels, [len(r) for r in label_rows])
  np.testing.assert_allclose(out["per_utterance"], ref, rtol=1e-4, atol=1e-4)
  assert ref[3] == 0 and ref[4] == 0
  np.testing.assert_allclose(out["loss"], ref.sum(), rtol=1e-4)
  assert out["num_infinite"] == 2
  assert out["num_utterances"] == 5
  assert out["num_label_tokens"] == sum(len(r) for r in label_rows)

  def total(x):
    return losses.ctc(x, frame_pad, labels, label_pad)["loss"]

  grad = np.asarray(jax.jit(jax.grad(total))(logits))
  assert np.all(np.isfinite(grad))
  assert np.all(grad[3] == 0) and np.all(grad[4] == 0)  # zeroed utterances
  assert np.all(grad[frame_pad] == 0)  # padding frames get no gradient


def test_ctc_random_lengths_vs_torch():
  rng = np.random.default_rng(9)
  frame_lens = rng.integers(1, 17, 12)
  label_rows = [list(rng.integers(1, 3, rng.integers(0, 9))) for _ in range(12)]
  logits, frame_pad, labels, label_pad = make_ctc_batch(10, frame_lens, label_rows)
  out = _ctc(logits, frame_pad, labels, label_pad)
  lens = [len(r) for r in label_rows]
  ref = torch_ctc(logits, frame_lens, labels, lens)
  np.testing.assert_allclose(out["per_utterance"], ref, rtol=1e-4, atol=1e-4)
  # torch (float64) returns inf exactly for impossible alignments.
  logp = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), -1)
  raw = F.ctc_loss(
    logp.transpose(0, 1),
    torch.tensor(labels, dtype=torch.long),
    torch.tensor(frame_lens),
    torch.tensor(lens),
    reduction="none",
    zero_infinity=False,
  ).numpy()
  assert out["num_infinite"] == np.isinf(raw).sum() > 0


def test_ctc_without_padding_and_nonzero_blank():
  logits, _, labels, label_pad = make_ctc_batch(11, [16, 16], [[1, 2], [3]])
  out = _ctc(logits, None, labels, label_pad, blank_id=5)
  ref = torch_ctc(logits, [16, 16], labels, [2, 1], blank=5)
  np.testing.assert_allclose(out["per_utterance"], ref, rtol=1e-4, atol=1e-4)


def test_ctc_empty_utterances():
  # An all-padding slot (no frames, no labels) adds nothing and is not
  # counted; one with labels but no frames is impossible.
  logits, _, labels, label_pad = make_ctc_batch(12, [16, 0, 0], [[1], [], [2]])
  frame_pad = np.zeros((3, 16), bool)
  frame_pad[1:] = True
  out = _ctc(logits, frame_pad, labels, label_pad)
  ref = torch_ctc(logits[:1], [16], labels[:1], [1])
  np.testing.assert_allclose(out["per_utterance"], [ref[0], 0, 0], rtol=1e-4, atol=1e-4)
  assert out["num_utterances"] == 1 and out["num_infinite"] == 1
  assert out["num_label_tokens"] == 2


def test_small_functions_jit():
  feats = np.random.default_rng(13).normal(size=(2, 5, 3)).astype(np.float32)
  pad = np.zeros((2, 5), bool)
  pad[1, 2:] = True
  np.testing.assert_allclose(
    jax.jit(losses.feature_penalty)(feats, pad), losses.feature_penalty(feats, pad), rtol=1e-6
  )
  np.testing.assert_allclose(jax.jit(losses.diversity, static_argnums=1)(jnp.float32(320.0), 640), 0.5)
  np.testing.assert_allclose(jax.jit(losses.bits)(jnp.float32(math.log(2))), 1.0, rtol=1e-6)


def test_with_masking_sample_negatives():
  """Interface check with the real sampler (own-index filler, flat indices)."""
  masking = pytest.importorskip("w2v2_jax.masking")
  if not hasattr(masking, "sample_negatives"):
    pytest.skip("masking.sample_negatives not available")
  data = make_batch(14, tiny=False)
  mask = data["mask"].copy()
  mask[2] = False
  mask[2, 5] = True  # a row with a single masked frame: no negatives at all
  negatives = np.asarray(masking.sample_negatives(jax.random.key(0), jnp.asarray(mask), 10))
  data.update(mask=mask, negatives=negatives)
  out = run_contrastive(data)
  ref = torch_contrastive(data["context"], data["targets"], mask, negatives)
  np.testing.assert_allclose(out["loss"], ref["loss"], rtol=1e-5)
  assert np.all(np.isneginf(np.asarray(out["logits"])[2, 5, 1:]))


@pytest.mark.parametrize("cross_sample", [False, True])
def test_no_gathered_negative_vectors(cross_sample):
  """Neither the loss nor its gradient builds a (B,T,K,F) tensor."""
  data = make_batch(15, cross_sample=cross_sample)
  b, t, f = data["context"].shape
  k = data["negatives"].shape[-1]

  def loss_fn(context, targets):
    return losses.contrastive(
      context, targets, data["codes"], data["mask"], data["negatives"], cross_sample=cross_sample
    )["loss"]

  jaxpr = jax.make_jaxpr(jax.grad(loss_fn, argnums=(0, 1)))(data["context"], data["targets"])

  def shapes(jp):
    for eqn in jp.eqns:
      for var in eqn.outvars:
        yield tuple(getattr(var.aval, "shape", ()))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        yield from shapes(sub)

  big = [s for s in shapes(jaxpr.jaxpr) if int(np.prod(s)) >= b * t * k * f]
  assert not big, big
