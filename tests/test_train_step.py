"""The data-parallel pretraining step: layout independence, both wrappers, compilations, updates."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from w2v2_jax.configs.model import get_config
from w2v2_jax import backend, models
from w2v2_jax.models.config import ModelConfig
from w2v2_jax.train import optimizer, parallel, schedules
from w2v2_jax.train import step as train_step

OPTIM = ml_collections.ConfigDict(dict(lr=1e-3, schedule="polynomial", warmup_steps=2, end_lr=0.0, power=1.0,
                                       b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01, clip_norm=0.0))
TEMP = (2.0, 0.5, 0.999995)


def tiny(**changes):
  # Dropout and LayerDrop are per-device random by design; switch them off to compare layouts.
  base = dict(dropout=0.0, attention_dropout=0.0, dropout_input=0.0, dropout_features=0.0,
              encoder_layerdrop=0.0)
  base.update(changes)
  return ModelConfig.from_any(get_config("tiny")).replace(**base)


def make_batch(num_micro, rows, samples=6400, seed=0, pad_last=0):
  rng = np.random.default_rng(seed)
  audio = rng.standard_normal((num_micro, rows, samples)).astype(np.float32)
  padding = np.zeros(audio.shape, bool)
  if pad_last:
    padding[:, -1, -pad_last:] = True
    audio[padding] = 0.0
  row_ids = np.broadcast_to(np.arange(rows, dtype=np.int32), (num_micro, rows)).copy()
  return {"audio": audio, "padding_mask": padding, "row_ids": row_ids}


@functools.lru_cache(maxsize=None)
def init_params(cfg):
  module = models.build(cfg)
  return jax.device_get(module.init({"params": jax.random.PRNGKey(0), "mask": jax.random.PRNGKey(1)},
                                    np.zeros((1, 6400), np.float32))["params"])


def run(cfg, batch, mode, devices, steps=2, total_steps=10, params=None, platform=None):
  if platform:                       # trace (and so compile) the step as for another platform
    with backend.compiling_for(platform):
      return run(cfg, batch, mode, devices, steps, total_steps, params)
  module = models.build(cfg)
  tx = optimizer.make(OPTIM, total_steps)
  step = functools.partial(train_step.pretrain_step, module=module, tx=tx,
                           lr_schedule=schedules.learning_rate(OPTIM, total_steps), latent_temp=TEMP)
  dp = parallel.DataParallel(step, mode, devices)
  params = init_params(cfg) if params is None else params
  state = dp.put_state(train_step.init_state(params, tx, jax.random.key(0)))
  history = []
  for _ in range(steps):
    state, metrics = dp.step(state, dp.put_batch(batch))
    history.append({k: float(v) for k, v in metrics.items()})
  return jax.device_get(dp.get_state(state)), history, dp


def max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.fixture(scope="module")
def layouts():
  """The same 2 updates on 1 device, on 8 devices (shard_map) and on 8 devices (pmap)."""
  assert jax.device_count() == 8
  cfg = tiny()
  batch = make_batch(1, 8, pad_last=1500)
  return cfg, {"one": run(cfg, batch, "shard_map", jax.devices()[:1]),
               "eight": run(cfg, batch, "shard_map", jax.devices()),
               "pmap": run(cfg, batch, "pmap", jax.devices())}


def test_eight_devices_match_one_device_and_pmap_matches_shard_map(layouts):
  cfg, runs = layouts
  (one, h1, dp1), (eight, h8, dp8), (pm, hp, dpp) = runs["one"], runs["eight"], runs["pmap"]
  for a, b in ((h1, h8), (h8, hp)):
    for ma, mb in zip(a, b):
      for key in ("loss", "contrastive", "diversity", "feature_pen", "accuracy", "prob_perplexity"):
        assert abs(ma[key] - mb[key]) <= 1e-5 * max(1.0, abs(ma[key])), (key, ma[key], mb[key])
  assert max_diff(one["params"], eight["params"]) <= 1e-5
  assert max_diff(eight["params"], pm["params"]) <= 1e-5
  assert max_diff(one["opt_state"], eight["opt_state"]) <= 1e-5
  # The params really moved, and the step compiled once for the two identical batches.
  assert max_diff(one["params"], init_params(cfg)) > 1e-4
  assert dp1.cache_size() == dp8.cache_size() == dpp.cache_size() == 1
  assert int(one["step"]) == 2 and int(one["skipped"]) == 0


def test_metrics_are_global_statistics(layouts):
  cfg, runs = layouts
  m = runs["eight"][1][0]
  frames = cfg.num_frames(6400)
  # Every row has the same masked count (require_same_masks); the padded row has 1500 fewer samples.
  valid = 7 * frames + cfg.num_frames(6400 - 1500)
  assert m["sample_size"] % 8 == 0 and 0.2 < m["masked_fraction"] < 0.8
  assert m["sample_size"] == pytest.approx(m["masked_fraction"] * valid)
  # Loss identity: total = contrastive + w_div * diversity + w_pen * pen (all per masked frame).
  assert m["loss"] == pytest.approx(m["contrastive"] + cfg.diversity_weight * m["diversity"]
                                    + cfg.feature_pen_weight * m["feature_pen"], rel=1e-5)
  assert m["diversity"] == pytest.approx((cfg.num_codevectors - m["prob_perplexity"]) / cfg.num_codevectors,
                                         rel=1e-5)
  assert m["temperature"] == pytest.approx(2.0) and m["lr"] == pytest.approx(0.0)   # step 0 of warmup
  assert m["audio_samples"] == 8 * 6400 - 1500


def test_gradient_accumulation_matches_one_big_batch():
  """Two micro-batches of 4 utterances == one batch of 8, given utterance-keyed randomness (loss terms
  that are statistics of one micro-batch, diversity and feature penalty, switched off)."""
  cfg = tiny(diversity_weight=0.0, feature_pen_weight=0.0)
  big = make_batch(1, 8)
  split = {"audio": big["audio"].reshape(2, 4, -1), "padding_mask": big["padding_mask"].reshape(2, 4, -1),
           "row_ids": np.broadcast_to(np.arange(4, dtype=np.int32), (2, 4)).copy()}
  a, ha, _ = run(cfg, big, "shard_map", jax.devices()[:4], steps=1)
  b, hb, _ = run(cfg, split, "shard_map", jax.devices()[:2], steps=1)
  assert ha[0]["loss"] == pytest.approx(hb[0]["loss"], rel=1e-5)
  assert ha[0]["sample_size"] == hb[0]["sample_size"]
  assert max_diff(a["params"], b["params"]) <= 1e-5


def test_remat_and_scanned_layers_make_the_same_updates():
  """Recomputation (model.remat), the scanned encoder (model.scan_layers, stacked params) and the scanned
  accumulation change memory and compile time, not the numbers: the same 2 updates of 2 accumulated
  micro-batches on 2 devices as the plain model (dropout and LayerDrop off: their draws differ under scan)."""
  cfg = tiny()
  batch = make_batch(2, 4, pad_last=1500)
  ref, href, _ = run(cfg, batch, "shard_map", jax.devices()[:2])
  # The last variant traces the step as for a GPU: accumulation as a lax.scan (CPU unrolls it).
  for variant, platform in ((cfg.replace(remat="full"), None), (cfg.replace(remat="dots", scan_layers=True), None),
                            (cfg.replace(scan_layers=True), "gpu")):
    params = init_params(cfg)
    if variant.scan_layers:
      params = jax.device_get(models.stack_layers(params))
      assert "layers" in params["wav2vec2"]["encoder"] and "layers_0" not in params["wav2vec2"]["encoder"]
    got, hgot, dp = run(variant, batch, "shard_map", jax.devices()[:2], params=params, platform=platform)
    for ma, mb in zip(href, hgot):
      assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-5)
    assert max_diff(ref["params"], models.unstack_layers(got["params"])) <= 1e-5, variant
    assert dp.cache_size() == 1


def test_non_finite_update_is_skipped_and_counted():
  cfg = tiny()
  tx = optimizer.make(ml_collections.ConfigDict(dict(OPTIM.to_dict(), schedule="constant")), 10)
  params = init_params(cfg)
  state = dict(train_step.init_state(params, tx, jax.random.key(0)), step=jnp.int32(5))
  grads = jax.tree_util.tree_map(np.ones_like, params)
  grads["final_proj"]["bias"] = grads["final_proj"]["bias"] * np.nan
  new, stats = jax.jit(lambda s, g: train_step.apply_gradients(s, g, tx))(state, grads)
  assert int(new["skipped"]) == 1 and int(new["step"]) == 6 and not np.isfinite(float(stats["grad_norm"]))
  assert max_diff(new["params"], params) == 0.0
  finite, _ = jax.jit(lambda s, g: train_step.apply_gradients(s, g, tx))(
      state, jax.tree_util.tree_map(np.ones_like, params))
  assert int(finite["skipped"]) == 0 and max_diff(finite["params"], params) > 0


def test_bad_batch_is_rejected(layouts):
  dp = layouts[1]["eight"][2]
  with pytest.raises(ValueError, match="multiple of the 8 local devices"):
    dp.put_batch(make_batch(1, 6))
  with pytest.raises(ValueError, match="parallel.mode='ddp'"):
    parallel.DataParallel(lambda s, b: (s, {}), "ddp")


def test_schedules():
  lr = schedules.learning_rate(ml_collections.ConfigDict(dict(lr=1.0, schedule="polynomial", warmup_steps=10,
                                                              end_lr=0.0, power=1.0)), 110)
  assert [float(lr(s)) for s in (0, 5, 10, 60, 110)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])
  tri = schedules.learning_rate(ml_collections.ConfigDict(dict(
      lr=1.0, schedule="tri_stage", warmup_fraction=0.1, hold_fraction=0.4, init_lr_scale=0.01,
      final_lr_scale=0.05)), 100)
  assert float(tri(0)) == pytest.approx(0.01) and float(tri(10)) == pytest.approx(1.0)
  assert float(tri(49)) == pytest.approx(1.0) and float(tri(100)) == pytest.approx(0.05, rel=1e-4)
  assert float(tri(75)) == pytest.approx(0.05 ** 0.5, rel=1e-4)        # exponential: geometric midpoint
  t = schedules.gumbel_temperature(np.array([0, 100000, 10 ** 7]), 2.0, 0.5, 0.999995)
  np.testing.assert_allclose(np.asarray(t), [2.0, 2.0 * 0.999995 ** 100000, 0.5], rtol=1e-5)
