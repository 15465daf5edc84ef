"""The per-device pretraining train step, with explicit collectives over the data axis.

`pretrain_step` runs on ONE device's shard of the global batch; `parallel.py` runs it under
`jax.jit(jax.shard_map(...))` or `jax.pmap`. Every collective is explicit: masked-frame counts,
loss sums, the quantizer's codeword statistics and the gradients are `psum`med over `axis_name`.

Layout independence: masks, negatives and Gumbel noise are drawn with one key per utterance, folded
from the step key and the utterance's global row index (`batch["row_ids"]`); the masked-count
equalisation, the perplexity (diversity loss) and the feature penalty are computed over the global
batch. So one global batch gives the same loss and update on 1 device as on 64. Dropout and LayerDrop
are drawn per device (like fairseq, each device skips its own layers).

Normalisation (fairseq's): loss = (contrastive_sum + w_div * diversity * S + w_pen * pen * S) / S with
S the global number of masked frames of the update; with gradient accumulation each micro-batch's
extra terms are weighted by its share of S.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import optax

from w2v2_jax import losses, masking
from w2v2_jax.models.feature_encoder import frame_padding_mask
from w2v2_jax.models.quantizer import perplexity_from_sums
from w2v2_jax.train import schedules

State = Dict[str, Any]
Batch = Dict[str, jnp.ndarray]

# Stream ids folded into the step key: one independent stream per use.
_MASK, _EQUALIZE, _NEGATIVES, _GUMBEL, _DROPOUT, _LAYERDROP = range(6)


def init_state(params, tx: optax.GradientTransformation, rng: jax.Array) -> State:
  """A fresh train state: plain dict of params, optimizer state, step count (applied plus skipped
  updates: it keys the randomness), base key, and skipped (non-finite) update count."""
  return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
          "rng": rng, "skipped": jnp.zeros((), jnp.int32)}


def _row_keys(key, stream: int, row_ids):
  key = jax.random.fold_in(key, stream)
  return jax.vmap(jax.random.fold_in, (None, 0))(key, row_ids)


def apply_gradients(state: State, grads, tx: optax.GradientTransformation) -> Tuple[State, Dict[str, Any]]:
  """Optimizer update from already-reduced gradients; a non-finite update is skipped and counted
  (params and optimizer state stay as they were, so params never become NaN)."""
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(grad_norm)

  def update(operands):
    params, opt_state = operands
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  # Real control flow: a skipped update costs nothing, and no select pass over params and moments.
  params, opt_state = jax.lax.cond(finite, update, lambda operands: operands,
                                   (state["params"], state["opt_state"]))
  new_state = dict(state, params=params, opt_state=opt_state,
                   step=state["step"] + 1, skipped=state["skipped"] + (~finite).astype(jnp.int32))
  return new_state, {"grad_norm": grad_norm, "skipped": new_state["skipped"].astype(jnp.float32)}


def pretrain_step(state: State, batch: Batch, *, module: Any, tx: optax.GradientTransformation,
                  lr_schedule: Callable, latent_temp: Tuple[float, float, float],
                  axis_name: str = "data") -> Tuple[State, Dict[str, jnp.ndarray]]:
  """One update of wav2vec 2.0 pretraining on this device's shard.

  batch: `audio` (A, b, L) float32, `padding_mask` (A, b, L) bool (True = padding), `row_ids` (A, b)
  int32 global row indices within each micro-batch; A = gradient-accumulation micro-batches.
  latent_temp: (max, min, decay) of the Gumbel temperature, evaluated at the update count.
  Returns the new state and global metrics (float32 scalars, identical on every device).
  """
  cfg = module.config
  audio, padding, row_ids = batch["audio"], batch["padding_mask"], batch["row_ids"]
  num_micro, _, num_samples = audio.shape
  num_frames = cfg.num_frames(num_samples)
  step_key = jax.random.fold_in(state["rng"], state["step"])
  device_key = jax.random.fold_in(step_key, jax.lax.axis_index(axis_name))
  updates_done = state["step"] - state["skipped"]          # optax's own count: skipped steps excluded
  temperature = schedules.gumbel_temperature(updates_done, *latent_temp)
  num_codevectors = cfg.num_codevectors

  # Utterance ids unique within the update: micro-batch a's rows follow those of micro-batches < a.
  rows_per_micro = row_ids.shape[1] * jax.lax.psum(1, axis_name)
  row_ids = row_ids + rows_per_micro * jnp.arange(num_micro, dtype=row_ids.dtype)[:, None]

  # Masks of every micro-batch first: they do not depend on the params, and every micro-batch's loss
  # is normalised by the masked count of the whole update. Equalised to the minimum masked count over
  # the update's utterances on all devices (fairseq: over one device's batch).
  frame_pad = jax.vmap(lambda p: frame_padding_mask(p, num_frames, cfg.conv_layers))(padding)
  masks = jnp.stack([
      masking.row_span_mask(_row_keys(step_key, _MASK, row_ids[a]), frame_pad[a], cfg.mask_prob,
                            cfg.mask_length, cfg.mask_min_masks, require_same_masks=False)
      for a in range(num_micro)])
  if cfg.require_same_masks and cfg.mask_prob > 0:
    target = jax.lax.pmin(jnp.min(jnp.sum(masks, axis=2)), axis_name)
    masks = jnp.stack([masking.row_equalize(_row_keys(step_key, _EQUALIZE, row_ids[a]), masks[a], target)
                       for a in range(num_micro)])
  sample_size = jax.lax.psum(jnp.sum(masks, axis=(1, 2)).astype(jnp.float32), axis_name)   # (A,)
  total_size = jnp.maximum(jnp.sum(sample_size), 1.0)
  valid_frames = jax.lax.psum(jnp.sum(~frame_pad, axis=(1, 2)).astype(jnp.float32), axis_name)

  def micro_loss(params, a):
    micro_device_key = jax.random.fold_in(device_key, a)
    out = module.apply(
        {"params": params}, audio[a], padding[a], mask_time=masks[a], temperature=temperature,
        deterministic=False, row_ids=row_ids[a],
        rngs={"gumbel": jax.random.fold_in(step_key, _GUMBEL),
              "dropout": jax.random.fold_in(micro_device_key, _DROPOUT),
              "layerdrop": jax.random.fold_in(micro_device_key, _LAYERDROP)})
    negatives = masking.row_negatives(_row_keys(step_key, _NEGATIVES, row_ids[a]), masks[a],
                                      max(cfg.num_negatives, 1))
    if cfg.cross_sample_negatives:
      cross = masking.sample_negatives(jax.random.fold_in(micro_device_key, _NEGATIVES), masks[a], 0,
                                       cfg.cross_sample_negatives)
      negatives = jnp.concatenate([negatives[..., :cfg.num_negatives], cross], axis=-1)
    con = losses.contrastive(out["context"], out["targets"], out["codes"], masks[a], negatives,
                             cfg.logit_temp, cross_sample=cfg.cross_sample_negatives > 0)
    # Global perplexity whose gradient flows through this device's own codeword statistics only.
    local = out["prob_sums"]
    global_sums = local + jax.lax.stop_gradient(jax.lax.psum(local, axis_name) - local)
    weight = jax.lax.psum(out["weight_sum"], axis_name)
    prob_ppl = perplexity_from_sums(global_sums, weight)
    code_ppl = perplexity_from_sums(jax.lax.psum(out["code_counts"], axis_name), weight)
    diversity = losses.diversity(prob_ppl, num_codevectors)
    features = out["features"].astype(jnp.float32)
    sq_sum = jnp.sum(jnp.where(out["frame_padding_mask"][..., None], 0.0, features * features))
    pen_norm = jnp.maximum(valid_frames[a] * features.shape[-1], 1.0)   # global mean of features**2
    share = sample_size[a] / total_size
    loss = (con["loss"] / total_size + cfg.diversity_weight * diversity * share
            + cfg.feature_pen_weight * sq_sum / pen_norm * share)
    # Logged values, already global (psum'd) where the loss uses global statistics.
    aux = {"contrastive": con["loss"], "correct": con["correct"], "count": con["count"],
           "diversity": diversity * sample_size[a],
           "feature_pen": jax.lax.psum(jax.lax.stop_gradient(sq_sum), axis_name) / pen_norm * sample_size[a],
           "prob_perplexity": prob_ppl, "code_perplexity": code_ppl}
    return loss, aux

  grad_fn = jax.grad(micro_loss, has_aux=True)
  grads, aux = grad_fn(state["params"], 0)
  for a in range(1, num_micro):          # static, small: accumulation steps of one bucket
    g, x = grad_fn(state["params"], a)
    grads = jax.tree_util.tree_map(jnp.add, grads, g)
    aux = jax.tree_util.tree_map(jnp.add, aux, x)
  grads = jax.lax.psum(grads, axis_name)
  new_state, update_stats = apply_gradients(state, grads, tx)

  sums = jax.lax.psum({k: aux[k] for k in ("contrastive", "correct", "count")}, axis_name)
  loss = (sums["contrastive"] + cfg.diversity_weight * aux["diversity"]
          + cfg.feature_pen_weight * aux["feature_pen"]) / total_size
  metrics = {
      "loss": loss,
      "contrastive": sums["contrastive"] / total_size,
      "diversity": aux["diversity"] / total_size,
      "feature_pen": aux["feature_pen"] / total_size,
      "accuracy": sums["correct"] / jnp.maximum(sums["count"], 1.0),
      "prob_perplexity": aux["prob_perplexity"] / num_micro,
      "code_perplexity": aux["code_perplexity"] / num_micro,
      "temperature": temperature,
      "lr": jnp.asarray(lr_schedule(updates_done), jnp.float32),
      "masked_fraction": jnp.sum(sample_size) / jnp.maximum(jnp.sum(valid_frames), 1.0),
      "sample_size": jnp.sum(sample_size),
      "audio_samples": jax.lax.psum(jnp.sum(~padding).astype(jnp.float32), axis_name),
      **update_stats,
  }
  return new_state, metrics


def finetune_step(state: State, batch: Batch, *, module: Any, tx: optax.GradientTransformation,
                  lr_schedule: Callable, freeze_updates: int = 0, blank_id: int = 0,
                  axis_name: str = "data", freeze_mode: str = "auto") -> Tuple[State, Dict[str, jnp.ndarray]]:
  """One CTC fine-tuning update on this device's shard.

  batch: `audio` (A, b, L) float32, `padding_mask` (A, b, L) bool, `labels` (A, b, N) int32,
  `label_padding` (A, b, N) bool, `weight` (A, b) float32 (1 = the utterance counts; 0 = a row the
  data pipeline could not use, e.g. an empty or out-of-vocabulary transcript, kept only for the shape).

  The loss is sentence-averaged as fairseq's: the sum of per-utterance CTC losses over the update
  divided by the global number of utterances; infinite losses (labels longer than the frames) are
  zeroed and counted. For the first `freeze_updates` applied updates only the output layer trains:
  the backbone's gradients are zero (and its Adam moments stay zero). The conv encoder is frozen by
  the model config (feature_grad_mult=0).
  Masks (time and channel) and dropout are drawn per device by the model in training mode.

  freeze_mode: how the freeze is switched off on device. "cond": `lax.cond` between a backward pass
  that stops at the backbone and the full one (no backbone backward while frozen). "mask": always the
  full backward, the backbone's gradients zeroed while frozen. Same updates either way. "auto": "mask"
  on CPU, where XLA runs convolutions inside a conditional's branch about 20x slower than at top level
  (an unfrozen conv encoder, feature_grad_mult > 0, then takes seconds per step), "cond" elsewhere.
  """
  if freeze_mode == "auto":
    freeze_mode = "mask" if jax.default_backend() == "cpu" else "cond"
  if freeze_mode not in ("cond", "mask"):
    raise ValueError(f"freeze_mode must be 'auto', 'cond' or 'mask', got {freeze_mode!r}")
  audio, padding = batch["audio"], batch["padding_mask"]
  labels, label_padding, weight = batch["labels"], batch["label_padding"], batch["weight"]
  num_micro = audio.shape[0]
  step_key = jax.random.fold_in(state["rng"], state["step"])
  device_key = jax.random.fold_in(step_key, jax.lax.axis_index(axis_name))
  updates_done = state["step"] - state["skipped"]
  utterances = jnp.maximum(jax.lax.psum(jnp.sum(weight), axis_name), 1.0)

  def micro_loss(params, a, frozen: bool):
    if frozen:
      params = dict(params, wav2vec2=jax.lax.stop_gradient(params["wav2vec2"]))
    key = jax.random.fold_in(device_key, a)
    out = module.apply({"params": params}, audio[a], padding[a], deterministic=False,
                       rngs={"mask": jax.random.fold_in(key, _MASK), "dropout": jax.random.fold_in(key, _DROPOUT),
                             "layerdrop": jax.random.fold_in(key, _LAYERDROP)})
    ctc = losses.ctc(out["logits"], out["frame_padding_mask"], labels[a], label_padding[a], blank_id=blank_id)
    per_utt = ctc["per_utterance"] * weight[a]
    infinite = jnp.sum(jnp.where(weight[a] > 0, ctc["infinite"], False)).astype(jnp.float32)
    return jnp.sum(per_utt) / utterances, {"loss_sum": jnp.sum(per_utt), "infinite": infinite}

  def grads_for(frozen: bool):
    def run(params):
      grad_fn = jax.grad(functools.partial(micro_loss, frozen=frozen), has_aux=True)
      grads, aux = grad_fn(params, 0)
      for a in range(1, num_micro):
        g, x = grad_fn(params, a)
        grads = jax.tree_util.tree_map(jnp.add, grads, g)
        aux = jax.tree_util.tree_map(jnp.add, aux, x)
      return grads, aux
    return run

  if freeze_updates > 0 and freeze_mode == "cond":
    grads, aux = jax.lax.cond(updates_done < freeze_updates, grads_for(True), grads_for(False), state["params"])
  else:
    grads, aux = grads_for(False)(state["params"])
    if freeze_updates > 0:
      frozen = updates_done < freeze_updates
      grads = dict(grads, wav2vec2=jax.tree_util.tree_map(lambda g: jnp.where(frozen, jnp.zeros_like(g), g),
                                                         grads["wav2vec2"]))
  grads = jax.lax.psum(grads, axis_name)
  new_state, update_stats = apply_gradients(state, grads, tx)
  sums = jax.lax.psum(aux, axis_name)
  metrics = {
      "loss": sums["loss_sum"] / utterances,
      "infinite_losses": sums["infinite"],
      "utterances": utterances,
      "frozen": (updates_done < freeze_updates).astype(jnp.float32),
      "lr": jnp.asarray(lr_schedule(updates_done), jnp.float32),
      "audio_samples": jax.lax.psum(jnp.sum(~padding).astype(jnp.float32), axis_name),
      **update_stats,
  }
  return new_state, metrics
