"""One wav2vec 2.0 pretraining train step, ours (JAX) vs Hugging Face PyTorch, side by side in one run.

    python benchmarks/pretrain_step.py                  # BASE size, batch 4 x 4 s, fp32, Adam
    python benchmarks/pretrain_step.py --size tiny --steps 3

Prints the median step time over --steps steps (after warm-up / compilation), audio-seconds per second
and the ratio, for the full train step (ours: the production `pretrain_step` on one device; forward,
masking, negatives, loss, backward, Adam update) and for the encoder forward pass (eval mode). PyTorch runs with flush-denormal on (10x slower without it).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import functools

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


def median_time(fn, steps):
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def jax_bench(cfg: ModelConfig, params, audio: np.ndarray, steps: int):
  """The production step (w2v2_jax.train.step.pretrain_step) on one device, via DataParallel."""
  module = models.build(cfg)
  optim = ml_collections.ConfigDict(dict(lr=5e-4, schedule="polynomial", warmup_steps=10, end_lr=0.0, power=1.0,
                                         b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01, clip_norm=0.0))
  tx = optimizer.make(optim, 1000)
  step_fn = functools.partial(train_step.pretrain_step, module=module, tx=tx,
                              lr_schedule=schedules.learning_rate(optim, 1000), latent_temp=(2.0, 0.5, 0.999995))
  runner = parallel.DataParallel(step_fn, "shard_map", jax.devices()[:1])
  state = runner.put_state(train_step.init_state(params, tx, jax.random.key(0)))
  batch = runner.put_batch({"audio": audio[None], "padding_mask": np.zeros((1,) + audio.shape, bool),
                            "row_ids": np.arange(audio.shape[0], dtype=np.int32)[None]})
  t0 = time.perf_counter()
  state, metrics = runner.step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0

  def one():
    nonlocal state, metrics
    state, metrics = runner.step(state, batch)
    jax.block_until_ready(metrics)
  step_s = median_time(one, steps)

  encoder = models.build(cfg.replace(task="encoder"))
  fwd = jax.jit(lambda p, a: encoder.apply({"params": {"wav2vec2": p}}, a)["last_hidden_state"])
  backbone = runner.get_state(state)["params"]["wav2vec2"]
  jax.block_until_ready(fwd(backbone, audio))
  fwd_s = median_time(lambda: jax.block_until_ready(fwd(backbone, audio)), steps)
  return step_s, fwd_s, compile_s, float(metrics["loss"])


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
  parser.add_argument("--size", default="base", help="model preset (w2v2_jax/models/presets.py)")
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
          f"compile {compile_s:.1f} s, loss {loss:.3f}")
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
