"""The data-parallel CTC fine-tuning step: freezing, sentence averaging, layouts, impossible labels."""
import functools

import jax
import ml_collections
import numpy as np
import pytest

from w2v2_jax import models
from w2v2_jax.models import presets
from w2v2_jax.train import optimizer, parallel, schedules
from w2v2_jax.train import step as train_step

OPTIM = ml_collections.ConfigDict(dict(lr=2e-3, schedule="constant", b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.0,
                                       clip_norm=0.0))
CFG = presets.get("tiny,ctc").replace(vocab_size=8, dropout=0.0, attention_dropout=0.0, dropout_input=0.0,
                                      activation_dropout=0.0, mask_prob=0.0, feature_grad_mult=0.0)


def batch(rows=8, samples=6400, seed=0):
  rng = np.random.default_rng(seed)
  audio = rng.standard_normal((1, rows, samples)).astype(np.float32)
  labels = rng.integers(1, 8, (1, rows, 6)).astype(np.int32)
  label_padding = np.zeros(labels.shape, bool)
  label_padding[0, :, 4:] = True                  # 4 labels per utterance
  weight = np.ones((1, rows), np.float32)
  weight[0, -1] = 0.0                             # a row the pipeline could not use
  return {"audio": audio, "padding_mask": np.zeros(audio.shape, bool), "labels": labels,
          "label_padding": label_padding, "weight": weight}


def run(devices, data, steps, freeze=0, freeze_mode="auto", cfg=CFG, train_top_layers=0):
  module = models.build(cfg)
  tx = optimizer.make(OPTIM, 100)
  params = jax.device_get(jax.jit(lambda r: module.init(r, np.zeros((1, 6400), np.float32))["params"])(
      {"params": jax.random.PRNGKey(0)}))
  fn = functools.partial(train_step.finetune_step, module=module, tx=tx,
                         lr_schedule=schedules.learning_rate(OPTIM, 100), freeze_updates=freeze,
                         freeze_mode=freeze_mode, train_top_layers=train_top_layers)
  runner = parallel.DataParallel(fn, "shard_map", devices)
  state = runner.put_state(train_step.init_state(params, tx, jax.random.key(0)))
  history, snapshots = [], [params]
  for _ in range(steps):
    state, m = runner.step(state, runner.put_batch(data))
    history.append({k: float(v) for k, v in m.items()})
    snapshots.append(jax.device_get(runner.get_state(state)["params"]))
  return history, snapshots


def changed(a, b):
  return any(np.any(x != y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_freeze_then_train_everything_but_the_conv_encoder():
  hist, snaps = run(jax.devices()[:1], batch(), steps=4, freeze=2)
  assert [h["frozen"] for h in hist] == [1.0, 1.0, 0.0, 0.0]
  assert not changed(snaps[0]["wav2vec2"], snaps[2]["wav2vec2"])       # frozen: backbone untouched
  assert changed(snaps[0]["proj"], snaps[1]["proj"])                   # ... but the head trains
  assert changed(snaps[2]["wav2vec2"]["encoder"], snaps[4]["wav2vec2"]["encoder"])
  assert not changed(snaps[0]["wav2vec2"]["feature_extractor"], snaps[4]["wav2vec2"]["feature_extractor"])
  assert hist[-1]["loss"] < hist[0]["loss"]                            # overfits the fixed batch
  assert hist[0]["utterances"] == 7.0                                  # the weight-0 row is not counted


@pytest.mark.parametrize("grad_mult", [0.0, 1.0])
def test_freeze_modes_make_the_same_updates(grad_mult):
  # "cond" skips the backbone's backward while frozen; "mask" (the CPU default: XLA:CPU runs convolutions
  # inside a conditional ~20x slower) runs it and zeroes the backbone's gradients. Same training.
  cfg = CFG.replace(feature_grad_mult=grad_mult)
  h_cond, s_cond = run(jax.devices()[:1], batch(), steps=4, freeze=2, freeze_mode="cond", cfg=cfg)
  h_mask, s_mask = run(jax.devices()[:1], batch(), steps=4, freeze=2, freeze_mode="mask", cfg=cfg)
  assert [h["frozen"] for h in h_mask] == [1.0, 1.0, 0.0, 0.0]
  np.testing.assert_allclose([h["loss"] for h in h_cond], [h["loss"] for h in h_mask], rtol=1e-5)
  assert not changed(s_mask[0]["wav2vec2"], s_mask[2]["wav2vec2"])
  assert changed(s_mask[2]["wav2vec2"]["feature_extractor"], s_mask[4]["wav2vec2"]["feature_extractor"]) == (
      grad_mult > 0)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(s_cond[-1]), jax.tree_util.tree_leaves(s_mask[-1])):
    if "k_proj" in jax.tree_util.keystr(path) and "bias" in jax.tree_util.keystr(path):
      continue    # zero gradient up to float noise (see test_eight_devices_match_one_device)
    np.testing.assert_allclose(x, y, atol=1e-4, err_msg=jax.tree_util.keystr(path))
  with pytest.raises(ValueError, match="freeze_mode"):
    run(jax.devices()[:1], batch(), steps=1, freeze=1, freeze_mode="sometimes")


def test_top_layers_train_during_the_freeze():
  """train_top_layers=1 (re-initialised layers): while frozen, the top layer trains with the output
  layer and every other backbone weight waits; afterwards all train."""
  hist, snaps = run(jax.devices()[:1], batch(), steps=3, freeze=2, train_top_layers=1)
  assert [h["frozen"] for h in hist] == [1.0, 1.0, 0.0]
  top = CFG.encoder_layers - 1
  rest = lambda p: {k: v for k, v in p.items() if k != "encoder"} | {  # noqa: E731
      "encoder": {k: v for k, v in p["encoder"].items() if not k.startswith("layers_")}}
  before, frozen, after = (s["wav2vec2"] for s in (snaps[0], snaps[2], snaps[3]))
  layer = lambda p, i: p["encoder"][f"layers_{i}"]  # noqa: E731
  assert changed(layer(before, top), layer(frozen, top)) and changed(snaps[0]["proj"], snaps[2]["proj"])
  for i in range(top):
    assert not changed(layer(before, i), layer(frozen, i))
    assert changed(layer(frozen, i), layer(after, i))
  assert not changed(rest(before), rest(frozen)) and changed(rest(frozen)["encoder"], rest(after)["encoder"])
  with pytest.raises(ValueError, match="train_top_layers needs freeze_mode 'mask'"):
    run(jax.devices()[:1], batch(), steps=1, freeze=1, freeze_mode="cond", train_top_layers=1)


def test_top_layers_mask_in_both_layouts():
  """The freeze's mask: True in the top layers only, a scalar per per-layer leaf, (layers, 1, ...) for
  a stacked one; the same layers either way."""
  cfg = CFG.replace(encoder_layers=3)
  module = models.build(cfg)
  params = jax.eval_shape(lambda: module.init({"params": jax.random.PRNGKey(0)},
                                              np.zeros((1, 6400), np.float32))["params"]["wav2vec2"])
  params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), params)
  per_layer = train_step.top_layers_mask(params, 2)
  stacked = train_step.top_layers_mask(models.layer_layout(params, True), 2)
  assert [bool(per_layer["encoder"][f"layers_{i}"]["fc1"]["kernel"]) for i in range(3)] == [False, True, True]
  kernel = stacked["encoder"]["layers"]["layer"]["fc1"]["kernel"]
  assert kernel.shape == (3, 1, 1) and kernel.reshape(-1).tolist() == [False, True, True]
  outside = [v for path, v in jax.tree_util.tree_flatten_with_path(stacked)[0]
             if "layers" not in jax.tree_util.keystr(path)]
  assert outside and not any(bool(v) for v in outside)
  assert not any(bool(np.any(v)) for v in jax.tree_util.tree_leaves(train_step.top_layers_mask(params, 0)))


