"""parallel.mode="fsdp": the train state sharded over the devices gives the replicated step's updates, holds
1/n of the large leaves per device, and its checkpoints resume in any mode and on any device count."""
import functools

import jax
import ml_collections
import numpy as np
import optax
import pytest

from test_train_step import OPTIM, TEMP, init_params, make_batch, max_diff, tiny
from w2v2_jax import models
from w2v2_jax.models import presets
from w2v2_jax.train import checkpoint, fsdp, loop, optimizer, parallel, schedules
from w2v2_jax.train import step as train_step

MIN = 64          # the tiny model's leaves are small: shard everything of 64 elements or more


def test_split_axis_rule():
  assert fsdp.split_axis((1024, 4096), 8) == 1                  # the largest divisible dimension
  assert fsdp.split_axis((4096, 1024), 8) == 0
  assert fsdp.split_axis((768, 768), 8) == 1                    # ties: the last (output features)
  assert fsdp.split_axis((24, 1024, 1024), 16) == 2             # a stacked (scanned) kernel: not the layer axis
  assert fsdp.split_axis((1001, 12), 8) is None                 # nothing divisible: replicated
  assert fsdp.split_axis((1024,), 8) is None                    # under the default minimum size
  assert fsdp.split_axis((1024,), 8, min_size=0) == 0
  assert fsdp.split_axis((4,), 8, min_size=0) is None           # fewer elements than devices
  assert fsdp.split_axis((1024, 4096), 1) is None               # one device: nothing to split
  P = jax.sharding.PartitionSpec
  tree = {"conv": np.zeros((512, 3, 64)), "encoder": {"layers": {"layer": {"fc1": np.zeros((64, 32, 16))}}},
          "proj": np.zeros((64, 32, 16))}
  # The scanned layers' stacked leaves are never split on their layer axis; the same shape elsewhere is.
  assert fsdp.specs(tree, 8, "data", min_size=0) == {
      "conv": P("data"), "encoder": {"layers": {"layer": {"fc1": P(None, "data")}}}, "proj": P("data")}
  assert fsdp.axes(tree, 8, min_size=0)["encoder"]["layers"]["layer"]["fc1"] == 1


def run_pretrain(mode, devices, steps=3, clip_norm=0.0, tx=None, cfg=None):
  cfg = cfg or tiny()
  optim = ml_collections.ConfigDict(dict(OPTIM.to_dict(), clip_norm=clip_norm))
  tx = tx or optimizer.make(optim, 10)
  step = functools.partial(train_step.pretrain_step, module=models.build(cfg), tx=tx,
                           lr_schedule=schedules.learning_rate(optim, 10), latent_temp=TEMP,
                           clip_norm=0.0 if clip_norm is None else clip_norm)
  dp = parallel.DataParallel(step, mode, devices, min_shard_size=MIN)
  params = init_params(tiny())
  state = dp.put_state(train_step.init_state(models.layer_layout(params, cfg.scan_layers), tx, jax.random.key(0)))
  history = []
  for i in range(steps):
    state, metrics = dp.step(state, dp.put_batch(make_batch(1, 8, seed=i, pad_last=1500)))
    history.append({k: float(v) for k, v in metrics.items()})
  return dp, state, history


def test_pretraining_fsdp_matches_replicated_and_shards_the_state():
  devices = jax.devices()
  dp_r, rep, h_r = run_pretrain("shard_map", devices)
  dp_f, sharded, h_f = run_pretrain("fsdp", devices)
  for a, b in zip(h_r, h_f):
    for key in ("loss", "contrastive", "accuracy", "grad_norm", "prob_perplexity"):
      assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
  assert max_diff(jax.device_get(rep["params"]), jax.device_get(sharded["params"])) <= 1e-5
  assert max_diff(jax.device_get(rep["opt_state"]), jax.device_get(sharded["opt_state"])) <= 1e-5
  assert int(sharded["step"]) == 3 and dp_f.cache_size() == 1
  # Each device holds 1/8 of every split leaf of params and moments; the small ones are replicated.
  full = local = split = 0
  for x in jax.tree_util.tree_leaves({"p": sharded["params"], "o": sharded["opt_state"]}):
    shard = x.addressable_shards[0].data
    full += x.size
    local += shard.size
    if shard.size != x.size:
      split += 1
      assert shard.size * 8 == x.size
  assert split > 40 and local < 0.2 * full, (split, local / full)
  assert all(x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(rep["params"]))


