"""The model configuration: one frozen dataclass with the recipe's (fairseq's) field names.

Presets live in `models/presets.py`; `ModelConfig.from_any` accepts a `ml_collections.ConfigDict`, a plain
dict or a `ModelConfig` and validates every field before anything is traced or compiled.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Tuple

from w2v2_jax.models import feature_encoder

# (channels, kernel, stride) per conv layer: 400-sample receptive field, 320-sample hop.
DEFAULT_CONV_LAYERS: Tuple[Tuple[int, int, int], ...] = (
    ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2)

_EXTRACTOR_MODES = ("default", "layer_norm")
_TASKS = ("pretrain", "ctc", "encoder")
_DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and regularisation of a wav2vec 2.0 model. Defaults are BASE (LS-960 pretraining)."""
  task: str = "pretrain"                      # "pretrain", "ctc" or "encoder" (no head)
  # Conv feature encoder.
  conv_layers: Tuple[Tuple[int, int, int], ...] = DEFAULT_CONV_LAYERS
  extractor_mode: str = "default"             # "default": GroupNorm on layer 0; "layer_norm": LN everywhere
  conv_bias: bool = False
  feature_grad_mult: float = 1.0              # scales conv-encoder gradients; 0 = frozen, no backward pass
  # Transformer.
  encoder_embed_dim: int = 768
  encoder_layers: int = 12
  encoder_ffn_embed_dim: int = 3072
  encoder_attention_heads: int = 12
  layer_norm_first: bool = False              # False: post-LN (BASE); True: pre-LN (LARGE LV-60k)
  conv_pos: int = 128                         # positional conv kernel
  conv_pos_groups: int = 16
  layer_norm_eps: float = 1e-5
  # Dropouts (probabilities).
  dropout: float = 0.1
  attention_dropout: float = 0.1
  activation_dropout: float = 0.0
  dropout_input: float = 0.1                  # after post_extract_proj
  dropout_features: float = 0.1               # on the quantizer's input
  encoder_layerdrop: float = 0.05
  final_dropout: float = 0.0                  # before the CTC head
  # Quantizer and contrastive task.
  final_dim: int = 256
  latent_vars: int = 320                      # V codewords per group
  latent_groups: int = 2                      # G groups
  latent_dim: int = 0                         # codebook dim (all groups); 0 = final_dim
  logit_temp: float = 0.1
  num_negatives: int = 100
  cross_sample_negatives: int = 0
  diversity_weight: float = 0.1
  feature_pen_weight: float = 10.0
  # Masking.
  mask_prob: float = 0.65
  mask_length: int = 10
  mask_min_masks: int = 2
  require_same_masks: bool = True
  mask_channel_prob: float = 0.0
  mask_channel_length: int = 10
  mask_channel_min_masks: int = 0
  # CTC head.
  vocab_size: int = 0
  # Numerics: compute dtype (params stay float32; losses, softmax and Gumbel are float32).
  dtype: str = "float32"
  # Memory (no effect on the numbers): recompute each transformer layer's activations in the backward
  # pass. "none"; "full" (keep only each layer's input); "dots" (keep the outputs of the layer's
  # projections and feed-forward matmuls, recompute attention scores, softmax, norms and activations).
  remat: str = "none"
  # Run the transformer layers as one `lax.scan` over stacked parameters (`encoder/layers/layer/...`,
  # leading axis = layer): compile time independent of depth. Same numbers in evaluation; training
  # draws other dropout / LayerDrop numbers. `models.layer_layout(params, scan)` converts.
  scan_layers: bool = False

  # ---------------------------------------------------------------- derived values
  @property
  def conv_dim(self) -> int:
    return self.conv_layers[-1][0]

  @property
  def vq_dim(self) -> int:
    return self.latent_dim or self.final_dim

  @property
  def num_codevectors(self) -> int:
    return self.latent_groups * self.latent_vars

  @property
  def receptive_field(self) -> int:
    """Samples one output frame sees (400 for the default stack)."""
    return feature_encoder.receptive_field(self.conv_layers)

  @property
  def hop(self) -> int:
    """Samples between consecutive frames (320 for the default stack: 20 ms at 16 kHz)."""
    hop = 1
    for _, _, s in self.conv_layers:
      hop *= s
    return hop

  def num_frames(self, num_samples: int) -> int:
    """Static frame count of `num_samples` of audio: floor((L - k) / s) + 1 per layer."""
    return int(feature_encoder.output_lengths(int(num_samples), self.conv_layers))

  # ---------------------------------------------------------------- construction
  @classmethod
  def from_any(cls, cfg: Any) -> "ModelConfig":
    if isinstance(cfg, ModelConfig):
      cfg.validate()
      return cfg
    if hasattr(cfg, "to_dict"):
      cfg = cfg.to_dict()
    if not isinstance(cfg, Mapping):
      raise TypeError(f"model config must be a ModelConfig, ConfigDict or dict, got {type(cfg).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - names)
    if unknown:
      raise ValueError(f"unknown model config field(s): {', '.join(unknown)}")
    values = dict(cfg)
    if "conv_layers" in values:
      values["conv_layers"] = tuple(tuple(int(v) for v in layer) for layer in values["conv_layers"])
    out = cls(**values)
    out.validate()
    return out

  def replace(self, **changes) -> "ModelConfig":
    out = dataclasses.replace(self, **changes)
    out.validate()
    return out

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["conv_layers"] = [list(layer) for layer in self.conv_layers]
    return d

  def validate(self) -> None:
    """Raises ValueError naming the first invalid field."""
    def fail(field, why):
      raise ValueError(f"model config: {field}={getattr(self, field)!r} {why}")

    if self.task not in _TASKS:
      fail("task", f"must be one of {_TASKS}")
    if self.extractor_mode not in _EXTRACTOR_MODES:
      fail("extractor_mode", f"must be one of {_EXTRACTOR_MODES}")
    if self.dtype not in _DTYPES:
      fail("dtype", f"must be one of {_DTYPES}")
    if self.remat not in REMAT_POLICIES:
      fail("remat", f"must be one of {REMAT_POLICIES}")
    if not self.conv_layers or any(len(l) != 3 or min(l) < 1 for l in self.conv_layers):
      fail("conv_layers", "must be a non-empty list of positive (channels, kernel, stride) triples")
    for name in ("encoder_embed_dim", "encoder_layers", "encoder_ffn_embed_dim", "encoder_attention_heads",
                 "conv_pos", "conv_pos_groups", "final_dim", "latent_vars", "latent_groups",
                 "mask_length", "mask_channel_length"):
      if int(getattr(self, name)) < 1:
        fail(name, "must be >= 1")
    if self.encoder_embed_dim % self.encoder_attention_heads:
      fail("encoder_attention_heads", f"must divide encoder_embed_dim={self.encoder_embed_dim}")
    if self.encoder_embed_dim % self.conv_pos_groups:
      fail("conv_pos_groups", f"must divide encoder_embed_dim={self.encoder_embed_dim}")
    if self.vq_dim % self.latent_groups:
      fail("latent_groups", f"must divide the codebook dim {self.vq_dim}")
    for name in ("dropout", "attention_dropout", "activation_dropout", "dropout_input", "dropout_features",
                 "encoder_layerdrop", "final_dropout", "mask_prob", "mask_channel_prob"):
      if not 0.0 <= float(getattr(self, name)) <= 1.0:
        fail(name, "must be a probability in [0, 1]")
    if self.encoder_layerdrop >= 1.0:
      fail("encoder_layerdrop", "must be < 1")
    if self.feature_grad_mult < 0:
      fail("feature_grad_mult", "must be >= 0")
    if self.logit_temp <= 0:
      fail("logit_temp", "must be > 0")
    if self.num_negatives < 0 or self.cross_sample_negatives < 0:
      fail("num_negatives", "and cross_sample_negatives must be >= 0")
    if self.task == "pretrain" and self.num_negatives + self.cross_sample_negatives < 1:
      fail("num_negatives", "plus cross_sample_negatives must be >= 1 for pretraining")
    if self.mask_min_masks < 0 or self.mask_channel_min_masks < 0:
      fail("mask_min_masks", "and mask_channel_min_masks must be >= 0")
    if self.layer_norm_eps <= 0:
      fail("layer_norm_eps", "must be > 0")
    if self.task == "ctc" and self.vocab_size < 2:
      fail("vocab_size", "must be >= 2 (blank plus at least one symbol) for a CTC model")
    if self.mask_channel_prob > 0 and self.mask_channel_length > self.encoder_embed_dim:
      fail("mask_channel_length", f"must be <= encoder_embed_dim={self.encoder_embed_dim}")
