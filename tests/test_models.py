"""Behaviour of the Flax wav2vec 2.0 models: presets, frame arithmetic, quantizer, LayerDrop, masks,
gradient scaling, padding, input validation, mixed precision and the pretraining objective's gradients.

Everything runs the `tiny` preset (full 7-layer conv stack, 32 channels, 2 transformer layers) on CPU;
the BASE / LARGE presets are only shape-evaluated (`jax.eval_shape`, nothing allocated).
"""
import functools
import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.model import get_config
from w2v2_jax import models
from w2v2_jax.models import GumbelQuantizer, ModelConfig, TransformerEncoder
from w2v2_jax.models.config import DEFAULT_CONV_LAYERS
from w2v2_jax.train import objective

TINY = ModelConfig.from_any(get_config("tiny"))
TINY_CTC = ModelConfig.from_any(get_config("tiny,ctc"))
NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, dropout_input=0.0,
                  dropout_features=0.0, final_dropout=0.0)
PRETRAIN_RNGS = ("mask", "dropout", "gumbel", "layerdrop")


def key(seed):
  return jax.random.key(seed)


def rngs(seed, names=PRETRAIN_RNGS):
  return {name: jax.random.fold_in(key(seed), i) for i, name in enumerate(names)}


def make_batch(seed=0, length=4000, valid=(4000, 3000)):
  """(B, length) audio with rows right-padded (with zeros) after `valid` samples, and its padding mask."""
  rng = np.random.default_rng(seed)
  audio = rng.standard_normal((len(valid), length)).astype(np.float32)
  pad = np.arange(length)[None, :] >= np.asarray(valid)[:, None]
  audio[pad] = 0.0
  return audio, pad


