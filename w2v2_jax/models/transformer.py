"""Transformer context network: positional conv, post-LN (BASE) or pre-LN (LARGE LV-60k) layers, LayerDrop."""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from w2v2_jax.models.conv import grouped_conv
from w2v2_jax.models.feature_encoder import gelu

Array = jnp.ndarray


def _dense(features: int, dtype, name: str) -> nn.Dense:
  """Linear layer with BERT init (N(0, 0.02) weights, zero bias), as the reference initialises it."""
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=nn.initializers.normal(0.02),
                  name=name)


def _layer_norm(eps: float, dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


class PositionalConv(nn.Module):
  """Grouped Conv1d(D, D, kernel K, groups G, padding K//2) with weight norm over the kernel axis, then
  the extra last frame dropped for an even K ("same" length), then GELU.

  Weight norm as PyTorch's `weight_norm(conv, dim=2)`: weight[k] = g[k] * v[k] / ||v[k]||, the norm taken
  over both channel axes. Params: `weight_v` (K, D/G, D) (the PyTorch (D, D/G, K) tensor transposed),
  `weight_g` (K,), `bias` (D,). Init: v ~ N(0, sqrt(4 / (K * D))), g = ||v[k]||, bias 0.
  """
  kernel_size: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x (B, T, D) -> (B, T, D)."""
    dim, k = x.shape[-1], self.kernel_size
    std = math.sqrt(4.0 / (k * dim))
    v = self.param("weight_v", nn.initializers.normal(std), (k, dim // self.groups, dim), jnp.float32)
    g = self.param("weight_g", lambda _: jnp.sqrt(jnp.sum(v * v, axis=(1, 2))), )
    bias = self.param("bias", nn.initializers.zeros, (dim,), jnp.float32)
    norm = jnp.sqrt(jnp.sum(v * v, axis=(1, 2), keepdims=True))
    kernel = (g[:, None, None] * v / norm).astype(self.dtype)
    pad = k // 2
    y = grouped_conv(x.astype(self.dtype), kernel, self.groups, pad)
    y = y + bias.astype(self.dtype)
    if k % 2 == 0:
      y = y[:, :-1]
    return gelu(y)


class SelfAttention(nn.Module):
  """Multi-head self-attention with a key-padding mask; softmax in float32."""
  num_heads: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, padding_mask: Optional[Array], deterministic: bool) -> Array:
    """x (B, T, D), padding_mask (B, T) bool True = padding key -> (B, T, D)."""
    b, t, d = x.shape
    h = self.num_heads
    hd = d // h
    def heads(y):
      return y.reshape(b, t, h, hd)
    q = heads(_dense(d, self.dtype, "q_proj")(x)) * (hd ** -0.5)
    k = heads(_dense(d, self.dtype, "k_proj")(x))
    v = heads(_dense(d, self.dtype, "v_proj")(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    if padding_mask is not None:
      scores = jnp.where(padding_mask[:, None, None, :], jnp.finfo(jnp.float32).min, scores)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(self.dropout)(probs, deterministic=deterministic).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
    return _dense(d, self.dtype, "out_proj")(out)


class EncoderLayer(nn.Module):
  """One transformer block. Post-LN: x = LN(x + Attn(x)); x = LN(x + FFN(x)).
  Pre-LN: x = x + Attn(LN(x)); x = x + FFN(LN(x))."""
  num_heads: int
  ffn_dim: int
  dropout: float
  attention_dropout: float
  activation_dropout: float
  layer_norm_first: bool
  eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, padding_mask: Optional[Array], deterministic: bool) -> Array:
    d = x.shape[-1]
    attn = SelfAttention(self.num_heads, self.attention_dropout, self.dtype, name="self_attn")
    attn_norm = _layer_norm(self.eps, self.dtype, "self_attn_layer_norm")
    final_norm = _layer_norm(self.eps, self.dtype, "final_layer_norm")
    fc1 = _dense(self.ffn_dim, self.dtype, "fc1")
    fc2 = _dense(d, self.dtype, "fc2")
    drop = lambda y, p: nn.Dropout(p)(y, deterministic=deterministic)

    def ffn(y):
      y = drop(gelu(fc1(y)), self.activation_dropout)
      return drop(fc2(y), self.dropout)

    if self.layer_norm_first:
      x = x + drop(attn(attn_norm(x), padding_mask, deterministic), self.dropout)
      return x + ffn(final_norm(x))
    x = attn_norm(x + drop(attn(x, padding_mask, deterministic), self.dropout))
    return final_norm(x + ffn(x))


# model.remat -> what a layer keeps for its backward pass (None: everything, no recomputation).
REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class TransformerEncoder(nn.Module):
  """Positional conv + layers. Returns the last state and, optionally, every state as HF orders them:
  the input of each layer, then the final output (after the final LayerNorm in the pre-LN form)."""
  num_layers: int
  num_heads: int
  ffn_dim: int
  conv_pos: int = 128
  conv_pos_groups: int = 16
  dropout: float = 0.1
  attention_dropout: float = 0.1
  activation_dropout: float = 0.0
  layerdrop: float = 0.0
  layer_norm_first: bool = False
  eps: float = 1e-5
  dtype: Any = jnp.float32
  remat: str = "none"

  @nn.compact
  def __call__(self, x: Array, padding_mask: Optional[Array] = None, *, deterministic: bool = True,
               output_hidden_states: bool = False) -> Tuple[Array, Tuple[Array, ...]]:
    """x (B, T, D), padding_mask (B, T) bool True = padding -> ((B, T, D), hidden states)."""
    if padding_mask is not None:
      x = jnp.where(padding_mask[..., None], 0, x)
    x = x + PositionalConv(self.conv_pos, self.conv_pos_groups, self.dtype, name="pos_conv")(x)
    final_norm = _layer_norm(self.eps, self.dtype, "layer_norm")
    if not self.layer_norm_first:
      x = final_norm(x)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    hidden = []
    layer_cls = EncoderLayer
    if self.remat != "none":
      # Recompute the layer in the backward pass; `deterministic` (argument 3, counting self) is static.
      layer_cls = nn.remat(EncoderLayer, policy=REMAT[self.remat], static_argnums=(3,))
    for i in range(self.num_layers):
      if output_hidden_states:
        hidden.append(x)
      layer = layer_cls(self.num_heads, self.ffn_dim, self.dropout, self.attention_dropout,
                           self.activation_dropout, self.layer_norm_first, self.eps, self.dtype,
                           name=f"layers_{i}")
      if deterministic or self.layerdrop == 0.0 or self.is_initializing():
        x = layer(x, padding_mask, deterministic)
      else:
        # LayerDrop: a traced coin per layer (per device: the caller folds the device index into the rng),
        # and real control flow, so a skipped layer costs nothing and nothing recompiles.
        skip = jax.random.uniform(self.make_rng("layerdrop")) < self.layerdrop
        x = nn.cond(skip, lambda mdl, y: y, lambda mdl, y: mdl(y, padding_mask, False), layer, x)
    if self.layer_norm_first:
      x = final_norm(x)
    if output_hidden_states:
      hidden.append(x)
    return x, tuple(hidden)
