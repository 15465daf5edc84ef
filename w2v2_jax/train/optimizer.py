"""The optimiser of the recipe: Adam(0.9, 0.98) with decoupled weight decay."""
from __future__ import annotations

from typing import Any

import optax

from w2v2_jax.train import schedules


def make(cfg: Any, total_steps: int) -> optax.GradientTransformation:
  """Optax transformation from `cfg` (fields: b1, b2, eps, weight_decay and the schedule's).

  Weight decay is decoupled (AdamW: param -= lr * wd * param), on every parameter, as fairseq's Adam.
  cfg.clip_norm (the global gradient norm's clipping; the recipe does not clip: 0) is applied by the
  train step (`step.apply_gradients`), which knows the global norm when the gradients are sharded.
  Conv-encoder gradient scaling (feature_grad_mult) lives in the model, where fairseq puts it.
  """
  return optax.chain(optax.adamw(schedules.learning_rate(cfg, total_steps), b1=float(cfg.b1), b2=float(cfg.b2),
                                 eps=float(cfg.eps), weight_decay=float(cfg.weight_decay)))
