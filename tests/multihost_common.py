"""Shared by test_multihost.py and multihost_worker.py: a fixed global batch and a short training run."""
import functools

import jax
import ml_collections
import numpy as np

from w2v2_jax import models
from w2v2_jax.models import presets
from w2v2_jax.train import checkpoint, optimizer, parallel, schedules
from w2v2_jax.train import step as train_step

OPTIM = ml_collections.ConfigDict(dict(lr=1e-3, schedule="constant", b1=0.9, b2=0.98, eps=1e-6,
                                       weight_decay=0.01, clip_norm=0.0))
CFG = presets.get("tiny").replace(dropout=0.0, attention_dropout=0.0, dropout_input=0.0, dropout_features=0.0)


def global_batch(rows=8, samples=6400):
  rng = np.random.default_rng(0)
  audio = rng.standard_normal((1, rows, samples)).astype(np.float32)
  return {"audio": audio, "padding_mask": np.zeros(audio.shape, bool),
          "row_ids": np.arange(rows, dtype=np.int32)[None]}


def _init_params(module, seed):
  """The tiny model's params (numpy) from PRNG keys seed, seed + 1."""
  return jax.device_get(jax.jit(lambda r: module.init(r, np.zeros((1, 6400), np.float32))["params"])(
      {"params": jax.random.PRNGKey(seed), "mask": jax.random.PRNGKey(seed + 1)}))


def train(local_batch, devices, steps, mode="shard_map", checkpoint_dir=None):
  """Runs `steps` updates on `devices` (parallel `mode`; fsdp splits every leaf of 64 elements or more)
  feeding this process's `local_batch`; returns losses and the full params (numpy). With
  `checkpoint_dir`, the final state is saved there (every process writes what it holds)."""
  module = models.build(CFG)
  tx = optimizer.make(OPTIM, 10)
  params = _init_params(module, 0)
  step = functools.partial(train_step.pretrain_step, module=module, tx=tx,
                           lr_schedule=schedules.learning_rate(OPTIM, 10), latent_temp=(2.0, 0.5, 0.999995))
  runner = parallel.DataParallel(step, mode, devices, min_shard_size=64)
  state = runner.put_state(train_step.init_state(params, tx, jax.random.key(0)))
  losses = []
  for _ in range(steps):
    state, metrics = runner.step(state, runner.put_batch(local_batch))
    losses.append(float(metrics["loss"]))
  if mode == "fsdp" and jax.process_count() > 1:      # each process holds only its slices of split leaves
    leaves = jax.tree_util.tree_leaves(state["params"])
    assert sum(not x.is_fully_addressable for x in leaves) > 20, "fsdp state is not split across processes"
  if checkpoint_dir is not None:
    with checkpoint.Checkpointer(checkpoint_dir) as ckpt:
      ckpt.save(steps, state, force=True)
      ckpt.wait()
  return losses, runner.host_params(state)


def restore_params(checkpoint_dir, devices):
  """The params of the checkpoint in `checkpoint_dir`, restored into shard_map (replicated) on `devices`."""
  tx = optimizer.make(OPTIM, 10)
  params = _init_params(models.build(CFG), 3)         # other values: the template only gives the structure
  runner = parallel.DataParallel(lambda s, b: (s, {}), "shard_map", devices)
  template = runner.put_state(train_step.init_state(params, tx, jax.random.key(0)))
  with checkpoint.Checkpointer(checkpoint_dir) as ckpt:
    restored, _ = ckpt.restore(state_template=template)
  return runner.host_params(restored)


def checksum(params):
  return [float(np.sum(np.asarray(x, np.float64))) for x in jax.tree_util.tree_leaves(params)]
