"""Checkpoint conversion (w2v2_jax.convert): Hugging Face and fairseq layouts, both directions.

Everything is built here from tiny random transformers models (no downloads). Numerical parity of the
converted model's outputs with transformers is tested in test_hf_reference.py; this file checks the
parameter trees, values, key names, configs and error messages.
"""
import argparse
import json
import os
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from w2v2_jax import convert  # noqa: E402
from w2v2_jax.models import ModelConfig, build  # noqa: E402

CLASSES = {"pretrain": transformers.Wav2Vec2ForPreTraining, "ctc": transformers.Wav2Vec2ForCTC,
           "encoder": transformers.Wav2Vec2Model}

VARIANTS = {
    # BASE-like: GroupNorm on conv 0, no conv bias, post-LN; odd positional kernel; G=3 groups of V=5.
    "group_postln": dict(feat_extract_norm="group", conv_bias=False, do_stable_layer_norm=False,
                         conv_dim=(8, 8, 8), conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2),
                         num_conv_pos_embeddings=5, num_codevector_groups=3, num_codevectors_per_group=5,
                         codevector_dim=12, proj_codevector_dim=6),
    # LV-60k-like: LayerNorm after every conv, conv bias, pre-LN; even positional kernel; V=7 (odd);
    # conv channels change between layers; codebook dim != final dim.
    "layer_preln": dict(feat_extract_norm="layer", conv_bias=True, do_stable_layer_norm=True,
                        conv_dim=(6, 10), conv_kernel=(7, 3), conv_stride=(3, 2),
                        num_conv_pos_embeddings=4, num_codevector_groups=2, num_codevectors_per_group=7,
                        codevector_dim=8, proj_codevector_dim=10),
}


def hf_config(variant, **extra):
  kw = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
            num_conv_pos_embedding_groups=2, vocab_size=9, mask_time_length=4,
            hidden_dropout=0.05, attention_dropout=0.02, activation_dropout=0.03, feat_proj_dropout=0.04,
            feat_quantizer_dropout=0.06, final_dropout=0.07, layerdrop=0.08, num_negatives=5,
            mask_time_prob=0.3, mask_feature_prob=0.1, mask_feature_length=3)
  kw.update(VARIANTS[variant])
  kw.update(extra)
  return transformers.Wav2Vec2Config(**kw)


def make_hf(task, variant, directory, seed=0, safe=True, **extra):
  """A random transformers model, every parameter perturbed (no LayerNorm left at 1/0), saved."""
  torch.manual_seed(seed)
  model = CLASSES[task](hf_config(variant, **extra)).eval()
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=g))
  model.save_pretrained(directory, safe_serialization=safe)
  return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """(task, variant) -> (directory, model), built once per module."""
  cache = {}

  def get(task, variant):
    if (task, variant) not in cache:
      d = tmp_path_factory.mktemp(f"{task}_{variant}")
      cache[task, variant] = (d, make_hf(task, variant, d, seed=len(cache)))
    return cache[task, variant]
  return get


def flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = v
  return out


def assert_params_equal(a, b):
  fa, fb = flat(a), flat(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    assert fa[k].dtype == fb[k].dtype == np.float32, k
    assert fa[k].shape == fb[k].shape, k
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def init_params(cfg, frames=16):
  """Our module's real init (not eval_shape). Jitted, with masks given and the "unsafe_rbg" PRNG: XLA:CPU
  compiles threefry slowly, and this is about structure, not random streams (~2 s instead of ~5 s)."""
  samples = cfg.receptive_field + cfg.hop * (frames - 1)
  init = jax.jit(build(cfg).init)
  variables = init({"params": jax.random.key(0, impl="unsafe_rbg")},
                   jnp.zeros((1, samples), jnp.float32), mask_time=jnp.zeros((1, frames), bool))
  return jax.tree_util.tree_map(np.asarray, jax.device_get(variables["params"]))


def random_params(cfg, seed=0):
  """Random values on the tree of `build(cfg).init` (from its abstract evaluation: nothing compiled)."""
  samples = cfg.receptive_field + cfg.hop
  shapes = jax.eval_shape(build(cfg).init, {"params": jax.random.PRNGKey(0), "mask": jax.random.PRNGKey(1)},
                          jax.ShapeDtypeStruct((1, samples), jnp.float32), mask_time=jnp.zeros((1, 2), bool))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes["params"])


