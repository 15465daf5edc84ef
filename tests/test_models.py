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

from w2v2_jax.configs.model import get_config
from w2v2_jax import convert, models
from w2v2_jax.models import GumbelQuantizer, ModelConfig, TransformerEncoder
from w2v2_jax.models.config import DEFAULT_CONV_LAYERS
from w2v2_jax.train import objective

TINY = ModelConfig.from_any(get_config("tiny"))
TINY_CTC = ModelConfig.from_any(get_config("tiny,ctc"))
NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, dropout_input=0.0,
                  dropout_features=0.0, final_dropout=0.0)
PRETRAIN_RNGS = ("mask", "dropout", "gumbel", "layerdrop")

# Attention key biases add q . b_k to every score of a query; softmax is shift-invariant, so their exact
# gradient is zero (numerically: rounding noise). Every other parameter must get a gradient.
NO_GRADIENT = ("['k_proj']['bias']",)


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


def random_params(module, audio_shape, seed=0, with_rngs=True):
  """Random parameters with the tree of `module.init`, drawn in numpy (no forward pass, nothing compiled):
  kernels N(0, 1/fan_in) (the quantizer's N(0, 1), as its init), norm scales near 1, small biases,
  codebooks and mask_emb U[0, 1), positional-conv weight norm g = |v| (as its init)."""
  init_rngs = {"params": key(0), "mask": key(1)} if with_rngs else key(0)
  shapes = jax.eval_shape(module.init, init_rngs, jax.ShapeDtypeStruct(audio_shape, jnp.float32))["params"]
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
      v = math.sqrt(4.0 / (shape[0] * shape[2])) * rng.standard_normal(shape)
      vs[name[:-len("['weight_v']")]] = v
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


def production_loss(module, params, audio, pad, rng, temperature):
  """The production step's pretraining objective on one device, the batch as one micro-batch: the
  update's masks (`objective.pretrain_masks`), then `objective.pretrain_micro_loss`, the function the
  train step scans over micro-batches and differentiates. Returns (loss, (aux, prep))."""
  row_ids = jnp.arange(audio.shape[0], dtype=jnp.int32)
  prep = objective.pretrain_masks(module.config, rng, pad[None], row_ids[None])
  total = jnp.maximum(jnp.sum(prep["sample_size"]), 1.0)
  micro = {"audio": audio, "padding_mask": pad, "mask": prep["masks"][0], "row_ids": row_ids,
           "index": jnp.zeros((), jnp.int32), "sample_size": prep["sample_size"][0],
           "valid_frames": prep["valid_frames"][0]}
  loss, aux = objective.pretrain_micro_loss(params, micro, module=module, step_key=rng, device_key=rng,
                                            temperature=temperature, total_size=total)
  return loss, (aux, prep)


@functools.lru_cache(maxsize=None)
def pretrain_grads_fn():
  """One jit of value_and_grad(production_loss) for the tiny model with feature_grad_mult 1, 0.1, 0
  (one compilation for all three: the forward passes are identical)."""
  fns = {}
  for mult in (1.0, 0.1, 0.0):
    module = models.build(TINY.replace(feature_grad_mult=mult))
    fns[mult] = jax.value_and_grad(functools.partial(production_loss, module), has_aux=True)
  return jax.jit(lambda *args: {mult: f(*args) for mult, f in fns.items()})


def pretrain_grads(pre, seed=3):
  """{feature_grad_mult: (loss, aux, prep, grads)} on the `pre` batch."""
  _, params, audio, pad = pre
  out = pretrain_grads_fn()(params, audio, pad, key(seed), 2.0)
  return {mult: (loss, aux, prep, grads) for mult, ((loss, (aux, prep)), grads) in out.items()}


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
  """Changing sample j changes exactly the frames t with 320 t <= j < 320 t + 400 (per-frame norm mode)."""
  encoder = models.FeatureEncoder(TINY.conv_layers, extractor_mode="layer_norm", conv_bias=True)
  length, frames = 1360, 4
  probes = sorted({j for t in range(frames) for j in (320 * t - 1, 320 * t, 320 * t + 399, 320 * t + 400)
                   if 0 <= j < length} | {0, 150, 700, 1359})
  audio = np.tile(np.random.default_rng(0).standard_normal(length).astype(np.float32), (len(probes) + 1, 1))
  for i, j in enumerate(probes):
    audio[i + 1, j] += 1.0
  params = {"params": random_params(encoder, (1, length), with_rngs=False)}
  feats = np.asarray(jax.jit(encoder.apply)(params, audio))
  assert feats.shape == (len(probes) + 1, frames, 32)
  changed = np.max(np.abs(feats[1:] - feats[:1]), axis=-1) > 1e-6          # (probes, frames)
  t = np.arange(frames)[None, :]
  j = np.asarray(probes)[:, None]
  np.testing.assert_array_equal(changed, (320 * t <= j) & (j < 320 * t + 400))


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