def test_always_frozen_is_a_linear_probe_with_the_masked_updates():
  """freeze_mode="always" (a probe of frozen features: no backbone backward) trains only the output
  layer, exactly as a freeze that covers every update does in "mask" mode."""
  h_probe, s_probe = run(jax.devices()[:1], batch(), steps=3, freeze=3, freeze_mode="always")
  h_mask, s_mask = run(jax.devices()[:1], batch(), steps=3, freeze=3, freeze_mode="mask")
  assert [h["frozen"] for h in h_probe] == [1.0, 1.0, 1.0]
  assert not changed(s_probe[0]["wav2vec2"], s_probe[-1]["wav2vec2"]) and changed(s_probe[0]["proj"], s_probe[-1]["proj"])
  np.testing.assert_allclose([h["loss"] for h in h_probe], [h["loss"] for h in h_mask], rtol=1e-6)
  for x, y in zip(jax.tree_util.tree_leaves(s_probe[-1]), jax.tree_util.tree_leaves(s_mask[-1])):
    np.testing.assert_allclose(x, y, atol=1e-6)


def test_eight_devices_match_one_device():
  data = batch()
  h1, s1 = run(jax.devices()[:1], data, steps=2)
  h8, s8 = run(jax.devices(), data, steps=2)
  np.testing.assert_allclose([h["loss"] for h in h1], [h["loss"] for h in h8], rtol=1e-5)
  flat1 = jax.tree_util.tree_leaves_with_path(s1[-1])
  flat8 = jax.tree_util.tree_leaves(s8[-1])
  for (path, x), y in zip(flat1, flat8):
    if "k_proj" in jax.tree_util.keystr(path) and "bias" in jax.tree_util.keystr(path):
      # Softmax ignores a shift shared by all keys: this gradient is 0 up to float noise, which Adam
      # (eps 1e-8) turns into updates of random sign. Nothing to compare.
      continue
    # Adam with eps 1e-8 turns float noise in near-zero gradients into visible update differences;
    # 1e-4 is 5% of one update (lr 2e-3).
    np.testing.assert_allclose(x, y, atol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_impossible_labels_are_zeroed_and_counted():
  data = batch(samples=1600)                     # 4 frames: 4 labels with a repeat cannot align
  data["labels"][0, 0, :4] = [3, 3, 5, 6]
  data["labels"][0, 1, :4] = [1, 2, 3, 4]        # exactly fits 4 frames
  hist, _ = run(jax.devices()[:1], data, steps=1)
  assert hist[0]["infinite_losses"] >= 1.0 and np.isfinite(hist[0]["loss"]) and np.isfinite(hist[0]["grad_norm"])
