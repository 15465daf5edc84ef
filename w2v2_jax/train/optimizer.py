"""The optimiser of the recipe: Adam(0.9, 0.98) with decoupled weight decay, optional clipping."""
from __future__ import annotations

from typing import Any

import optax

from w2v2_jax.train import schedules


def make(cfg: Any, total_steps: int) -> optax.GradientTransformation:
  """Optax transformation from `cfg` (fields: b1, b2, eps, weight_decay, clip_norm and the schedule's).

  Weight decay is decoupled (AdamW: param -= lr * wd * param), on every parameter, as fairseq's Adam.
  clip_norm > 0 clips the global gradient norm first (the recipe does not clip: 0).
  Conv-encoder gradient scaling (feature_grad_mult) lives in the model, where fairseq puts it.
  """
  chain = []
  if float(cfg.clip_norm) > 0:
    chain.append(optax.clip_by_global_norm(float(cfg.clip_norm)))
  chain.append(optax.adamw(schedules.learning_rate(cfg, total_steps), b1=float(cfg.b1), b2=float(cfg.b2),
                           eps=float(cfg.eps), weight_decay=float(cfg.weight_decay)))
  return optax.chain(*chain)
