"""The training objectives, one per task: the functions the train step differentiates, and nothing else.

`pretrain_masks` draws an update's time masks (they do not depend on the params) and
`pretrain_micro_loss` is the loss of one micro-batch of that update, normalised by the update's global
masked-frame count, so the gradient of the update is the sum of the micro-batches' gradients.
`ctc_micro_loss` is the same for CTC fine-tuning (sentence-averaged over the update's utterances).
`train/step.py` scans these over the accumulation axis and reduces the gradients over devices.

Collectives: with `axis_name` (inside shard_map / pmap) the masked-count equalisation, the
perplexity, the feature penalty's normaliser and the logged sums are global over that axis; with
`axis_name=None` the same functions run on one device without collectives (what the unit tests call).

Normalisation (fairseq's): loss = (contrastive_sum + w_div * diversity * S + w_pen * pen * S) / S with
S the global number of masked frames of the update; with gradient accumulation each micro-batch's
extra terms are weighted by its share of S.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from w2v2_jax import losses, masking
from w2v2_jax.models.feature_encoder import frame_padding_mask
from w2v2_jax.models.quantizer import perplexity_from_sums

# Stream ids folded into the step key: one independent stream per use.
MASK, EQUALIZE, NEGATIVES, GUMBEL, DROPOUT, LAYERDROP = range(6)
Micro = Dict[str, jnp.ndarray]


def psum(x, axis_name: Optional[str]):
  """`lax.psum` over `axis_name`, or `x` itself on one device (axis_name None)."""
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def row_keys(key, stream: int, row_ids):
  """One key per utterance: `key` folded with the stream, then with each global row index."""
  key = jax.random.fold_in(key, stream)
  return jax.vmap(jax.random.fold_in, (None, 0))(key, row_ids)


def pretrain_masks(cfg: Any, step_key, padding, row_ids, axis_name: Optional[str] = None
                   ) -> Dict[str, jnp.ndarray]:
  """Time masks and normalisers of a whole update, before any forward pass.

  padding (A, b, L) bool (True = padding), row_ids (A, b) int32 global utterance ids unique within the
  update. Returns `masks` (A, b, T) bool, `frame_padding` (A, b, T) bool, `sample_size` (A,) float32 global
  masked frames per micro-batch, `valid_frames` (A,) float32 global unpadded frames per micro-batch.
  The masks are equalised to the minimum masked count over the update's utterances on every device
  (fairseq: over one device's batch), so they do not depend on the device layout.
  """
  num_micro, rows, num_samples = padding.shape
  num_frames = cfg.num_frames(num_samples)
  frame_pad = frame_padding_mask(padding.reshape(num_micro * rows, num_samples), num_frames, cfg.conv_layers)
  flat_ids = row_ids.reshape(-1)
  masks = masking.row_span_mask(row_keys(step_key, MASK, flat_ids), frame_pad, cfg.mask_prob,
                                cfg.mask_length, cfg.mask_min_masks, require_same_masks=False)
  if cfg.require_same_masks and cfg.mask_prob > 0:
    target = jnp.min(jnp.sum(masks, axis=1))
    if axis_name is not None:
      target = jax.lax.pmin(target, axis_name)
    masks = masking.row_equalize(row_keys(step_key, EQUALIZE, flat_ids), masks, target)
  masks = masks.reshape(num_micro, rows, num_frames)
  frame_pad = frame_pad.reshape(num_micro, rows, num_frames)
  return {"masks": masks, "frame_padding": frame_pad,
          "sample_size": psum(jnp.sum(masks, axis=(1, 2)).astype(jnp.float32), axis_name),
          "valid_frames": psum(jnp.sum(~frame_pad, axis=(1, 2)).astype(jnp.float32), axis_name)}


def pretrain_micro_loss(params, micro: Micro, *, module: Any, step_key, device_key, temperature,
                        total_size, axis_name: Optional[str] = None) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
  """The pretraining loss of one micro-batch, as its share of the update's loss.

  micro: `audio` (b, L) float32, `padding_mask` (b, L) bool, `mask` (b, T) bool, `row_ids` (b,) int32,
  `index` () int32 (the micro-batch's position in the update: keys its dropout), `sample_size` and
  `valid_frames` () float32 (this micro-batch's global counts from `pretrain_masks`).
  total_size: the update's global masked-frame count (the normaliser of every micro-batch).
  Returns (loss, aux): loss float32 scalar (differentiate this); aux float32 sums for logging, already
  global (psum'd) where the loss uses global statistics, local for `contrastive`, `correct`, `count`.
  """
  cfg = module.config
  mask, ids = micro["mask"], micro["row_ids"]
  micro_key = jax.random.fold_in(device_key, micro["index"])
  out = module.apply(
      {"params": params}, micro["audio"], micro["padding_mask"], mask_time=mask, temperature=temperature,
      deterministic=False, row_ids=ids,
      rngs={"gumbel": jax.random.fold_in(step_key, GUMBEL),
            "dropout": jax.random.fold_in(micro_key, DROPOUT),
            "layerdrop": jax.random.fold_in(micro_key, LAYERDROP)})
  negatives = masking.row_negatives(row_keys(step_key, NEGATIVES, ids), mask, max(cfg.num_negatives, 1))
  if cfg.cross_sample_negatives:
    cross = masking.sample_negatives(jax.random.fold_in(micro_key, NEGATIVES), mask, 0,
                                     cfg.cross_sample_negatives)
    negatives = jnp.concatenate([negatives[..., :cfg.num_negatives], cross], axis=-1)
  con = losses.contrastive(out["context"], out["targets"], out["codes"], mask, negatives,
                           cfg.logit_temp, cross_sample=cfg.cross_sample_negatives > 0)
  # Global perplexity whose gradient flows through this device's own codeword statistics only.
  local = out["prob_sums"]
  global_sums = local + jax.lax.stop_gradient(psum(local, axis_name) - local)
  weight = psum(out["weight_sum"], axis_name)
  prob_ppl = perplexity_from_sums(global_sums, weight)
  code_ppl = perplexity_from_sums(psum(out["code_counts"], axis_name), weight)
  diversity = losses.diversity(prob_ppl, cfg.num_codevectors)
  features = out["features"].astype(jnp.float32)
  sq_sum = jnp.sum(jnp.where(out["frame_padding_mask"][..., None], 0.0, features * features))
  pen_norm = jnp.maximum(micro["valid_frames"] * features.shape[-1], 1.0)   # global mean of features**2
  share = micro["sample_size"] / total_size
  loss = (con["loss"] / total_size + cfg.diversity_weight * diversity * share
          + cfg.feature_pen_weight * sq_sum / pen_norm * share)
  aux = {"contrastive": con["loss"], "correct": con["correct"], "count": con["count"],
         "diversity": diversity * micro["sample_size"],
         "feature_pen": psum(jax.lax.stop_gradient(sq_sum), axis_name) / pen_norm * micro["sample_size"],
         "prob_perplexity": prob_ppl, "code_perplexity": code_ppl}
  return loss, aux


def ctc_micro_loss(params, micro: Micro, *, module: Any, device_key, utterances, blank_id: int = 0,
                   frozen: bool = False) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
  """The CTC loss of one micro-batch, as its share of the update's sentence-averaged loss.

  micro: `audio` (b, L) float32, `padding_mask` (b, L) bool, `labels` (b, N) int32, `label_padding`
  (b, N) bool, `weight` (b,) float32 (0 = a row kept only for the shape), `index` () int32.
  utterances: the update's global count of weighted utterances. frozen (static): stop the gradient at
  the backbone (only the output layer trains; XLA drops the backbone's backward pass).
  Returns (loss, aux) with aux `loss_sum` (summed per-utterance CTC, nats) and `infinite` (utterances
  whose labels cannot be aligned; zeroed).
  """
  if frozen:
    params = dict(params, wav2vec2=jax.lax.stop_gradient(params["wav2vec2"]))
  key = jax.random.fold_in(device_key, micro["index"])
  out = module.apply({"params": params}, micro["audio"], micro["padding_mask"], deterministic=False,
                     rngs={"mask": jax.random.fold_in(key, MASK), "dropout": jax.random.fold_in(key, DROPOUT),
                           "layerdrop": jax.random.fold_in(key, LAYERDROP)})
  ctc = losses.ctc(out["logits"], out["frame_padding_mask"], micro["labels"], micro["label_padding"],
                   blank_id=blank_id)
  weight = micro["weight"]
  per_utt = ctc["per_utterance"] * weight
  infinite = jnp.sum(jnp.where(weight > 0, ctc["infinite"], False)).astype(jnp.float32)
  return jnp.sum(per_utt) / utterances, {"loss_sum": jnp.sum(per_utt), "infinite": infinite}
