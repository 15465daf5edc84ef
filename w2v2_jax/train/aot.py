"""Ahead-of-time compilation of the production train step for a TPU slice, on any host (`w2v2 compile-check`).

The TPU compiler (libtpu, `pip install -e .[tpu]`) runs on a CPU: `jax.experimental.topologies` describes
the chips of a slice, the step is lowered on abstract arrays (`jax.ShapeDtypeStruct` with the shardings
training uses) and compiled for those chips. What comes back is the compiler's own account of the
program that would run on every chip: HBM for arguments and temporaries (`memory_analysis`), FLOPs
(`cost_analysis`, which counts a loop body once; `train/flops.py` counts the update's FLOPs from the
jaxpr), or the compiler's out-of-memory error. Nothing runs and no TPU is needed.

The step is the one `w2v2 pretrain` / `w2v2 finetune` run (`loop.pretrain_step_fn` /
`loop.finetune_step_fn` under `parallel.DataParallel`), traced with `backend.compiling_for("tpu")` so
it takes the TPU formulation (native grouped convolutions, the fine-tuning freeze as `lax.cond`), with
the batch geometry training derives for that many chips: the global batch of `batch.global_seconds`,
`batch.device_seconds` per chip per micro-batch, accumulation over micro-batches as a `lax.scan`.

Units: bytes, FLOPs per update (per chip and for the slice), seconds.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

GIB = 2.0 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: HBM per chip (GiB) and dense bf16 peak (TFLOP/s) per chip, as Google publishes."""
  name: str
  prefix: str             # get_topology_desc's topology name prefix
  chip_config: str        # "megacore": one device per chip made of two TensorCores (v4, v5p)
  hbm_gib: float
  peak_tflops: float
  cores_per_chip: int     # the slice name counts TensorCores (v4-32 = 16 chips) or chips (v5e-8 = 8)


CHIPS = {
    "v4": Chip("TPU v4", "v4", "megacore", 32.0, 275.0, 2),
    "v5p": Chip("TPU v5p", "v5", "megacore", 95.0, 459.0, 2),
    "v5e": Chip("TPU v5e", "v5e", "default", 16.0, 197.0, 1),
    "v6e": Chip("TPU v6e", "v6e", "default", 32.0, 918.0, 1),
}

