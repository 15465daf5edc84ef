"""wav2vec 2.0 models: the shared backbone, the pretraining model and the CTC model.

All three share one call contract: `__call__(audio, padding_mask=None, *, deterministic=True,
output_hidden_states=False, ...)` with audio (B, L) float32 and padding_mask (B, L) bool (True = padding,
the inverse of Hugging Face's attention_mask), returning a dict with `features` (B, T, C) conv output,
`hidden_states` (tuple, HF order, empty unless asked), `last_hidden_state` (B, T, D) and per model more.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from w2v2_jax import masking
from w2v2_jax.models import matmul
from w2v2_jax.models.config import ModelConfig
from w2v2_jax.models.feature_encoder import FeatureEncoder, check_audio, frame_padding_mask
from w2v2_jax.models.quantizer import GumbelQuantizer
from w2v2_jax.models.transformer import TransformerEncoder

Array = jnp.ndarray

# PyTorch's default nn.Linear weight init (uniform, variance 1 / (3 fan_in)), used by the reference
# for the projections outside the transformer.
_torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def scale_gradient(x: Array, scale: float) -> Array:
  """Identity forward; multiplies the gradient by `scale` (fairseq's GradMultiply)."""
  return x


def _scale_gradient_fwd(x, scale):
  return x, None


def _scale_gradient_bwd(scale, _, g):
  return (g * scale,)


scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)


class Wav2Vec2Backbone(nn.Module):
  """Conv encoder -> LayerNorm -> projection -> (masking) -> transformer.

  Masks: `mask_time` (B, T) bool replaces frames with the learned `mask_emb`; `mask_channel` (B, D) bool
  zeroes channels over all frames (fine-tuning). When not given and `draw_masks` is True they are drawn
  from the config's mask_prob / mask_channel_prob with the 'mask' rng (never on padding frames).
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, audio: Array, padding_mask: Optional[Array] = None, *,
               mask_time: Optional[Array] = None, mask_channel: Optional[Array] = None,
               draw_masks: bool = False, deterministic: bool = True,
               output_hidden_states: bool = False) -> Dict[str, Any]:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    check_audio(audio, padding_mask, cfg.conv_layers)
    # The conv norms use PyTorch's default eps (1e-5) in the reference, whatever layer_norm_eps says.
    features = FeatureEncoder(cfg.conv_layers, cfg.extractor_mode, cfg.conv_bias, 1e-5, dtype,
                              name="feature_extractor")(audio)
    if cfg.feature_grad_mult == 0.0:
      features = jax.lax.stop_gradient(features)        # frozen: XLA drops the conv backward pass
    elif cfg.feature_grad_mult != 1.0:
      features = scale_gradient(features, float(cfg.feature_grad_mult))
    b, t, _ = features.shape
    if padding_mask is None:
      frame_pad = jnp.zeros((b, t), bool)
    else:
      frame_pad = frame_padding_mask(padding_mask, t, cfg.conv_layers)

    normed = nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_fast_variance=False, dtype=dtype,
                          name="layer_norm")(features)
    x = matmul.dense(cfg.encoder_embed_dim, dtype, _torch_linear_init, "post_extract_proj")(normed)
    x = nn.Dropout(cfg.dropout_input)(x, deterministic=deterministic)

    mask_emb = self.param("mask_emb", nn.initializers.uniform(1.0), (cfg.encoder_embed_dim,), jnp.float32)
    if mask_time is None and draw_masks and cfg.mask_prob > 0:
      mask_time = masking.span_mask(self.make_rng("mask"), frame_pad, cfg.mask_prob, cfg.mask_length,
                                    cfg.mask_min_masks, cfg.require_same_masks)
    if mask_time is not None:
      if mask_time.shape != (b, t):
        raise ValueError(f"mask_time shape {mask_time.shape} does not match the {(b, t)} frames")
      x = jnp.where(mask_time[..., None], mask_emb.astype(x.dtype), x)
    if mask_channel is None and draw_masks and cfg.mask_channel_prob > 0:
      mask_channel = masking.channel_mask(self.make_rng("mask"), b, cfg.encoder_embed_dim,
                                          cfg.mask_channel_prob, cfg.mask_channel_length,
                                          cfg.mask_channel_min_masks)
    if mask_channel is not None:
      x = jnp.where(mask_channel[:, None, :], 0, x)

    last, hidden = TransformerEncoder(
        cfg.encoder_layers, cfg.encoder_attention_heads, cfg.encoder_ffn_embed_dim, cfg.conv_pos,
        cfg.conv_pos_groups, cfg.dropout, cfg.attention_dropout, cfg.activation_dropout,
        cfg.encoder_layerdrop, cfg.layer_norm_first, cfg.layer_norm_eps, dtype, cfg.remat, cfg.scan_layers,
        name="encoder")(
            x, frame_pad if padding_mask is not None else None, deterministic=deterministic,
            output_hidden_states=output_hidden_states)
    return {
        "features": features,                     # (B, T, C) raw conv output
        "normed_features": normed,                # (B, T, C) after LayerNorm: the quantizer's input
        "frame_padding_mask": frame_pad,          # (B, T) bool, True = padding
        "mask_time": mask_time,                   # (B, T) bool or None
        "hidden_states": hidden,
        "last_hidden_state": last,                # (B, T, D)
    }


class Wav2Vec2ForPreTraining(nn.Module):
  """Backbone + Gumbel quantizer + `project_q` (targets) + `final_proj` (context).

  Masks are always applied (drawn with the 'mask' rng unless `mask_time` is given), in training and in
  evaluation, as the contrastive task needs them. Extra rngs in training: 'dropout', 'gumbel',
  'layerdrop'. Adds to the backbone's outputs: `context` (B, T, final_dim), `targets` (B, T, final_dim),
  `codes` (B, T, G), `prob_perplexity`, `code_perplexity` (over masked, unpadded frames).
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, audio: Array, padding_mask: Optional[Array] = None, *, mask_time: Optional[Array] = None,
               temperature: Any = 2.0, deterministic: bool = True, output_hidden_states: bool = False,
               row_ids: Optional[Array] = None) -> Dict[str, Any]:
    """row_ids (B,) int: global utterance indices that key each row's Gumbel noise (see GumbelQuantizer)."""
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    out = Wav2Vec2Backbone(cfg, name="wav2vec2")(
        audio, padding_mask, mask_time=mask_time, draw_masks=True, deterministic=deterministic,
        output_hidden_states=output_hidden_states)
    counted = ~out["frame_padding_mask"]
    if out["mask_time"] is not None:
      counted = counted & out["mask_time"]
    quantizer_in = nn.Dropout(cfg.dropout_features)(out["normed_features"], deterministic=deterministic)
    q = GumbelQuantizer(cfg.latent_groups, cfg.latent_vars, cfg.vq_dim, dtype, name="quantizer")(
        quantizer_in, counted, temperature=temperature, deterministic=deterministic, row_ids=row_ids)
    out["targets"] = matmul.dense(cfg.final_dim, dtype, _torch_linear_init, "project_q")(q["quantized"])
    out["context"] = matmul.dense(cfg.final_dim, dtype, _torch_linear_init, "final_proj")(out["last_hidden_state"])
    out["codes"] = q["codes"]
    for key in ("prob_perplexity", "code_perplexity", "prob_sums", "code_counts", "weight_sum"):
      out[key] = q[key]
    return out


