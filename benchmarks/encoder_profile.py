"""Where the encoder's time goes on a CPU: ours (XLA) beside HF PyTorch, forward and forward + backward.

    python benchmarks/encoder_profile.py                 # BASE, 4 x 4 s, fp32
    python benchmarks/encoder_profile.py --size tiny --batch 2 --seconds 1 --steps 2

One process, the same weights (ours converted to HF with `convert.to_hf`) and the same audio:
  1. median times of the encoder forward (eval mode) and forward + backward (gradient of
     0.5 * sum(hidden ** 2) with respect to every parameter), ours and torch's, interleaved;
  2. one profiled forward + backward of each: for ours, every executed XLA thunk (an HLO instruction or
     fusion) from `jax.profiler`'s trace, attributed to the model part its HLO metadata names (the gaps
     in which no thunk runs, asynchronous work, charged to the thunk before them); for torch,
     `torch.profiler`'s operators by self CPU time. Prints the time share per model part (both), then the
     top ops.

Model parts: feature encoder (the conv stack), feature projection (LayerNorm + projection), positional
conv, attention projections (q/k/v/out), attention core (scores, softmax, weighted sum), feed-forward,
layer norms, other (elementwise glue, copies).
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from w2v2_jax import convert  # noqa: E402
from pretrain_step import add_workload_args, jax_encoder, torch_encoder, workload  # noqa: E402  (benchmarks/)

# (part, pattern on the op's name stack): the first match wins. Ours: the Flax module path in the HLO
# metadata's op_name; torch: the module path recorded by record_function below.
PARTS = [
    ("feature encoder", r"feature_extractor"),
    ("feature projection", r"feature_projection|post_extract_proj|wav2vec2/layer_norm/"),
    ("positional conv", r"pos_conv"),
    ("attention projections", r"(q_proj|k_proj|v_proj|out_proj)"),
    ("attention core", r"self_attn|attention"),
    ("feed-forward", r"fc1|fc2|feed_forward|intermediate_dense|output_dense"),
    ("layer norms", r"layer_norm"),
]


def part_of(name: str) -> str:
  for part, pattern in PARTS:
    if re.search(pattern, name):
      return part
  return "other"


# ------------------------------------------------------------------------------------------------- ours

def _op_names(compiled_text: str):
  """HLO instruction name -> its metadata op_name (the name stack), from a compiled module's text.
  Instructions XLA created without metadata (e.g. the convolutions of a weight gradient) take their
  first named operand's."""
  names = {}
  for line in compiled_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (.*)$", line)
    if not m:
      continue
    meta = re.search(r'metadata=\{[^}]*op_name="([^"]*)"', m.group(2))
    if meta:
      names[m.group(1)] = meta.group(1)
      continue
    for operand in re.findall(r"%([\w.\-]+)", m.group(2)):
      if operand in names:
        names[m.group(1)] = names[operand]
        break
  return names


def jax_profile(fn, args):
  """{hlo op: total seconds} of one call of jitted `fn`, and hlo op -> op_name."""
  from jax.profiler import ProfileData
  names = _op_names(fn.lower(*args).compile().as_text())
  jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      jax.block_until_ready(fn(*args))
    path = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)[0]
    data = ProfileData.from_file(path)
  events = []
  for plane in data.planes:
    if plane.name != "/host:CPU":
      continue
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        if "hlo_op" in stats:
          events.append((event.start_ns, event.start_ns + event.duration_ns, stats["hlo_op"]))
  # XLA:CPU runs some thunks (convolutions among them) asynchronously: their event ends at dispatch and
  # the work shows as a gap in which no thunk runs. Each gap is charged to the thunk that ended last
  # before it.
  events.sort()
  totals = collections.Counter()
  last_end, last_op = events[0][0], events[0][2]
  for start, end, op in events:
    if start > last_end:
      totals[last_op] += (start - last_end) * 1e-9
    totals[op] += (end - start) * 1e-9
    if end > last_end:
      last_end, last_op = end, op
  return totals, names


# ------------------------------------------------------------------------------------------------ torch

def _innermost(ranges, event) -> str:
  """The name of the shortest (start, end, name) range containing `event`'s time range, or ""."""
  best, best_len = "", None
  for start, end, name in ranges:
    if start <= event.time_range.start and event.time_range.end <= end and (best_len is None or end - start < best_len):
      best, best_len = name, end - start
  return best


