"""wav2vec 2.0 losses: contrastive (InfoNCE), diversity, feature penalty, CTC.

Pure JAX, jittable, static shapes. All loss math runs in float32 whatever the
input dtype. The pretraining functions return *sums* over the local batch
together with their normaliser (``sample_size``): a data-parallel caller
``psum``s every entry over devices and divides by the global ``sample_size``,
as fairseq does (docs/recipe.md, "Pretraining objective").

Shapes: B batch, T frames, F final_dim, G codebook groups, K negatives,
C feature channels, V vocabulary, N label tokens.
"""

import math

import jax
import jax.numpy as jnp
import optax

_COS_EPS = 1e-8
_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32/bf16 passes in the loss matmuls


def bits(x):
  """Converts a value in nats to bits (for logging): ``x / ln 2``."""
  return x / math.log(2.0)


def _unit(x):
  """x / max(|x|, 1e-8) along the last axis, in float32.

  This is what ``torch.nn.functional.cosine_similarity`` computes (it clamps
  each norm separately, although its docstring says max(|x|*|y|, eps)), so
  cosine(x, y) == _unit(x) . _unit(y). The clamp sits inside the square root
  so the gradient stays finite at x == 0.
  """
  x = jnp.asarray(x).astype(jnp.float32)
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, _COS_EPS**2))


def contrastive(context, targets, codes, mask, negatives, logit_temp=0.1, cross_sample=False):
  """InfoNCE loss of wav2vec 2.0, summed over masked frames.

  Logits are cosine(context[b,t], [targets[b,t], targets.flat[negatives[b,t,k]]])
  / logit_temp, positive first. A negative with the same codewords as the
  positive (hence a bit-identical target vector) gets -inf. Every frame gets
  logits (static shapes); only masked frames count in the sums.

  Instead of gathering (B,T,K,F) negative vectors, the cosine of every
  (context frame, target frame) pair is computed as one matmul of unit
  vectors, and K entries per frame are picked from it.

  Args:
    context: (B,T,F) final_proj of the transformer output, any float dtype.
    targets: (B,T,F) quantized and project_q'd vectors for every frame.
    codes: (B,T,G) int, the quantizer's codeword index per group per frame.
    mask: (B,T) bool, True at masked frames (the only ones that count).
    negatives: (B,T,K) int, flat indices b*T+t into the B*T frames, as made
      by ``masking.sample_negatives``. Entries of unmasked frames are filler
      (any value; they are clipped into range and weighted out).
    logit_temp: temperature dividing the cosine similarities.
    cross_sample: static. False (fairseq's default): every negative of a
      masked frame lies in the same utterance, and a (B,T,T) similarity is
      used; a negative from another row would be silently clipped into the
      row, so pass True if the sampler draws across utterances
      (``sample_negatives(..., cross_sample_negatives>0)``), which uses a
      (B*T, B*T) similarity instead.

  Returns:
    dict of float32 scalars summed over masked frames: ``loss`` (sum of
    cross-entropies, nats, target index 0), ``sample_size`` (number of
    masked frames), ``correct`` (frames with argmax == 0, not counting
    frames whose logits are all equal, as fairseq does), ``count`` (masked
    frames); and ``logits`` (B,T,1+K) float32 for inspection.
  """
  batch, frames, _ = context.shape
  codes = jnp.asarray(codes)
  negatives = jnp.asarray(negatives)
  c = _unit(context)
  q = _unit(targets)
  positive = jnp.sum(c * q, axis=-1)  # (B,T)

  offsets = (jnp.arange(batch) * frames)[:, None, None]  # (B,1,1)
  if cross_sample:
    flat = jnp.clip(negatives, 0, batch * frames - 1)
    c2 = c.reshape(batch * frames, -1)
    q2 = q.reshape(batch * frames, -1)
    sim = jnp.matmul(c2, q2.T, precision=_HIGHEST)  # (B*T, B*T)
    neg = jnp.take_along_axis(sim, flat.reshape(batch * frames, -1), axis=1)
    neg = neg.reshape(negatives.shape)
  else:
    local = jnp.clip(negatives - offsets, 0, frames - 1)
    flat = local + offsets
    sim = jnp.einsum("btf,bsf->bts", c, q, precision=_HIGHEST)  # (B,T,T)
    neg = jnp.take_along_axis(sim, local, axis=2)  # (B,T,K)

  groups = codes.shape[-1]
  neg_codes = codes.reshape(batch * frames, groups)[flat]  # (B,T,K,G)
  same = jnp.all(neg_codes == codes[:, :, None, :], axis=-1)  # (B,T,K)

  logits = jnp.concatenate([positive[..., None], neg], axis=-1) / logit_temp
  is_pos = jnp.concatenate([jnp.zeros_like(same[..., :1]), same], axis=-1)
  logits = jnp.where(is_pos, -jnp.inf, logits)

  # The positive logit is always finite, so logsumexp and its gradient are
  # too; a frame whose negatives are all -inf has loss exactly 0.
  nll = jax.nn.logsumexp(logits, axis=-1) - logits[..., 0]  # (B,T)
  mask = jnp.asarray(mask).astype(bool)
  loss = jnp.sum(jnp.where(mask, nll, 0.0))

  arg_max_0 = jnp.argmax(logits, axis=-1) == 0
  arg_min_0 = jnp.argmin(logits, axis=-1) == 0
  correct = mask & arg_max_0 & ~arg_min_0
  count = jnp.sum(mask).astype(jnp.float32)
  return {
    "loss": loss,
    "sample_size": count,
    "correct": jnp.sum(correct).astype(jnp.float32),
    "count": count,
    "logits": logits,
  }


