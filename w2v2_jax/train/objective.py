"""The per-device pretraining objective: model forward, negatives, losses, as sums over the local batch.

Knows nothing of files, devices or optimisers: a data-parallel caller `psum`s the returned sums and
divides the total (and its gradient) by the global `sample_size`.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from w2v2_jax import losses, masking
from w2v2_jax.models.config import ModelConfig

RNG_STREAMS = ("mask", "dropout", "gumbel", "layerdrop", "negatives")


def split_rngs(rng: jax.Array) -> Dict[str, jax.Array]:
  """One independent key per random stream of the pretraining forward pass."""
  return dict(zip(RNG_STREAMS, jax.random.split(rng, len(RNG_STREAMS))))


def pretrain_sums(module: Any, params: Any, audio: jnp.ndarray, padding_mask: Optional[jnp.ndarray],
                  rng: jax.Array, temperature: Any, *, deterministic: bool = False
                  ) -> Tuple[Dict[str, jnp.ndarray], Dict[str, jnp.ndarray]]:
  """Loss sums and logging statistics of wav2vec 2.0 pretraining on one device's batch.

  audio (B, L) float32, padding_mask (B, L) bool or None, temperature: the Gumbel temperature (scalar).
  Returns (sums, stats): sums as `losses.pretrain_loss` (total, contrastive, diversity, feature_pen,
  sample_size, correct, count); stats: prob_perplexity, code_perplexity, features_pen, masked_frames,
  valid_frames (float32 scalars).
  """
  cfg: ModelConfig = module.config
  rngs = split_rngs(rng)
  out = module.apply({"params": params}, audio, padding_mask, temperature=temperature,
                     deterministic=deterministic, rngs={k: rngs[k] for k in RNG_STREAMS[:4]})
  mask = out["mask_time"]
  negatives = masking.sample_negatives(rngs["negatives"], mask, cfg.num_negatives, cfg.cross_sample_negatives)
  con = losses.contrastive(out["context"], out["targets"], out["codes"], mask, negatives, cfg.logit_temp,
                           cross_sample=cfg.cross_sample_negatives > 0)
  features_pen = losses.feature_penalty(out["features"], out["frame_padding_mask"])
  sums = losses.pretrain_loss(con, out["prob_perplexity"], features_pen, cfg.num_codevectors,
                              cfg.diversity_weight, cfg.feature_pen_weight)
  stats = {
      "prob_perplexity": out["prob_perplexity"],
      "code_perplexity": out["code_perplexity"],
      "features_pen": features_pen,
      "masked_frames": jnp.sum(mask).astype(jnp.float32),
      "valid_frames": jnp.sum(~out["frame_padding_mask"]).astype(jnp.float32),
  }
  return sums, stats
