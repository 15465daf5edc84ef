"""Run by test_aot.py in a fresh process: libtpu's compiler must not share a process with the CPU tests.

Compiles the tiny pretraining step for a TPU v5e-8 slice with 1 and with 8 accumulated micro-batches
(the same per-chip micro-batch), and with 8 in parallel.mode="fsdp" (sharded state), and prints the
reports as one JSON line.
"""
import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.pop("XLA_FLAGS", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position

from w2v2_jax.configs.pretrain import get_config  # pylint: disable=wrong-import-position
from w2v2_jax.train import aot  # pylint: disable=wrong-import-position

reports = {}
for accumulate in (1, 8):
  config = get_config("tiny")
  config.model.dtype = "bfloat16"
  config.batch.global_seconds = config.batch.device_seconds * 8 * accumulate   # 8 chips
  reports[accumulate] = aot.compile_check(config, "v5e-8")
  if accumulate == 8:
    config.parallel.mode, config.parallel.fsdp_min_size = "fsdp", 0
    reports["fsdp"] = aot.compile_check(config, "v5e-8")
# XLA's own count of the same step compiled for this CPU (one device, A=1): an independent reference
# for the jaxpr FLOP counter.
config = get_config("tiny")
config.batch.global_seconds = config.batch.device_seconds
runner, state, batch, _ = aot.build(config, jax.devices()[:1])
step = runner.jitted(state)
compiled = step.lower(state, batch).compile()
from w2v2_jax.train import flops  # pylint: disable=wrong-import-position
cpu = {"xla_flops": aot._cost(compiled)["flops"],  # pylint: disable=protected-access
       "jaxpr_flops": flops.total_flops(flops.count(jax.make_jaxpr(step)(state, batch)))}
print("REPORT " + json.dumps({"reports": {str(k): {n: v for n, v in r.items() if n not in ("buckets", "ops")}
                                          for k, r in reports.items()}, "cpu": cpu}))
