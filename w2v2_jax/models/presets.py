"""Model architecture presets with the recipe's values (docs/recipe.md).

  base        BASE, LS-960 pretraining: 95M params, post-LN, group-norm conv encoder.
  large       LARGE, LS-960: 317M params, post-LN, group-norm conv encoder.
  large_lv60  LARGE, LV-60k: pre-LN, layer-norm conv encoder with bias, no dropout, no feature penalty.
  xlsr_300m   XLS-R 300M (Babu et al., 2021): the LV-60k layout (pre-LN, layer-norm conv with bias), 24 x 1024.
  xlsr_1b     XLS-R 1B: the same layout, 48 x 1280, FFN 5120, 16 heads, 1024-dim quantized targets.
  xlsr_2b     XLS-R 2B: 48 x 1920, FFN 7680, 16 heads. These three need parallel.mode="fsdp" on pods whose
              chips cannot hold a replicated copy of params + Adam moments (16 bytes per parameter).
  small       2.2M parameters (128-channel conv stack, 4 x 192 transformer): the demo model, pretrained
              and fine-tuned on 2 CPU cores in minutes. Departs from BASE where a short run on an hour
              of synthetic speech needs it: no feature penalty (as LV-60k; with it the conv output
              shrinks to noise and the contrastive loss stays at chance), 80 ms mask spans (4 frames)
              instead of 200 ms, 2 x 32 codewords and 20 negatives.
  tiny        About 0.1M parameters with the full 7-layer conv stack (narrow), for CPU tests and demos.
"""
from w2v2_jax.models.config import ModelConfig


def presets():
  """name -> ModelConfig."""
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
  small = base.replace(
      conv_layers=((128, 10, 5),) + ((128, 3, 2),) * 4 + ((128, 2, 2),) * 2,
      encoder_embed_dim=192, encoder_layers=4, encoder_ffn_embed_dim=768, encoder_attention_heads=4,
      conv_pos=32, conv_pos_groups=8, final_dim=64, latent_vars=32, num_negatives=20, mask_length=4,
      feature_pen_weight=0.0, encoder_layerdrop=0.0)
  xlsr_300m = large_lv60
  xlsr_1b = large_lv60.replace(encoder_embed_dim=1280, encoder_layers=48, encoder_ffn_embed_dim=5120, final_dim=1024)
  xlsr_2b = xlsr_1b.replace(encoder_embed_dim=1920, encoder_ffn_embed_dim=7680)
  base = base.replace(feature_grad_mult=0.1)
  return {"base": base, "large": large, "large_lv60": large_lv60, "xlsr_300m": xlsr_300m, "xlsr_1b": xlsr_1b,
          "xlsr_2b": xlsr_2b, "small": small, "tiny": tiny}


def get(arg: str = "base") -> ModelConfig:
  """`name` or `name,task` (e.g. "base,ctc"; a CTC variant gets vocab_size 32 until a fine-tuning
  config sets the vocabulary's size)."""
  name, _, task = arg.partition(",")
  table = presets()
  if name not in table:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(table)}")
  cfg = table[name]
  if task:
    cfg = cfg.replace(task=task, vocab_size=cfg.vocab_size or 32)
  return cfg
