"""Sharded train state (FSDP / ZeRO-3 style) over the data axis: which array dimension each leaf is split
along, and the collectives the per-device step uses on split leaves.

`parallel.mode="fsdp"` stores every large leaf of the train state (params and, having the same shapes, the
Adam moments) split along one dimension over the devices of the "data" axis: each device holds 1/n of it.
The per-device step (`train/step.py`) then
  1. gathers the full params inside each micro-batch's loss (`gather`: an `all_gather` per split leaf),
  2. differentiates through the gather: the transpose of an all_gather is a reduce-scatter, so each
     split leaf's gradient arrives already summed over the devices and split like the leaf,
  3. sums the gradients of the replicated (small) leaves with `psum` (`reduce_gradients`),
  4. computes the global gradient norm from both (`global_norm`) and updates only its own slice of the
     params and moments.
Same updates as the replicated step (up to the order of floating-point sums).

The rule depends on a leaf's shape only (`split_axis`), so a param and its moments are split alike, and
the layout of a checkpoint does not matter: Orbax stores logical arrays, which restore into any layout.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

# Leaves with fewer elements stay replicated (biases, LayerNorm scales, scalars, PRNG keys): a collective
# per small leaf costs more latency than its memory is worth.
DEFAULT_MIN_SIZE = 2 ** 12


def split_axis(shape: Sequence[int], num_devices: int, min_size: int = DEFAULT_MIN_SIZE) -> Optional[int]:
  """The dimension of an array of `shape` to split over `num_devices`, or None to replicate it.

  The largest dimension divisible by the device count (the last such one on ties: the output features
  of a kernel); None for one device, leaves under `min_size` elements, and shapes with no divisible
  dimension.
  """
  size = 1
  for d in shape:
    size *= int(d)
  if num_devices <= 1 or size < max(min_size, num_devices):
    return None
  best = None
  for i, d in enumerate(shape):
    if d % num_devices == 0 and (best is None or d >= shape[best]):
      best = i
  return best


def spec_of(shape: Sequence[int], num_devices: int, axis_name: str, min_size: int = DEFAULT_MIN_SIZE) -> P:
  """The PartitionSpec of a leaf of `shape` (P() when replicated)."""
  axis = split_axis(shape, num_devices, min_size)
  if axis is None:
    return P()
  return P(*([None] * axis + [axis_name]))


def _shape(x: Any):
  if jax.dtypes.issubdtype(getattr(x, "dtype", jnp.float32), jax.dtypes.prng_key):
    return ()                       # typed keys: always replicated
  return tuple(getattr(x, "shape", ()))


def specs(tree: Any, num_devices: int, axis_name: str, min_size: int = DEFAULT_MIN_SIZE) -> Any:
  """PartitionSpecs for every leaf of `tree` (arrays or ShapeDtypeStructs)."""
  return jax.tree_util.tree_map(lambda x: spec_of(_shape(x), num_devices, axis_name, min_size), tree)


def axes(tree: Any, num_devices: int, min_size: int = DEFAULT_MIN_SIZE) -> Any:
  """The split dimension (int) or -1 (replicated) of every leaf of `tree`, as given to the step."""
  def one(x):
    axis = split_axis(_shape(x), num_devices, min_size)
    return -1 if axis is None else axis
  return jax.tree_util.tree_map(one, tree)


def gather(params: Any, split: Any, axis_name: str) -> Any:
  """This device's slices -> the full params (inside the per-device step). `split`: `axes(params)`."""
  return jax.tree_util.tree_map(
      lambda x, a: x if a < 0 else jax.lax.all_gather(x, axis_name, axis=a, tiled=True), params, split)


def reduce_gradients(grads: Any, split: Optional[Any], axis_name: str) -> Any:
  """Gradients summed over devices: `psum` of replicated leaves. Split leaves' gradients, taken through
  `gather`, are already summed (the all_gather's transpose is a reduce-scatter). split None: every
  leaf is replicated (the data-parallel modes)."""
  if split is None:
    return jax.lax.psum(grads, axis_name)
  replicated = jax.tree_util.tree_map(lambda g, a: g if a < 0 else None, grads, split)
  summed = iter(jax.tree_util.tree_leaves(jax.lax.psum(replicated, axis_name)))
  return jax.tree_util.tree_map(lambda g, a: g if a >= 0 else next(summed), grads, split)


def global_norm(grads: Any, split: Optional[Any], axis_name: str) -> jax.Array:
  """The L2 norm of the whole (reduced) gradient: split leaves' squares summed over devices, replicated
  leaves' counted once. split None: every leaf is whole on each device."""
  if split is None:
    return optax.tree.norm(grads)
  leaves = jax.tree_util.tree_leaves(grads)
  flags = jax.tree_util.tree_leaves(split)
  local = sum((jnp.sum(jnp.square(g.astype(jnp.float32))) for g, a in zip(leaves, flags) if a >= 0),
              jnp.zeros((), jnp.float32))
  whole = sum((jnp.sum(jnp.square(g.astype(jnp.float32))) for g, a in zip(leaves, flags) if a < 0),
              jnp.zeros((), jnp.float32))
  return jnp.sqrt(jax.lax.psum(local, axis_name) + whole)