# ------------------------------------------------------------------------------------------ 3. quantizer

G, V, QDIM = 2, 8, 16


@pytest.fixture(scope="module")
def quantizer():
  q = GumbelQuantizer(G, V, QDIM)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 50, 12)), jnp.float32)
  variables = q.init(key(0), x)
  return q, variables, x


def q_logits(variables, x):
  p = variables["params"]["weight_proj"]
  return (x @ p["kernel"] + p["bias"]).reshape(x.shape[0], x.shape[1], G, V)


def codewords(variables, codes):
  """Concatenated codewords of `codes` (B, T, G) from the `vars` table (G*V, QDIM/G)."""
  table = np.asarray(variables["params"]["vars"]).reshape(G, V, QDIM // G)
  codes = np.asarray(codes)
  return np.concatenate([table[g][codes[..., g]] for g in range(G)], axis=-1)


@pytest.fixture
def gumbel_spy(monkeypatch):
  """Records the Gumbel noise the quantizer draws (it looks jax.random.gumbel up at call time)."""
  drawn = []
  original = jax.random.gumbel

  def spy(*args, **kwargs):
    noise = original(*args, **kwargs)
    drawn.append(noise)
    return noise
  monkeypatch.setattr(jax.random, "gumbel", spy)
  return drawn


def test_quantizer_eval_is_argmax_and_codeword_lookup(quantizer):
  q, variables, x = quantizer
  out = q.apply(variables, x)
  expected_codes = np.argmax(np.asarray(q_logits(variables, x)), axis=-1)
  np.testing.assert_array_equal(out["codes"], expected_codes)
  assert out["codes"].dtype == jnp.int32 and out["codes"].shape == (2, 50, G)
  assert len(np.unique(expected_codes)) > 1
  np.testing.assert_array_equal(out["quantized"], codewords(variables, expected_codes))
  again = q.apply(variables, x, rngs={"gumbel": key(5)})            # eval ignores any rng
  np.testing.assert_array_equal(again["quantized"], out["quantized"])


def test_quantizer_train_is_hard_straight_through(quantizer, gumbel_spy):
  q, variables, x = quantizer
  tau = 0.7
  out = q.apply(variables, x, temperature=tau, deterministic=False, rngs={"gumbel": key(7)})
  assert len(gumbel_spy) == 1
  noise = np.asarray(gumbel_spy[0])
  logits = np.asarray(q_logits(variables, x))
  np.testing.assert_array_equal(out["codes"], np.argmax(logits + noise, axis=-1))
  # Forward value: the codewords of the drawn codes (one-hot; `hard + soft - soft` is exact to an ulp).
  np.testing.assert_allclose(out["quantized"], codewords(variables, out["codes"]), rtol=0, atol=1e-6)
  assert np.mean(np.asarray(out["codes"]) != np.argmax(logits, -1)) > 0.05

  cot = jnp.asarray(np.random.default_rng(2).standard_normal((2, 50, QDIM)), jnp.float32)
  table = variables["params"]["vars"].reshape(G, V, QDIM // G)

  def straight_through(x_):
    y = q.apply(variables, x_, temperature=tau, deterministic=False, rngs={"gumbel": key(7)})["quantized"]
    return jnp.sum(y * cot)

  def soft_path(x_):
    soft = jax.nn.softmax((q_logits(variables, x_) + noise) / tau, axis=-1)
    return jnp.sum(jnp.einsum("btgv,gvd->btgd", soft, table).reshape(cot.shape) * cot)

  g_st = jax.jit(jax.grad(straight_through))(x)
  g_soft = jax.jit(jax.grad(soft_path))(x)
  scale = float(jnp.max(jnp.abs(g_soft)))
  assert scale > 1e-2
  np.testing.assert_allclose(g_st, g_soft, rtol=1e-5, atol=1e-5 * scale)


def test_quantizer_hard_codes_follow_gumbel_max(quantizer):
  """Hard training codes are samples of softmax(logits) (Gumbel-max trick): the temperature leaves them
  unchanged (argmax of (l + n) / tau does not depend on tau); they match the noise-free argmax more often
  as the logits get sharper."""
  q, variables, _ = quantizer
  frame = 0.3 * np.random.default_rng(3).standard_normal((1, 1, 12)).astype(np.float32)
  x = jnp.asarray(np.broadcast_to(frame, (1, 4000, 12)))
  apply = jax.jit(lambda x_, tau, rng: q.apply(variables, x_, temperature=tau, deterministic=False,
                                               rngs={"gumbel": rng})["codes"])
  probs = np.asarray(jax.nn.softmax(q_logits(variables, x)[0, 0], axis=-1))     # (G, V)
  assert probs.max() < 0.9
  codes = {tau: np.asarray(apply(x, tau, key(11))[0]) for tau in (2.0, 0.5)}
  np.testing.assert_array_equal(codes[2.0], codes[0.5])
  for g in range(G):
    freq = np.bincount(codes[2.0][:, g], minlength=V) / 4000
    np.testing.assert_allclose(freq, probs[g], atol=0.035)   # ~4 sigma of a 4000-draw frequency
  match = {}
  for scale in (1.0, 10.0):
    argmax = np.argmax(np.asarray(q_logits(variables, x * scale)), axis=-1)
    match[scale] = np.mean(np.asarray(apply(x * scale, 1.0, key(12))) == argmax)
  assert match[1.0] < 0.9 and match[10.0] > match[1.0] + 0.1, match


def test_quantizer_temperature_is_traced(quantizer):
  q, variables, x = quantizer
  traces = []

  @jax.jit
  def grad_at(variables, x, temperature, rng):
    traces.append(None)
    f = lambda x_: jnp.sum(q.apply(variables, x_, temperature=temperature, deterministic=False,
                                   rngs={"gumbel": rng})["quantized"] ** 2)
    return jax.grad(f)(x)

  grads = [grad_at(variables, x, tau, key(4)) for tau in (2.0, 1.0, 0.5)]
  assert len(traces) == 1 and grad_at._cache_size() == 1
  assert float(jnp.max(jnp.abs(grads[0] - grads[2]))) > 1e-3   # and it is used: the gradient depends on it


def test_prob_perplexity_bounds_uniform_and_peaked(quantizer):
  q, variables, x = quantizer
  out = q.apply(variables, x)
  assert G <= float(out["prob_perplexity"]) <= G * V
  assert G <= float(out["code_perplexity"]) <= G * V
  assert out["prob_perplexity"].dtype == out["code_perplexity"].dtype == jnp.float32

  zero_proj = jax.tree_util.tree_map(jnp.zeros_like, variables["params"]["weight_proj"])
  zero = {"params": {"vars": variables["params"]["vars"], "weight_proj": zero_proj}}
  uniform = q.apply(zero, x)
  np.testing.assert_allclose(uniform["prob_perplexity"], G * V, rtol=1e-4)
  np.testing.assert_allclose(uniform["code_perplexity"], G, rtol=1e-4)   # all argmaxes tie at code 0

  sharp = {"params": {"vars": variables["params"]["vars"],
                      "weight_proj": {"kernel": 1000.0 * variables["params"]["weight_proj"]["kernel"],
                                      "bias": variables["params"]["weight_proj"]["bias"]}}}
  same_frame = jnp.broadcast_to(x[:1, :1], x.shape)
  np.testing.assert_allclose(q.apply(sharp, same_frame)["prob_perplexity"], G, rtol=1e-4)
  np.testing.assert_allclose(q.apply(sharp, x)["prob_perplexity"], q.apply(sharp, x)["code_perplexity"],
                             rtol=1e-3)


def test_perplexity_weights_exclude_frames(quantizer):
  q, variables, x = quantizer
  weights = np.ones((2, 50), np.float32)
  weights[0, :20] = 0.0
  weights[1, 45:] = 0.0
  base = q.apply(variables, x, jnp.asarray(weights))
  changed = np.asarray(x).copy()
  changed[0, :20] = 5.0 * np.random.default_rng(9).standard_normal((20, 12))
  changed[1, 45:] = -3.0
  out = q.apply(variables, jnp.asarray(changed), jnp.asarray(weights))
  assert float(out["prob_perplexity"]) == float(base["prob_perplexity"])
  assert float(out["code_perplexity"]) == float(base["code_perplexity"])
  # ... whereas the unweighted perplexity moves; the weighted one is that of the counted frames alone.
  assert float(q.apply(variables, jnp.asarray(changed))["prob_perplexity"]) != float(
      q.apply(variables, x)["prob_perplexity"])
  probs = np.asarray(jax.nn.softmax(q_logits(variables, x), axis=-1))[weights > 0]     # (N, G, V)
  avg = probs.mean(0)
  np.testing.assert_allclose(base["prob_perplexity"], np.sum(np.exp(-np.sum(avg * np.log(avg + 1e-7), -1))),
                             rtol=1e-5)


# ------------------------------------------------------------------------------------------ 4. LayerDrop

def test_layerdrop_under_jit():
  cfg = TINY.replace(task="encoder", encoder_layers=4, encoder_layerdrop=0.5, **NO_DROPOUT)
  module = models.build(cfg)
  audio, _ = make_batch(length=2000, valid=(2000,))
  params = {"params": random_params(module, audio.shape)}
  traces = []

  @functools.partial(jax.jit, static_argnames="deterministic")
  def skipped(params, audio, rng, deterministic=False):
    traces.append(None)
    hidden = module.apply(params, audio, deterministic=deterministic, output_hidden_states=True,
                          rngs={"layerdrop": rng, "dropout": rng})["hidden_states"]
    assert len(hidden) == cfg.encoder_layers + 1
    return jnp.stack([jnp.all(hidden[i + 1] == hidden[i]) for i in range(cfg.encoder_layers)])

  runs = np.stack([np.asarray(skipped(params, audio, jax.random.fold_in(key(1), i))) for i in range(200)])
  assert len(traces) == 1 and skipped._cache_size() == 1
  rate = runs.mean(0)
  assert np.all(np.abs(rate - 0.5) < 0.15), rate                # 200 draws a layer: sigma 0.035
  assert abs(runs.mean() - 0.5) < 0.07                           # 800 draws: sigma 0.018
  for i in range(4):
    for j in range(i + 1, 4):
      both = np.mean(runs[:, i] & runs[:, j])
      assert abs(both - rate[i] * rate[j]) < 0.12, (i, j, both)  # an independent coin per layer
  assert len({tuple(r) for r in runs}) >= 12                     # of the 16 possible patterns
  for seed in range(5):
    assert not np.any(skipped(params, audio, key(seed), deterministic=True))


# ------------------------------------------------------------------------------------------ 5. masks

PRE_NO_DROPOUT = TINY.replace(**NO_DROPOUT)


def test_pretraining_time_mask_replaces_frames_with_mask_emb(pre):
  _, params, audio, pad = pre
  _, apply = jitted_apply(PRE_NO_DROPOUT)
  out = apply({"params": params}, audio, pad, deterministic=False, rngs=rngs(1))
  x = np.asarray(out["encoder_input"])
  mask = np.asarray(out["mask_time"])
  frame_pad = np.asarray(out["frame_padding_mask"])
  assert mask.shape == frame_pad.shape == (2, TINY.num_frames(4000))
  assert frame_pad.sum(1).tolist() == [0, TINY.num_frames(4000) - TINY.num_frames(3000)]
  assert not np.any(mask & frame_pad)
  assert mask.sum(1)[0] == mask.sum(1)[1] > 0                    # require_same_masks
  bb = params["wav2vec2"]
  np.testing.assert_array_equal(x[mask], np.broadcast_to(bb["mask_emb"], (mask.sum(), 64)))
  proj = np.asarray(out["normed_features"]) @ np.asarray(bb["post_extract_proj"]["kernel"]) + np.asarray(
      bb["post_extract_proj"]["bias"])
  np.testing.assert_allclose(x[~mask], proj[~mask], rtol=1e-5, atol=1e-5)
  assert not np.allclose(x[mask], proj[mask], atol=1e-2)
  # another rng, another mask, no recompilation
  other = apply({"params": params}, audio, pad, deterministic=False, rngs=rngs(2))
  assert np.any(np.asarray(other["mask_time"]) != mask)
  assert not np.any(np.asarray(other["mask_time"]) & frame_pad)
  assert apply._cache_size() == 1


def test_group_norm_mode_padding_content_changes_valid_frames(pre):
  """RECIPE: the default extractor's GroupNorm normalises each channel over all frames, padding included
  (as the reference), so the padding's content reaches the valid frames of that row only."""
  _, params, audio, pad = pre
  _, apply = jitted_apply(PRE_NO_DROPOUT)
  noisy = audio.copy()
  noisy[pad] = 3.0
  a = apply({"params": params}, audio, pad, deterministic=False, rngs=rngs(1))
  b = apply({"params": params}, noisy, pad, deterministic=False, rngs=rngs(1))
  np.testing.assert_array_equal(a["mask_time"], b["mask_time"])
  np.testing.assert_array_equal(a["features"][0], b["features"][0])
  valid = TINY.num_frames(3000)
  assert not np.allclose(a["features"][1, :valid], b["features"][1, :valid], atol=1e-4)


CTC_CFG = TINY_CTC.replace(extractor_mode="layer_norm", conv_bias=True, layer_norm_first=True,
                           mask_channel_prob=0.5, mask_channel_length=8, **NO_DROPOUT)


@pytest.fixture(scope="module")
def ctc():
  """Tiny CTC model in the LV-60k layout (per-frame LayerNorm conv encoder, pre-LN), channel masking."""
  module, apply = jitted_apply(CTC_CFG)
  audio, pad = make_batch()
  return module, apply, random_params(module, audio.shape), audio, pad


def test_ctc_training_masks_channels_and_time(ctc):
  module, apply, params, audio, pad = ctc
  train = apply({"params": params}, audio, pad, deterministic=False, rngs={"mask": key(3)})
  ref = apply({"params": params}, audio, pad, deterministic=True, rngs={"mask": key(3)})
  x, x_ref = np.asarray(train["encoder_input"]), np.asarray(ref["encoder_input"])
  frame_pad = np.asarray(train["frame_padding_mask"])
  mask_time = np.asarray(train["mask_time"])
  assert mask_time.any() and not np.any(mask_time & frame_pad)
  assert ref["mask_time"] is None
  mask_emb = np.asarray(params["wav2vec2"]["mask_emb"])
  zero_rows = []
  for b in range(2):
    valid = ~frame_pad[b]
    zero = np.all(x[b][valid] == 0, axis=0)                      # channels zero at every valid frame
    assert 8 <= zero.sum() < 64, zero.sum()
    edges = np.flatnonzero(np.diff(np.concatenate([[0], zero.astype(int), [0]])))
    assert np.all(edges[1::2] - edges[::2] >= 8)                 # spans of >= mask_channel_length
    expected = np.where(mask_time[b][:, None], mask_emb[None, :], x_ref[b])
    expected = np.where(zero[None, :], 0.0, expected)
    np.testing.assert_allclose(x[b][valid], expected[valid], rtol=1e-6, atol=1e-6)
    assert not np.any(np.all(x_ref[b][valid] == 0, axis=0))
    zero_rows.append(zero)
  assert np.any(zero_rows[0] != zero_rows[1])                    # drawn per row
  assert not np.allclose(train["logits"], ref["logits"])


def test_ctc_eval_draws_no_mask(ctc):
  module, apply, params, audio, pad = ctc
  assert CTC_CFG.mask_prob > 0 and CTC_CFG.mask_channel_prob > 0
  outs = [apply({"params": params}, audio, pad, deterministic=True, rngs={"mask": key(s)}) for s in (1, 2)]
  for out in outs:
    assert out["mask_time"] is None
  np.testing.assert_array_equal(outs[0]["logits"], outs[1]["logits"])
  np.testing.assert_array_equal(outs[0]["encoder_input"], outs[1]["encoder_input"])


# ---------------------------------------------------------------------------------- 6. feature_grad_mult

def test_feature_grad_mult_scales_only_the_conv_encoder(pre):
  results = pretrain_grads(pre)
  ref_loss, _, _, ref = results[1.0]
  ref_conv = flat(ref["wav2vec2"]["feature_extractor"])
  ref_rest = {k: v for k, v in flat(ref).items() if "['feature_extractor']" not in k}
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in ref_conv.values())
  for mult in (0.1, 0.0):
    loss, _, _, grads = results[mult]
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)   # forward unchanged
    for name, g in flat(grads["wav2vec2"]["feature_extractor"]).items():
      if mult == 0.0:
        assert not np.any(np.asarray(g)), name
      else:
        np.testing.assert_allclose(g, mult * np.asarray(ref_conv[name]), rtol=2e-5,
                                   atol=1e-6 * float(jnp.max(jnp.abs(ref_conv[name]))), err_msg=name)
    rest = {k: v for k, v in flat(grads).items() if "['feature_extractor']" not in k}
    assert rest.keys() == ref_rest.keys()
    for name, g in rest.items():
      if name.endswith(NO_GRADIENT):
        continue                                                 # rounding noise only, see NO_GRADIENT
      # equal up to float reassociation (the forward passes fuse differently): 1e-5 of the leaf's scale
      np.testing.assert_allclose(g, ref_rest[name], rtol=1e-5,
                                 atol=1e-5 * float(jnp.max(jnp.abs(ref_rest[name]))), err_msg=name)