def t(x):
  return x.detach().numpy()


# ============================================================================== from_hf


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("task", list(CLASSES))
def test_from_hf_matches_init_tree_and_hf_values(task, variant, hf_dirs):
  directory, hf = hf_dirs(task, variant)
  cfg, params = convert.from_hf(directory)
  hc = hf.config
  assert cfg.task == task
  # Config mapping.
  assert cfg.conv_layers == tuple(zip(hc.conv_dim, hc.conv_kernel, hc.conv_stride))
  assert cfg.extractor_mode == {"group": "default", "layer": "layer_norm"}[hc.feat_extract_norm]
  assert cfg.conv_bias == hc.conv_bias and cfg.layer_norm_first == hc.do_stable_layer_norm
  assert (cfg.encoder_embed_dim, cfg.encoder_layers, cfg.encoder_ffn_embed_dim, cfg.encoder_attention_heads) == (
      16, 2, 24, 2)
  assert (cfg.conv_pos, cfg.conv_pos_groups) == (hc.num_conv_pos_embeddings, 2)
  assert (cfg.latent_groups, cfg.latent_vars, cfg.vq_dim, cfg.final_dim) == (
      hc.num_codevector_groups, hc.num_codevectors_per_group, hc.codevector_dim, hc.proj_codevector_dim)
  assert (cfg.dropout, cfg.attention_dropout, cfg.activation_dropout, cfg.dropout_input, cfg.dropout_features,
          cfg.final_dropout, cfg.encoder_layerdrop) == (0.05, 0.02, 0.03, 0.04, 0.06, 0.07, 0.08)
  assert (cfg.mask_prob, cfg.mask_length, cfg.mask_min_masks) == (0.3, 4, 2)
  assert (cfg.mask_channel_prob, cfg.mask_channel_length, cfg.mask_channel_min_masks) == (0.1, 3, 0)
  assert cfg.num_negatives == 5 and cfg.vocab_size == (9 if task == "ctc" else 0)

  # Exactly the tree and shapes of our module's init.
  ref = init_params(cfg)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(ref)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(ref)):
    assert isinstance(a, np.ndarray) and a.dtype == np.float32, path
    assert a.shape == b.shape, path

  # Values, spot-checked against the torch modules themselves.
  base = hf if task == "encoder" else hf.wav2vec2
  p = params["wav2vec2"]
  fe = p["feature_extractor"]
  for i, conv in enumerate(base.feature_extractor.conv_layers):
    np.testing.assert_array_equal(fe[f"conv_{i}"]["kernel"], t(conv.conv.weight).transpose(2, 1, 0))
    if hc.conv_bias:
      np.testing.assert_array_equal(fe[f"conv_{i}"]["bias"], t(conv.conv.bias))
    if hasattr(conv, "layer_norm"):
      np.testing.assert_array_equal(fe[f"norm_{i}"]["scale"], t(conv.layer_norm.weight))
      np.testing.assert_array_equal(fe[f"norm_{i}"]["bias"], t(conv.layer_norm.bias))
  assert sorted(k for k in fe if k.startswith("norm")) == (
      ["norm_0"] if hc.feat_extract_norm == "group" else [f"norm_{i}" for i in range(len(hc.conv_dim))])
  np.testing.assert_array_equal(p["layer_norm"]["scale"], t(base.feature_projection.layer_norm.weight))
  np.testing.assert_array_equal(p["post_extract_proj"]["kernel"], t(base.feature_projection.projection.weight).T)
  np.testing.assert_array_equal(p["mask_emb"], t(base.masked_spec_embed))
  pos = base.encoder.pos_conv_embed.conv
  np.testing.assert_array_equal(p["encoder"]["pos_conv"]["weight_g"],
                                t(pos.parametrizations.weight.original0).reshape(-1))
  np.testing.assert_array_equal(p["encoder"]["pos_conv"]["weight_v"],
                                t(pos.parametrizations.weight.original1).transpose(2, 1, 0))
  np.testing.assert_array_equal(p["encoder"]["pos_conv"]["bias"], t(pos.bias))
  np.testing.assert_array_equal(p["encoder"]["layer_norm"]["bias"], t(base.encoder.layer_norm.bias))
  for i, layer in enumerate(base.encoder.layers):
    ours = p["encoder"][f"layers_{i}"]
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
      np.testing.assert_array_equal(ours["self_attn"][name]["kernel"], t(getattr(layer.attention, name).weight).T)
      np.testing.assert_array_equal(ours["self_attn"][name]["bias"], t(getattr(layer.attention, name).bias))
    np.testing.assert_array_equal(ours["self_attn_layer_norm"]["scale"], t(layer.layer_norm.weight))
    np.testing.assert_array_equal(ours["final_layer_norm"]["bias"], t(layer.final_layer_norm.bias))
    np.testing.assert_array_equal(ours["fc1"]["kernel"], t(layer.feed_forward.intermediate_dense.weight).T)
    np.testing.assert_array_equal(ours["fc2"]["bias"], t(layer.feed_forward.output_dense.bias))
  if task == "pretrain":
    np.testing.assert_array_equal(params["quantizer"]["vars"], t(hf.quantizer.codevectors)[0])
    np.testing.assert_array_equal(params["quantizer"]["weight_proj"]["kernel"], t(hf.quantizer.weight_proj.weight).T)
    np.testing.assert_array_equal(params["project_q"]["kernel"], t(hf.project_q.weight).T)
    np.testing.assert_array_equal(params["final_proj"]["kernel"], t(hf.project_hid.weight).T)
    np.testing.assert_array_equal(params["final_proj"]["bias"], t(hf.project_hid.bias))
  if task == "ctc":
    np.testing.assert_array_equal(params["proj"]["kernel"], t(hf.lm_head.weight).T)
    np.testing.assert_array_equal(params["proj"]["bias"], t(hf.lm_head.bias))


