"""Learning-rate and Gumbel-temperature schedules (functions of the update count, jittable)."""
from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import optax


def learning_rate(cfg: Any, total_steps: int) -> optax.Schedule:
  """The recipe's schedules. `cfg` fields: lr, schedule, and per schedule:

  - "polynomial" (pretraining): linear warmup from 0 over `warmup_steps`, then polynomial decay with
    `power` (1.0 = linear, fairseq's polynomial_decay) to `end_lr` at `total_steps`.
  - "tri_stage" (fine-tuning): warmup from `init_lr_scale * lr` over `warmup_fraction` of the updates,
    hold for `hold_fraction`, then exponential decay to `final_lr_scale * lr` over the rest.
  - "constant".
  """
  lr = float(cfg.lr)
  if cfg.schedule == "constant":
    return optax.constant_schedule(lr)
  if cfg.schedule == "polynomial":
    warmup = int(cfg.warmup_steps)
    return optax.join_schedules([
        optax.linear_schedule(0.0, lr, max(warmup, 1)),
        optax.polynomial_schedule(lr, float(cfg.end_lr), float(cfg.power), max(total_steps - warmup, 1)),
    ], [warmup])
  if cfg.schedule == "tri_stage":
    warmup = int(round(total_steps * float(cfg.warmup_fraction)))
    hold = int(round(total_steps * float(cfg.hold_fraction)))
    decay = max(total_steps - warmup - hold, 1)
    final = lr * float(cfg.final_lr_scale)
    return optax.join_schedules([
        optax.linear_schedule(lr * float(cfg.init_lr_scale), lr, max(warmup, 1)),
        optax.constant_schedule(lr),
        lambda step: lr * jnp.exp(jnp.log(final / lr) * jnp.minimum(step, decay) / decay),
    ], [warmup, warmup + hold])
  raise ValueError(f"optim.schedule={cfg.schedule!r}: choose 'polynomial', 'tri_stage' or 'constant'")


def gumbel_temperature(step, max_temp: float, min_temp: float, decay: float):
  """max(max_temp * decay ** step, min_temp): the quantizer's temperature at update `step` (traced)."""
  # decay ** step as exp(step * log(decay)) with the log taken in float64 on the host: float32 cannot
  # hold 0.999995 closely enough for its 100000th power (0.07% off).
  step = jnp.asarray(step, jnp.float32)
  return jnp.maximum(max_temp * jnp.exp(step * math.log(decay)), min_temp)
