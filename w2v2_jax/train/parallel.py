"""Data parallelism: one per-device step run by `jax.jit(jax.shard_map(...))` on a mesh or by `jax.pmap`.

Both wrappers take the same per-device step (collectives over the axis named "data") and give the
same numbers. Multi-host: every process calls `initialize_distributed()` first, feeds only its own
share of the global batch, and the wrappers assemble the global arrays
(`jax.make_array_from_process_local_data` for shard_map; per-local-device shards for pmap).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"
MODES = ("shard_map", "pmap")
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
  state is replicated; `step` donates it.
  """

  def __init__(self, step: Callable, mode: str = "shard_map", devices: Optional[list] = None):
    if mode not in MODES:
      raise ValueError(f"parallel.mode={mode!r}: choose one of {MODES}")
    self.mode = mode
    self.traces = 0
    def counted(*args):
      self.traces += 1            # runs once per trace, i.e. once per compilation
      return step(*args)
    self.devices = list(devices) if devices is not None else jax.devices()
    self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
    if mode == "shard_map":
      self.mesh = Mesh(np.array(self.devices), (AXIS,))
      self._replicated = NamedSharding(self.mesh, P())
      self._batched = NamedSharding(self.mesh, P(None, AXIS))
      # check_vma=False: pmap's semantics, so the step's explicit psum of gradients is the only
      # reduction (with varying-manual-axes checking, AD would insert its own psum for replicated
      # params, and the per-device step would no longer be the same function under both wrappers).
      mapped = jax.shard_map(counted, mesh=self.mesh, in_specs=(P(), P(None, AXIS)), out_specs=(P(), P()),
                             check_vma=False)
      self._step = jax.jit(mapped, donate_argnums=0)
    else:
      self._step = jax.pmap(counted, axis_name=AXIS, devices=self.local_devices, donate_argnums=0)
      # Replicating through a pmap with the step's axis name gives the state exactly the sharding the
      # step returns, so the step compiles once.
      self._replicate = jax.pmap(lambda x: x, axis_name=AXIS, devices=self.local_devices)

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  def put_state(self, state: Any) -> Any:
    """Host (or single-device) state -> replicated state on every device."""
    if self.mode == "shard_map":
      return jax.tree_util.tree_map(self._global_replicated, state)
    n = len(self.local_devices)
    stacked = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), state)
    return self._replicate(stacked)

  def _global_replicated(self, x: Any) -> jax.Array:
    """A host value (identical on every process) -> an array replicated over the whole mesh, which
    `device_put` cannot build across processes."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = self._global_replicated(jax.random.key_data(x))
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, self._replicated, lambda index: value[index])

  def get_state(self, state: Any) -> Any:
    """Replicated state -> one copy (still on device; `jax.device_get` it for the host)."""
    if self.mode == "shard_map":
      return state
    return jax.tree_util.tree_map(lambda x: x[0], state)

  def put_batch(self, batch: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """This process's numpy batch {(A, b_local, ...)} -> global device arrays for the step."""
    n = len(self.local_devices)
    for name, x in batch.items():
      if x.ndim < 2 or x.shape[1] % n:
        raise ValueError(f"batch[{name!r}] has shape {x.shape}: its second (batch) axis must be a multiple "
                         f"of the {n} local devices")
    if self.mode == "shard_map":
      return {k: jax.make_array_from_process_local_data(self._batched, np.asarray(v)) for k, v in batch.items()}
    def split(x):             # (A, b, ...) -> (n, A, b / n, ...): pmap shards the leading axis
      x = np.asarray(x)
      return np.moveaxis(x.reshape(x.shape[0], n, x.shape[1] // n, *x.shape[2:]), 1, 0)
    return {k: split(v) for k, v in batch.items()}

  def step(self, state: Any, batch: Dict[str, Any]):
    """One update. Returns (new replicated state, metrics as device scalars, one copy)."""
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
    if self.mode == "shard_map":
      mapped = jax.jit(jax.shard_map(fn, mesh=self.mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS),
                                     check_vma=False))
      sharding = NamedSharding(self.mesh, P(AXIS))

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
