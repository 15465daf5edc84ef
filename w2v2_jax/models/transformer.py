"""Transformer context network: positional conv, post-LN (BASE) or pre-LN (LARGE LV-60k) layers, LayerDrop."""
from __future__ import annotations

import contextlib
import math
import re
from typing import Any, Callable, Iterator, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from w2v2_jax import backend
from w2v2_jax.models import matmul
from w2v2_jax.models.conv import grouped_conv
from w2v2_jax.models.feature_encoder import gelu

Array = jnp.ndarray


def _dense(features: int, dtype, name: str) -> nn.Dense:
  """Linear layer with BERT init (N(0, 0.02) weights, zero bias), as the reference initialises it."""
  return matmul.dense(features, dtype, nn.initializers.normal(0.02), name)


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
    # A bf16 model on CPU convolves the bf16 values in float32 (what XLA:CPU does for a bf16 convolution
    # anyway) and keeps the result unrounded for the GELU (backend.elementwise_dtype).
    act = backend.elementwise_dtype(self.dtype)
    y = grouped_conv(x.astype(self.dtype).astype(act), kernel.astype(act), self.groups, pad)
    y = y + bias.astype(act)
    if k % 2 == 0:
      y = y[:, :-1]
    return gelu(y).astype(self.dtype)


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
    # The attention core's dtype: the model's, except float32 for a bf16 model on CPU (see
    # backend.elementwise_dtype; XLA:CPU computes these batched dots in float32 either way).
    core = backend.elementwise_dtype(self.dtype)
    q = heads(_dense(d, self.dtype, "q_proj")(x)).astype(core) * (hd ** -0.5)
    k = heads(_dense(d, self.dtype, "k_proj")(x)).astype(core)
    v = heads(_dense(d, self.dtype, "v_proj")(x)).astype(core)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    if padding_mask is not None:
      scores = jnp.where(padding_mask[:, None, None, :], jnp.finfo(jnp.float32).min, scores)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(self.dropout)(probs, deterministic=deterministic).astype(core)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
    return _dense(d, self.dtype, "out_proj")(out.astype(self.dtype))


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
      y = drop(gelu(fc1(y).astype(backend.elementwise_dtype(self.dtype))), self.activation_dropout)
      return drop(fc2(y), self.dropout)

    if self.layer_norm_first:
      x = x + drop(attn(attn_norm(x), padding_mask, deterministic), self.dropout)
      return x + ffn(final_norm(x))
    x = attn_norm(x + drop(attn(x, padding_mask, deterministic), self.dropout))
    return final_norm(x + ffn(x))


class _ScannedLayer(nn.Module):
  """The body of the scanned encoder: one EncoderLayer (remat'd per the config) with LayerDrop.

  Carry: x (B, T, D); broadcast: padding_mask. Emits the layer's input (a hidden state) when asked."""
  layer_args: Tuple[Any, ...]
  remat: str
  layerdrop: float
  deterministic: bool
  emit_inputs: bool

  @nn.compact
  def __call__(self, x: Array, padding_mask: Optional[Array]) -> Tuple[Array, Optional[Array]]:
    hook = _LAYER_PARAMS_HOOKS[-1] if _LAYER_PARAMS_HOOKS and not self.is_initializing() else None
    layer = _layer_class(self.remat, hook)(*self.layer_args, name="layer")
    # With a params hook (the per-layer all-gather of the sharded state), the layer runs on every device
    # whatever its coin: a collective must not sit in a branch some devices skip.
    y = _apply_with_layerdrop(self, layer, x, padding_mask, self.deterministic, self.layerdrop,
                              always_run=hook is not None)
    return y, (x if self.emit_inputs else None)


def _apply_with_layerdrop(parent: nn.Module, layer: nn.Module, x: Array, padding_mask: Optional[Array],
                          deterministic: bool, layerdrop: float, always_run: bool = False) -> Array:
  """`layer(x)`, skipped with probability `layerdrop` in training: a traced coin from `parent`'s
  'layerdrop' rng (per device: the caller folds the device index into it) and real control flow, so a
  skipped layer costs nothing and nothing recompiles. always_run: compute the layer and select its input
  when skipped (same result and gradients; for layers whose params go through collectives)."""
  if deterministic or layerdrop == 0.0 or parent.is_initializing():
    return layer(x, padding_mask, deterministic)
  skip = jax.random.uniform(parent.make_rng("layerdrop")) < layerdrop
  if always_run:
    return jnp.where(skip, x, layer(x, padding_mask, False))
  return nn.cond(skip, lambda mdl, y: y, lambda mdl, y: mdl(y, padding_mask, False), layer, x)


