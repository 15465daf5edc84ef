"""The pretraining train step and the encoder, ours (JAX) vs Hugging Face PyTorch, side by side in one run.

    python benchmarks/pretrain_step.py                  # BASE size, batch 4 x 4 s, fp32 (+ bf16 where fast)
    python benchmarks/pretrain_step.py --size tiny --steps 3 --dtypes float32

Each runtime and dtype runs in its own process, alone, one after the other (JAX ran 20-30% slower beside
a live PyTorch process or its own bf16 variant). For each compute dtype, median times (after warm-up /
compilation, the kinds' calls interleaved) of
  - the full train step (ours: the production `pretrain_step` on one device: forward, masking, negatives,
    loss, backward, Adam update; torch: `Wav2Vec2ForPreTraining` with HF's masks and negatives, AdamW),
  - the encoder forward pass (eval mode),
  - the encoder forward + backward (gradient of 0.5 * sum(hidden ** 2) for every parameter, eval mode),
and the ratios torch time / ours against torch fp32 and torch in the same dtype. Each timed call starts
after --pause idle seconds (the previous call's worker threads stop spinning). bf16 is mixed precision on
both sides: ours `model.dtype=bfloat16` (params, softmax, losses fp32), torch `torch.autocast` (CPU,
bfloat16). `--dtypes auto` adds bf16 when the CPU has bf16 instructions (AMX or AVX512-BF16).
PyTorch runs with flush-denormal on (10x slower without it). Where the time goes:
`benchmarks/encoder_profile.py`.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from w2v2_jax.configs.model import get_config  # noqa: E402
from w2v2_jax import models  # noqa: E402
from w2v2_jax.models.config import ModelConfig  # noqa: E402
from w2v2_jax.train import optimizer, parallel, schedules  # noqa: E402
from w2v2_jax.train import step as train_step  # noqa: E402

SAMPLE_RATE = 16000
KINDS = ("train step", "encoder fwd", "encoder fwd+bwd")


def cpu_has_bf16() -> bool:
  """True when the CPU has bf16 matrix or vector instructions (Linux: AMX-BF16 or AVX512-BF16)."""
  try:
    with open("/proc/cpuinfo") as f:
      flags = f.read()
  except OSError:
    return False
  return "amx_bf16" in flags or "avx512_bf16" in flags


def jax_encoder(cfg: ModelConfig):
  """The encoder's jitted forward (params, audio) -> hidden (B, T, D), and forward + backward
  (params, audio) -> gradient of 0.5 * sum(hidden ** 2) for every param (eval mode)."""
  encoder = models.build(cfg.replace(task="encoder"))

  def hidden(p, a):
    return encoder.apply({"params": {"wav2vec2": p}}, a)["last_hidden_state"]
  return jax.jit(hidden), jax.jit(jax.grad(lambda p, a: 0.5 * jnp.sum(jnp.square(hidden(p, a).astype(jnp.float32)))))


def torch_encoder(hf_dir: str, audio: np.ndarray, dtype: str = "float32"):
  """HF's Wav2Vec2Model (eval mode) and its forward / forward + backward on `audio`, as in `jax_encoder`;
  bf16 through torch.autocast (CPU)."""
  import torch
  import transformers
  torch.set_flush_denormal(True)
  encoder = transformers.Wav2Vec2Model.from_pretrained(hf_dir).eval()
  x = torch.from_numpy(audio)

  def fwd():
    with torch.no_grad(), _autocast(dtype):
      encoder(x)

  def fwd_bwd():
    encoder.zero_grad(set_to_none=True)
    with _autocast(dtype):
      h = encoder(x).last_hidden_state
    (0.5 * h.float().square().sum()).backward()
  return encoder, fwd, fwd_bwd


def _autocast(dtype: str):
  import torch
  if dtype == "bfloat16":
    return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
  return contextlib.nullcontext()


def jax_callables(cfg: ModelConfig, params, audio: np.ndarray):
  """{kind: fn()} for ours: the production step on one device (via DataParallel) and the encoder."""
  module = models.build(cfg)
  optim = ml_collections.ConfigDict(dict(lr=5e-4, schedule="polynomial", warmup_steps=10, end_lr=0.0, power=1.0,
                                         b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01, clip_norm=0.0))
  tx = optimizer.make(optim, 1000)
  step_fn = functools.partial(train_step.pretrain_step, module=module, tx=tx,
                              lr_schedule=schedules.learning_rate(optim, 1000), latent_temp=(2.0, 0.5, 0.999995))
  runner = parallel.DataParallel(step_fn, "shard_map", jax.devices()[:1])
  state = runner.put_state(train_step.init_state(jax.tree_util.tree_map(jnp.array, params), tx, jax.random.key(0)))
  batch = runner.put_batch({"audio": audio[None], "padding_mask": np.zeros((1,) + audio.shape, bool),
                            "row_ids": np.arange(audio.shape[0], dtype=np.int32)[None]})
  box = {"state": state}

  def step():
    box["state"], metrics = runner.step(box["state"], batch)   # the step donates its input state
    jax.block_until_ready(metrics)

  fwd, fwd_bwd = jax_encoder(cfg)
  backbone = jax.tree_util.tree_map(jnp.array, params["wav2vec2"])
  x = jnp.asarray(audio)
  return {"train step": step,
          "encoder fwd": lambda: jax.block_until_ready(fwd(backbone, x)),
          "encoder fwd+bwd": lambda: jax.block_until_ready(fwd_bwd(backbone, x))}


def torch_callables(hf_dir: str, audio: np.ndarray, dtype: str):
  """{kind: fn()} for HF PyTorch; bf16 through torch.autocast (CPU)."""
  import torch
  import transformers
  from transformers.models.wav2vec2.modeling_wav2vec2 import (_compute_mask_indices,
                                                              _sample_negative_indices)
  torch.set_flush_denormal(True)
  model = transformers.Wav2Vec2ForPreTraining.from_pretrained(hf_dir).train()
  cfg = model.config
  opt = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
  x = torch.from_numpy(audio)
  frames = int(model._get_feat_extract_output_lengths(audio.shape[1]))

  def step():
    mask = _compute_mask_indices((audio.shape[0], frames), cfg.mask_time_prob, cfg.mask_time_length,
                                 min_masks=2)
    neg = _sample_negative_indices((audio.shape[0], frames), cfg.num_negatives, mask_time_indices=mask)
    with _autocast(dtype):
      out = model(x, mask_time_indices=torch.from_numpy(mask), sampled_negative_indices=torch.from_numpy(neg))
    opt.zero_grad()
    (out.loss.float() / mask.sum()).backward()
    opt.step()

  _, fwd, fwd_bwd = torch_encoder(hf_dir, audio, dtype)
  return {"train step": step, "encoder fwd": fwd, "encoder fwd+bwd": fwd_bwd}


def add_workload_args(parser: argparse.ArgumentParser) -> None:
  """The flags that choose the benchmarked model and input (shared with encoder_profile.py)."""
  parser.add_argument("--size", default="base", help="model preset (w2v2_jax/models/presets.py)")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seconds", type=float, default=4.0)
  parser.add_argument("--steps", type=int, default=5, help="timed calls per variant (median)")


def workload(args):
  """(model config, audio (batch, samples) float32 noise, host params of Wav2Vec2ForPreTraining) for the
  flags of `add_workload_args`; the same seeds every run."""
  cfg = ModelConfig.from_any(get_config(args.size))
  audio = np.random.default_rng(0).standard_normal(
      (args.batch, int(args.seconds * SAMPLE_RATE))).astype(np.float32)
  params = jax.device_get(models.build(cfg).init({"params": jax.random.PRNGKey(0), "mask": jax.random.PRNGKey(1)},
                                                 audio[:1])["params"])
  return cfg, audio, params


def _worker(conn, side: str, flags: dict, dtype: str) -> None:
  """One runtime in one dtype, in its own process: builds and warms up its callables (sends
  {kind: seconds}), then runs each kind it is sent and answers with the seconds it took, until sent None."""
  args = argparse.Namespace(**flags)
  cfg, audio, params = workload(args)
  with tempfile.TemporaryDirectory() as tmp:
    if side == "torch":
      from w2v2_jax import convert
      convert.to_hf(cfg, params, tmp)
      fns = torch_callables(tmp, audio, dtype)
    else:
      fns = jax_callables(cfg.replace(dtype=dtype), params, audio)
  warm = {}
  for kind, fn in fns.items():               # warm-up: compilation, allocator, first-call costs
    start = time.perf_counter()
    fn()
    warm[kind] = time.perf_counter() - start
  conn.send(warm)
  while (kind := conn.recv()) is not None:
    start = time.perf_counter()
    fns[kind]()
    conn.send(time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_workload_args(parser)
  parser.add_argument("--dtypes", default="auto",
                      help="comma-separated compute dtypes (float32, bfloat16), or auto: float32, plus "
                           "bfloat16 on CPUs with bf16 instructions")
  parser.add_argument("--pause", type=float, default=1.0,
                      help="seconds idle before each timed call: a runtime's worker threads spin for a "
                           "while after a call and would slow the next one")
  parser.add_argument("--which", choices=("both", "jax", "torch"), default="both")
  args = parser.parse_args()

  dtypes = (["float32"] + (["bfloat16"] if cpu_has_bf16() else [])) if args.dtypes == "auto" \
      else args.dtypes.split(",")
  sides = {"both": ("ours", "torch"), "jax": ("ours",), "torch": ("torch",)}[args.which]
  audio_seconds = args.batch * args.seconds
  print(f"config={args.size} batch={args.batch} x {args.seconds:g} s  dtypes={','.join(dtypes)}  "
        f"{os.cpu_count()} CPUs, jax {jax.__version__}  medians of {args.steps}, one process per runtime and dtype")

  # One process per runtime and dtype, one after the other, each alone on the machine as a user's program
  # is. Measured in one process, JAX ran 20-30% slower beside a live PyTorch (another process included,
  # even idle between calls) or beside its own bf16 variant; PyTorch did not slow down.
  ctx = multiprocessing.get_context("spawn")
  warm, times = {}, collections.defaultdict(list)
  for side in sides:
    for dtype in dtypes:
      parent, child = ctx.Pipe()
      proc = ctx.Process(target=_worker, args=(child, side, vars(args), dtype), daemon=True)
      proc.start()
      for kind, seconds in parent.recv().items():       # built and warmed up
        warm[(side, dtype, kind)] = seconds
      for _ in range(args.steps):
        for kind in KINDS:
          time.sleep(args.pause)           # let the previous call's worker threads stop spinning
          parent.send(kind)
          times[(side, dtype, kind)].append(parent.recv())
      parent.send(None)
      proc.join()
  med = {k: statistics.median(v) for k, v in times.items()}

  print(f"\n| {'':16s} | {'dtype':8s} | {'ours':>8s} | {'torch':>8s} | {'torch / ours':>12s} | {'torch fp32 / ours':>17s} |")
  print(f"|{'-' * 18}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 14}|{'-' * 19}|")
  for kind in KINDS:
    for dtype in dtypes:
      ours, theirs = med.get(("ours", dtype, kind)), med.get(("torch", dtype, kind))
      base = med.get(("torch", "float32", kind))
      def fmt(t):
        return f"{t:7.3f}s" if t is not None else f"{'-':>8s}"
      def ratio(a, b):
        return f"{a / b:.2f}x" if a is not None and b is not None else "-"
      print(f"| {kind:16s} | {dtype:8s} | {fmt(ours)} | {fmt(theirs)} | {ratio(theirs, ours):>12s} | "
            f"{ratio(base, ours):>17s} |")
  if ("ours", "float32", "train step") in med:
    t = med[("ours", "float32", "train step")]
    print(f"\nours fp32 train step: {audio_seconds / t:.2f} audio-s/s; first call (compile) "
          f"{warm[('ours', 'float32', 'train step')]:.1f} s")


if __name__ == "__main__":
  main()