def test_scanned_layers_are_gathered_one_layer_at_a_time():
  """With model.scan_layers (and remat) the stacked layer weights stay split into the scan and are gathered
  per layer inside it: the same updates as the replicated, unscanned step."""
  _, rep, h_r = run_pretrain("shard_map", jax.devices(), steps=2)
  cfg = tiny(scan_layers=True, remat="full")
  dp, sharded, h_f = run_pretrain("fsdp", jax.devices(), steps=2, cfg=cfg)
  np.testing.assert_allclose([h["loss"] for h in h_f], [h["loss"] for h in h_r], rtol=1e-5)
  assert max_diff(jax.device_get(rep["params"]), models.unstack_layers(jax.device_get(sharded["params"]))) <= 1e-5
  fc1 = sharded["params"]["wav2vec2"]["encoder"]["layers"]["layer"]["fc1"]["kernel"]      # (L, 64, 128)
  assert fc1.addressable_shards[0].data.shape == (2, 64, 16)
  # The step's jaxpr: the stacked kernel enters the scan as a slice, the gathers run inside the scan.
  jaxpr = str(jax.make_jaxpr(dp.jitted(sharded))(sharded, dp.put_batch(make_batch(1, 8, pad_last=1500))))
  scan_body = jaxpr[jaxpr.index("scan["):]
  assert "all_gather" in scan_body


def test_layerdrop_with_scanned_sharded_layers():
  """LayerDrop's coin is per device, so devices skip different layers: the per-layer gather must not sit
  in a branch some devices skip (a collective only some devices enter). Same updates as shard_map."""
  cfg = tiny(scan_layers=True, remat="full", encoder_layerdrop=0.5)
  _, rep, h_r = run_pretrain("shard_map", jax.devices(), steps=2, cfg=cfg)
  _, sharded, h_f = run_pretrain("fsdp", jax.devices(), steps=2, cfg=cfg)
  np.testing.assert_allclose([h["loss"] for h in h_f], [h["loss"] for h in h_r], rtol=1e-5)
  assert max_diff(jax.device_get(rep["params"]), jax.device_get(sharded["params"])) <= 1e-5


def test_clipping_uses_the_global_norm_of_the_sharded_gradient():
  """clip_norm in the step (a norm over every device's slice) = optax's clip_by_global_norm on one
  device with the whole gradient."""
  clip = 0.05
  reference_tx = optax.chain(optax.clip_by_global_norm(clip), optimizer.make(OPTIM, 10))
  _, ref, h_ref = run_pretrain("shard_map", jax.devices()[:1], clip_norm=None, tx=reference_tx)
  _, got, h_got = run_pretrain("fsdp", jax.devices(), clip_norm=clip)
  assert all(h["grad_norm"] > 2 * clip for h in h_ref)                 # the clip binds
  np.testing.assert_allclose([h["grad_norm"] for h in h_got], [h["grad_norm"] for h in h_ref], rtol=1e-5)
  assert max_diff(jax.device_get(ref["params"]), jax.device_get(got["params"])) <= 1e-5


def test_finetuning_fsdp_matches_replicated():
  from test_finetune_step import OPTIM as FT_OPTIM, batch   # pylint: disable=import-outside-toplevel
  cfg = presets.get("tiny,ctc").replace(vocab_size=8, dropout=0.0, attention_dropout=0.0, dropout_input=0.0,
                                        activation_dropout=0.0, mask_prob=0.0, feature_grad_mult=0.0)
  module = models.build(cfg)
  params = jax.device_get(jax.jit(lambda r: module.init(r, np.zeros((1, 6400), np.float32))["params"])(
      {"params": jax.random.PRNGKey(0)}))
  tx = optimizer.make(FT_OPTIM, 100)
  out = {}
  for mode in ("shard_map", "fsdp"):
    fn = functools.partial(train_step.finetune_step, module=module, tx=tx,
                           lr_schedule=schedules.learning_rate(FT_OPTIM, 100), freeze_updates=1)
    runner = parallel.DataParallel(fn, mode, jax.devices(), min_shard_size=MIN)
    state = runner.put_state(train_step.init_state(params, tx, jax.random.key(0)))
    losses = []
    for _ in range(3):                     # one frozen update, then the whole model
      state, m = runner.step(state, runner.put_batch(batch()))
      losses.append(float(m["loss"]))
    out[mode] = losses, runner.host_params(state)
  np.testing.assert_allclose(out["fsdp"][0], out["shard_map"][0], rtol=1e-5)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(out["shard_map"][1]),
                          jax.tree_util.tree_leaves(out["fsdp"][1])):
    if "k_proj" in jax.tree_util.keystr(path) and "bias" in jax.tree_util.keystr(path):
      continue          # a zero gradient up to float noise (test_finetune_step.test_eight_devices_match_one_device)
    np.testing.assert_allclose(x, y, atol=1e-4, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory):
  """A checkpoint of the fsdp state after one update on 8 devices, and that state (as stored)."""
  _, state, _ = run_pretrain("fsdp", jax.devices(), steps=1)
  directory = tmp_path_factory.mktemp("fsdp_ckpt")
  with checkpoint.Checkpointer(directory) as ckpt:
    ckpt.save(1, state, force=True)
    ckpt.wait()
  return directory, jax.device_get(checkpoint._storable(state))   # pylint: disable=protected-access