# ---------------------------------------------------------------------------------- 7. padding invariance

def test_ctc_valid_frames_ignore_padding_in_layer_norm_mode(ctc):
  """Per-frame LayerNorm conv encoder: a row's valid-frame logits do not depend on how much padding
  follows it nor on what the padding holds (the attention and the positional conv see padding as 0)."""
  module, apply, params, audio, pad = ctc
  frames = CTC_CFG.num_frames(3000)
  row = audio[1, :3000]
  alone = np.asarray(apply({"params": params}, row[None], None, deterministic=True,
                           rngs={"mask": key(0)})["logits"][0])
  assert alone.shape == (frames, CTC_CFG.vocab_size)
  noisy = audio.copy()
  noisy[1, 3000:] = 10.0 * np.random.default_rng(6).standard_normal(1000)
  for batch in (audio, noisy):
    out = apply({"params": params}, batch, pad, deterministic=True, rngs={"mask": key(0)})
    np.testing.assert_allclose(out["logits"][1, :frames], alone, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["frame_padding_mask"][1], np.arange(CTC_CFG.num_frames(4000)) >= frames)


# ---------------------------------------------------------------------------------- 8. bad input

@pytest.fixture
def no_compiles(caplog):
  """Context manager asserting that JAX compiled nothing inside it."""
  class Guard:
    def __enter__(self):
      caplog.clear()
      self._ctx = jax.log_compiles(True)
      self._ctx.__enter__()

    def __exit__(self, *exc):
      self._ctx.__exit__(*exc)
      compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling")]
      assert not compiled, compiled
      return False
  caplog.set_level(logging.WARNING)
  return Guard()


