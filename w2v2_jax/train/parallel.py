"""Data parallelism: one per-device step run by `jax.jit(jax.shard_map(...))` on a mesh or by `jax.pmap`.

Both wrappers take the same per-device step (collectives over the axis named "data") and give the
same numbers. Modes:
  shard_map  the state replicated on every device; jit + shard_map over a 1-D mesh (the default).
  pmap       the same with `jax.pmap`.
  fsdp       the state sharded over the same axis (`train/fsdp.py`): every large leaf of params and
             Adam moments split along one dimension, 1/n per device; the step gathers the params per
             micro-batch and reduce-scatters their gradients. For models whose replicated state does
             not fit a chip's share (LARGE on v5e, XLS-R); same updates as shard_map. Multi-host: every process calls `initialize_distributed()` first, feeds only its own
share of the global batch, and the wrappers assemble the global arrays
(`jax.make_array_from_process_local_data` for shard_map; per-local-device shards for pmap).
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from w2v2_jax.train import fsdp

AXIS = "data"
MODES = ("shard_map", "pmap", "fsdp")
HEARTBEAT_TIMEOUT_S = 100   # jax.distributed.initialize's default


def initialize_distributed(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, heartbeat_timeout_s: Optional[int] = None) -> None:
  """`jax.distributed.initialize` for multi-process runs; a no-op for one process.

  Arguments default to the environment set by launch/*.sh: W2V2_COORDINATOR (host:port),
  W2V2_NUM_PROCESSES, W2V2_PROCESS_ID. On Cloud TPU pods set W2V2_COORDINATOR=auto and JAX finds
  the coordinator itself. heartbeat_timeout_s (default $W2V2_HEARTBEAT_TIMEOUT_S, else JAX's 100 s):
  when a process dies (a lost host, SIGKILL), the others are stopped by JAX's coordination service
  this long after its last heartbeat, with JAX's "distributed service detected fatal errors" message,
  instead of waiting in a collective forever.
  """
  coordinator = coordinator or os.environ.get("W2V2_COORDINATOR")
  if not coordinator:
    return
  if heartbeat_timeout_s is None:
    value = os.environ.get("W2V2_HEARTBEAT_TIMEOUT_S") or str(HEARTBEAT_TIMEOUT_S)
    try:
      heartbeat_timeout_s = int(value)
    except ValueError:
      raise ValueError(f"W2V2_HEARTBEAT_TIMEOUT_S={value!r}: expected a whole number of seconds") from None
  if coordinator == "auto":
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s)
  else:
    num_processes = int(num_processes if num_processes is not None else os.environ["W2V2_NUM_PROCESSES"])
    process_id = int(process_id if process_id is not None else os.environ["W2V2_PROCESS_ID"])
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, heartbeat_timeout_seconds=heartbeat_timeout_s)
  logging.info("distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


class DataParallel:
  """Compiles a per-device `step(state, batch) -> (state, metrics)` for all devices of all processes.

  Batches hold arrays with a leading accumulation axis and the batch axis second, (A, b, ...), where
  b is this process's share of the global micro-batch (a multiple of its local device count). The
  state is replicated (sharded in mode "fsdp": leaves of at least `min_shard_size` elements); `step`
  donates it.
  """

  def __init__(self, step: Callable, mode: str = "shard_map", devices: Optional[list] = None,
               min_shard_size: int = fsdp.DEFAULT_MIN_SIZE):
    if mode not in MODES:
      raise ValueError(f"parallel.mode={mode!r}: choose one of {MODES}")
    self.mode = mode
    self.traces = 0
    def counted(*args, **kwargs):
      self.traces += 1            # runs once per trace, i.e. once per compilation
      return step(*args, **kwargs)
    self._counted = counted
    self.min_shard_size = int(min_shard_size)
    self.devices = list(devices) if devices is not None else jax.devices()
    self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
    self._jitted: Dict[Any, Callable] = {}
    if mode in ("shard_map", "fsdp"):
      self.mesh = Mesh(np.array(self.devices), (AXIS,))
      self._replicated = NamedSharding(self.mesh, P())
      self._batched = NamedSharding(self.mesh, P(None, AXIS))
    else:
      self._step = jax.pmap(counted, axis_name=AXIS, devices=self.local_devices, donate_argnums=0)
      # Replicating through a pmap with the step's axis name gives the state exactly the sharding the
      # step returns, so the step compiles once.
      self._replicate = jax.pmap(lambda x: x, axis_name=AXIS, devices=self.local_devices)

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  def state_specs(self, state: Any) -> Any:
    """PartitionSpec of every leaf of `state` (arrays or ShapeDtypeStructs of the global shapes): P()
    (replicated) except in mode "fsdp"."""
    if self.mode == "fsdp":
      return fsdp.specs(state, self.num_devices, AXIS, self.min_shard_size)
    return jax.tree_util.tree_map(lambda _: P(), state)

  def state_shardings(self, state: Any) -> Any:
    """NamedSharding of every leaf of `state` on this runner's mesh (modes shard_map and fsdp)."""
    return jax.tree_util.tree_map(lambda spec: NamedSharding(self.mesh, spec), self.state_specs(state),
                                  is_leaf=lambda x: isinstance(x, P))

  def split(self, params: Any) -> Optional[Any]:
    """The step's `split` argument for `params` (global shapes): `fsdp.axes` in mode "fsdp", else None."""
    if self.mode != "fsdp":
      return None
    return fsdp.axes(params, self.num_devices, self.min_shard_size)

  def jitted(self, state: Any) -> Callable:
    """The compiled-on-first-call `step(state, batch)` for states shaped like `state` (jit + shard_map;
    modes shard_map and fsdp)."""
    key = jax.tree_util.tree_structure(state), tuple(np.shape(x) for x in jax.tree_util.tree_leaves(state))
    if key not in self._jitted:
      state_specs = self.state_specs(state)
      step = functools.partial(self._counted, split=self.split(state["params"])) if self.mode == "fsdp" else self._counted
      # check_vma=False: pmap's semantics, so the step's explicit psum of gradients is the only
      # reduction (with varying-manual-axes checking, AD would insert its own psum for replicated
      # params, and the per-device step would no longer be the same function under both wrappers).
      mapped = jax.shard_map(step, mesh=self.mesh, in_specs=(state_specs, P(None, AXIS)),
                             out_specs=(state_specs, P()), check_vma=False)
      self._jitted[key] = jax.jit(mapped, donate_argnums=0)
    return self._jitted[key]

  def put_state(self, state: Any) -> Any:
    """Host (or single-device) state -> the state on every device: replicated, or in mode "fsdp" split
    as `state_specs` says (each device receives only its slices)."""
    if self.mode in ("shard_map", "fsdp"):
      return jax.tree_util.tree_map(self._global_array, state, self.state_shardings(state))
    n = len(self.local_devices)

    def host(x):
      # Through the host: a value committed to one device (a restored checkpoint's) is refused by pmap.
      if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(np.asarray(jax.random.key_data(x)), impl=jax.random.key_impl(x))
      return np.asarray(x)
    stacked = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(host(x), (n,) + np.shape(x)), state)
    return self._replicate(stacked)

  def _global_array(self, x: Any, sharding: NamedSharding) -> jax.Array:
    """A host value (identical on every process) -> an array laid out by `sharding` over the whole mesh,
    which `device_put` cannot build across processes."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = self._global_array(jax.random.key_data(x), self._replicated)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  def get_state(self, state: Any) -> Any:
    """The step's state -> one logical copy (still on device: replicated or, in mode "fsdp", sharded
    global arrays, as checkpoints store them). `host_params` gives the params as numpy."""
    if self.mode in ("shard_map", "fsdp"):
      return state
    return jax.tree_util.tree_map(lambda x: x[0], state)

  def host_params(self, state: Any) -> Any:
    """The full params as numpy on this process. Collective in mode "fsdp" with several processes (every
    process must call it): the slices other hosts hold are gathered."""
    params = self.get_state(state)["params"]
    def fetch(x):
      if x.is_fully_addressable or x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0)) if x.sharding.is_fully_replicated else np.asarray(x)
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.tree_util.tree_map(fetch, params)

  def put_batch(self, batch: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """This process's numpy batch {(A, b_local, ...)} -> global device arrays for the step."""
    n = len(self.local_devices)
    for name, x in batch.items():
      if x.ndim < 2 or x.shape[1] % n:
        raise ValueError(f"batch[{name!r}] has shape {x.shape}: its second (batch) axis must be a multiple "
                         f"of the {n} local devices")
    if self.mode in ("shard_map", "fsdp"):
      return {k: jax.make_array_from_process_local_data(self._batched, np.asarray(v)) for k, v in batch.items()}
    def split(x):             # (A, b, ...) -> (n, A, b / n, ...): pmap shards the leading axis
      x = np.asarray(x)
      return np.moveaxis(x.reshape(x.shape[0], n, x.shape[1] // n, *x.shape[2:]), 1, 0)
    return {k: split(v) for k, v in batch.items()}

  def step(self, state: Any, batch: Dict[str, Any]):
    """One update. Returns (new state, metrics as device scalars, one copy)."""
    if self.mode in ("shard_map", "fsdp"):
      return self.jitted(state)(state, batch)
    state, metrics = self._step(state, batch)
    if self.mode == "pmap":
      metrics = jax.tree_util.tree_map(lambda x: x[0], metrics)
    return state, metrics

  def map_rows(self, fn: Callable) -> Callable:
    """A per-device `fn(params, rows) -> outputs` run on every device of every process, rows split over
    the devices along their first axis (no accumulation axis), outputs with the same leading axis.

    Returns `run(state, rows)`: `state` as the step holds it (its params are used as they are, no copy),
    `rows` this process's numpy rows (a multiple of its local device count); the result is every
    output gathered over all processes, as numpy with the global row count (process 0's rows first).
    """
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    n = len(self.local_devices)
    if self.mode in ("shard_map", "fsdp"):
      sharding = NamedSharding(self.mesh, P(AXIS))
      compiled = {}

      def mapped(params, arrays):
        key = jax.tree_util.tree_structure(params)
        if key not in compiled:
          split = self.split(params)
          per_device = fn if split is None else lambda p, r: fn(fsdp.gather(p, split, AXIS), r)
          compiled[key] = jax.jit(jax.shard_map(per_device, mesh=self.mesh, in_specs=(self.state_specs(params), P(AXIS)),
                                                out_specs=P(AXIS), check_vma=False))
        return compiled[key](params, arrays)

      def run(state, rows):
        arrays = {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in rows.items()}
        out = mapped(state["params"], arrays)
        return jax.tree_util.tree_map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), out)
      return run
    mapped = jax.pmap(fn, axis_name=AXIS, devices=self.local_devices)

    def run(state, rows):
      split = {k: np.asarray(v).reshape(n, -1, *np.shape(v)[1:]) for k, v in rows.items()}
      out = jax.device_get(mapped(state["params"], split))
      local = jax.tree_util.tree_map(lambda x: np.asarray(x).reshape(-1, *x.shape[2:]), out)
      if jax.process_count() == 1:
        return local
      return jax.tree_util.tree_map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), local)
    return run

  def cache_size(self) -> int:
    """Times the step was traced, hence compiled (tests assert one per batch shape)."""
    return self.traces
