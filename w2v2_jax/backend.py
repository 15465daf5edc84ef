"""The platform the code is being compiled for, which is not always the one it runs on.

A few functions pick a formulation per platform (`models/conv.py`: the grouped conv's weight
gradient on CPU; `train/step.py`: the fine-tuning freeze). Ahead-of-time compilation for a TPU slice
runs on a CPU host (`w2v2 compile-check`), where `jax.default_backend()` says "cpu": it compiles
inside `compiling_for("tpu")` so the step takes the TPU's formulation.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import jax
import jax.numpy as jnp

_TARGET = threading.local()
PLATFORMS = ("cpu", "gpu", "tpu")


def target() -> str:
  """The platform being compiled for: the innermost `compiling_for`, else JAX's default backend."""
  return getattr(_TARGET, "platform", None) or jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
  """Trace and compile for `platform` ("cpu", "gpu" or "tpu") inside this block."""
  if platform not in PLATFORMS:
    raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
  previous = getattr(_TARGET, "platform", None)
  _TARGET.platform = platform
  try:
    yield
  finally:
    _TARGET.platform = previous


def elementwise_dtype(dtype):
  """The dtype for a model's elementwise work (norms, activations) when its matmuls run in `dtype`.

  On CPU a bfloat16 model keeps these in float32: XLA:CPU has no bf16 arithmetic and emulates each bf16
  elementwise op as float32 plus a rounding, which made the conv encoder's GELU and GroupNorm backward
  the largest ops of a bf16 training step. Elsewhere (TPU, GPU) it is `dtype`.
  """
  if target() == "cpu" and jnp.dtype(dtype) == jnp.bfloat16:
    return jnp.float32
  return dtype
