"""The train step compiled for a TPU slice by libtpu's compiler, on this CPU (`w2v2 compile-check`).

libtpu runs in subprocesses: the rest of the suite keeps its CPU backend with 8 fake devices.
"""
import json
import os
import subprocess
import sys

import pytest

from w2v2_jax.train import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2.0 ** 30


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1")
  env.pop("XLA_FLAGS", None)
  return env


@pytest.fixture(scope="module")
def worker():
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "aot_worker.py")], capture_output=True,
                        text=True, env=_env(), timeout=1200, cwd=ROOT)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("REPORT ")]
  assert proc.returncode == 0 and lines, proc.stderr[-3000:]
  return json.loads(lines[-1][len("REPORT "):])


def test_tiny_step_fits_v5e_8_and_accumulation_costs_no_memory(worker):
  one, eight = worker["reports"]["1"], worker["reports"]["8"]
  for r in (one, eight):
    assert r["chips"] == 8 and r["chip"] == "TPU v5e" and r["fits"]
    assert 0 < r["total_bytes"] < 16 * GIB and r["temp_bytes"] > 0
    assert r["rows_per_device"] == one["rows_per_device"] and r["samples"] == one["samples"]
  assert (one["accumulate"], eight["accumulate"]) == (1, 8)
  # Scanned accumulation: the activations of one micro-batch are alive at a time, so 8 micro-batches
  # take the temporaries of 1 plus at most a copy of the larger batch (an unrolled loop kept every
  # micro-batch's activations: 8x). The batch argument grows by the 7 extra micro-batches.
  per_micro = one["rows_per_device"] * one["samples"] * (4 + 1) + one["rows_per_device"] * 4   # audio, padding, ids
  batch_growth = eight["argument_bytes"] - one["argument_bytes"]
  assert 7 * per_micro <= batch_growth <= 7 * per_micro * 1.1
  assert eight["temp_bytes"] - one["temp_bytes"] <= 1.5 * batch_growth
  assert eight["temp_bytes"] < 2 * one["temp_bytes"]
  # FLOPs per update scale with the micro-batches (the jaxpr count); XLA counts the loop body once.
  assert eight["flops_per_chip"] == pytest.approx(8 * one["flops_per_chip"], rel=0.02)
  assert eight["xla_flops_per_chip"] == pytest.approx(one["xla_flops_per_chip"], rel=0.05)
  assert one["ideal_update_seconds"] == pytest.approx(one["flops_per_chip"] / 197e12)


def test_sharded_state_takes_an_eighth_of_the_chip(worker):
  """parallel.mode="fsdp" compiled for v5e-8 (the scanned accumulation, params gathered inside it): params
  and Adam moments per chip fall to about 1/8 of the replicated step's, and the step's arguments (state +
  batch, as the TPU lays them out: small arrays are padded to its tiles, so the compiler's saving is
  larger than the logical one) fall by at least that much; the update's model FLOPs are the same."""
  rep, sharded = worker["reports"]["8"], worker["reports"]["fsdp"]
  assert (rep["parallel"], sharded["parallel"]) == ("shard_map", "fsdp") and sharded["fits"]
  assert sharded["state_bytes_per_chip"] <= rep["state_bytes_per_chip"] / 8 * 1.1
  state_saved = rep["state_bytes_per_chip"] - sharded["state_bytes_per_chip"]
  assert rep["argument_bytes"] - sharded["argument_bytes"] >= 0.95 * state_saved
  assert sharded["flops_per_chip"] == pytest.approx(rep["flops_per_chip"], rel=0.01)


def test_flop_counter_agrees_with_xla_without_loops(worker):
  cpu = worker["cpu"]
  assert cpu["jaxpr_flops"] == pytest.approx(cpu["xla_flops"], rel=0.05)


def test_compile_check_cli_exits_nonzero_when_the_step_does_not_fit():
  # 20000 s of audio per chip per micro-batch: tens of GiB of activations on a 16 GiB v5e chip.
  cmd = [sys.executable, "-m", "w2v2_jax.cli", "compile-check", "--config=pretrain:tiny",
         "--topology=v5e-1", "--config.batch.device_seconds=20000", "--config.batch.global_seconds=20000",
         "--top_ops=3"]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=1200, cwd=ROOT)
  assert proc.returncode != 0
  assert "w2v2 compile-check:" in proc.stderr
  assert "v5e-1" in proc.stderr or "TPU v5e" in proc.stderr


def test_topologies_and_bad_names():
  assert aot.topology("v4-32").num_chips == 16 and aot.topology("v4-32").topology_name == "v4:2x2x4"
  assert aot.topology("v5p-8").num_chips == 4 and aot.topology("v5e-64").topology_name == "v5e:8x8"
  assert aot.topology("v6e-8").chip.hbm_gib == 32
  for name in ("v4-8", "v4-32", "v4-128", "v5e-8", "v5e-64", "v5e-256", "v5p-8", "v5p-64"):
    assert name in aot.TOPOLOGIES
  with pytest.raises(ValueError, match="unknown TPU topology 'v5e-7'"):
    aot.topology("v5e-7")


def test_flop_counter_counts_scans_conds_and_convolutions_exactly():
  import jax
  import jax.numpy as jnp
  from w2v2_jax.train import flops

  def fn(x, w, k, flag):
    def body(carry, _):
      return carry @ w, None                                   # (8, 16) @ (16, 16): 2 * 8 * 16 * 16
    y, _ = jax.lax.scan(body, x, None, length=5)
    z = jax.lax.cond(flag, lambda v: (v @ w) @ w, lambda v: v, y)   # the costlier branch: 2 matmuls
    conv = jax.lax.conv_general_dilated(x[None], k, (2,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"))
    return z, conv

  x, w = jnp.ones((8, 16)), jnp.ones((16, 16))
  k = jnp.ones((3, 16, 4))                                     # kernel 3, 16 -> 4 channels, stride 2
  table = flops.count(jax.make_jaxpr(fn)(x, w, k, True))
  matmul = 2 * 8 * 16 * 16
  conv_out = 1 * ((8 - 3) // 2 + 1) * 4
  assert flops.total_flops(table, ("matmul",)) == 5 * matmul + 2 * matmul
  assert flops.total_flops(table, ("conv",)) == 2 * conv_out * 3 * 16
