"""Shared by test_multihost.py and multihost_worker.py: a fixed global batch and a short training run."""
import functools

import jax
import ml_collections
import numpy as np

from w2v2_jax import models
from w2v2_jax.models import presets
from w2v2_jax.train import optimizer, parallel, schedules
from w2v2_jax.train import step as train_step

OPTIM = ml_collections.ConfigDict(dict(lr=1e-3, schedule="constant", b1=0.9, b2=0.98, eps=1e-6,
                                       weight_decay=0.01, clip_norm=0.0))
CFG = presets.get("tiny").replace(dropout=0.0, attention_dropout=0.0, dropout_input=0.0, dropout_features=0.0)


def global_batch(rows=8, samples=6400):
  rng = np.random.default_rng(0)
  audio = rng.standard_normal((1, rows, samples)).astype(np.float32)
  return {"audio": audio, "padding_mask": np.zeros(audio.shape, bool),
          "row_ids": np.arange(rows, dtype=np.int32)[None]}


def train(local_batch, devices, steps):
  """Runs `steps` updates on `devices` feeding this process's `local_batch`; returns losses, params."""
  module = models.build(CFG)
  tx = optimizer.make(OPTIM, 10)
  params = jax.device_get(jax.jit(lambda r: module.init(r, np.zeros((1, 6400), np.float32))["params"])(
      {"params": jax.random.PRNGKey(0), "mask": jax.random.PRNGKey(1)}))
  step = functools.partial(train_step.pretrain_step, module=module, tx=tx,
                           lr_schedule=schedules.learning_rate(OPTIM, 10), latent_temp=(2.0, 0.5, 0.999995))
  runner = parallel.DataParallel(step, "shard_map", devices)
  state = runner.put_state(train_step.init_state(params, tx, jax.random.key(0)))
  losses = []
  for _ in range(steps):
    state, metrics = runner.step(state, runner.put_batch(local_batch))
    losses.append(float(metrics["loss"]))
  replicated = runner.get_state(state)["params"]
  host = jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), replicated)
  return losses, host


def checksum(params):
  return [float(np.sum(np.asarray(x, np.float64))) for x in jax.tree_util.tree_leaves(params)]
