"""Model architecture presets (the recipe's values; see ../shared/RECIPE.md).

  base        BASE, LS-960 pretraining: 95M params, post-LN, group-norm conv encoder.
  large       LARGE, LS-960: 317M params, post-LN, group-norm conv encoder.
  large_lv60  LARGE, LV-60k: pre-LN, layer-norm conv encoder with bias, no dropout, no feature penalty.
  tiny        A few hundred thousand parameters with the full conv stack, for CPU tests.

Usage: `--config=configs/model.py:base`, or `get_config("large_lv60")` in Python. Append `,ctc` for the
CTC fine-tuning variant (e.g. `base,ctc`); the vocabulary size is then set by the fine-tuning config.
"""
import ml_collections

from w2v2_jax.models.config import DEFAULT_CONV_LAYERS, ModelConfig


def _presets():
  base = ModelConfig()
  large = base.replace(
      encoder_embed_dim=1024, encoder_layers=24, encoder_ffn_embed_dim=4096, encoder_attention_heads=16,
      final_dim=768, dropout=0.0, attention_dropout=0.1, encoder_layerdrop=0.0, feature_grad_mult=0.03)
  large_lv60 = large.replace(
      extractor_mode="layer_norm", conv_bias=True, layer_norm_first=True, attention_dropout=0.0,
      dropout_input=0.0, dropout_features=0.0, feature_grad_mult=1.0, feature_pen_weight=0.0)
  tiny = base.replace(
      conv_layers=((32, 10, 5),) + ((32, 3, 2),) * 4 + ((32, 2, 2),) * 2,
      encoder_embed_dim=64, encoder_layers=2, encoder_ffn_embed_dim=128, encoder_attention_heads=4,
      conv_pos=16, conv_pos_groups=4, final_dim=32, latent_vars=16, num_negatives=10, mask_length=4,
      encoder_layerdrop=0.0)
  base = base.replace(feature_grad_mult=0.1)
  return {"base": base, "large": large, "large_lv60": large_lv60, "tiny": tiny}


def get_config(arg: str = "base") -> ml_collections.ConfigDict:
  name, _, task = arg.partition(",")
  presets = _presets()
  if name not in presets:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(presets)}")
  cfg = presets[name]
  if task:
    cfg = cfg.replace(task=task, vocab_size=cfg.vocab_size or 32)
  return ml_collections.ConfigDict(cfg.to_dict())
