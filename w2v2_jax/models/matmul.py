"""Dense-layer matmuls in bfloat16 that XLA:CPU runs on the CPU's bf16 units.

In a bf16 model (`model.dtype=bfloat16`) each Dense layer multiplies bf16 activations by bf16-cast
weights. TPUs and GPUs do that natively (bf16 inputs, float32 accumulation, a bf16 result). XLA:CPU
(jax 0.10) runs a bf16 x bf16 -> bf16 dot by converting both operands to float32 first, no faster than
a float32 model. Asked for a float32 result (`preferred_element_type`), it hands the dot to its
XNNPACK/YNNPACK kernels, which use the CPU's bf16 dot-product instructions (AVX512-BF16, AMX): measured
here, (796, 768) x (768, 3072) took 9.3 ms against 18.4 ms in float32. It does that only for a plain
(M, K) x (K, N) layout of operands already in memory; a dot whose operand is a transpose (as a weight
gradient's is) falls back to the float32 conversion.

`dot_general` below is a drop-in for `nn.Dense(dot_general=...)` (`dense` builds the model's layers with
it). Off CPU, for float32 operands or with an explicit precision, it is `lax.dot_general`. On CPU with
bf16 operands it computes the same products (bf16 inputs, float32 accumulation, rounded to bf16) in forms
the fast kernels take, forward and backward:
  y  = x @ W                 (M, K) x (K, N)
  dx = dy @ W^T              contracting both operands' last axis, also a fast form
  dW = x^T @ dy              over the M = rows axis; x^T and dy are first copied with their rows in
                             another order (rows (b, t) as (t, b)), a real copy XLA cannot fold back
                             into the dot as a transposed layout. The sum over rows is unchanged.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from w2v2_jax import backend

_F32 = jnp.float32


def dense(features: int, dtype, kernel_init, name: str) -> nn.Dense:
  """The model's linear layer: float32 params, compute in `dtype`, matmuls through `dot_general` below."""
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init,
                  dot_general=dot_general, name=name)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
  """`lax.dot_general`, with the fast CPU path for a bf16 Dense layer: lhs (..., K) x rhs (K, N)."""
  (lc, rc), (lb, rb) = dimension_numbers
  dense_form = tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb and not rb and rhs.ndim == 2
  if (backend.target() != "cpu" or not dense_form or lhs.dtype != jnp.bfloat16 or rhs.dtype != jnp.bfloat16
      or precision is not None or preferred_element_type not in (None, jnp.bfloat16) or kwargs):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)
  return bf16_matmul(lhs, rhs)


def _mm(a, b, contract):
  return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=_F32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def bf16_matmul(x, w, out_dtype=jnp.bfloat16):
  """x (..., K) bf16, w (K, N) bf16 -> (..., N) in `out_dtype`, accumulated in float32 (a float32 result
  lets a caller add partial products before rounding once)."""
  return _mm(x, w, ((x.ndim - 1,), (0,))).astype(out_dtype)


def _fwd(x, w, out_dtype):
  return bf16_matmul(x, w, out_dtype), (x, w)


def _row_split(m: int) -> int:
  """A factor a of m with 1 < a < m (the rows (a, m / a) are reordered to (m / a, a)), or 1 if m is prime."""
  for a in (4, 8, 2, 16, 3, 5, 6, 7):
    if m % a == 0 and m > a:
      return a
  return next((a for a in range(2, int(m ** 0.5) + 1) if m % a == 0), 1)


def _rows_reordered(a2d, split: int):
  """(M, C) -> (M, C) with row i * (M / split) + j moved to j * split + i: a physical copy."""
  m, c = a2d.shape
  return jnp.swapaxes(a2d.reshape(split, m // split, c), 0, 1).reshape(m, c)


def _bwd(out_dtype, res, dy):  # pylint: disable=unused-argument
  x, w = res
  dy = dy.astype(jnp.bfloat16)
  dx = _mm(dy, w, ((dy.ndim - 1,), (1,))).astype(x.dtype)
  x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  split = _row_split(x2.shape[0])
  if split > 1:
    # x^T as its own (K, M) array in memory, built so that the copy cannot be a transposed layout.
    xt = jnp.swapaxes(x2.reshape(split, -1, x2.shape[1]), 0, 2).reshape(x2.shape[1], -1)
    dw = _mm(xt, _rows_reordered(dy2, split), ((1,), (0,)))
  else:
    dw = _mm(x2, dy2, ((0,), (0,)))
  return dx, dw.astype(w.dtype)


bf16_matmul.defvjp(_fwd, _bwd)

