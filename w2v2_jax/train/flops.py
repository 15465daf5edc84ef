"""FLOPs and memory traffic of a traced step, op by op, from its jaxpr.

XLA's `cost_analysis()` counts the body of a loop once, so with gradient accumulation as a `lax.scan`
it reports one micro-batch's FLOPs however many micro-batches an update has. This counter walks the
jaxpr of the per-device step instead, multiplying a scan's body by its length, taking the larger
branch of a `cond` (LayerDrop, the optimizer's skip, the fine-tuning freeze: the worst case) and
recursing into remat, custom-derivative and nested jit calls (so recomputation is counted).

FLOPs: 2 per multiply-add for `dot_general` and `conv_general_dilated`, 1 per output element for
everything else ("elementwise": norms, activations, softmax, the optimizer). Bytes: operand plus result
sizes of each op, i.e. the traffic if nothing were fused (an upper bound: XLA fuses elementwise chains).
Ops are grouped by where they come from (the Flax module path in the name stack, layer indices merged)
and by pass (forward, or backward for the transposed ops of the gradient).
"""
from __future__ import annotations

import collections
import math
import re
from typing import Any, Dict, Iterable, List, Tuple

import numpy as np

_MATMUL = "dot_general"
_CONV = "conv_general_dilated"
# Bookkeeping primitives that move no data worth counting.
_FREE = {"pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr",
         "remat", "checkpoint", "shard_map", "scan", "while", "cond", "broadcast_in_dim", "reshape",
         "convert_element_type", "squeeze", "expand_dims", "copy", "copy_p", "iota", "random_wrap",
         "random_unwrap", "random_bits", "random_seed", "random_fold_in", "threefry2x32", "stop_gradient",
         "psum", "pmin", "pmax", "all_gather", "axis_index", "optimization_barrier", "name"}


def _size(aval) -> int:
  shape = getattr(aval, "shape", ())
  return int(np.prod(shape)) if shape else 1


def _bytes(aval) -> int:
  dtype = getattr(aval, "dtype", None)
  try:
    itemsize = np.dtype(dtype).itemsize
  except TypeError:
    itemsize = 4                      # typed PRNG keys and other extended dtypes
  return _size(aval) * itemsize


def _op_flops(eqn) -> Tuple[str, float]:
  name = eqn.primitive.name
  if name == _MATMUL:
    (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    contract = math.prod(lhs[d] for d in lc) if lc else 1
    return "matmul", 2.0 * _size(eqn.outvars[0].aval) * contract
  if name == _CONV:
    rhs = eqn.invars[1].aval.shape
    dn = eqn.params["dimension_numbers"]
    out_feature_dim = dn.rhs_spec[0]            # kernel: (out, in, spatial...) in rhs_spec order
    kernel_per_output = math.prod(rhs) / rhs[out_feature_dim]
    return "conv", 2.0 * _size(eqn.outvars[0].aval) * kernel_per_output / max(eqn.params.get("batch_group_count", 1), 1)
  return "elementwise", float(sum(_size(v.aval) for v in eqn.outvars))


def _subjaxprs(eqn) -> Iterable[Tuple[Any, float]]:
  """(jaxpr, multiplicity) of the computations nested in `eqn` (cond branches handled by the caller)."""
  name = eqn.primitive.name
  for key, value in eqn.params.items():
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
      jaxpr = getattr(v, "jaxpr", v)
      if hasattr(jaxpr, "eqns"):
        yield jaxpr, float(eqn.params["length"]) if name == "scan" and key == "jaxpr" else 1.0


_LAYER = re.compile(r"layers_\d+")
_WRAPPER = re.compile(r"^(?:\w+\()+|\)+$")
_RECOMPUTE = "rematted_computation"


def scope_of(stack: str, depth: int = 4) -> Tuple[str, str]:
  """(module path, pass) of an op from its full name stack (its enclosing calls' stacks prepended):
  e.g. ("wav2vec2/encoder/layers_*", "backward"). Pass: "forward", "backward" (the gradient's
  transposed ops) or "recompute" (a remat'd layer's forward run again for the backward pass)."""
  if "transpose(" in stack:
    direction = "recompute" if _RECOMPUTE in stack else "backward"
  else:
    direction = "forward"
  parts = []
  for part in stack.split("/"):
    part = _LAYER.sub("layers_*", _WRAPPER.sub("", part))
    if not part or part[:1].isupper() or "<lambda>" in part or part == _RECOMPUTE:
      continue
    if part in parts:                 # a nested call's stack repeats its caller's path
      continue
    parts.append(part)
  return "/".join(parts[:depth]) or "(step)", direction


def _new_table() -> Dict[Tuple[str, str, str], Dict[str, float]]:
  return collections.defaultdict(lambda: {"flops": 0.0, "bytes": 0.0, "ops": 0.0})


def _walk(table, jaxpr, mult: float, prefix: str) -> None:
  """Adds the ops of `jaxpr`, run `mult` times, to `table`; `prefix`: the enclosing calls' name stack."""
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    stack = f"{prefix}/{eqn.source_info.name_stack}" if prefix else str(eqn.source_info.name_stack)
    if name == "cond":                      # the costlier branch alone
      branches = []
      for branch in eqn.params["branches"]:
        sub = _new_table()
        _walk(sub, getattr(branch, "jaxpr", branch), 1.0, stack)
        branches.append(sub)
      best = max(branches, key=lambda t: sum(v["flops"] for v in t.values()))
      for key, value in best.items():
        for field in ("flops", "bytes", "ops"):
          table[key][field] += value[field] * mult
      continue
    nested = list(_subjaxprs(eqn))
    if nested:
      for sub, times in nested:
        _walk(table, sub, mult * times, stack)
      continue
    if name in _FREE:
      continue
    kind, flops = _op_flops(eqn)
    path, direction = scope_of(stack)
    entry = table[(path, direction, kind)]
    entry["flops"] += flops * mult
    entry["bytes"] += mult * (sum(_bytes(v.aval) for v in eqn.invars if hasattr(v, "aval"))
                              + sum(_bytes(v.aval) for v in eqn.outvars))
    entry["ops"] += mult


def count(closed_jaxpr) -> Dict[Tuple[str, str, str], Dict[str, float]]:
  """{(module path, pass, kind): {"flops", "bytes", "ops"}} of a (closed) jaxpr, per execution; kind is
  matmul, conv or elementwise."""
  table = _new_table()
  _walk(table, getattr(closed_jaxpr, "jaxpr", closed_jaxpr), 1.0, "")
  return dict(table)


def total_flops(table: Dict[Tuple[str, str, str], Dict[str, float]], kinds=("matmul", "conv", "elementwise")) -> float:
  return float(sum(v["flops"] for (_, _, kind), v in table.items() if kind in kinds))


def rows(table, top: int = 20) -> List[Dict[str, Any]]:
  """The `top` entries by FLOPs, with their share of all FLOPs and arithmetic intensity (FLOP/byte)."""
  total = max(total_flops(table), 1.0)
  out = [{"scope": k[0], "pass": k[1], "kind": k[2], "flops": v["flops"], "bytes": v["bytes"],
          "share": v["flops"] / total, "intensity": v["flops"] / max(v["bytes"], 1.0)} for k, v in table.items()]
  return sorted(out, key=lambda r: -r["flops"])[:top]