def diversity(prob_perplexity, num_codevectors):
  """Diversity penalty (G*V - perplexity) / (G*V), a float32 scalar.

  Args:
    prob_perplexity: scalar, the quantizer's softmax perplexity summed over
      groups (at most num_codevectors = G*V).
    num_codevectors: G*V.

  The caller multiplies it by sample_size and its weight (see train/objective.py).
  """
  pp = jnp.asarray(prob_perplexity, jnp.float32)
  return (num_codevectors - pp) / num_codevectors


def feature_penalty(features, frame_padding_mask=None):
  """Mean of features**2 over valid frames and all channels, float32 scalar.

  Args:
    features: (B,T,C) raw conv-encoder output.
    frame_padding_mask: optional (B,T) bool, True marks padding frames,
      which are left out. Without it this is ``features.pow(2).mean()``.
  """
  sq = jnp.square(jnp.asarray(features).astype(jnp.float32))
  if frame_padding_mask is None:
    return jnp.mean(sq)
  valid = ~jnp.asarray(frame_padding_mask).astype(bool)
  total = jnp.sum(jnp.where(valid[..., None], sq, 0.0))
  n = jnp.sum(valid).astype(jnp.float32) * features.shape[-1]
  return total / jnp.maximum(n, 1.0)


def ctc(logits, frame_padding_mask, labels, label_padding_mask, blank_id=0, zero_infinity=True):
  """Per-utterance CTC loss (optax.ctc_loss), summed over the batch.

  Args:
    logits: (B,T,V) unnormalised scores (log_softmax is applied inside).
    frame_padding_mask: (B,T) bool, True marks padding frames, or None.
    labels: (B,N) int, right-padded label ids (no blank among them).
    label_padding_mask: (B,N) bool, True marks padding labels.
    blank_id: static, the blank's index in V.
    zero_infinity: set the loss of impossible utterances (fewer valid
      frames than labels plus repeated consecutive labels) to 0, with zero
      gradient, like torch's ``zero_infinity``. optax returns a large finite
      value (about 1e5, its log_epsilon) rather than inf for these, so
      impossibility is detected from the lengths (and non-finite losses).

  Returns:
    dict: ``loss`` float32 scalar, sum of per-utterance losses (nats);
    ``per_utterance`` (B,) float32; ``num_utterances`` float32, utterances
    with at least one valid frame whose loss was not zeroed (sentence
    averaging divides ``loss`` by this; fairseq divides by the batch size,
    i.e. also counts zeroed ones: add ``num_infinite``); ``num_infinite``
    float32, impossible utterances; ``num_label_tokens`` float32, valid
    labels in the batch; ``infinite`` (B,) bool, which utterances were impossible.
  """
  logits = jnp.asarray(logits).astype(jnp.float32)
  batch, frames, _ = logits.shape
  if frame_padding_mask is None:
    frame_pad = jnp.zeros((batch, frames), bool)
  else:
    frame_pad = jnp.asarray(frame_padding_mask).astype(bool)
  label_pad = jnp.asarray(label_padding_mask).astype(bool)
  # Defensive: padding labels get an id that matches nothing, so optax's
  # "repeated label" flag never pairs the last real label with padding.
  labels = jnp.where(label_pad, -1, jnp.asarray(labels).astype(jnp.int32))
  per = optax.ctc_loss(
    logits, frame_pad.astype(jnp.float32), labels, label_pad.astype(jnp.float32), blank_id=blank_id
  )

  valid_labels = ~label_pad
  num_frames = jnp.sum(~frame_pad, axis=1)
  num_labels = jnp.sum(valid_labels, axis=1)
  repeats = jnp.sum((labels[:, 1:] == labels[:, :-1]) & valid_labels[:, 1:], axis=1)
  impossible = (num_frames < num_labels + repeats) | ~jnp.isfinite(per)
  nonempty = num_frames > 0
  if zero_infinity:
    per = jnp.where(impossible, 0.0, per)
    counted = nonempty & ~impossible
  else:
    counted = nonempty
  return {
    "loss": jnp.sum(per),
    "per_utterance": per,
    "num_utterances": jnp.sum(counted).astype(jnp.float32),
    "num_infinite": jnp.sum(impossible).astype(jnp.float32),
    "num_label_tokens": jnp.sum(num_labels).astype(jnp.float32),
    "infinite": impossible,
  }