def test_no_compiles_guard_detects_compilation(no_compiles):
  with pytest.raises(AssertionError, match="Compiling"):
    with no_compiles:
      jax.jit(lambda a: a * 3.0 + 1.0)(jnp.ones((3, 7, 5)))


@pytest.mark.parametrize("shape,pattern", [
    ((4001,), r"2-D.*\(4001,\)"),
    ((1, 2, 4001), r"2-D.*\(1, 2, 4001\)"),
    ((2, 399), r"399 samples.*400"),
])
def test_bad_audio_shape(ctc, shape, pattern, no_compiles):
  module, _, params, _, _ = ctc
  audio = np.zeros(shape, np.float32)
  with no_compiles, pytest.raises(ValueError, match=pattern):
    module.apply({"params": params}, audio)
  with no_compiles, pytest.raises(ValueError, match=pattern):       # at trace time under jit
    jax.jit(module.apply)({"params": params}, audio)


def test_receptive_field_length_is_accepted():
  module = models.build(TINY_CTC)
  variables = jax.eval_shape(module.init, key(0), jax.ShapeDtypeStruct((1, 400), jnp.float32))
  out = jax.eval_shape(module.apply, variables, jax.ShapeDtypeStruct((1, 400), jnp.float32))
  assert out["logits"].shape == (1, 1, TINY_CTC.vocab_size)


