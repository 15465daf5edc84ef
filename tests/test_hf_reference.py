"""Numerical parity with Hugging Face's PyTorch Wav2Vec2 (the independent reference), random weights.

Both layouts: group-norm conv encoder + post-LN transformer (BASE) and layer-norm conv encoder with bias +
pre-LN transformer (LARGE LV-60k), with and without padding. fp32, max abs diff <= 1e-4 on hidden states.
"""
import numpy as np
import pytest
import jax.numpy as jnp

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from w2v2_jax import convert, losses, models  # noqa: E402

torch.set_flush_denormal(True)
TOL = 1e-4

LAYOUTS = {
    # BASE layout: group norm on conv 0, no conv bias, post-LN; even positional-conv kernel.
    "group_postln": dict(feat_extract_norm="group", conv_bias=False, do_stable_layer_norm=False,
                         num_conv_pos_embeddings=16),
    # LARGE LV-60k layout: layer norm after every conv, conv bias, pre-LN; odd positional-conv kernel.
    "layer_preln": dict(feat_extract_norm="layer", conv_bias=True, do_stable_layer_norm=True,
                        num_conv_pos_embeddings=15),
}


def hf_config(layout, **extra):
  kw = dict(
      conv_dim=(32,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
      hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
      num_conv_pos_embedding_groups=4, num_codevector_groups=2, num_codevectors_per_group=12,
      codevector_dim=24, proj_codevector_dim=20, vocab_size=11,
      hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
      feat_quantizer_dropout=0.0, final_dropout=0.0, layerdrop=0.0)
  kw.update(LAYOUTS[layout])
  kw.update(extra)
  return transformers.Wav2Vec2Config(**kw)


def perturb(model, seed):
  """Randomise every parameter a little (LayerNorm scales, biases...) so no identity hides a bug."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))
  return model


def make_hf(cls, layout, tmp_path, seed=0, **extra):
  torch.manual_seed(seed)
  model = perturb(cls(hf_config(layout, **extra)), seed).eval()
  model.save_pretrained(tmp_path)
  return model


def batch(padded, seed=0):
  rng = np.random.default_rng(seed)
  audio = rng.standard_normal((3, 8000)).astype(np.float32)
  pad = np.zeros(audio.shape, bool)
  if padded:
    pad[1, 6000:] = True
    pad[2, 4500:] = True
    audio[pad] = 0.0
  return audio, pad


def valid(x, frame_pad):
  """Valid (unpadded) frames of (B, T, ...) as a flat list of rows."""
  return np.asarray(x)[~np.asarray(frame_pad)]


def hf_attention_mask(pad):
  return torch.from_numpy(~pad).long()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("padded", [False, True])
def test_encoder_every_hidden_state(layout, padded, tmp_path):
  hf = make_hf(transformers.Wav2Vec2Model, layout, tmp_path)
  cfg, params = convert.from_hf(tmp_path)
  assert cfg.task == "encoder"
  audio, pad = batch(padded)
  with torch.no_grad():
    conv = hf.feature_extractor(torch.from_numpy(audio)).transpose(1, 2).numpy()
    ref = hf(torch.from_numpy(audio), attention_mask=hf_attention_mask(pad) if padded else None,
             output_hidden_states=True)
  out = models.build(cfg).apply({"params": params}, jnp.asarray(audio), jnp.asarray(pad) if padded else None,
                                output_hidden_states=True)
  frame_pad = np.asarray(out["frame_padding_mask"])
  assert frame_pad.sum() == (24 - 18 + 24 - 13 if padded else 0)   # 8000/6000/4500 samples -> 24/18/13
  # The conv encoder sees the whole (zero-padded) input in both implementations.
  np.testing.assert_allclose(out["features"], conv, atol=TOL, rtol=0)
  assert len(out["hidden_states"]) == len(ref.hidden_states) == cfg.encoder_layers + 1
  diffs = []
  for ours, theirs in zip(out["hidden_states"], ref.hidden_states):
    diffs.append(np.abs(valid(ours, frame_pad) - valid(theirs.numpy(), frame_pad)).max())
  assert max(diffs) <= TOL, diffs
  np.testing.assert_allclose(valid(out["last_hidden_state"], frame_pad),
                             valid(ref.last_hidden_state.numpy(), frame_pad), atol=TOL, rtol=0)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("padded", [False, True])
def test_ctc_logits(layout, padded, tmp_path):
  hf = make_hf(transformers.Wav2Vec2ForCTC, layout, tmp_path, seed=1)
  cfg, params = convert.from_hf(tmp_path)
  assert cfg.task == "ctc" and cfg.vocab_size == 11
  audio, pad = batch(padded, seed=1)
  with torch.no_grad():
    ref = hf(torch.from_numpy(audio), attention_mask=hf_attention_mask(pad) if padded else None).logits
  out = models.build(cfg).apply({"params": params}, jnp.asarray(audio), jnp.asarray(pad) if padded else None)
  frame_pad = out["frame_padding_mask"]
  np.testing.assert_allclose(valid(out["logits"], frame_pad), valid(ref.numpy(), frame_pad), atol=TOL, rtol=0)


def _mask_and_negatives(frame_pad, num_negatives, seed):
  """A fixed span-style mask on valid frames and in-row negatives among the other masked frames."""
  rng = np.random.default_rng(seed)
  b, t = frame_pad.shape
  mask = np.zeros((b, t), bool)
  for i in range(b):
    n = int((~frame_pad[i]).sum())
    for s in rng.choice(n - 3, size=3, replace=False):
      mask[i, s:s + 3] = True
    mask[i, n:] = False
  neg = np.zeros((b, t, num_negatives), np.int64)
  for i in range(b):
    pos = np.nonzero(mask[i])[0]
    for j, p in enumerate(pos):
      others = np.delete(pos, j)
      neg[i, p] = i * t + rng.choice(others, size=num_negatives)
  return mask, neg


def _pretrain_pair(layout, padded, tmp_path, seed):
  hf = make_hf(transformers.Wav2Vec2ForPreTraining, layout, tmp_path, seed=seed, num_negatives=7)
  cfg, params = convert.from_hf(tmp_path)
  assert cfg.task == "pretrain"
  audio, pad = batch(padded, seed=seed)
  module = models.build(cfg)
  frame_pad = np.asarray(models.frame_padding_mask(jnp.asarray(pad), cfg.num_frames(audio.shape[1]),
                                                   cfg.conv_layers))
  mask, neg = _mask_and_negatives(frame_pad, cfg.num_negatives, seed)
  # Force a few negatives to share the positive's codes so the -inf path is exercised.
  out = module.apply({"params": params}, jnp.asarray(audio), jnp.asarray(pad) if padded else None,
                     mask_time=jnp.asarray(mask), output_hidden_states=True)
  codes = np.asarray(out["codes"]).reshape(-1, cfg.latent_groups)
  for i, t in zip(*np.nonzero(mask)):
    same = [j for j in np.nonzero(mask[i])[0] if j != t and (codes[i * mask.shape[1] + j] ==
                                                               codes[i * mask.shape[1] + t]).all()]
    if same:
      neg[i, t, 0] = i * mask.shape[1] + same[0]
  hf_in = dict(attention_mask=hf_attention_mask(pad) if padded else None,
               mask_time_indices=torch.from_numpy(mask),   # bool, as the docs ask
               sampled_negative_indices=torch.from_numpy(neg))
  return hf, cfg, params, module, audio, pad, mask, neg, out, hf_in


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("padded", [False, True])
def test_pretraining_outputs_and_loss_eval_mode(layout, padded, tmp_path):
  hf, cfg, params, module, audio, pad, mask, neg, out, hf_in = _pretrain_pair(layout, padded, tmp_path, 2)
  with torch.no_grad():
    ref = hf(torch.from_numpy(audio), **hf_in, output_hidden_states=True)
  frame_pad = out["frame_padding_mask"]
  for ours, theirs in zip(out["hidden_states"], ref.hidden_states):
    np.testing.assert_allclose(valid(ours, frame_pad), valid(theirs.numpy(), frame_pad), atol=TOL, rtol=0)
  # Quantizer (argmax in eval), project_q targets and final_proj context.
  np.testing.assert_allclose(valid(out["targets"], frame_pad), valid(ref.projected_quantized_states.numpy(),
                                                                       frame_pad), atol=TOL, rtol=0)
  np.testing.assert_allclose(valid(out["context"], frame_pad), valid(ref.projected_states.numpy(), frame_pad),
                             atol=TOL, rtol=0)
  # HF's eval-mode perplexity counts hard argmax codes over masked frames: our code_perplexity.
  np.testing.assert_allclose(float(out["code_perplexity"]), float(ref.codevector_perplexity.detach()), rtol=1e-5)
  # Losses given the same mask and negatives.
  c = losses.contrastive(out["context"], out["targets"], out["codes"], jnp.asarray(mask), jnp.asarray(neg),
                         cfg.logit_temp)
  np.testing.assert_allclose(float(c["loss"]), float(ref.contrastive_loss), rtol=1e-5)
  div = losses.diversity(out["code_perplexity"], cfg.num_codevectors) * c["sample_size"]
  np.testing.assert_allclose(float(div), float(ref.diversity_loss), rtol=1e-5)
  assert float(c["sample_size"]) == mask.sum()


def test_pretraining_loss_train_mode_prob_perplexity(tmp_path, monkeypatch):
  """In training HF's perplexity (and so its diversity loss) uses the noise-free softmax: our
  prob_perplexity. With Gumbel noise switched off in HF, codes equal our argmax codes."""
  hf, cfg, params, module, audio, pad, mask, neg, out, hf_in = _pretrain_pair("group_postln", True, tmp_path, 3)

  def noise_free_gumbel(logits, tau=1.0, hard=False, dim=-1):
    soft = torch.softmax(logits / tau, dim=dim)
    index = soft.argmax(dim, keepdim=True)
    hard_ = torch.zeros_like(logits).scatter_(dim, index, 1.0)
    return hard_ - soft.detach() + soft

  monkeypatch.setattr(torch.nn.functional, "gumbel_softmax", noise_free_gumbel)
  hf.train()
  ref = hf(torch.from_numpy(audio), **hf_in)
  np.testing.assert_allclose(float(out["prob_perplexity"]), float(ref.codevector_perplexity.detach()), rtol=1e-5)
  c = losses.contrastive(out["context"], out["targets"], out["codes"], jnp.asarray(mask), jnp.asarray(neg),
                         cfg.logit_temp)
  total = c["loss"] + cfg.diversity_weight * losses.diversity(out["prob_perplexity"],
                                                              cfg.num_codevectors) * c["sample_size"]
  np.testing.assert_allclose(float(total), float(ref.loss.detach()), rtol=1e-5)


@pytest.mark.parametrize("preset", ["xlsr_300m", "xlsr_1b", "xlsr_2b"])
def test_xlsr_shaped_hf_model(preset, tmp_path):
  """An HF directory shaped like XLS-R (its layout and positional conv, 3 narrow layers instead of 24/48
  wide ones) loads with the preset's layout and matches HF's hidden states."""
  from w2v2_jax.models import presets  # pylint: disable=import-outside-toplevel
  want = presets.get(preset)
  hf = make_hf(transformers.Wav2Vec2Model, "layer_preln", tmp_path, seed=3,
               num_conv_pos_embeddings=want.conv_pos, num_conv_pos_embedding_groups=want.conv_pos_groups,
               num_attention_heads=want.encoder_attention_heads, hidden_size=want.encoder_attention_heads * 4)
  cfg, params = convert.from_hf(tmp_path)
  layout = ("extractor_mode", "conv_bias", "layer_norm_first", "conv_pos", "conv_pos_groups",
            "encoder_attention_heads")
  assert {k: getattr(cfg, k) for k in layout} == {k: getattr(want, k) for k in layout}
  assert [c[1:] for c in cfg.conv_layers] == [c[1:] for c in want.conv_layers]     # kernels and strides
  audio, pad = batch(True, seed=3)
  with torch.no_grad():
    ref = hf(torch.from_numpy(audio), attention_mask=hf_attention_mask(pad)).last_hidden_state.numpy()
  out = models.build(cfg).apply({"params": params}, jnp.asarray(audio), jnp.asarray(pad))
  frame_pad = np.asarray(out["frame_padding_mask"])
  np.testing.assert_allclose(valid(out["last_hidden_state"], frame_pad), valid(ref, frame_pad), atol=TOL, rtol=0)


@pytest.mark.parametrize("preset,low,high", [("xlsr_300m", 0.3e9, 0.33e9), ("xlsr_1b", 0.95e9, 1.0e9),
                                              ("xlsr_2b", 2.1e9, 2.2e9)])
def test_xlsr_presets_have_the_published_sizes(preset, low, high):
  """The XLS-R presets' encoders have exactly the parameter count of HF's Wav2Vec2Model of the same
  config (built on the meta device: no memory), which is the model's name: 300M, 1B, 2B."""
  import jax  # pylint: disable=import-outside-toplevel
  from w2v2_jax.models import presets  # pylint: disable=import-outside-toplevel
  cfg = presets.get(preset).replace(task="encoder")
  shapes = jax.eval_shape(lambda: models.build(cfg).init({"params": jax.random.PRNGKey(0)},
                                                         jnp.zeros((1, 16000), jnp.float32))["params"])
  ours = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
  config = transformers.Wav2Vec2Config(**convert.model_config_to_hf(cfg))
  with torch.device("meta"):
    theirs = sum(p.numel() for p in transformers.Wav2Vec2Model(config).parameters())
  assert ours == theirs and low <= ours <= high, (ours, theirs)
