"""Sharded train state (FSDP / ZeRO-3 style) over the data axis: which array dimension each leaf is split
along, and the collectives the per-device step uses on split leaves.

`parallel.mode="fsdp"` stores every large leaf of the train state (params and, having the same shapes and
tree paths, the Adam moments) split along one dimension over the devices of the "data" axis: each device
holds 1/n of it. The per-device step (`train/step.py`, through `gathered_loss`)
  1. all-gathers the params inside each micro-batch's loss: with scanned layers (model.scan_layers) each
     layer's weights are gathered inside the scan body, one layer at a time (and again when remat
     recomputes the layer in the backward pass; without remat the backward keeps every layer's gathered
     weights); the other params at the start of the loss. A scanned layer dropped by LayerDrop (a
     per-device coin) is computed and discarded, so every device joins every gather,
  2. differentiates through the gathers: the transpose of an all-gather is a reduce-scatter, so each
     split leaf's gradient arrives already summed over the devices and split like the leaf,
  3. sums the gradients of the replicated (small) leaves with `psum` (`reduce_gradients`),
  4. computes the global gradient norm from both (`global_norm`) and updates only its own slice of the
     params and moments.
Same updates as the replicated step (up to the order of floating-point sums).

The rule depends on a leaf's shape, and for the scanned layers' stacked leaves (`layers/layer`, leading
layer axis) on that path: a param and its moments are split alike, and the layer axis never is. The
layout of a checkpoint does not matter: Orbax stores logical arrays, which restore into any layout.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from w2v2_jax.models import transformer

# Leaves with fewer elements stay replicated (biases, LayerNorm scales, scalars, PRNG keys): a collective
# per small leaf costs more latency than its memory is worth.
DEFAULT_MIN_SIZE = 2 ** 12


def split_axis(shape: Sequence[int], num_devices: int, min_size: int = DEFAULT_MIN_SIZE,
               stacked: bool = False) -> Optional[int]:
  """The dimension of an array of `shape` to split over `num_devices`, or None to replicate it.

  The largest dimension divisible by the device count (the last such one on ties: the output features
  of a kernel), never the leading layer axis of a `stacked` leaf; None for one device, leaves under
  `min_size` elements, and shapes with no divisible dimension.
  """
  size = 1
  for d in shape:
    size *= int(d)
  if num_devices <= 1 or size < max(min_size, num_devices):
    return None
  best = None
  for i, d in enumerate(shape):
    if (i > 0 or not stacked) and d % num_devices == 0 and (best is None or d >= shape[best]):
      best = i
  return best


def _is_stacked(path) -> bool:
  """True for a leaf of the scanned layers' stacked params (a `layers` key followed by `layer`)."""
  keys = [getattr(k, "key", None) for k in path]
  return any(a == "layers" and b == "layer" for a, b in zip(keys, keys[1:]))


def _shape(x: Any):
  if jax.dtypes.issubdtype(getattr(x, "dtype", jnp.float32), jax.dtypes.prng_key):
    return ()                       # typed keys: always replicated
  return tuple(getattr(x, "shape", ()))


def _leaf_axis(path, x, num_devices: int, min_size: int) -> Optional[int]:
  return split_axis(_shape(x), num_devices, min_size, stacked=_is_stacked(path))


def specs(tree: Any, num_devices: int, axis_name: str, min_size: int = DEFAULT_MIN_SIZE) -> Any:
  """PartitionSpecs for every leaf of `tree` (arrays or ShapeDtypeStructs); P() when replicated."""
  def one(path, x):
    axis = _leaf_axis(path, x, num_devices, min_size)
    return P() if axis is None else P(*([None] * axis + [axis_name]))
  return jax.tree_util.tree_map_with_path(one, tree)


def axes(tree: Any, num_devices: int, min_size: int = DEFAULT_MIN_SIZE) -> Any:
  """The split dimension (int) or -1 (replicated) of every leaf of `tree`: the step's `split`."""
  def one(path, x):
    axis = _leaf_axis(path, x, num_devices, min_size)
    return -1 if axis is None else axis
  return jax.tree_util.tree_map_with_path(one, tree)


def gather(params: Any, split: Any, axis_name: str, *, skip_stacked: bool = False) -> Any:
  """This device's slices -> the full params (inside the per-device step). `split`: `axes(params)`.
  skip_stacked: leave the scanned layers' stacked leaves as slices (`gathered_loss` gathers them layer
  by layer)."""
  def one(path, x, a):
    if a < 0 or (skip_stacked and _is_stacked(path)):
      return x
    return jax.lax.all_gather(x, axis_name, axis=a, tiled=True)
  return jax.tree_util.tree_map_with_path(one, params, split)


def _stacked_split(split: Any) -> Optional[Any]:
  """The `layers/layer` subtree of `split` (the scanned layers' leaves), or None."""
  if not isinstance(split, dict):
    return None
  if isinstance(split.get("layers"), dict) and "layer" in split["layers"]:
    return split["layers"]["layer"]
  for value in split.values():
    found = _stacked_split(value)
    if found is not None:
      return found
  return None


def gathered_loss(loss_fn: Callable, split: Optional[Any], axis_name: str) -> Callable:
  """loss_fn(params, micro) -> the same function of this device's param slices (split None: unchanged).

  Gathers inside the differentiated function, so the backward pass reduce-scatters each split leaf's
  gradient; the scanned layers' weights are gathered one layer at a time inside the scan
  (`transformer.layer_params_hook`)."""
  if split is None:
    return loss_fn
  stacked = _stacked_split(split)
  if stacked is None:
    return lambda params, micro: loss_fn(gather(params, split, axis_name), micro)
  per_layer = jax.tree_util.tree_map(lambda a: a - 1 if a > 0 else -1, stacked)   # the layer axis sliced off

  def hook(variables):
    return dict(variables, params=gather(variables["params"], per_layer, axis_name))

  def loss(params, micro):
    with transformer.layer_params_hook(hook):
      return loss_fn(gather(params, split, axis_name, skip_stacked=True), micro)
  return loss


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