def count_params(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def flat(tree):
  return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def random_params(module, audio_shape, seed=0):
  """Random parameters with the tree of `module.init`, drawn in numpy (no forward pass, nothing compiled):
  kernels N(0, 1/fan_in) (the quantizer's N(0, 1), as its init), norm scales near 1, small biases,
  codebooks and mask_emb U[0, 1), positional-conv weight norm g = |v| (as its init)."""
  shapes = jax.eval_shape(module.init, {"params": key(0), "mask": key(1)},
                          jax.ShapeDtypeStruct(audio_shape, jnp.float32))["params"]
  rng = np.random.default_rng(seed)
  vs = {}

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    shape = leaf.shape
    if name.endswith("['kernel']"):
      std = 1.0 if "weight_proj" in name else 1.0 / math.sqrt(np.prod(shape[:-1]))
      return std * rng.standard_normal(shape)
    if name.endswith("['scale']"):
      return 1.0 + 0.1 * rng.standard_normal(shape)
    if name.endswith("['bias']"):
      return 0.1 * rng.standard_normal(shape)
    if name.endswith("['vars']") or name.endswith("['mask_emb']"):
      return rng.uniform(size=shape)
    if name.endswith("['weight_v']"):
      vs[name[:-len("['weight_v']")]] = v = math.sqrt(4.0 / (shape[0] * shape[2])) * rng.standard_normal(shape)
      return v
    if name.endswith("['weight_g']"):
      return None
    raise AssertionError(f"unexpected parameter {name}")

  params = jax.tree_util.tree_map_with_path(draw, shapes)

  def fill_g(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['weight_g']"):
      return np.sqrt(np.sum(vs[name[:-len("['weight_g']")]] ** 2, axis=(1, 2)))
    return leaf
  params = jax.tree_util.tree_map_with_path(fill_g, params, is_leaf=lambda x: x is None)
  params = jax.tree_util.tree_map(lambda a, s: jnp.asarray(a, s.dtype), params, shapes)
  return params


def apply_recording(module, variables, *args, **kwargs):
  """module.apply, plus `encoder_input`: the input of the TransformerEncoder (after masking)."""
  seen = []

  def interceptor(next_fun, args_, kwargs_, context):
    if isinstance(context.module, TransformerEncoder) and context.method_name == "__call__":
      seen.append(args_[0])
    return next_fun(*args_, **kwargs_)
  with nn.intercept_methods(interceptor):
    out = dict(module.apply(variables, *args, **kwargs))
  assert len(seen) == 1
  out["encoder_input"] = seen[0]
  return out


@functools.lru_cache(maxsize=None)
def jitted_apply(cfg):
  """(module, jit of its `apply_recording`): one compiled function per config, shared by the tests."""
  module = models.build(cfg)
  return module, jax.jit(functools.partial(apply_recording, module),
                         static_argnames=("deterministic", "output_hidden_states"))


@pytest.fixture(scope="module")
def pre():
  """The tiny pretraining model, its params and a padded batch (row 1: 3000 of 4000 samples valid)."""
  module = models.build(TINY)
  audio, pad = make_batch()
  return module, random_params(module, audio.shape), audio, pad


@functools.lru_cache(maxsize=None)
def pretrain_grads_fn():
  """One jit of value_and_grad(pretrain_sums' total) for the tiny model with feature_grad_mult 1, 0.1, 0
  (one compilation for all three: the forward passes are identical)."""
  fns = {}
  for mult in (1.0, 0.1, 0.0):
    module = models.build(TINY.replace(feature_grad_mult=mult))

    def total(params, audio, pad, rng, temperature, module=module):
      sums, stats = objective.pretrain_sums(module, params, audio, pad, rng, temperature)
      return sums["total"], (sums, stats)
    fns[mult] = jax.value_and_grad(total, has_aux=True)
  return jax.jit(lambda *args: {mult: f(*args) for mult, f in fns.items()})


def pretrain_grads(pre, seed=3):
  """{feature_grad_mult: (loss, sums, stats, grads)} on the `pre` batch."""
  _, params, audio, pad = pre
  out = pretrain_grads_fn()(params, audio, pad, key(seed), 2.0)
  return {mult: (loss, sums, stats, grads) for mult, ((loss, (sums, stats)), grads) in out.items()}


# ------------------------------------------------------------------------------------------ 1. presets

def preset_params(name):
  module = models.build(get_config(name))
  init_rngs = {"params": key(0), "mask": key(1)}
  shapes = jax.eval_shape(module.init, init_rngs, jax.ShapeDtypeStruct((1, 16000), jnp.float32))
  return module, shapes["params"]


@pytest.mark.parametrize("name,paper_count,exact", [
    ("base", 95e6, 95_044_608),          # paper: BASE 95M
    ("large", 317e6, 317_380_864),       # paper: LARGE 317M
    ("large_lv60", 317e6, 317_390_592),  # + 7 conv biases and 6 more conv LayerNorms (13,728 params)
])
def test_preset_parameter_counts(name, paper_count, exact):
  module, params = preset_params(name)
  n = count_params(params)
  assert abs(n / paper_count - 1) < 0.02, n
  assert n == exact
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))
  assert set(params) == {"wav2vec2", "quantizer", "project_q", "final_proj"}
  cfg = module.config
  d = {"base": 768, "large": 1024, "large_lv60": 1024}[name]
  assert params["wav2vec2"]["post_extract_proj"]["kernel"].shape == (512, d)
  assert len([k for k in params["wav2vec2"]["encoder"] if k.startswith("layers_")]) == cfg.encoder_layers
  assert params["quantizer"]["vars"].shape == (640, cfg.final_dim // 2)
  assert params["project_q"]["kernel"].shape == (cfg.final_dim, cfg.final_dim)


def test_preset_layouts():
  _, base = preset_params("base")
  _, lv60 = preset_params("large_lv60")
  base_fe, lv60_fe = base["wav2vec2"]["feature_extractor"], lv60["wav2vec2"]["feature_extractor"]
  # BASE: no conv bias, one (group) norm after conv 0 only.
  assert set(base_fe) == {f"conv_{i}" for i in range(7)} | {"norm_0"}
  assert all(set(base_fe[f"conv_{i}"]) == {"kernel"} for i in range(7))
  # LV-60k: bias and a LayerNorm (scale, bias over 512 channels) after every conv; pre-LN transformer.
  assert set(lv60_fe) == {f"conv_{i}" for i in range(7)} | {f"norm_{i}" for i in range(7)}
  for i in range(7):
    assert lv60_fe[f"conv_{i}"]["bias"].shape == (512,)
    assert {k: v.shape for k, v in lv60_fe[f"norm_{i}"].items()} == {"scale": (512,), "bias": (512,)}
  cfg = ModelConfig.from_any(get_config("large_lv60"))
  assert (cfg.extractor_mode, cfg.conv_bias, cfg.layer_norm_first) == ("layer_norm", True, True)
  assert cfg.feature_pen_weight == 0.0 and cfg.dropout == 0.0
  base_cfg = ModelConfig.from_any(get_config("base"))
  assert (base_cfg.extractor_mode, base_cfg.conv_bias, base_cfg.layer_norm_first) == ("default", False, False)
  assert (base_cfg.encoder_attention_heads, base_cfg.feature_grad_mult) == (12, 0.1)


@pytest.mark.parametrize("name", ["base", "large_lv60"])
def test_ctc_preset_has_proj_head(name):
  module, params = preset_params(name + ",ctc")
  assert isinstance(module, models.Wav2Vec2ForCTC)
  cfg = module.config
  assert cfg.task == "ctc" and cfg.vocab_size >= 2
  assert set(params) == {"wav2vec2", "proj"}
  assert params["proj"]["kernel"].shape == (cfg.encoder_embed_dim, cfg.vocab_size)
  assert params["proj"]["bias"].shape == (cfg.vocab_size,)
  _, pre_params = preset_params(name)
  assert jax.tree_util.tree_structure(params["wav2vec2"]) == jax.tree_util.tree_structure(
      pre_params["wav2vec2"])


# ------------------------------------------------------------------------------------- 2. frame lengths

LENGTHS = [400, 401, 719, 720, 16000, 64000]
STACKS = {
    "default": DEFAULT_CONV_LAYERS,
    "tiny": TINY.conv_layers,
    "odd": ((8, 11, 3), (8, 4, 3), (8, 3, 1)),      # first kernel not a multiple of its stride
}


def direct_lengths(length, conv_layers):
  out = []
  for _, k, s in conv_layers:
    length = math.floor((length - k) / s) + 1
    out.append(length)
  return out


@pytest.mark.parametrize("stack", list(STACKS))
def test_output_lengths_match_formula_and_conv(stack):
  conv_layers = STACKS[stack]
  cfg = TINY.replace(conv_layers=conv_layers)
  expected = [direct_lengths(n, conv_layers)[-1] for n in LENGTHS]
  assert [int(models.output_lengths(n, conv_layers)) for n in LENGTHS] == expected
  assert [cfg.num_frames(n) for n in LENGTHS] == expected
  np.testing.assert_array_equal(models.output_lengths(np.asarray(LENGTHS), conv_layers), expected)
  np.testing.assert_array_equal(models.output_lengths(jnp.asarray(LENGTHS), conv_layers), expected)
  encoder = models.FeatureEncoder(conv_layers)
  for n, frames in zip(LENGTHS, expected):
    out = jax.eval_shape(lambda a: encoder.init_with_output(key(0), a)[0],
                         jax.ShapeDtypeStruct((2, n), jnp.float32))
    assert out.shape == (2, frames, conv_layers[-1][0]), (n, out.shape)


def test_default_stack_lengths_receptive_field_and_hop():
  assert [direct_lengths(n, DEFAULT_CONV_LAYERS)[-1] for n in LENGTHS] == [1, 1, 1, 2, 49, 199]
  for cfg in (ModelConfig(), TINY):
    assert (cfg.receptive_field, cfg.hop) == (400, 320)
  # Frames of n samples: floor((n - 400) / 320) + 1 for the whole stack.
  for n in list(range(400, 1400, 7)) + LENGTHS:
    assert ModelConfig().num_frames(n) == (n - 400) // 320 + 1


def test_frame_sees_exactly_its_receptive_field():
  """d frame_t / d audio is non-zero on exactly samples [320 t, 320 t + 400) (per-frame norm mode)."""
  encoder = models.FeatureEncoder(TINY.conv_layers, extractor_mode="layer_norm", conv_bias=True)
  audio = jnp.asarray(np.random.default_rng(0).standard_normal((1, 1360)), jnp.float32)
  params = encoder.init(key(0), audio)
  jac = jax.jit(jax.jacrev(lambda a: jnp.sum(encoder.apply(params, a), axis=-1)[0]))(audio)[:, 0]  # (T, L)
  assert jac.shape == (4, 1360)
  for t in range(4):
    nonzero = np.nonzero(np.asarray(jac[t]))[0]
    assert (nonzero.min(), nonzero.max()) == (320 * t, 320 * t + 399)
    assert len(nonzero) == 400


def test_frame_padding_mask_matches_hugging_face():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(
      hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8, conv_dim=(4,) * 7,
      num_conv_pos_embeddings=2, num_conv_pos_embedding_groups=1))
  ours = models.output_lengths(np.asarray(LENGTHS), DEFAULT_CONV_LAYERS)
  theirs = hf._get_feat_extract_output_lengths(torch.tensor(LENGTHS)).numpy()
  np.testing.assert_array_equal(ours, theirs)

  valid = [16000, 15999, 720, 719, 401, 400, 12345, 15680]
  _, pad = make_batch(length=16000, valid=valid)
  frames = ModelConfig().num_frames(16000)
  ours = np.asarray(models.frame_padding_mask(jnp.asarray(pad), frames, DEFAULT_CONV_LAYERS))
  hf_mask = hf._get_feature_vector_attention_mask(frames, torch.from_numpy(~pad).long()).numpy()
  np.testing.assert_array_equal(ours, ~hf_mask)
  assert ours.sum(1).tolist() == [frames - ModelConfig().num_frames(n) for n in valid]