@pytest.mark.parametrize("mode,count", [("shard_map", 2), ("fsdp", 4), ("pmap", 8)])
def test_a_sharded_checkpoint_restores_in_another_mode_and_device_count(sharded_checkpoint, mode, count):
  directory, saved = sharded_checkpoint
  step = functools.partial(train_step.pretrain_step, module=models.build(tiny()), tx=optimizer.make(OPTIM, 10),
                           lr_schedule=schedules.learning_rate(OPTIM, 10), latent_temp=TEMP)
  other = parallel.DataParallel(step, mode, jax.devices()[:count], min_shard_size=MIN)
  template = train_step.init_state(init_params(tiny()), optimizer.make(OPTIM, 10), jax.random.key(5))
  if mode != "pmap":
    template = other.put_state(template)        # restored straight into the new layout (as the loop does)
  with checkpoint.Checkpointer(directory) as ckpt:
    restored, _ = ckpt.restore(state_template=template)
  if mode == "pmap":
    restored = other.put_state(restored)        # the loop's pmap path: restored on one device, then replicated
  for x, y in zip(jax.tree_util.tree_leaves(saved),
                  jax.tree_util.tree_leaves(jax.device_get(checkpoint._storable(other.get_state(restored))))):  # pylint: disable=protected-access
    np.testing.assert_array_equal(x, y)            # exact, whatever the layout
  if mode == "pmap":
    return
  kernel = restored["params"]["wav2vec2"]["encoder"]["layers_0"]["fc1"]["kernel"]
  assert kernel.addressable_shards[0].data.size * (count if mode == "fsdp" else 1) == kernel.size
  restored, metrics = other.step(restored, other.put_batch(make_batch(1, 8, seed=1, pad_last=1500)))
  assert np.isfinite(float(metrics["loss"])) and int(jax.device_get(other.get_state(restored)["step"])) == 2


def test_the_loop_resumes_an_fsdp_run_in_shard_map_mode(tmp_path):
  """loop.pretrain in mode fsdp, stopped after 2 updates and resumed replicated (shard_map), ends where an
  uninterrupted fsdp run ends (to float reordering)."""
  from test_pretrain_loop import config, tone_corpus  # pylint: disable=import-outside-toplevel
  from orbax import checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from w2v2_jax.data.manifest import write_manifest  # pylint: disable=import-outside-toplevel
  tone_corpus(tmp_path / "audio", count=12)
  write_manifest(str(tmp_path / "audio"), str(tmp_path / "manifest"), valid_percent=0.0)

  def cfg(mode):
    c = config(str(tmp_path / "manifest" / "train.tsv"))
    c.train.steps = 4
    c.batch.global_seconds, c.batch.device_seconds = 8.0, 1.0     # 8 rows of 1 s: one per device
    c.parallel.mode = mode
    c.parallel.fsdp_min_size = MIN
    return c

  loop.pretrain(cfg("fsdp"), str(tmp_path / "split"), max_steps=2)
  loop.pretrain(cfg("shard_map"), str(tmp_path / "split"))
  loop.pretrain(cfg("fsdp"), str(tmp_path / "straight"))
  a, b = (ocp.StandardCheckpointer().restore(tmp_path / run / "checkpoints" / "4" / "state")["params"]
          for run in ("split", "straight"))
  assert max_diff(a, b) <= 1e-5
  at_two = ocp.StandardCheckpointer().restore(tmp_path / "split" / "checkpoints" / "2" / "state")["params"]
  assert max_diff(a, at_two) > 1e-4                 # the resumed updates did change the params
