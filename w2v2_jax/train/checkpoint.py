"""Checkpoints and preemption: a thin layer over Orbax's `CheckpointManager`.

One step directory `<workdir>/checkpoints/<step>/` holds three items, written with
`ocp.args.Composite`:
  state   the training pytree (params, opt_state, step, rng, ...) via StandardSave/StandardRestore;
          arrays may be sharded or replicated `jax.Array`s; restore lays them out like a template.
  data    every process's data-iterator state (JSON), so a multi-host run resumes each host's
          shard of the input pipeline where it stopped.
  config  the run configuration (JSON), given with the first save and repeated in every later one
          so that keep-N deletion never removes it.
Saves are asynchronous (the device-to-host copy blocks, the write does not), keep the latest N,
and are atomic: Orbax writes `<step>.orbax-checkpoint-tmp*` and renames it when complete (on GCS,
where rename is not atomic, it writes a `commit_success.txt` instead); an unfinished directory
left by a crash is never listed and is removed when the next `Checkpointer` opens the directory.

Typed PRNG keys (`jax.random.key`) are stored as their raw `jax.random.key_data` (uint32) and
re-wrapped on restore with the template leaf's key dtype, so checkpoints do not depend on the
Orbax version's support for extended dtypes.

Preemption: the loop runs inside `PreemptionGuard`, asks `guard.should_stop(step)` after every
step on every process, and when it says so saves with `force=True` and leaves the loop:

  with PreemptionGuard() as guard:
    for step in range(start + 1, total + 1):
      state, metrics = train_step(state, next(batches))
      stop = guard.should_stop(step)
      if stop or ckpt.should_save(step):
        ckpt.save(step, state, batches.get_state(), force=stop)
      if stop:
        break
  ckpt.close()
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Union

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)

ITEMS = ("state", "data", "config")
CHECKPOINT_DIR = "checkpoints"


def _is_key(x: Any) -> bool:
  """True for typed PRNG key arrays (and their ShapeDtypeStructs)."""
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _storable(state: Any) -> Any:
  """Typed PRNG keys -> their uint32 key data, same sharding; everything else unchanged."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)


def _abstract_leaf(x: Any) -> Any:
  """A template leaf -> what StandardRestore should produce for it (shape, dtype, sharding)."""
  if _is_key(x):
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, "sharding", None))
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  return x        # ShapeDtypeStruct, numpy array or Python scalar: Orbax restores the same kind


def _rewrap(template: Any, restored: Any) -> Any:
  """Key data restored for a typed-key template leaf -> a typed key array of the template's dtype."""
  def fix(t, r):
    if not _is_key(t):
      return r
    try:
      return jax.random.wrap_key_data(r, dtype=t.dtype)
    except TypeError:                    # older JAX without `dtype=`: needs a concrete key array
      return jax.random.wrap_key_data(r, impl=jax.random.key_impl(t))
  return jax.tree.map(fix, template, restored)


def _json_default(x: Any) -> Any:
  """json.dumps fallback for numpy scalars and arrays inside data-iterator states."""
  if isinstance(x, (np.generic, np.ndarray)):
    return x.tolist()
  raise TypeError(f"data state holds a {type(x).__name__}, which is not JSON-serialisable")


def _gather_json(obj: Any) -> list:
  """Every process's JSON-able `obj`, in process order (a collective when there are several)."""
  text = json.dumps(obj, default=_json_default)
  if jax.process_count() == 1:
    return [json.loads(text)]
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  raw = np.frombuffer(text.encode("utf-8"), np.uint8)
  lengths = multihost_utils.process_allgather(np.array([raw.size], np.int64)).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:raw.size] = raw
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
  return [json.loads(bytes(row[:n]).decode("utf-8")) for row, n in zip(rows, lengths)]


def _as_config(config_json: Union[str, Mapping[str, Any], None]) -> Optional[Any]:
  if config_json is None:
    return None
  return json.loads(config_json) if isinstance(config_json, (str, bytes)) else dict(config_json)


def check_run_dir(workdir: Union[str, epath.PathLike]) -> str:
  """The run directory as Orbax needs it (local paths made absolute); ValueError for a URL Orbax
  cannot write checkpoints to (anything but gs://, e.g. s3://: this Orbax turns it into a relative path)."""
  workdir = os.fspath(workdir)
  if "://" not in workdir:   # Orbax's tensorstore layer refuses relative local paths
    return os.path.abspath(workdir)
  if not workdir.startswith("gs://"):
    raise ValueError(f"run directory {workdir}: Orbax {getattr(ocp, '__version__', '')} reads and writes checkpoints "
                     "in local paths and gs:// only (it turns other URLs into relative paths); put the run "
                     "directory (or the pretraining run given as init) on gs:// or a local or mounted path; "
                     "the data may stay where it is")
  return workdir