# Slice name -> chip grid (the topology's bounds), as Cloud TPU names them.
_GRIDS = {
    "v4": {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8", 512: "4x8x8"},
    "v5p": {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8", 512: "4x8x8"},
    "v5e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
    "v6e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
}
TOPOLOGIES = tuple(f"{gen}-{n}" for gen, grids in _GRIDS.items() for n in grids)


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str               # e.g. "v5e-8"
  chip: Chip
  grid: str               # e.g. "2x4"
  num_chips: int

  @property
  def topology_name(self) -> str:
    return f"{self.chip.prefix}:{self.grid}"


def topology(name: str) -> Topology:
  """"v5e-8", "v4-32", ... -> Topology. Raises ValueError naming the supported slices."""
  gen, _, size = name.partition("-")
  if gen not in _GRIDS or not size.isdigit() or int(size) not in _GRIDS[gen]:
    raise ValueError(f"unknown TPU topology {name!r}; supported: {', '.join(TOPOLOGIES)}")
  chip = CHIPS[gen]
  return Topology(name, chip, _GRIDS[gen][int(size)], int(size) // chip.cores_per_chip)


def tpu_devices(topo: Topology, num_slices: int = 1) -> list:
  """The abstract devices of the slice, from libtpu's topology description (no TPU needed).

  Raises RuntimeError with the install command when libtpu is missing, or when this libtpu does not
  know the generation."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")       # no metadata server off Cloud TPU VMs
  # Compiling only: several processes may load libtpu at once (it otherwise holds /tmp/libtpu_lockfile).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.topology_name,
                                        chip_config_name=topo.chip.chip_config, chips_per_host_bounds=(2, 2, 1),
                                        num_slices=num_slices)
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(f"cannot describe TPU topology {topo.name} ({topo.topology_name}): {e}. The TPU compiler "
                       "comes with libtpu: pip install -e '.[tpu]' (jax[tpu] at the installed jax version)") from e
  devices = list(desc.devices)
  if len(devices) != topo.num_chips * num_slices:
    raise RuntimeError(f"{topo.name}: libtpu describes {len(devices)} devices, expected {topo.num_chips}")
  return devices


def task_of(config: Any) -> str:
  """"finetune" for a fine-tuning config (it has `init`), else "pretrain"."""
  return "finetune" if "init" in config else "pretrain"


def _abstract(tree, shardings):
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def build(config: Any, devices: list, *, bucket: Optional[int] = None):
  """The production step for `devices`, and abstract (state, batch) to lower it on.

  Returns (runner, state, batch, geometry) with geometry: devices, accumulate, rows (global micro-batch
  rows), rows_per_device, samples (per row), bucket list, params (count), task.
  """
  from w2v2_jax.data import batching  # pylint: disable=import-outside-toplevel
  from w2v2_jax.models.config import ModelConfig  # pylint: disable=import-outside-toplevel
  from w2v2_jax.train import fsdp, loop, parallel  # pylint: disable=import-outside-toplevel
  from w2v2_jax.train import step as train_step  # pylint: disable=import-outside-toplevel

  task = task_of(config)
  n = len(devices)
  if task == "pretrain":
    model_cfg = ModelConfig.from_any(config.model).replace(task="pretrain")
    module, tx, step_fn = loop.pretrain_step_fn(config, model_cfg)
  else:
    model_cfg = ModelConfig.from_any(config.model).replace(task="ctc")
    module, tx, step_fn = loop.finetune_step_fn(config, model_cfg)
  geometry = loop.batch_geometry(config, n)
  buckets = tuple(int(b) for b in config.data.buckets)
  length = int(bucket or max(buckets))
  if length not in buckets:
    raise ValueError(f"bucket {length} is not one of data.buckets={buckets}")
  rows = batching.bucket_batch_sizes(buckets, geometry["batch_samples"], n)[length]
  # The state as the run lays it out: replicated (shard_map, and pmap's equivalent) or sharded (fsdp).
  mode = "fsdp" if config.parallel.mode == "fsdp" else "shard_map"
  runner = parallel.DataParallel(step_fn, mode, devices,
                                 min_shard_size=int(config.parallel.get("fsdp_min_size", fsdp.DEFAULT_MIN_SIZE)))
  params = jax.eval_shape(lambda: module.init({"params": jax.random.PRNGKey(0), "mask": jax.random.PRNGKey(1)},
                                              jnp.zeros((1, min(buckets)), jnp.float32))["params"])
  state = jax.eval_shape(lambda p: train_step.init_state(p, tx, jax.random.key(0)), params)
  state = _abstract(state, runner.state_shardings(state))
  a = geometry["accumulate"]
  batch_sharding = NamedSharding(runner.mesh, P(None, parallel.AXIS))
  shapes = {"audio": ((a, rows, length), jnp.float32), "padding_mask": ((a, rows, length), jnp.bool_)}
  if task == "pretrain":
    shapes["row_ids"] = ((a, rows), jnp.int32)
  else:
    width = model_cfg.num_frames(length)
    shapes.update(labels=((a, rows, width), jnp.int32), label_padding=((a, rows, width), jnp.bool_),
                  weight=((a, rows), jnp.float32))
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding) for k, (shape, dtype) in shapes.items()}
  def per_chip(x):           # bytes of one device's share of a state leaf
    share = x.sharding.shard_shape(x.shape)
    return int(np.prod(share)) * np.dtype(x.dtype).itemsize if x.shape else np.dtype(x.dtype).itemsize
  leaves = jax.tree_util.tree_leaves({"p": state["params"], "o": state["opt_state"]})
  info = {"task": task, "devices": n, "parallel": mode,
          "state_bytes_per_chip": int(sum(per_chip(x) for x in leaves)), "accumulate": a, "rows": rows, "rows_per_device": rows // n,
          "samples": length, "buckets": buckets, "model_dtype": model_cfg.dtype, "remat": model_cfg.remat,
          "params": int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params))),
          "audio_seconds_per_update": a * rows * length / float(config.data.sample_rate)}
  return runner, state, batch, info


def _cost(compiled) -> Dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def compile_check(config: Any, topology_name: str, *, bucket: Optional[int] = None,
                  target_hours: Optional[float] = None, devices: Optional[list] = None) -> Dict[str, Any]:
  """Compiles the train step of `config` for the slice `topology_name`; returns the figures.

  Keys: topology, chip, chips, hbm_gib (per chip), the geometry of `build`, compile_seconds,
  argument/output/alias/temp/code bytes and total_bytes (peak HBM per chip), fits (bool),
  headroom (fraction of HBM left), flops_per_chip (one update, counted on the jaxpr by `train/flops.py`;
  xla_flops_per_chip: XLA's count, one loop body), flops_per_update (all chips), ops (the costliest ops), ideal_update_seconds (at the chip's bf16 peak), and with `target_hours` the MFU that
  finishing config.train.steps updates in that time needs. Raises `CompileError` (with the compiler's
  message) when the step does not fit or does not compile.
  """
  from w2v2_jax import backend  # pylint: disable=import-outside-toplevel
  topo = topology(topology_name)
  devices = devices if devices is not None else tpu_devices(topo)
  runner, state, batch, info = build(config, devices, bucket=bucket)
  from w2v2_jax.train import flops as flops_lib  # pylint: disable=import-outside-toplevel
  start = time.monotonic()
  try:
    with backend.compiling_for("tpu"):
      traced = runner.jitted(state).trace(state, batch)
      compiled = traced.lower().compile()
  except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError: out of HBM, unsupported op, ...)
    raise CompileError(f"{topology_name}: the {info['task']} step does not compile: {e}", info) from e
  seconds = time.monotonic() - start
  mem = compiled.memory_analysis()
  argument, output = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
  alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
  code = int(getattr(mem, "generated_code_size_in_bytes", 0))
  total = argument + output - alias + temp + code
  capacity = topo.chip.hbm_gib * GIB
  cost = _cost(compiled)
  # XLA counts a loop's body once (one micro-batch of the scanned accumulation): count the jaxpr instead.
  op_table = flops_lib.count(traced.jaxpr)
  flops_chip = flops_lib.total_flops(op_table)
  flops = flops_chip * len(devices)
  ideal = flops_chip / (topo.chip.peak_tflops * 1e12)
  out = dict(info, topology=topology_name, chip=topo.chip.name, chips=len(devices), hbm_gib=topo.chip.hbm_gib,
             peak_tflops=topo.chip.peak_tflops, compile_seconds=seconds, argument_bytes=argument,
             output_bytes=output, alias_bytes=alias, temp_bytes=temp, code_bytes=code, total_bytes=total,
             fits=total <= capacity, headroom=1.0 - total / capacity, flops_per_chip=flops_chip,
             flops_per_update=flops, xla_flops_per_chip=float(cost.get("flops", 0.0)),
             xla_bytes_accessed_per_chip=float(cost.get("bytes accessed", 0.0)),
             matmul_conv_flops_per_chip=flops_lib.total_flops(op_table, ("matmul", "conv")),
             ops=flops_lib.rows(op_table, top=25),
             ideal_update_seconds=ideal, steps=int(config.train.steps))
  if target_hours:
    out["target_hours"] = float(target_hours)
    out["mfu_needed"] = ideal * out["steps"] / (float(target_hours) * 3600.0)
  return out


class CompileError(RuntimeError):
  """The step did not compile for the slice (out of HBM, or another compiler error)."""

  def __init__(self, message: str, info: Dict[str, Any]):
    super().__init__(message)
    self.info = info


def format_report(r: Dict[str, Any], top_ops: int = 0) -> str:
  """Human-readable lines of a `compile_check` result; `top_ops` > 0 adds the costliest ops by FLOPs."""
  gib = lambda b: f"{b / GIB:.2f} GiB"
  lines = [
      f"topology        {r['topology']}: {r['chips']} x {r['chip']} ({r['hbm_gib']:g} GiB HBM, "
      f"{r['peak_tflops']:g} TFLOP/s bf16 per chip)",
      f"step            {r['task']}, {r['params'] / 1e6:.1f}M params, dtype {r['model_dtype']}, remat {r['remat']}, "
      f"parallel {r.get('parallel', 'shard_map')}: params + Adam moments {gib(r.get('state_bytes_per_chip', 0))} per chip",
      f"batch           bucket {r['samples']} samples; {r['rows_per_device']} rows x {r['samples']} samples per chip "
      f"per micro-batch, accumulation {r['accumulate']} -> {r['audio_seconds_per_update']:.0f} s of audio per update",
      f"compile time    {r['compile_seconds']:.1f} s",
      f"HBM per chip    arguments {gib(r['argument_bytes'])} + outputs {gib(r['output_bytes'])} - aliased "
      f"{gib(r['alias_bytes'])} + temporaries {gib(r['temp_bytes'])} + code {gib(r['code_bytes'])} = "
      f"{gib(r['total_bytes'])} of {r['hbm_gib']:g} GiB ({100 * r['total_bytes'] / (r['hbm_gib'] * GIB):.1f}%, "
      f"headroom {100 * r['headroom']:.1f}%)",
      f"FLOPs           {r['flops_per_chip']:.3e} per chip per update ({r['matmul_conv_flops_per_chip']:.3e} in matmuls "
      f"and convolutions), {r['flops_per_update']:.3e} for the slice; XLA's count, each loop body once, "
      f"{r['xla_flops_per_chip']:.3e}",
      f"ideal update    {r['ideal_update_seconds']:.3f} s at peak; {r['steps']} updates = "
      f"{r['ideal_update_seconds'] * r['steps'] / 3600:.2f} h at 100% MFU",
  ]
  if "mfu_needed" in r:
    lines.append(f"target          {r['steps']} updates in {r['target_hours']:g} h needs "
                 f"{100 * r['mfu_needed']:.1f}% MFU")
  if top_ops:
    lines.append(f"top ops per chip per update (jaxpr; bytes = operands + results, unfused):")
    lines.append(f"  {'module':<42} {'pass':<8} {'kind':<11} {'GFLOP':>9} {'share':>6} {'GB':>8} {'FLOP/B':>7}")
    for op in r["ops"][:top_ops]:
      lines.append(f"  {op['scope'][:42]:<42} {op['pass']:<8} {op['kind']:<11} {op['flops'] / 1e9:9.1f} "
                   f"{100 * op['share']:5.1f}% {op['bytes'] / 1e9:8.2f} {op['intensity']:7.1f}")
  lines.append("fits" if r["fits"] else "DOES NOT FIT")
  return "\n".join(lines)
