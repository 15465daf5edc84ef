"""Gumbel product quantizer: G groups x V codewords, hard straight-through Gumbel-softmax in training."""
from __future__ import annotations

from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from w2v2_jax.models import matmul

Array = jnp.ndarray


def weighted_sums(probs: Array, weights: Array) -> Array:
  """probs (B, T, G, V) float32, weights (B, T) -> (G, V) sum over frames of probs * weight."""
  return jnp.einsum("btgv,bt->gv", probs, weights.astype(jnp.float32))


def perplexity_from_sums(sums: Array, total: Array) -> Array:
  """Sum over groups of exp(entropy) of the average distribution sums / total, (G, V) -> scalar.

  Splitting perplexity into sums and a final step lets a data-parallel caller psum the (G, V) sums
  over devices and get the perplexity of the global batch.
  """
  avg = sums / jnp.maximum(total, 1.0)
  return jnp.sum(jnp.exp(-jnp.sum(avg * jnp.log(avg + 1e-7), axis=-1)))


def perplexity(probs: Array, weights: Array) -> Array:
  """Sum over groups of exp(entropy) of the weighted average distribution.

  probs (B, T, G, V) float32, weights (B, T) float (1 for frames that count) -> scalar in [G, G*V].
  """
  return perplexity_from_sums(weighted_sums(probs, weights), jnp.sum(weights.astype(jnp.float32)))


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
               deterministic: bool = True, row_ids: Optional[Array] = None) -> Dict[str, Array]:
    """x (B, T, C); weights (B, T) frames counted in the perplexities (default: all).

    row_ids (B,) int: when given, row b's Gumbel noise is drawn from fold_in(key, row_ids[b]), so it
    does not depend on which device or batch position the row lands on.

    Returns `quantized` (B, T, dim), `codes` (B, T, G) int32, `prob_perplexity` (from the noise-free
    softmax, averaged over counted frames; the diversity loss uses it), `code_perplexity` (from hard
    noise-free argmax counts, for logging; HF's eval-mode "codevector_perplexity"), and their
    ingredients `prob_sums`, `code_counts` (G, V) and `weight_sum` for a cross-device perplexity.
    """
    b, t, _ = x.shape
    g, v = self.num_groups, self.num_vars
    logits = matmul.dense(g * v, self.dtype, nn.initializers.normal(1.0), "weight_proj")(x)
    logits = logits.astype(jnp.float32).reshape(b, t, g, v)
    codebook = self.param("vars", nn.initializers.uniform(1.0), (g * v, self.dim // g), jnp.float32)
    codebook = codebook.reshape(g, v, self.dim // g)
    if weights is None:
      weights = jnp.ones((b, t), jnp.float32)

    hard_codes = jnp.argmax(logits, axis=-1)
    weight_sum = jnp.sum(weights.astype(jnp.float32))
    prob_sums = weighted_sums(jax.nn.softmax(logits, axis=-1), weights)
    code_counts = weighted_sums(jax.nn.one_hot(hard_codes, v, dtype=jnp.float32), weights)
    out = {
        "prob_perplexity": perplexity_from_sums(prob_sums, weight_sum),
        "code_perplexity": perplexity_from_sums(code_counts, weight_sum),
        "prob_sums": prob_sums,
        "code_counts": code_counts,
        "weight_sum": weight_sum,
    }
    if deterministic:
      codes = hard_codes
      quantized = jax.vmap(lambda cb, c: cb[c], in_axes=(0, 2), out_axes=2)(codebook, codes)  # (B,T,G,d)
    else:
      key = self.make_rng("gumbel")
      if row_ids is None:
        noise = jax.random.gumbel(key, logits.shape, jnp.float32)
      else:
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, row_ids)
        noise = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[1:], jnp.float32))(keys)
      soft = jax.nn.softmax((logits + noise) / jnp.asarray(temperature, jnp.float32), axis=-1)
      codes = jnp.argmax(soft, axis=-1)
      hard = jax.nn.one_hot(codes, v, dtype=jnp.float32)
      probs = hard + soft - jax.lax.stop_gradient(soft)            # straight-through
      quantized = jnp.einsum("btgv,gvd->btgd", probs.astype(self.dtype), codebook.astype(self.dtype))
    out["quantized"] = quantized.reshape(b, t, self.dim)
    out["codes"] = codes.astype(jnp.int32)
    return out