class Checkpointer:
  """Saves and restores {state, data-iterator state, run config} under `<workdir>/checkpoints`.

  Every process must make the same calls in the same order (save and restore are collective).

  Args:
    workdir: run directory (local path, relative or absolute, or a URL such as gs://bucket/run that
      etils.epath can open).
    keep: how many of the latest checkpoints to keep; older ones are deleted after each save.
    save_every: `should_save(step)` (and an unforced `save`) accepts steps that are multiples of it.
    async_save: write in a background thread after the device-to-host copy (`wait()` joins it).
  """

  def __init__(self, workdir: Union[str, epath.PathLike], *, keep: int = 3, save_every: int = 1000,
               async_save: bool = True):
    if keep < 1 or save_every < 1:
      raise ValueError(f"keep={keep} and save_every={save_every} must both be >= 1")
    workdir = check_run_dir(workdir)
    self.directory = epath.Path(workdir) / CHECKPOINT_DIR
    self.save_every = int(save_every)
    self._config = None
    # When to save is decided here (`should_save`); every save reaches Orbax with force=True.
    if hasattr(ocp, "checkpoint_managers"):     # newer Orbax: policy objects replace max_to_keep
      keep_option = dict(preservation_policy=ocp.checkpoint_managers.LatestN(keep))
    else:
      keep_option = dict(max_to_keep=keep)
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True, create=True, **keep_option)
    self._manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

  # -- queries -------------------------------------------------------------------------------

  def latest_step(self) -> Optional[int]:
    """The newest complete checkpoint's step, or None; unfinished (tmp) directories never count."""
    return self._manager.latest_step()

  def all_steps(self) -> list:
    """Steps of all complete checkpoints still on disk, ascending."""
    return sorted(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Whether an unforced `save(step, ...)` would write: a multiple of save_every, newer than
    the latest checkpoint. The same answer on every process."""
    latest = self._manager.latest_step()
    return step % self.save_every == 0 and (latest is None or step > latest)

  # -- save / restore ------------------------------------------------------------------------

  def save(self, step: int, state: Any, data_state: Any = None,
           config_json: Union[str, Mapping[str, Any], None] = None, force: bool = False) -> bool:
    """Starts writing checkpoint `step`; returns whether one was started.

    Without `force`, only steps accepted by `should_save` are written. With it (preemption, the
    last step) any step not yet on disk is written. Returns before the files are written when
    `async_save`; `wait()` blocks until they are. `state` must not be donated or modified in
    place until this call returns (the device-to-host copy happens inside it).

    Args:
      step: the training step (number of updates applied to `state`).
      state: pytree of arrays (jax.Array, typed PRNG keys, numpy arrays, Python scalars).
      data_state: this process's data-iterator state, a JSON-able object (or None).
      config_json: the run configuration as JSON text or a dict; remembered and stored with
        this and every later checkpoint.
    """
    step = int(step)
    if config_json is not None:
      self._config = _as_config(config_json)
    if step in self._manager.all_steps():
      log.info("checkpoint %d already exists; not saving it again", step)
      return False
    if not force and not self.should_save(step):
      return False
    data = {"num_processes": jax.process_count(), "per_process": _gather_json(data_state)}
    items = dict(state=ocp.args.StandardSave(_storable(state)), data=ocp.args.JsonSave(data))
    if self._config is not None:
      items["config"] = ocp.args.JsonSave(self._config)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    if saved:
      log.info("checkpoint %d: saving to %s%s", step, self.directory, " (forced)" if force else "")
    return bool(saved)

  def restore(self, step: Optional[int] = None, *, state_template: Any) -> Tuple[Any, Any]:
    """Loads checkpoint `step` (default: the latest) -> (state, this process's data state).

    `state_template` has the saved tree structure; its leaves are arrays or ShapeDtypeStructs
    whose shapes, dtypes and shardings the restored arrays take (a sharded template leaf restores
    sharded, a replicated one replicated, whatever the layout at save time). Typed-key leaves
    restore as typed keys of the same implementation. The data state is None when the
    checkpoint had none or was written by a different number of processes.
    """
    if step is not None and not isinstance(step, (int, np.integer)):
      raise TypeError(f"step must be an int or None, got {type(step).__name__}; "
                      "pass the template as state_template=...")
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    step = int(step)
    abstract = jax.tree.map(_abstract_leaf, state_template)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    state = _rewrap(state_template, restored["state"])
    data = restored["data"] or {}
    per_process = data.get("per_process") or [None]
    if data.get("num_processes", 1) != jax.process_count():
      log.warning("checkpoint %d holds data-iterator states of %s processes, this run has %d: "
                  "the data pipeline restarts from its initial state", step,
                  data.get("num_processes"), jax.process_count())
      data_state = None
    else:
      data_state = per_process[jax.process_index()]
    log.info("restored checkpoint %d from %s", step, self.directory)
    return state, data_state

  def restore_config(self, step: Optional[int] = None) -> Optional[Any]:
    """The run configuration stored with checkpoint `step` (default latest), or None."""
    step = self.latest_step() if step is None else int(step)
    if step is None:
      return None
    path = self.directory / str(step) / "config"
    if not path.exists():
      return None
    return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  # -- lifecycle -----------------------------------------------------------------------------

  def wait(self) -> None:
    """Blocks until every started save is written and committed (and old ones deleted)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's threads."""
    self.wait()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# -- preemption ------------------------------------------------------------------------------

_STOP = threading.Event()
DEFAULT_CHECK_EVERY = 10   # steps between flag all-gathers in multi-process runs without the service


def _on_signal(signum, frame) -> None:  # pylint: disable=unused-argument
  if not _STOP.is_set():
    log.warning("received signal %d: will checkpoint and stop after the current step", signum)
  _STOP.set()


def install_sigterm_handler(signals: Iterable[int] = (signal.SIGTERM,)) -> Dict[int, Any]:
  """Makes the given signals set the stop flag instead of killing the process.

  Main thread only (a Python rule). Returns the previous handlers, for `uninstall_sigterm_handler`.
  """
  return {int(s): signal.signal(s, _on_signal) for s in signals}


def uninstall_sigterm_handler(previous: Mapping[int, Any]) -> None:
  """Puts back handlers returned by `install_sigterm_handler` (where ours is still in place)."""
  for s, handler in previous.items():
    if signal.getsignal(s) is _on_signal:
      signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def should_stop() -> bool:
  """Whether a handled signal arrived in this process (local; see `reached_preemption`)."""
  return _STOP.is_set()


def clear_stop() -> None:
  """Resets the stop flag (tests, or a loop that handled the stop and carries on)."""
  _STOP.clear()


def preemption_service_enabled() -> bool:
  """Whether this is a multi-process run with JAX's preemption service (on by default after
  `jax.distributed.initialize`; off with the public config `jax_enable_preemption_service=False`)."""
  return (jax.process_count() > 1 and jax.distributed.is_initialized()
          and bool(jax.config.jax_enable_preemption_service))


def reached_preemption(step: int, *, check_every: int = DEFAULT_CHECK_EVERY) -> bool:
  """Whether to checkpoint at `step` and stop; the same answer on every process.

  Call it after every step on every process, with the same step numbers (from the same start).
  - One process: the local stop flag (set by the handler of `install_sigterm_handler`).
  - Several processes with JAX's preemption service: the public
    `multihost_utils.reached_preemption_sync_point(step)`. JAX catches SIGTERM on any host, the
    coordination service tells the others, and all agree on a step; no collective runs while no
    notice came.
  - Several processes without the service: every `check_every` steps the local flags are
    all-gathered (one small collective per `check_every` steps) and any set flag stops everyone.
  """
  if jax.process_count() <= 1:
    return _STOP.is_set()
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  if preemption_service_enabled():
    try:
      return bool(multihost_utils.reached_preemption_sync_point(int(step)))
    except RuntimeError:      # the service did not start after all: the flags below
      pass
  if step % max(int(check_every), 1):
    return False
  flags = multihost_utils.process_allgather(np.array([_STOP.is_set()], np.int32))
  return bool(np.any(flags))


class PreemptionGuard:
  """Context manager: catch SIGTERM (or `signals`) for a clean checkpoint-and-exit.

  Inside it, a signal only sets a flag; `should_stop(step)` (see `reached_preemption`) turns it
  into a decision shared by all processes. In a multi-process run with JAX's preemption service,
  JAX's own SIGTERM handler is left in place (replacing it would hide the notice from the
  service). On exit the previous handlers come back and the flag is cleared.
  """

  def __init__(self, signals: Iterable[int] = (signal.SIGTERM,), *, check_every: int = DEFAULT_CHECK_EVERY):
    self.signals = tuple(signals)
    self.check_every = int(check_every)
    self._previous: Dict[int, Any] = {}

  def __enter__(self) -> "PreemptionGuard":
    clear_stop()
    if not preemption_service_enabled():
      self._previous = install_sigterm_handler(self.signals)
      if jax.process_count() > 1:
        log.info("multi-process run without JAX's preemption service: stop flags are compared every %d "
                 "steps", self.check_every)
    else:
      log.info("multi-process run: SIGTERM goes to JAX's preemption service")
    return self

  def __exit__(self, *exc) -> None:
    uninstall_sigterm_handler(self._previous)
    self._previous = {}
    clear_stop()

  def should_stop(self, step: int) -> bool:
    """Call after every step on every process; True: save with force=True and leave the loop."""
    return reached_preemption(step, check_every=self.check_every)

  @property
  def signalled(self) -> bool:
    """Whether this process received one of the signals (local, not agreed across processes)."""
    return _STOP.is_set()