# Functions the scanned layers' params pass through inside the scan body (innermost last); see
# `layer_params_hook`.
_LAYER_PARAMS_HOOKS: List[Callable[[Any], Any]] = []


@contextlib.contextmanager
def layer_params_hook(fn: Callable[[Any], Any]) -> Iterator[None]:
  """While tracing inside this context, each scanned layer (model.scan_layers) applies `fn` to its own
  params ({"params": one layer's tree}) inside the scan body and inside remat, before using them. The
  sharded-state step (train/fsdp.py) passes a per-layer all-gather: one layer's weights are whole at a
  time, and in the backward pass each layer's gradient is reduce-scattered as soon as it is computed."""
  _LAYER_PARAMS_HOOKS.append(fn)
  try:
    yield
  finally:
    _LAYER_PARAMS_HOOKS.pop()


def _layer_class(remat: str, params_hook: Optional[Callable[[Any], Any]] = None):
  """EncoderLayer, or EncoderLayer recomputed in the backward pass per `remat` ("none", "full", "dots");
  with `params_hook`, its params go through the hook first (inside the recomputed function)."""
  cls = EncoderLayer
  if params_hook is not None:
    cls = nn.map_variables(EncoderLayer, "params", trans_in_fn=params_hook, mutable=False)
  if remat == "none":
    return cls
  # `deterministic` (argument 3, counting self) is static.
  return nn.remat(cls, policy=REMAT[remat], static_argnums=(3,))


def stack_layers(params: Any) -> Any:
  """Params with per-layer subtrees `layers_0 .. layers_{L-1}` -> the scanned layout `layers/layer`
  (every leaf stacked on a leading L axis). Applied wherever such a subtree occurs; other params as they are."""
  if not isinstance(params, dict):
    return params
  names = [k for k in params if re.fullmatch(r"layers_\d+", k)]
  out = {k: stack_layers(v) for k, v in params.items() if k not in names}
  if names:
    if "layers" in params:
      raise ValueError("params hold both per-layer (layers_N) and stacked (layers) encoder layers")
    per_layer = [params[f"layers_{i}"] for i in range(len(names))]
    out["layers"] = {"layer": jax.tree_util.tree_map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]),
                                                     *per_layer)}
  return out


def unstack_layers(params: Any) -> Any:
  """The inverse of `stack_layers`: `layers/layer` (leading L axis) -> `layers_0 .. layers_{L-1}`."""
  if not isinstance(params, dict):
    return params
  out = {k: unstack_layers(v) for k, v in params.items() if k != "layers"}
  if "layers" in params:
    stacked = params["layers"]["layer"]
    count = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    for i in range(count):
      out[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
  return out


def layer_layout(params: Any, scan_layers: bool) -> Any:
  """`params` in the layout of a model with `scan_layers` (stacked or per layer), whichever it is in."""
  return stack_layers(params) if scan_layers else unstack_layers(params)


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
  scan_layers: bool = False

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
    layer_args = (self.num_heads, self.ffn_dim, self.dropout, self.attention_dropout, self.activation_dropout,
                  self.layer_norm_first, self.eps, self.dtype)
    if self.scan_layers:
      # One layer's program, run L times by lax.scan over parameters stacked on a leading L axis
      # (`layers/layer`; `stack_layers` / `unstack_layers` convert): compile time does not grow with L.
      scanned = nn.scan(_ScannedLayer, variable_axes={"params": 0},
                        split_rngs={"params": True, "dropout": True, "layerdrop": True},
                        in_axes=(nn.broadcast,), length=self.num_layers)
      x, inputs = scanned(layer_args, self.remat, self.layerdrop, deterministic, output_hidden_states,
                          name="layers")(x, padding_mask)
      if output_hidden_states:
        hidden = [inputs[i] for i in range(self.num_layers)]
    else:
      for i in range(self.num_layers):
        if output_hidden_states:
          hidden.append(x)
        layer = _layer_class(self.remat)(*layer_args, name=f"layers_{i}")
        x = _apply_with_layerdrop(self, layer, x, padding_mask, deterministic, self.layerdrop)
    if self.layer_norm_first:
      x = final_norm(x)
    if output_hidden_states:
      hidden.append(x)
    return x, tuple(hidden)
