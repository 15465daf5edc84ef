"""Conv feature encoder: raw 16 kHz audio (B, L) -> frames (B, T, C), 20 ms hop for the default stack."""
from __future__ import annotations

from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from w2v2_jax import backend
from w2v2_jax.models.conv import strided_conv


def output_lengths(lengths, conv_layers: Sequence[Tuple[int, int, int]]):
  """Frames produced from `lengths` samples: floor((L - k) / s) + 1 per layer (works on ints and arrays)."""
  for _, k, s in conv_layers:
    lengths = (lengths - k) // s + 1
  return lengths


def frame_padding_mask(padding_mask: jnp.ndarray, num_frames: int,
                       conv_layers: Sequence[Tuple[int, int, int]]) -> jnp.ndarray:
  """Sample-level padding (B, L) bool, True = padding -> frame-level padding (B, T) bool.

  A frame is valid when it lies within the conv output of the utterance's unpadded length.
  """
  lengths = jnp.sum(~padding_mask, axis=-1).astype(jnp.int32)
  frames = jnp.maximum(output_lengths(lengths, conv_layers), 0)
  return jnp.arange(num_frames)[None, :] >= frames[:, None]


def gelu(x):
  """Exact (erf) GELU, as in the reference implementations."""
  return jax.nn.gelu(x, approximate=False)


class Conv1D(nn.Module):
  """VALID strided 1-D convolution; kernel (k, C_in, C_out) as PyTorch's (C_out, C_in, k) transposed.

  A single-channel input whose kernel is a multiple of the stride (the first layer of the default stack)
  is folded into `stride` channels first, an identical computation that XLA runs much faster.
  """
  features: int
  kernel_size: int
  stride: int
  use_bias: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    k, s = self.kernel_size, self.stride
    c_in = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.kaiming_normal(), (k, c_in, self.features), jnp.float32)
    kernel = kernel.astype(self.dtype)
    x = x.astype(self.dtype)
    out_dtype = backend.elementwise_dtype(self.dtype)
    if c_in == 1 and k % s == 0 and s > 1:
      frames = x.shape[1] // s
      x = x[:, :frames * s, 0].reshape(x.shape[0], frames, s)
      kernel = kernel.reshape(k // s, s, self.features)
      stride = 1
    else:
      stride = s
    y = strided_conv(x, kernel, stride, out_dtype)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(out_dtype)
    return y


class FeatureEncoder(nn.Module):
  """The wav2vec 2.0 conv stack.

  extractor_mode "default": no conv bias, GroupNorm(C groups) after the first conv only, normalising each
  channel over all frames (padding included, like the reference). "layer_norm": LayerNorm over channels
  after every conv. GELU after every layer.
  """
  conv_layers: Sequence[Tuple[int, int, int]]
  extractor_mode: str = "default"
  conv_bias: bool = False
  eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, audio: jnp.ndarray) -> jnp.ndarray:
    """audio (B, L) float -> features (B, T, C_last)."""
    x = audio[..., None]
    act_dtype = backend.elementwise_dtype(self.dtype)
    for i, (dim, k, s) in enumerate(self.conv_layers):
      x = Conv1D(dim, k, s, self.conv_bias, self.dtype, name=f"conv_{i}")(x)
      if self.extractor_mode == "layer_norm":
        x = nn.LayerNorm(epsilon=self.eps, use_fast_variance=False, dtype=act_dtype, name=f"norm_{i}")(x)
      elif i == 0:
        x = nn.GroupNorm(num_groups=dim, epsilon=self.eps, use_fast_variance=False, dtype=act_dtype,
                         name="norm_0")(x)
      x = gelu(x)
    return x.astype(self.dtype)


def receptive_field(conv_layers: Sequence[Tuple[int, int, int]]) -> int:
  field, jump = 1, 1
  for _, k, s in conv_layers:
    field += (k - 1) * jump
    jump *= s
  return field


def check_audio(audio: Any, padding_mask: Any, conv_layers: Sequence[Tuple[int, int, int]]) -> None:
  """Raise ValueError for audio the model cannot take, before anything is compiled.

  Shapes are checked always; finiteness only when the values are concrete (not under jit tracing).
  """
  shape = np.shape(audio)
  if len(shape) != 2:
    raise ValueError(f"audio must be 2-D (batch, samples), got shape {shape}")
  field = receptive_field(conv_layers)
  if shape[1] < field:
    raise ValueError(f"audio has {shape[1]} samples, fewer than the conv receptive field of {field} samples")
  if padding_mask is not None and np.shape(padding_mask) != shape:
    raise ValueError(f"padding_mask shape {np.shape(padding_mask)} does not match audio shape {shape}")
  if not isinstance(audio, jax.core.Tracer):
    values = np.asarray(audio)
    if not np.issubdtype(values.dtype, np.floating):
      raise ValueError(f"audio must be floating point, got dtype {values.dtype}")
    if not np.all(np.isfinite(values)):
      bad = int(np.sum(~np.isfinite(values)))
      rows = sorted(set(np.nonzero(~np.isfinite(values))[0].tolist()))
      raise ValueError(f"audio has {bad} non-finite samples (NaN/Inf) in batch row(s) {rows}")
