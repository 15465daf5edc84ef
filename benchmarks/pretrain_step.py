"""One wav2vec 2.0 pretraining train step, ours (JAX) vs Hugging Face PyTorch, side by side in one run.

    python benchmarks/pretrain_step.py                  # BASE size, batch 4 x 4 s, fp32, Adam
    python benchmarks/pretrain_step.py --size tiny --steps 3

Prints the median step time over --steps steps (after warm-up / compilation), audio-seconds per second
and the ratio, for the full train step (forward, masking, negatives, loss, backward, Adam update) and for
the encoder forward pass (eval mode). PyTorch runs with flush-denormal on (10x slower without it).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs.model import get_config  # noqa: E402
from w2v2_jax import models  # noqa: E402
from w2v2_jax.models.config import ModelConfig  # noqa: E402
from w2v2_jax.train.objective import pretrain_sums  # noqa: E402

SAMPLE_RATE = 16000


def median_time(fn, steps):
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def jax_bench(cfg: ModelConfig, params, audio: np.ndarray, steps: int):
  module = models.build(cfg)
  tx = optax.adamw(5e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01)
  state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  batch = jnp.asarray(audio)

  def train_step(state, batch, rng):
    def loss_fn(p):
      sums, _ = pretrain_sums(module, p, batch, None, jax.random.fold_in(rng, state["step"]), 2.0)
      return sums["total"] / jnp.maximum(sums["sample_size"], 1.0), sums
    grads, sums = jax.grad(loss_fn, has_aux=True)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    new = {"params": optax.apply_updates(state["params"], updates), "opt": opt, "step": state["step"] + 1}
    return new, sums

  step = jax.jit(train_step, donate_argnums=0)
  rng = jax.random.PRNGKey(0)
  t0 = time.perf_counter()
  state, sums = step(state, batch, rng)
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - t0

  def one():
    nonlocal state
    state, s = step(state, batch, rng)
    jax.block_until_ready(s)
  step_s = median_time(one, steps)

  encoder = models.build(cfg.replace(task="encoder"))
  fwd = jax.jit(lambda p, a: encoder.apply({"params": {"wav2vec2": p}}, a)["last_hidden_state"])
  jax.block_until_ready(fwd(state["params"]["wav2vec2"], batch))
  fwd_s = median_time(lambda: jax.block_until_ready(fwd(state["params"]["wav2vec2"], batch)), steps)
  return step_s, fwd_s, compile_s, float(sums["total"] / sums["sample_size"])


def torch_bench(hf_dir: str, audio: np.ndarray, steps: int):
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

  def one():
    mask = _compute_mask_indices((audio.shape[0], frames), cfg.mask_time_prob, cfg.mask_time_length,
                                 min_masks=2)
    neg = _sample_negative_indices((audio.shape[0], frames), cfg.num_negatives, mask_time_indices=mask)
    out = model(x, mask_time_indices=torch.from_numpy(mask), sampled_negative_indices=torch.from_numpy(neg))
    opt.zero_grad()
    (out.loss / mask.sum()).backward()
    opt.step()
  one()
  step_s = median_time(one, steps)
  encoder = model.wav2vec2.eval()
  def fwd():
    with torch.no_grad():
      encoder(x)
  fwd()
  fwd_s = median_time(fwd, steps)
  return step_s, fwd_s


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="base", help="model preset from configs/model.py")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seconds", type=float, default=4.0)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--which", choices=("both", "jax", "torch"), default="both")
  args = parser.parse_args()

  import tempfile
  cfg = ModelConfig.from_any(get_config(args.size))
  module = models.build(cfg)
  audio = np.random.default_rng(0).standard_normal(
      (args.batch, int(args.seconds * SAMPLE_RATE))).astype(np.float32)
  params = module.init({"params": jax.random.PRNGKey(0), "mask": jax.random.PRNGKey(1)}, audio[:1])["params"]
  audio_seconds = args.batch * args.seconds
  print(f"config={args.size} batch={args.batch} x {args.seconds:g} s fp32  devices={jax.devices()}  "
        f"steps={args.steps} (median)")
  results = {}
  host_params = jax.device_get(params)          # the jitted step donates (deletes) its input buffers
  if args.which in ("both", "jax"):
    step_s, fwd_s, compile_s, loss = jax_bench(cfg, jax.tree_util.tree_map(jnp.array, host_params), audio,
                                               args.steps)
    results["jax"] = (step_s, fwd_s)
    print(f"w2v2_jax   train step {step_s:7.3f} s  ({audio_seconds / step_s:6.2f} audio-s/s)   "
          f"encoder fwd {fwd_s:6.3f} s  ({audio_seconds / fwd_s:6.2f} audio-s/s)   "
          f"compile {compile_s:.1f} s, loss/frame {loss:.3f}")
  if args.which in ("both", "torch"):
    from w2v2_jax import convert
    with tempfile.TemporaryDirectory() as tmp:
      convert.to_hf(cfg, host_params, tmp)
      step_s, fwd_s = torch_bench(tmp, audio, args.steps)
    results["torch"] = (step_s, fwd_s)
    print(f"HF torch   train step {step_s:7.3f} s  ({audio_seconds / step_s:6.2f} audio-s/s)   "
          f"encoder fwd {fwd_s:6.3f} s  ({audio_seconds / fwd_s:6.2f} audio-s/s)")
  if len(results) == 2:
    print(f"speed-up (torch time / ours): train step {results['torch'][0] / results['jax'][0]:.2f}x   "
          f"encoder fwd {results['torch'][1] / results['jax'][1]:.2f}x")


if __name__ == "__main__":
  main()