def _rewrite_weights(src, dst, rename=None, drop=(), add=None):
  """Copy an HF directory, renaming / dropping / adding safetensors keys."""
  os.makedirs(dst, exist_ok=True)
  shutil.copy(os.path.join(src, "config.json"), dst)
  state = load_file(os.path.join(src, "model.safetensors"))
  state = {(rename(k) if rename else k): v for k, v in state.items() if k not in drop}
  state.update(add or {})
  save_file(state, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  return state


def test_both_weight_norm_key_forms(hf_dirs, tmp_path):
  directory, _ = hf_dirs("ctc", "layer_preln")
  keys = load_file(os.path.join(directory, "model.safetensors"))
  assert "wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original0" in keys
  legacy = _rewrite_weights(directory, tmp_path / "legacy", rename=lambda k: k.replace(
      "parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1", "weight_v"))
  assert "wav2vec2.encoder.pos_conv_embed.conv.weight_g" in legacy
  cfg_a, a = convert.from_hf(directory)
  cfg_b, b = convert.from_hf(tmp_path / "legacy")
  assert cfg_a == cfg_b
  assert_params_equal(a, b)
  # Both forms at once is ambiguous.
  both = {k: v for k, v in legacy.items() if "weight_g" in k}
  _rewrite_weights(directory, tmp_path / "both", add=both)
  with pytest.raises(ValueError, match="weight_g"):
    convert.from_hf(tmp_path / "both")


def test_half_precision_weights_are_read_as_float32(hf_dirs, tmp_path):
  directory, _ = hf_dirs("pretrain", "layer_preln")
  _, params = convert.from_hf(directory)
  state = load_file(os.path.join(directory, "model.safetensors"))
  _rewrite_weights(directory, tmp_path, add={k: v.astype(np.float16) for k, v in state.items()})
  _, half = convert.from_hf(tmp_path)
  assert_params_equal(half, jax.tree_util.tree_map(lambda x: x.astype(np.float16).astype(np.float32), params))


# ============================================================================== to_hf round trips


@pytest.mark.parametrize("form", ["parametrizations", "legacy"])
@pytest.mark.parametrize("task,variant", [("pretrain", "group_postln"), ("ctc", "layer_preln"),
                                          ("encoder", "layer_preln"), ("pretrain", "layer_preln")])
def test_roundtrip_through_transformers(task, variant, form, hf_dirs, tmp_path):
  directory, hf = hf_dirs(task, variant)
  cfg, params = convert.from_hf(directory)
  out = tmp_path / "ours"
  convert.to_hf(cfg, params, out, weight_norm_keys=form)
  written = load_file(os.path.join(out, "model.safetensors"))
  suffix = {"parametrizations": "parametrizations.weight.original0", "legacy": "weight_g"}[form]
  assert any(k.endswith("pos_conv_embed.conv." + suffix) for k in written)
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["model_type"] == "wav2vec2"
  assert config["architectures"] == [type(hf).__name__]

  loaded, info = CLASSES[task].from_pretrained(out, output_loading_info=True)
  assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
  ref, got = hf.state_dict(), loaded.state_dict()
  assert sorted(ref) == sorted(got)
  for k in ref:
    assert torch.equal(ref[k], got[k]), k
  for name in ("conv_dim", "conv_kernel", "conv_stride", "feat_extract_norm", "conv_bias", "do_stable_layer_norm",
               "num_conv_pos_embeddings", "hidden_dropout", "layerdrop", "mask_time_prob", "mask_feature_length",
               "codevector_dim", "proj_codevector_dim", "num_codevector_groups", "num_codevectors_per_group"):
    assert getattr(loaded.config, name) == getattr(hf.config, name), name
  if task == "ctc":
    assert loaded.config.vocab_size == hf.config.vocab_size

  # transformers' own save -> from_hf: bit-identical params and the same config.
  loaded.save_pretrained(tmp_path / "resaved")
  cfg2, params2 = convert.from_hf(tmp_path / "resaved")
  assert cfg2 == cfg
  assert_params_equal(params2, params)
  # from_hf(to_hf(...)) directly.
  cfg3, params3 = convert.from_hf(out)
  assert cfg3 == cfg
  assert_params_equal(params3, params)


@pytest.mark.parametrize("task", ["pretrain", "ctc", "encoder"])
def test_our_init_roundtrip(task, tmp_path):
  """Params that never came from transformers: to_hf -> from_hf gives them back, config included."""
  cfg = ModelConfig(task=task, conv_layers=((12, 6, 3), (10, 3, 2), (10, 2, 1)), extractor_mode="layer_norm",
                    conv_bias=True, encoder_embed_dim=12, encoder_layers=2, encoder_ffn_embed_dim=20,
                    encoder_attention_heads=3, layer_norm_first=True, conv_pos=6, conv_pos_groups=3,
                    final_dim=9, latent_vars=4, latent_groups=3, latent_dim=6, num_negatives=4,
                    mask_length=3, mask_channel_prob=0.2, mask_channel_length=2,
                    vocab_size=7 if task == "ctc" else 0, encoder_layerdrop=0.0, final_dropout=0.1)
  params = random_params(cfg)
  convert.to_hf(cfg, {"params": params}, tmp_path)
  cfg2, params2 = convert.from_hf(tmp_path)
  assert cfg2 == cfg
  assert_params_equal(params2, params)
  loaded, info = CLASSES[task].from_pretrained(tmp_path, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_no_mask_embedding_when_masking_is_off(tmp_path):
  """transformers has no masked_spec_embed when both mask probabilities are 0: read as zeros, not written."""
  make_hf("encoder", "group_postln", tmp_path / "hf", mask_time_prob=0.0, mask_feature_prob=0.0)
  assert not any("masked_spec_embed" in k for k in load_file(tmp_path / "hf" / "model.safetensors"))
  cfg, params = convert.from_hf(tmp_path / "hf")
  assert cfg.mask_prob == 0.0 and cfg.mask_channel_prob == 0.0
  np.testing.assert_array_equal(params["wav2vec2"]["mask_emb"], np.zeros(16, np.float32))
  convert.to_hf(cfg, params, tmp_path / "out")
  assert not any("masked_spec_embed" in k for k in load_file(tmp_path / "out" / "model.safetensors"))
  _, info = transformers.Wav2Vec2Model.from_pretrained(tmp_path / "out", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]


def test_pytorch_bin_and_sharded_safetensors(hf_dirs, tmp_path):
  directory, hf = hf_dirs("pretrain", "group_postln")
  cfg, params = convert.from_hf(directory)
  hf.save_pretrained(tmp_path / "bin", safe_serialization=False)
  assert os.path.exists(tmp_path / "bin" / "pytorch_model.bin")
  cfg_bin, params_bin = convert.from_hf(tmp_path / "bin")
  assert cfg_bin == cfg
  assert_params_equal(params_bin, params)
  hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
  cfg_sh, params_sh = convert.from_hf(tmp_path / "sharded")
  assert cfg_sh == cfg
  assert_params_equal(params_sh, params)


def test_pytorch_bin_without_torch_names_the_extra(hf_dirs, tmp_path, monkeypatch):
  _, hf = hf_dirs("ctc", "group_postln")
  hf.save_pretrained(tmp_path, safe_serialization=False)
  monkeypatch.setitem(sys.modules, "torch", None)          # `import torch` now raises ImportError
  with pytest.raises(ImportError, match=r"w2v2_jax\[hf\]"):
    convert.from_hf(tmp_path)


# ============================================================================== fairseq


def fairseq_state(hf_state, layer_norm_mode, ctc):
  """HF state dict -> fairseq key names, written independently of convert.py."""
  norm = r"\1.2.1.\2" if layer_norm_mode else r"\1.2.\2"
  rules = [
      (r"^wav2vec2\.", ""),
      (r"feature_extractor\.conv_layers\.(\d+)\.conv\.(weight|bias)$", r"feature_extractor.conv_layers.\1.0.\2"),
      (r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.(weight|bias)$", "feature_extractor.conv_layers." + norm),
      (r"^feature_projection\.layer_norm\.", "layer_norm."),
      (r"^feature_projection\.projection\.", "post_extract_proj."),
      (r"^masked_spec_embed$", "mask_emb"),
      (r"pos_conv_embed\.conv\.parametrizations\.weight\.original0$", "pos_conv.0.weight_g"),
      (r"pos_conv_embed\.conv\.parametrizations\.weight\.original1$", "pos_conv.0.weight_v"),
      (r"pos_conv_embed\.conv\.bias$", "pos_conv.0.bias"),
      (r"\.attention\.", ".self_attn."),
      (r"(layers\.\d+)\.layer_norm\.", r"\1.self_attn_layer_norm."),
      (r"feed_forward\.intermediate_dense\.", "fc1."),
      (r"feed_forward\.output_dense\.", "fc2."),
      (r"^quantizer\.codevectors$", "quantizer.vars"),
      (r"^project_hid\.", "final_proj."),
  ]
  out = {}
  for key, value in hf_state.items():
    is_backbone = key.startswith("wav2vec2.")
    for pattern, repl in rules:
      key = re.sub(pattern, repl, key)
    if key.startswith("lm_head."):
      key = "w2v_encoder.proj." + key[len("lm_head."):]
    elif ctc and is_backbone:
      key = "w2v_encoder.w2v_model." + key
    out[key] = value.clone()
  return out


def fairseq_arch(hc, conv_spec):
  return {
      "_name": "wav2vec2", "extractor_mode": "layer_norm" if hc.feat_extract_norm == "layer" else "default",
      "conv_feature_layers": conv_spec, "conv_bias": hc.conv_bias, "encoder_layers": hc.num_hidden_layers,
      "encoder_embed_dim": hc.hidden_size, "encoder_ffn_embed_dim": hc.intermediate_size,
      "encoder_attention_heads": hc.num_attention_heads, "activation_fn": "gelu",
      "layer_norm_first": hc.do_stable_layer_norm, "conv_pos": hc.num_conv_pos_embeddings,
      "conv_pos_groups": hc.num_conv_pos_embedding_groups, "dropout": 0.1, "attention_dropout": 0.1,
      "activation_dropout": 0.0, "encoder_layerdrop": 0.05, "dropout_input": 0.1, "dropout_features": 0.1,
      "final_dim": hc.proj_codevector_dim, "latent_vars": hc.num_codevectors_per_group,
      "latent_groups": hc.num_codevector_groups, "latent_dim": hc.codevector_dim, "quantize_targets": True,
      "quantize_input": False, "target_glu": False, "feature_grad_mult": 0.1, "logit_temp": 0.1,
      "num_negatives": 5, "cross_sample_negatives": 0, "mask_prob": 0.65, "mask_length": 4,
      "mask_channel_prob": 0.0, "mask_channel_length": 10, "latent_temp": [2.0, 0.5, 0.999995],
  }


CONV_SPECS = {"group_postln": "[(8, 10, 5)] + [(8, 3, 2)] + [(8,2,2)] * 1",
              "layer_preln": "[(6, 7, 3), (10, 3, 2)]"}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fairseq_pretraining_checkpoint(variant, hf_dirs, tmp_path):
  directory, hf = hf_dirs("pretrain", variant)
  cfg_hf, params_hf = convert.from_hf(directory)
  arch = fairseq_arch(hf.config, CONV_SPECS[variant])
  state = fairseq_state(hf.state_dict(), variant == "layer_preln", ctc=False)
  assert "encoder.pos_conv.0.weight_g" in state and "quantizer.vars" in state
  torch.save({"cfg": {"model": arch, "criterion": {"_name": "wav2vec", "loss_weights": [0.1, 0.0]}},
              "model": state}, tmp_path / "ckpt.pt")
  cfg, params = convert.from_fairseq(tmp_path / "ckpt.pt")
  assert_params_equal(params, params_hf)
  assert cfg.task == "pretrain"
  same = ("conv_layers", "extractor_mode", "conv_bias", "encoder_embed_dim", "encoder_layers",
          "encoder_ffn_embed_dim", "encoder_attention_heads", "layer_norm_first", "conv_pos", "conv_pos_groups",
          "final_dim", "latent_vars", "latent_groups", "vq_dim", "num_negatives", "mask_length")
  for name in same:
    assert getattr(cfg, name) == getattr(cfg_hf, name), name
  assert (cfg.dropout, cfg.dropout_input, cfg.dropout_features, cfg.encoder_layerdrop) == (0.1, 0.1, 0.1, 0.05)
  assert (cfg.feature_grad_mult, cfg.mask_prob, cfg.diversity_weight, cfg.feature_pen_weight) == (0.1, 0.65, 0.1, 0.0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fairseq_ctc_checkpoint(variant, hf_dirs, tmp_path):
  directory, hf = hf_dirs("ctc", variant)
  cfg_hf, params_hf = convert.from_hf(directory)
  arch = fairseq_arch(hf.config, CONV_SPECS[variant])
  state = fairseq_state(hf.state_dict(), variant == "layer_preln", ctc=True)
  assert "w2v_encoder.proj.weight" in state and "w2v_encoder.w2v_model.mask_emb" in state
  # Pretraining heads sometimes left in fine-tuned checkpoints are ignored.
  state["w2v_encoder.w2v_model.final_proj.weight"] = torch.zeros(3, 16)
  finetune = {"_name": "wav2vec_ctc", "w2v_path": "/nowhere/pretrained.pt", "apply_mask": True,
              "mask_prob": 0.5, "mask_channel_prob": 0.25, "mask_channel_length": 6, "layerdrop": 0.1,
              "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.1, "dropout_input": 0.0,
              "final_dropout": 0.0, "feature_grad_mult": 0.0,
              "w2v_args": {"model": arch, "criterion": {"loss_weights": [0.1, 10]}}}
  torch.save({"cfg": {"model": finetune, "criterion": {"_name": "ctc"}}, "model": state}, tmp_path / "ctc.pt")
  cfg, params = convert.from_fairseq(tmp_path / "ctc.pt")
  assert_params_equal(params, params_hf)
  assert cfg.task == "ctc" and cfg.vocab_size == hf.config.vocab_size
  assert cfg.conv_layers == cfg_hf.conv_layers and cfg.layer_norm_first == cfg_hf.layer_norm_first
  assert (cfg.mask_prob, cfg.mask_channel_prob, cfg.mask_channel_length, cfg.encoder_layerdrop) == (0.5, 0.25, 6, 0.1)
  assert (cfg.dropout, cfg.activation_dropout, cfg.feature_grad_mult, cfg.final_dropout) == (0.0, 0.1, 0.0, 0.0)
  # apply_mask=False turns fine-tuning masks off.
  finetune["apply_mask"] = False
  torch.save({"cfg": {"model": finetune}, "model": state}, tmp_path / "nomask.pt")
  cfg_nm, _ = convert.from_fairseq(tmp_path / "nomask.pt")
  assert cfg_nm.mask_prob == 0.0 and cfg_nm.mask_channel_prob == 0.0


def test_fairseq_legacy_args_and_identity_projection(tmp_path):
  """Legacy checkpoints (argparse Namespace in ckpt['args']); conv dim == encoder dim: no post_extract_proj."""
  d = tmp_path / "hf"
  hf = make_hf("pretrain", "group_postln", d, conv_dim=(16, 16, 16))
  _, params_hf = convert.from_hf(d)
  arch = fairseq_arch(hf.config, "[(16, 10, 5), (16, 3, 2), (16, 2, 2)]")
  state = fairseq_state(hf.state_dict(), False, ctc=False)
  del state["post_extract_proj.weight"], state["post_extract_proj.bias"]
  args = argparse.Namespace(arch="wav2vec2", loss_weights="[0.2, 5]", **{k: v for k, v in arch.items() if k != "_name"})
  torch.save({"args": args, "model": state}, tmp_path / "legacy.pt")
  cfg, params = convert.from_fairseq(tmp_path / "legacy.pt")
  assert (cfg.diversity_weight, cfg.feature_pen_weight) == (0.2, 5.0)
  proj = params["wav2vec2"]["post_extract_proj"]
  np.testing.assert_array_equal(proj["kernel"], np.eye(16, dtype=np.float32))
  np.testing.assert_array_equal(proj["bias"], np.zeros(16, np.float32))
  params["wav2vec2"]["post_extract_proj"] = params_hf["wav2vec2"]["post_extract_proj"]
  assert_params_equal(params, params_hf)


def test_fairseq_omegaconf_config(hf_dirs, tmp_path):
  """Older fairseq checkpoints pickle the config as omegaconf DictConfig objects."""
  omegaconf = pytest.importorskip("omegaconf")
  directory, hf = hf_dirs("ctc", "group_postln")
  _, params_hf = convert.from_hf(directory)
  cfg = omegaconf.OmegaConf.create({"model": {
      "_name": "wav2vec_ctc", "final_dropout": 0.0, "w2v_args": {
          "model": fairseq_arch(hf.config, CONV_SPECS["group_postln"]), "task": {"data": "${model.w2v_path}"}}}})
  torch.save({"cfg": cfg, "model": fairseq_state(hf.state_dict(), False, ctc=True)}, tmp_path / "oc.pt")
  got_cfg, params = convert.from_fairseq(tmp_path / "oc.pt")
  assert got_cfg.task == "ctc"
  assert_params_equal(params, params_hf)


def test_fairseq_unsupported_field(hf_dirs, tmp_path):
  _, hf = hf_dirs("pretrain", "group_postln")
  arch = dict(fairseq_arch(hf.config, CONV_SPECS["group_postln"]), activation_fn="relu")
  torch.save({"cfg": {"model": arch}, "model": fairseq_state(hf.state_dict(), False, False)}, tmp_path / "x.pt")
  with pytest.raises(ValueError, match="activation_fn"):
    convert.from_fairseq(tmp_path / "x.pt")
  with pytest.raises(FileNotFoundError, match="nothere.pt"):
    convert.from_fairseq(tmp_path / "nothere.pt")


def test_parse_conv_layers_is_safe():
  default = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2
  assert convert.parse_conv_layers("[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2") == default
  assert convert.parse_conv_layers([[512, 10, 5]]) == ((512, 10, 5),)
  for bad in ("__import__('os').system('true')", "[(512, 10, 5)] * 10**9", "[(512, 10)]", "[]", "[(a, 1, 1)]",
              "[(512, 10, 5)] * 100000"):
    with pytest.raises(ValueError, match="conv_feature_layers"):
      convert.parse_conv_layers(bad)


# ============================================================================== bad input


def test_missing_files_are_named(hf_dirs, tmp_path):
  directory, _ = hf_dirs("encoder", "group_postln")
  with pytest.raises(FileNotFoundError, match="not a Hugging Face model directory"):
    convert.from_hf(tmp_path / "absent")
  (tmp_path / "noconfig").mkdir()
  shutil.copy(directory / "model.safetensors", tmp_path / "noconfig")
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "noconfig" / "config.json"))):
    convert.from_hf(tmp_path / "noconfig")
  (tmp_path / "noweights").mkdir()
  shutil.copy(directory / "config.json", tmp_path / "noweights")
  with pytest.raises(FileNotFoundError, match=r"no weights in .*noweights.*model\.safetensors"):
    convert.from_hf(tmp_path / "noweights")


@pytest.mark.parametrize("field,value", [("hidden_act", "relu"), ("feat_extract_activation", "gelu_new"),
                                         ("add_adapter", True), ("adapter_attn_dim", 8),
                                         ("feat_extract_norm", "batch"), ("model_type", "hubert"),
                                         ("architectures", ["Wav2Vec2ForXVector"])])
def test_unsupported_config_field_is_named(field, value, hf_dirs, tmp_path):
  directory, _ = hf_dirs("encoder", "group_postln")
  shutil.copytree(directory, tmp_path / "m")
  config = json.load(open(tmp_path / "m" / "config.json"))
  config[field] = value
  json.dump(config, open(tmp_path / "m" / "config.json", "w"))
  with pytest.raises(ValueError, match=field):
    convert.from_hf(tmp_path / "m")


def test_unexpected_missing_and_misshaped_keys_are_listed(hf_dirs, tmp_path):
  directory, _ = hf_dirs("ctc", "group_postln")
  _rewrite_weights(directory, tmp_path / "extra", add={"wav2vec2.encoder.extra_thing.weight": np.ones(3, np.float32)})
  with pytest.raises(ValueError, match=r"unexpected keys \(1\): wav2vec2\.encoder\.extra_thing\.weight"):
    convert.from_hf(tmp_path / "extra")
  _rewrite_weights(directory, tmp_path / "missing", drop={"wav2vec2.encoder.layers.1.final_layer_norm.bias"})
  with pytest.raises(ValueError, match=r"missing keys \(1\): wav2vec2\.encoder\.layers\.1\.final_layer_norm\.bias"):
    convert.from_hf(tmp_path / "missing")
  shutil.copytree(directory, tmp_path / "shape")
  config = json.load(open(tmp_path / "shape" / "config.json"))
  config["intermediate_size"] = 32
  json.dump(config, open(tmp_path / "shape" / "config.json", "w"))
  with pytest.raises(ValueError, match=r"intermediate_dense\.weight: \(24, 16\) in the file, \(32, 16\) expected"):
    convert.from_hf(tmp_path / "shape")


def test_to_hf_rejects_params_that_do_not_match_the_config(hf_dirs, tmp_path):
  directory, _ = hf_dirs("ctc", "group_postln")
  cfg, params = convert.from_hf(directory)
  del params["proj"]["bias"]
  with pytest.raises(ValueError, match="missing: proj/bias"):
    convert.to_hf(cfg, params, tmp_path)
  with pytest.raises(ValueError, match="weight_norm_keys"):
    convert.to_hf(cfg, params, tmp_path, weight_norm_keys="torch")