def torch_profile(model, fn):
  """{(module path, op): self seconds} of one call of `fn`; ops attributed to the innermost module."""
  from torch.profiler import ProfilerActivity, profile, record_function
  handles = []
  for name, module in model.named_modules():
    if name:
      ctx = {}
      def pre(mod, inp, name=name, ctx=ctx):
        ctx["rf"] = record_function("module::" + name)
        ctx["rf"].__enter__()
      def post(mod, inp, out, ctx=ctx):
        ctx["rf"].__exit__(None, None, None)
      handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
  fn()
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    fn()
  for h in handles:
    h.remove()
  # Each op belongs to the innermost enclosing range: a module's forward (recorded above), or a backward
  # node (`autograd::engine::evaluate_function: ...`), which belongs to the module whose forward op had
  # the same sequence number.
  events = sorted((e for e in prof.events() if e.device_type.name == "CPU"), key=lambda e: e.time_range.start)
  forward = [(e.time_range.start, e.time_range.end, e.name[len("module::"):]) for e in events
             if e.name.startswith("module::")]
  seq_owner = {}
  for e in events:
    if e.sequence_nr >= 0 and not e.name.startswith(("module::", "autograd::")):
      owner = _innermost(forward, e)
      if owner:
        seq_owner.setdefault(e.sequence_nr, owner)
  backward = [(e.time_range.start, e.time_range.end, seq_owner.get(e.sequence_nr, "")) for e in events
              if e.name.startswith("autograd::engine::evaluate_function")]
  totals = collections.Counter()
  for e in events:
    if e.name.startswith(("module::", "autograd::engine::evaluate_function", "ProfilerStep")):
      continue
    owner = _innermost(forward, e) or _innermost(backward, e) or ""
    totals[(owner, e.name)] += e.self_cpu_time_total * 1e-6
  return totals


# ------------------------------------------------------------------------------------------------ report

def print_parts(title: str, ours: dict, theirs: dict):
  print(f"\n{title}: time share per model part (seconds of one call, summed over threads' ops)")
  print(f"  {'part':24s} {'ours':>9s} {'share':>6s}   {'torch':>9s} {'share':>6s}")
  total_o, total_t = sum(ours.values()) or 1.0, sum(theirs.values()) or 1.0
  for part in [p for p, _ in PARTS] + ["other"]:
    o, t = ours.get(part, 0.0), theirs.get(part, 0.0)
    print(f"  {part:24s} {o:9.3f} {100 * o / total_o:5.1f}%   {t:9.3f} {100 * t / total_t:5.1f}%")
  print(f"  {'total':24s} {total_o:9.3f}         {total_t:9.3f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_workload_args(parser)
  parser.add_argument("--top", type=int, default=15, help="top ops printed per side")
  parser.add_argument("--no_profile", action="store_true", help="times only")
  args = parser.parse_args()

  cfg, audio, params = workload(args)
  backbone = jax.tree_util.tree_map(jnp.asarray, params["wav2vec2"])
  fwd, fwd_bwd = jax_encoder(cfg)
  x = jnp.asarray(audio)
  print(f"config={args.size} batch={args.batch} x {args.seconds:g} s fp32, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__}, medians of {args.steps}")

  with tempfile.TemporaryDirectory() as tmp:
    convert.to_hf(cfg, params, tmp)
    model, t_fwd, t_fwd_bwd = torch_encoder(tmp, audio)
    import torch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    jax.block_until_ready(fwd(backbone, x))
    jax.block_until_ready(fwd_bwd(backbone, x))
    t_fwd()
    t_fwd_bwd()
    # Interleaved: each function's median over its calls, with the others' calls between them.
    times = collections.defaultdict(list)
    runs = [("ours fwd", lambda: jax.block_until_ready(fwd(backbone, x))), ("torch fwd", t_fwd),
            ("ours fwd+bwd", lambda: jax.block_until_ready(fwd_bwd(backbone, x))), ("torch fwd+bwd", t_fwd_bwd)]
    for _ in range(args.steps):
      for name, fn in runs:
        start = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    audio_s = args.batch * args.seconds
    for what in ("fwd", "fwd+bwd"):
      o, t = med[f"ours {what}"], med[f"torch {what}"]
      print(f"encoder {what:8s} ours {o:7.3f} s   torch {t:7.3f} s   speed-up (torch / ours) {t / o:5.2f}x   "
            f"({audio_s / o:.1f} vs {audio_s / t:.1f} audio-s/s)")
    if args.no_profile:
      return

    for what, jfn, tfn in (("forward", fwd, t_fwd), ("forward + backward", fwd_bwd, t_fwd_bwd)):
      ops, names = jax_profile(jfn, (backbone, x))
      ours_parts = collections.Counter()
      for op, s in ops.items():
        ours_parts[part_of(names.get(op, op))] += s
      theirs = torch_profile(model, tfn)
      theirs_parts = collections.Counter()
      for (owner, op), s in theirs.items():
        theirs_parts[part_of(owner.replace(".", "/")) if owner else "other"] += s
      print_parts(f"{what}", ours_parts, theirs_parts)
      total = sum(ops.values()) or 1.0
      print(f"\n  ours, top {args.top} XLA ops ({what}):")
      for op, s in ops.most_common(args.top):
        print(f"    {s:8.4f} s {100 * s / total:5.1f}%  {op:28s} {part_of(names.get(op, op)):22s} "
              f"{names.get(op, '')[-70:]}")
      total = sum(theirs.values()) or 1.0
      print(f"\n  torch, top {args.top} operators by self CPU time ({what}):")
      for (owner, op), s in theirs.most_common(args.top):
        print(f"    {s:8.4f} s {100 * s / total:5.1f}%  {op:28s} {owner[-60:]}")


if __name__ == "__main__":
  main()