@pytest.mark.parametrize("bad,row", [(np.nan, 1), (np.inf, 0), (-np.inf, 1)])
def test_non_finite_audio_names_the_row(ctc, bad, row, no_compiles):
  module, _, params, _, _ = ctc
  audio, pad = make_batch(length=4003, valid=(4003, 3003))
  audio[row, 123] = bad
  with no_compiles, pytest.raises(ValueError, match=rf"non-finite.*row\(s\) \[{row}\]"):
    module.apply({"params": params}, audio, pad)


def test_padding_mask_shape_mismatch(ctc, no_compiles):
  module, _, params, _, _ = ctc
  audio, pad = make_batch(length=4003, valid=(4003, 3003))
  with no_compiles, pytest.raises(ValueError, match=r"\(2, 4002\).*\(2, 4003\)"):
    module.apply({"params": params}, audio, pad[:, :4002])
  with no_compiles, pytest.raises(ValueError, match=r"\(1, 4003\).*\(2, 4003\)"):
    module.apply({"params": params}, audio, pad[:1])


@pytest.mark.parametrize("change,pattern", [
    (dict(encoder_attention_heads=5), r"encoder_attention_heads=5 .*encoder_embed_dim=64"),
    (dict(no_such_field=1), r"unknown .*no_such_field"),
    (dict(extractor_mode="layernorm"), r"extractor_mode='layernorm'"),
    (dict(dropout=1.5), r"dropout=1\.5"),
    (dict(task="ctc", vocab_size=0), r"vocab_size=0"),
])
def test_bad_config_is_named(change, pattern):
  cfg = TINY.to_dict()
  cfg.update(change)
  with pytest.raises(ValueError, match=pattern):
    models.build(cfg)
  config_dict = get_config("tiny")
  with config_dict.unlocked():
    for k, v in change.items():
      config_dict[k] = v
  with pytest.raises(ValueError, match=pattern):
    models.build(config_dict)
  if "no_such_field" not in change:
    with pytest.raises(ValueError, match=pattern):
      TINY.replace(**change)