class Wav2Vec2ForCTC(nn.Module):
  """Backbone + dropout + linear `proj` to the vocabulary. In training (deterministic=False) time and
  channel masks are drawn from the config (SpecAugment-style fine-tuning). Adds `logits` (B, T, vocab)
  in float32."""
  config: ModelConfig

  @nn.compact
  def __call__(self, audio: Array, padding_mask: Optional[Array] = None, *, mask_time: Optional[Array] = None,
               mask_channel: Optional[Array] = None, deterministic: bool = True,
               output_hidden_states: bool = False) -> Dict[str, Any]:
    cfg = self.config
    out = Wav2Vec2Backbone(cfg, name="wav2vec2")(
        audio, padding_mask, mask_time=mask_time, mask_channel=mask_channel, draw_masks=not deterministic,
        deterministic=deterministic, output_hidden_states=output_hidden_states)
    x = nn.Dropout(cfg.final_dropout)(out["last_hidden_state"], deterministic=deterministic)
    logits = matmul.dense(cfg.vocab_size, jnp.dtype(cfg.dtype), _torch_linear_init, "proj")(x)
    out["logits"] = logits.astype(jnp.float32)
    return out


class Wav2Vec2Encoder(nn.Module):
  """The backbone alone (HF's Wav2Vec2Model): no quantizer, no head; masks only when given."""
  config: ModelConfig

  @nn.compact
  def __call__(self, audio: Array, padding_mask: Optional[Array] = None, *, mask_time: Optional[Array] = None,
               deterministic: bool = True, output_hidden_states: bool = False) -> Dict[str, Any]:
    return Wav2Vec2Backbone(self.config, name="wav2vec2")(
        audio, padding_mask, mask_time=mask_time, deterministic=deterministic,
        output_hidden_states=output_hidden_states)
