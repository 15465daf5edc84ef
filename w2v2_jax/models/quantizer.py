"""Gumbel product quantizer: G groups x V codewords, hard straight-through Gumbel-softmax in training."""
from __future__ import annotations

from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jnp.ndarray


def perplexity(probs: Array, weights: Array) -> Array:
  """Sum over groups of exp(entropy) of the weighted average distribution.

  probs (B, T, G, V) float32, weights (B, T) float (1 for frames that count) -> scalar in [G, G*V].
  """
  w = weights.astype(jnp.float32)[..., None, None]
  avg = jnp.sum(probs * w, axis=(0, 1)) / jnp.maximum(jnp.sum(w), 1.0)            # (G, V)
  return jnp.sum(jnp.exp(-jnp.sum(avg * jnp.log(avg + 1e-7), axis=-1)))


class GumbelQuantizer(nn.Module):
  """Product quantizer over the (unprojected) conv features.

  Params: `weight_proj` Dense(C -> G*V) (kernel N(0, 1), bias 0) and `vars` (G*V, dim/G) codewords,
  uniform [0, 1). Training: codes = argmax((logits + Gumbel noise) / tau) with the straight-through
  estimator of the Gumbel-softmax (one-hot forward, soft gradient); evaluation: argmax of the logits.
  The temperature `tau` is an input (a traced scalar), so its schedule never recompiles anything.
  Codewords are looked up with a one-hot matmul (the one-hot is needed for the gradient anyway).
  """
  num_groups: int
  num_vars: int
  dim: int                        # total codebook dim; each group contributes dim / num_groups
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, weights: Optional[Array] = None, *, temperature: Any = 2.0,
               deterministic: bool = True) -> Dict[str, Array]:
    """x (B, T, C); weights (B, T) frames counted in the perplexities (default: all).

    Returns `quantized` (B, T, dim), `codes` (B, T, G) int32, `prob_perplexity` (from the noise-free
    softmax, averaged over counted frames; the diversity loss uses it), `code_perplexity` (from hard
    noise-free argmax counts, for logging; HF's eval-mode "codevector_perplexity").
    """
    b, t, _ = x.shape
    g, v = self.num_groups, self.num_vars
    logits = nn.Dense(g * v, dtype=self.dtype, param_dtype=jnp.float32,
                      kernel_init=nn.initializers.normal(1.0), name="weight_proj")(x)
    logits = logits.astype(jnp.float32).reshape(b, t, g, v)
    codebook = self.param("vars", nn.initializers.uniform(1.0), (g * v, self.dim // g), jnp.float32)
    codebook = codebook.reshape(g, v, self.dim // g)
    if weights is None:
      weights = jnp.ones((b, t), jnp.float32)

    hard_codes = jnp.argmax(logits, axis=-1)
    out = {
        "prob_perplexity": perplexity(jax.nn.softmax(logits, axis=-1), weights),
        "code_perplexity": perplexity(jax.nn.one_hot(hard_codes, v, dtype=jnp.float32), weights),
    }
    if deterministic:
      codes = hard_codes
      quantized = jax.vmap(lambda cb, c: cb[c], in_axes=(0, 2), out_axes=2)(codebook, codes)  # (B,T,G,d)
    else:
      noise = jax.random.gumbel(self.make_rng("gumbel"), logits.shape, jnp.float32)
      soft = jax.nn.softmax((logits + noise) / jnp.asarray(temperature, jnp.float32), axis=-1)
      codes = jnp.argmax(soft, axis=-1)
      hard = jax.nn.one_hot(codes, v, dtype=jnp.float32)
      probs = hard + soft - jax.lax.stop_gradient(soft)            # straight-through
      quantized = jnp.einsum("btgv,gvd->btgd", probs.astype(self.dtype), codebook.astype(self.dtype))
    out["quantized"] = quantized.reshape(b, t, self.dim)
    out["codes"] = codes.astype(jnp.int32)
    return out