def test_mask_longer_than_frames_is_named(pre, no_compiles):
  module, params, _, _ = pre
  audio = jax.ShapeDtypeStruct((1, 720), jnp.float32)             # 2 frames < mask_length 4
  assert TINY.num_frames(720) == 2 and TINY.mask_length == 4
  apply = functools.partial(module.apply, rngs={"mask": key(0)})
  with no_compiles, pytest.raises(ValueError, match=r"mask_length=4\b.*\(2\)"):
    jax.eval_shape(apply, {"params": params}, audio)
  with no_compiles, pytest.raises(ValueError, match=r"mask_length=4\b.*\(2\)"):
    jax.jit(apply)({"params": params}, np.zeros((1, 720), np.float32))


# ---------------------------------------------------------------------------------- 9. dtype

def test_bfloat16_compute_float32_params(ctc):
  module, apply, params, audio, pad = ctc
  module16, apply16 = jitted_apply(CTC_CFG.replace(dtype="bfloat16"))
  shapes = jax.eval_shape(module16.init, key(0), jax.ShapeDtypeStruct(audio.shape, jnp.float32))
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype(jnp.float32)}
  assert jax.tree_util.tree_structure(shapes["params"]) == jax.tree_util.tree_structure(params)
  out32 = apply({"params": params}, audio, pad, deterministic=True, rngs={"mask": key(0)})
  out16 = apply16({"params": params}, audio, pad, deterministic=True, rngs={"mask": key(0)})
  assert out16["last_hidden_state"].dtype == jnp.bfloat16
  assert out16["logits"].dtype == out32["logits"].dtype == jnp.float32
  valid = ~np.asarray(out32["frame_padding_mask"])
  for name in ("last_hidden_state", "logits"):
    a = np.asarray(out16[name].astype(jnp.float32))[valid]
    b = np.asarray(out32[name])[valid]
    assert np.max(np.abs(a - b)) < 0.1 * np.max(np.abs(b)), name
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.995, name


