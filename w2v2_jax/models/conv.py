"""1-D convolutions with identical numerics on every backend and a fast path for XLA:CPU.

All convolutions are XLA's native ones, except one: XLA:CPU computes the weight gradient of a grouped
convolution many times slower than matmuls (measured here: the positional conv's weight gradient 2.0 s
vs 0.05 s for its forward pass), so on CPU that gradient is computed as chunked per-group matmuls.
(An im2col lowering of the strided conv-encoder convs was measured too and was slower end to end.)

In bfloat16 on CPU, the strided convs whose kernel spans one to two strides (the conv encoder's k=3, s=2
and k=2, s=2) run as matmuls over stride-folded frames on the CPU's bf16 kernels (`models/matmul.py`):
XLA:CPU has no bf16 convolution kernel and computes them in float32 (measured here, the BASE encoder's
second conv, 4 x 4 s: forward + backward 0.66 s vs 0.88 s).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from w2v2_jax import backend
from w2v2_jax.models.matmul import bf16_matmul

_DIMS = ("NWC", "WIO", "NWC")


def _on_cpu() -> bool:
  return backend.target() == "cpu"


def strided_conv(x: jnp.ndarray, kernel: jnp.ndarray, stride: int, out_dtype=None) -> jnp.ndarray:
  """VALID 1-D convolution. x (B, L, C_in), kernel (k, C_in, C_out) -> (B, (L - k) // s + 1, C_out).

  The result is in `out_dtype` (default: x's dtype). A float32 result of bf16 operands is their
  products accumulated in float32 and not rounded (on CPU only; elsewhere it is the bf16 result).
  """
  k = kernel.shape[0]
  out_dtype = x.dtype if out_dtype is None else out_dtype
  bf16 = x.dtype == kernel.dtype == jnp.bfloat16
  if _on_cpu() and bf16 and 2 <= stride <= k <= 2 * stride and x.shape[1] >= k:
    return _folded_conv(x, kernel, stride, out_dtype)
  if _on_cpu() and bf16 and out_dtype == jnp.float32:
    # XLA:CPU computes a bf16 convolution as this one anyway (float32 products of the bf16 values).
    x, kernel = x.astype(jnp.float32), kernel.astype(jnp.float32)
  y = jax.lax.conv_general_dilated(x, kernel, (stride,), "VALID", dimension_numbers=_DIMS)
  return y.astype(out_dtype)


def _folded_conv(x, kernel, stride, out_dtype):
  """The same convolution for stride <= k <= 2 * stride as matmuls: with frames folded in blocks of
  `stride` samples, output t = block t @ kernel[:stride] + (the first k - stride samples of block t + 1)
  @ kernel[stride:]."""
  b, length, c = x.shape
  k, s = kernel.shape[0], stride
  t = (length - k) // s + 1
  blocks = t + (1 if k > s else 0)
  x = x[:, :blocks * s] if length >= blocks * s else jnp.pad(x, ((0, 0), (0, blocks * s - length), (0, 0)))
  folded = x.reshape(b, blocks, s * c)
  y = bf16_matmul(folded[:, :t], kernel[:s].reshape(s * c, -1), jnp.float32)
  if k > s:
    y = y + bf16_matmul(folded[:, 1:t + 1, :(k - s) * c], kernel[s:].reshape((k - s) * c, -1), jnp.float32)
  return y.astype(out_dtype)           # the two partial sums added in float32, rounded once if bf16


def grouped_conv(x: jnp.ndarray, kernel: jnp.ndarray, groups: int, padding: int) -> jnp.ndarray:
  """Stride-1 grouped 1-D convolution, zero padding on both sides.

  x (B, T, C), kernel (K, C / groups, C_out) as XLA's WIO layout -> (B, T + 2 * padding - K + 1, C_out).
  """
  if not _on_cpu():
    return _lax_grouped(x, kernel, groups, padding)
  return _cpu_grouped(x, kernel, groups, padding)


def _lax_grouped(x, kernel, groups, padding):
  return jax.lax.conv_general_dilated(x, kernel, (1,), [(padding, padding)], dimension_numbers=_DIMS,
                                      feature_group_count=groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _cpu_grouped(x, kernel, groups, padding):
  return _lax_grouped(x, kernel, groups, padding)


def _cpu_grouped_fwd(x, kernel, groups, padding):
  return _lax_grouped(x, kernel, groups, padding), (x, kernel)


def _cpu_grouped_bwd(groups, padding, residuals, dy):
  x, kernel = residuals
  # Input gradient: XLA's transposed convolution is fast on CPU.
  _, input_vjp = jax.vjp(lambda x_: _lax_grouped(x_, kernel, groups, padding), x)
  (dx,) = input_vjp(dy)
  # Weight gradient: dW[k, i, g, o] = sum_{b,t} xpad[b, t + k, g, i] * dy[b, t, g, o], as per-group matmuls
  # over chunks of taps (bounded memory: B * T * chunk * C floats at a time).
  k_size, c_in_g, c_out = kernel.shape
  b, t_out, _ = dy.shape
  o_g = c_out // groups
  xpad = jnp.pad(x, ((0, 0), (padding, padding), (0, 0))).astype(jnp.float32)
  dy_g = dy.astype(jnp.float32).reshape(b, t_out, groups, o_g)
  chunk = next(c for c in (16, 8, 4, 2, 1) if k_size % c == 0)

  def one_chunk(start):
    window = jax.lax.dynamic_slice_in_dim(xpad, start, t_out + chunk - 1, axis=1)
    patches = jnp.stack([jax.lax.slice_in_dim(window, i, i + t_out, axis=1) for i in range(chunk)], axis=2)
    patches = patches.reshape(b, t_out, chunk, groups, c_in_g)
    return jnp.einsum("btcgi,btgo->cigo", patches, dy_g)

  dw = jax.lax.map(one_chunk, jnp.arange(0, k_size, chunk))          # (K / chunk, chunk, I, G, O_g)
  dw = dw.reshape(k_size, c_in_g, c_out).astype(kernel.dtype)
  return dx, dw


_cpu_grouped.defvjp(_cpu_grouped_fwd, _cpu_grouped_bwd)
