"""The per-device train steps (pretraining, CTC fine-tuning), with explicit collectives over the data axis.

Each step runs on ONE device's shard of the global batch; `parallel.py` runs it under
`jax.jit(jax.shard_map(...))` or `jax.pmap`. Every collective is explicit: masked-frame counts,
loss sums, the quantizer's codeword statistics and the gradients are `psum`med over `axis_name`.

Gradient accumulation is a `lax.scan` over the update's (A, b, ...) micro-batches on TPU and GPU: one
micro-batch's activations are alive at a time, and memory and compile time do not depend on A (on
CPU the micro-batches are unrolled, see `accumulate`). The accumulated function is the task's objective
(`train/objective.py`), the one the tests check.

Layout independence: masks, negatives and Gumbel noise are drawn with one key per utterance, folded
from the step key and the utterance's global row index (`batch["row_ids"]`); the masked-count
equalisation, the perplexity (diversity loss) and the feature penalty are computed over the global
batch. So one global batch gives the same loss and update on 1 device as on 64. Dropout and LayerDrop
are drawn per device (like fairseq, each device skips its own layers).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from w2v2_jax import backend
from w2v2_jax.train import fsdp, objective, schedules

State = Dict[str, Any]
Batch = Dict[str, jnp.ndarray]


def init_state(params, tx: optax.GradientTransformation, rng: jax.Array) -> State:
  """A fresh train state: plain dict of params, optimizer state, step count (applied plus skipped
  updates: it keys the randomness), base key, and skipped (non-finite) update count."""
  return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
          "rng": rng, "skipped": jnp.zeros((), jnp.int32)}


def accumulate(loss_fn: Callable, params, micro_batches: Dict[str, jnp.ndarray]):
  """Sum of `grad(loss_fn)(params, micro)` and of its aux over the leading (A) axis of `micro_batches`:
  (grads, aux sums). loss_fn(params, micro) -> (loss, aux dict of scalars).

  A `lax.scan` over the micro-batches when compiling for TPU or GPU: one micro-batch's activations are
  alive at a time and the program does not grow with A. For CPU the micro-batches are unrolled: XLA:CPU
  runs convolutions inside a loop body (like a conditional's branch) many times slower than at top
  level, and host memory is not what limits a CPU run. A = 1 is a plain call either way. Same sums.
  """
  grad_fn = jax.grad(loss_fn, has_aux=True)
  num_micro = jax.tree_util.tree_leaves(micro_batches)[0].shape[0]
  if num_micro == 1 or backend.target() == "cpu":
    total = None
    for a in range(num_micro):
      out = grad_fn(params, jax.tree_util.tree_map(lambda x, a=a: x[a], micro_batches))
      total = out if total is None else jax.tree_util.tree_map(jnp.add, total, out)
    return total
  first = jax.tree_util.tree_map(lambda x: x[0], micro_batches)
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, params, first))

  def body(carry, micro):
    return jax.tree_util.tree_map(jnp.add, carry, grad_fn(params, micro)), None

  (grads, aux), _ = jax.lax.scan(body, zeros, micro_batches)
  return grads, aux


def apply_gradients(state: State, grads, tx: optax.GradientTransformation, *, clip_norm: float = 0.0,
                    split: Optional[Any] = None, axis_name: str = "data") -> Tuple[State, Dict[str, Any]]:
  """Optimizer update from already-reduced gradients; a non-finite update is skipped and counted
  (params and optimizer state stay as they were, so params never become NaN).

  clip_norm > 0 scales the gradients to at most that global L2 norm first (as optax's
  clip_by_global_norm; the recipe does not clip). split: the sharded-state layout (`fsdp.axes`) when
  params, grads and moments are this device's slices (parallel.mode="fsdp"), else None.
  """
  grad_norm = fsdp.global_norm(grads, split, axis_name)
  finite = jnp.isfinite(grad_norm)
  if clip_norm > 0:
    keep = grad_norm < clip_norm
    grads = jax.tree_util.tree_map(
        lambda g: jax.lax.select(keep, g, (g / grad_norm.astype(g.dtype)) * clip_norm), grads)

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
                  lr_schedule: Callable, latent_temp: Tuple[float, float, float], clip_norm: float = 0.0,
                  split: Optional[Any] = None, axis_name: str = "data") -> Tuple[State, Dict[str, jnp.ndarray]]:
  """One update of wav2vec 2.0 pretraining on this device's shard.

  batch: `audio` (A, b, L) float32, `padding_mask` (A, b, L) bool (True = padding), `row_ids` (A, b)
  int32 global row indices within each micro-batch; A = gradient-accumulation micro-batches.
  latent_temp: (max, min, decay) of the Gumbel temperature, evaluated at the update count.
  clip_norm, split: see `apply_gradients` (split: set by `parallel.DataParallel` in mode "fsdp").
  Returns the new state and global metrics (float32 scalars, identical on every device).
  """
  cfg = module.config
  audio, padding, row_ids = batch["audio"], batch["padding_mask"], batch["row_ids"]
  num_micro = audio.shape[0]
  step_key = jax.random.fold_in(state["rng"], state["step"])
  device_key = jax.random.fold_in(step_key, jax.lax.axis_index(axis_name))
  updates_done = state["step"] - state["skipped"]          # optax's own count: skipped steps excluded
  temperature = schedules.gumbel_temperature(updates_done, *latent_temp)

  # Utterance ids unique within the update: micro-batch a's rows follow those of micro-batches < a.
  rows_per_micro = row_ids.shape[1] * jax.lax.psum(1, axis_name)
  row_ids = row_ids + rows_per_micro * jnp.arange(num_micro, dtype=row_ids.dtype)[:, None]
  # Masks of every micro-batch first: they do not depend on the params, and every micro-batch's loss
  # is normalised by the masked count of the whole update.
  prep = objective.pretrain_masks(cfg, step_key, padding, row_ids, axis_name)
  total_size = jnp.maximum(jnp.sum(prep["sample_size"]), 1.0)
  micro_batches = {"audio": audio, "padding_mask": padding, "mask": prep["masks"], "row_ids": row_ids,
                   "index": jnp.arange(num_micro, dtype=jnp.int32), "sample_size": prep["sample_size"],
                   "valid_frames": prep["valid_frames"]}
  loss_fn = functools.partial(objective.pretrain_micro_loss, module=module, step_key=step_key,
                              device_key=device_key, temperature=temperature, total_size=total_size,
                              axis_name=axis_name)
  grads, aux = accumulate(fsdp.gathered_loss(loss_fn, split, axis_name), state["params"], micro_batches)
  grads = fsdp.reduce_gradients(grads, split, axis_name)
  new_state, update_stats = apply_gradients(state, grads, tx, clip_norm=clip_norm, split=split, axis_name=axis_name)

  sums = jax.lax.psum({k: aux[k] for k in ("contrastive", "correct", "count")}, axis_name)
  loss = (sums["contrastive"] + cfg.diversity_weight * aux["diversity"]
          + cfg.feature_pen_weight * aux["feature_pen"]) / total_size
  valid_frames = jnp.sum(prep["valid_frames"])
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
      "masked_fraction": jnp.sum(prep["sample_size"]) / jnp.maximum(valid_frames, 1.0),
      "sample_size": jnp.sum(prep["sample_size"]),
      "audio_samples": jax.lax.psum(jnp.sum(~padding).astype(jnp.float32), axis_name),
      **update_stats,
  }
  return new_state, metrics


def top_layers_mask(backbone: Any, count: int) -> Any:
  """A tree like `backbone` (the wav2vec2 params or their gradients) of bool masks, True in the top
  `count` transformer layers: a scalar per leaf of a per-layer model (encoder/layers_<i>), a (layers,
  1, ...) array for a stacked one (encoder/layers/layer, layer axis first), False elsewhere."""
  layers = backbone.get("encoder", {}) if hasattr(backbone, "get") else {}
  stacked = "layers" in layers
  total = (jax.tree_util.tree_leaves(layers["layers"])[0].shape[0] if stacked
           else sum(1 for k in layers if k.startswith("layers_")))

  def mask(path, leaf):
    keys = [getattr(k, "key", None) for k in path]
    if count <= 0 or len(keys) < 2 or keys[0] != "encoder":
      return jnp.asarray(False)
    if stacked and keys[1] == "layers":
      on = jnp.arange(total) >= total - count
      return on.reshape((total,) + (1,) * (jnp.ndim(leaf) - 1))
    if keys[1].startswith("layers_"):
      return jnp.asarray(int(keys[1][len("layers_"):]) >= total - count)
    return jnp.asarray(False)
  return jax.tree_util.tree_map_with_path(mask, backbone)


def finetune_step(state: State, batch: Batch, *, module: Any, tx: optax.GradientTransformation,
                  lr_schedule: Callable, freeze_updates: int = 0, blank_id: int = 0,
                  axis_name: str = "data", freeze_mode: str = "auto", clip_norm: float = 0.0,
                  split: Optional[Any] = None, train_top_layers: int = 0) -> Tuple[State, Dict[str, jnp.ndarray]]:
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

  freeze_mode: how the freeze is switched off on device. "cond": `lax.cond` between two scanned
  accumulations, one whose backward pass stops at the backbone and the full one (no backbone backward
  while frozen). "mask": always the full backward, the backbone's gradients zeroed while frozen. Same
  updates either way. "auto": "mask" when compiling for CPU, where XLA runs convolutions inside a
  conditional's branch about 20x slower than at top level (an unfrozen conv encoder,
  feature_grad_mult > 0, then takes seconds per step), "cond" for TPU and GPU (`backend.target()`).
  "always": the backbone never trains (a linear probe of its features: only the backward pass of the
  output layer is computed); `finetune_step_fn` picks it when freeze_updates covers every update.
  clip_norm, split: see `apply_gradients`.
  train_top_layers: the top transformer layers that train during the freeze too (the layers
    `config.reinit_layers` gave a random initialisation: nothing in them to protect), with the output
    layer; the rest of the backbone waits. Needs the backward pass through them, so it takes "mask".
  """
  if freeze_mode == "auto":
    freeze_mode = "mask" if backend.target() == "cpu" or train_top_layers else "cond"
  if train_top_layers and freeze_mode == "cond":
    raise ValueError("train_top_layers needs freeze_mode 'mask' (or 'auto'): 'cond' stops the backward pass "
                     "below the output layer")
  if freeze_mode not in ("cond", "mask", "always"):
    raise ValueError(f"freeze_mode must be 'auto', 'cond', 'mask' or 'always', got {freeze_mode!r}")
  num_micro = batch["audio"].shape[0]
  step_key = jax.random.fold_in(state["rng"], state["step"])
  device_key = jax.random.fold_in(step_key, jax.lax.axis_index(axis_name))
  updates_done = state["step"] - state["skipped"]
  utterances = jnp.maximum(jax.lax.psum(jnp.sum(batch["weight"]), axis_name), 1.0)
  micro_batches = {k: batch[k] for k in ("audio", "padding_mask", "labels", "label_padding", "weight")}
  micro_batches["index"] = jnp.arange(num_micro, dtype=jnp.int32)

  def grads_for(frozen: bool):
    loss_fn = functools.partial(objective.ctc_micro_loss, module=module, device_key=device_key,
                                utterances=utterances, blank_id=blank_id, frozen=frozen)
    return lambda params: accumulate(fsdp.gathered_loss(loss_fn, split, axis_name), params, micro_batches)

  if freeze_mode == "always":
    grads, aux = grads_for(True)(state["params"])
  elif freeze_updates > 0 and freeze_mode == "cond":
    grads, aux = jax.lax.cond(updates_done < freeze_updates, grads_for(True), grads_for(False), state["params"])
  else:
    grads, aux = grads_for(False)(state["params"])
    if freeze_updates > 0:
      frozen = updates_done < freeze_updates
      keep = top_layers_mask(grads["wav2vec2"], train_top_layers)
      grads = dict(grads, wav2vec2=jax.tree_util.tree_map(
          lambda g, k: jnp.where(frozen & ~k, jnp.zeros_like(g), g), grads["wav2vec2"], keep))
  grads = fsdp.reduce_gradients(grads, split, axis_name)
  new_state, update_stats = apply_gradients(state, grads, tx, clip_norm=clip_norm, split=split, axis_name=axis_name)
  sums = jax.lax.psum(aux, axis_name)
  metrics = {
      "loss": sums["loss_sum"] / utterances,
      "infinite_losses": sums["infinite"],
      "utterances": utterances,
      "frozen": ((updates_done < freeze_updates) | (freeze_mode == "always")).astype(jnp.float32),
      "lr": jnp.asarray(lr_schedule(updates_done), jnp.float32),
      "audio_samples": jax.lax.psum(jnp.sum(~batch["padding_mask"]).astype(jnp.float32), axis_name),
      **update_stats,
  }
  return new_state, metrics