def test_bfloat16_pretraining_losses_are_float32(pre, quantizer):
  _, params, audio, pad = pre
  module16 = models.build(TINY.replace(dtype="bfloat16"))
  apply16 = functools.partial(module16.apply, rngs={"mask": key(0)})
  out = jax.eval_shape(apply16, {"params": params}, audio, pad)
  assert out["last_hidden_state"].dtype == out["context"].dtype == out["targets"].dtype == jnp.bfloat16
  assert out["prob_perplexity"].dtype == out["code_perplexity"].dtype == jnp.float32
  loss, (aux, _) = jax.eval_shape(functools.partial(production_loss, module16), params, audio, pad, key(3), 2.0)
  for leaf in jax.tree_util.tree_leaves((loss, aux)):
    assert leaf.dtype == jnp.float32 and leaf.shape == ()
  # The bf16 quantizer: logits, Gumbel noise and perplexity in float32, same codes as fp32 (mostly).
  q, variables, x = quantizer
  q16 = GumbelQuantizer(G, V, QDIM, dtype=jnp.bfloat16)
  for deterministic in (True, False):
    out16 = q16.apply(variables, x, temperature=0.5, deterministic=deterministic, rngs={"gumbel": key(1)})
    out32 = q.apply(variables, x, temperature=0.5, deterministic=deterministic, rngs={"gumbel": key(1)})
    assert out16["prob_perplexity"].dtype == jnp.float32
    np.testing.assert_allclose(out16["prob_perplexity"], out32["prob_perplexity"], rtol=0.02)
    assert np.mean(np.asarray(out16["codes"]) == np.asarray(out32["codes"])) > 0.9


