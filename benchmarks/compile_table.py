"""The compile-check table of the README: the production train steps compiled for TPU slices by libtpu's
compiler on this host (no TPU needed), one `w2v2 compile-check` subprocess per entry.

  python benchmarks/compile_table.py [--out compile_table.jsonl] [--only base] [--slice v5e-64] [--table sharded]

Prints a Markdown table (HBM per chip, headroom, compile time, FLOPs per update, ideal update time) and
appends each entry's full figures to --out as JSON lines. An entry that does not compile or fit is
reported as such. BASE takes 5-10 minutes per entry on a 2-core CPU, LARGE longer.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BF16 = ["--config.model.dtype=bfloat16"]
# (config, topology, extra flags): the recipes on the slices users rent, in the order they matter.
ENTRIES = [
    ("pretrain:base", "v5e-8", BF16),
    ("pretrain:base", "v5e-64", BF16),
    ("finetune:base_10m", "v5e-8", BF16),
    ("pretrain:base", "v4-32", BF16),
    ("pretrain:base", "v5p-8", BF16),
    ("pretrain:large", "v4-32", BF16),
    ("pretrain:large_lv60", "v4-32", BF16),
    ("finetune:large_960h", "v4-32", BF16),
    ("pretrain:large", "v5p-64", BF16),
    ("pretrain:large_lv60", "v5p-64", BF16),
]
FSDP, REPLICATED = ["--config.parallel.mode=fsdp"], ["--config.parallel.mode=shard_map"]
SCAN = ["--config.model.scan_layers=True"]
# --table sharded: parallel.mode="fsdp" (params and Adam moments split over the chips) beside the replicated
# state, for the models whose replicated state does not fit a chip's share. The xlsr configs set fsdp
# and scanned layers themselves.
SHARDED = [
    ("pretrain:large", "v5e-64", BF16 + SCAN + FSDP),
    ("pretrain:large", "v5e-64", BF16 + SCAN + REPLICATED),
    ("pretrain:xlsr_1b", "v5p-64", BF16),
    ("pretrain:xlsr_1b", "v5p-64", BF16 + REPLICATED),
    ("pretrain:xlsr_1b", "v4-128", BF16),
    ("pretrain:xlsr_1b", "v5e-64", BF16),
    ("pretrain:xlsr_1b", "v5e-64", BF16 + REPLICATED),
    ("pretrain:xlsr_2b", "v5p-128", BF16),
    ("pretrain:xlsr_2b", "v5p-128", BF16 + REPLICATED),
]


def main():
  parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
  parser.add_argument("--out", default="compile_table.jsonl")
  parser.add_argument("--only", default="", help="run only entries whose config contains this string")
  parser.add_argument("--slice", default="", help="run only entries on this topology (e.g. v5e-64)")
  parser.add_argument("--table", default="recipes", choices=("recipes", "sharded"))
  args = parser.parse_args()
  entries = ENTRIES if args.table == "recipes" else SHARDED
  env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1")
  env.pop("XLA_FLAGS", None)
  print("| config | parallel | slice | accumulation | per chip per micro-batch | params + moments per chip | HBM per chip | "
        "headroom | compile | FLOPs per update (slice) | ideal update |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for config, topo, extra in entries:
    if args.only not in config or (args.slice and args.slice != topo):
      continue
    before = _count(args.out)
    cmd = [sys.executable, "-m", "w2v2_jax.cli", "compile-check", f"--config={config}",
           f"--topology={topo}", f"--json={args.out}", "--top_ops=0"] + extra
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if _count(args.out) == before:
      reason = (proc.stderr.strip().splitlines() or ["?"])[-1]
      if "RESOURCE_EXHAUSTED: " in reason:       # XLA's out-of-memory message: keep the figures
        reason = "out of memory: " + reason.split("RESOURCE_EXHAUSTED: ", 1)[1]
      reason = reason[:200]
      mode = "fsdp" if FSDP[0] in extra or ("xlsr" in config and REPLICATED[0] not in extra) else "replicated"
      print(f"| {config} | {mode} | {topo} | | | | does not compile: {reason} | | | | |", flush=True)
      continue
    r = json.loads(open(args.out).read().splitlines()[-1])
    gib = r["total_bytes"] / 2 ** 30
    mode = "fsdp" if r.get("parallel") == "fsdp" else "replicated"
    print(f"| {config} | {mode} | {topo} ({r['chips']} chips) | {r['accumulate']} | {r['rows_per_device']} x {r['samples']} | "
          f"{r.get('state_bytes_per_chip', 0) / 2 ** 30:.2f} GiB | {gib:.2f} of {r['hbm_gib']:g} GiB{'' if r['fits'] else ' (does not fit)'} | {100 * r['headroom']:.0f}% | "
          f"{r['compile_seconds'] / 60:.1f} min | {r['flops_per_update']:.2e} | {r['ideal_update_seconds']:.3f} s |",
          flush=True)


def _count(path):
  return len(open(path).read().splitlines()) if os.path.exists(path) else 0


if __name__ == "__main__":
  main()