# ---------------------------------------------------------------------------------- 10. objective

def test_pretrain_objective_gradients(pre):
  """The production objective (what the train step differentiates) on one device: finite loss made of
  its logged parts, masks never on padding, every parameter but the attention's key bias gets a gradient."""
  loss, aux, prep, grads = pretrain_grads(pre)[1.0]
  cfg = TINY
  assert np.isfinite(float(loss)) and float(loss) > 0
  masks, frame_pad = np.asarray(prep["masks"][0]), np.asarray(prep["frame_padding"][0])
  sample_size = float(prep["sample_size"][0])
  assert sample_size == float(masks.sum()) == float(aux["count"]) > 0
  assert not np.any(masks & frame_pad)
  assert len(set(masks.sum(axis=1))) == 1                      # require_same_masks: equal counts per row
  assert float(prep["valid_frames"][0]) == cfg.num_frames(4000) + cfg.num_frames(3000)
  expect = (float(aux["contrastive"]) + cfg.diversity_weight * float(aux["diversity"])
            + cfg.feature_pen_weight * float(aux["feature_pen"])) / sample_size
  np.testing.assert_allclose(float(loss), expect, rtol=1e-5)
  for leaf in jax.tree_util.tree_leaves((loss, aux)):
    assert leaf.dtype == jnp.float32
  scale = {}
  for name, g in flat(grads).items():
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), name
    scale[name] = float(np.max(np.abs(g)))
  assert scale.keys() == flat(pre[1]).keys()
  typical = float(np.median(list(scale.values())))
  for name, s in scale.items():
    if name.endswith(NO_GRADIENT):
      assert s < 1e-5 * typical, (name, s, typical)
    else:
      assert s > 1e-4 * typical, (name, s, typical)
  assert len([n for n in scale if n.endswith(NO_GRADIENT)]) == TINY.encoder_layers
  # a new rng draws new masks and negatives: new loss, no recompilation
  loss2 = pretrain_grads(pre, seed=4)[1.0][0]
  assert float(loss2) != float(loss)
  assert pretrain_grads_fn()._cache_size() == 1


# ---------------------------------------------------------------------------------- 11. memory layouts

def test_scanned_encoder_and_remat_give_the_same_outputs_and_convert_through_one_mapping(pre, tmp_path):
  """model.scan_layers runs the layers as one lax.scan over stacked params; model.remat recomputes them
  in the backward pass. Same hidden states, same HF checkpoint (to_hf unstacks), layouts convertible."""
  _, params, audio, pad = pre
  ref_module = models.build(TINY)
  ref = ref_module.apply({"params": params}, audio, pad, rngs={"mask": key(0)}, output_hidden_states=True)
  stacked = models.stack_layers(params)
  encoder = stacked["wav2vec2"]["encoder"]
  assert "layers_0" not in encoder
  assert jax.tree_util.tree_leaves(encoder["layers"])[0].shape[0] == TINY.encoder_layers
  for cfg, p in ((TINY.replace(scan_layers=True), stacked), (TINY.replace(scan_layers=True, remat="dots"), stacked),
                 (TINY.replace(remat="full"), params)):
    out = models.build(cfg).apply({"params": p}, audio, pad, rngs={"mask": key(0)}, output_hidden_states=True)
    assert len(out["hidden_states"]) == len(ref["hidden_states"]) == TINY.encoder_layers + 1
    for a, b in zip(out["hidden_states"], ref["hidden_states"]):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["context"]), np.asarray(ref["context"]), atol=1e-5)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)),
                                                       models.unstack_layers(stacked), params))
  assert models.layer_layout(stacked, False).keys() == params.keys()
  convert.to_hf(TINY.replace(scan_layers=True), jax.device_get(stacked), tmp_path / "scanned")
  convert.to_hf(TINY, jax.device_get(params), tmp_path / "plain")
  from safetensors.numpy import load_file
  a, b = load_file(tmp_path / "scanned" / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  with pytest.raises(ValueError, match="remat"):
    TINY.replace(remat="everything")
