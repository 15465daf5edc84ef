"""Flax (linen) wav2vec 2.0 modules and `build(model_config)`."""
from w2v2_jax.models.config import ModelConfig
from w2v2_jax.models.feature_encoder import FeatureEncoder, frame_padding_mask, output_lengths
from w2v2_jax.models.quantizer import GumbelQuantizer
from w2v2_jax.models.transformer import TransformerEncoder, layer_layout, stack_layers, unstack_layers
from w2v2_jax.models.wav2vec2 import (Wav2Vec2Backbone, Wav2Vec2Encoder, Wav2Vec2ForCTC,
                                      Wav2Vec2ForPreTraining)

_MODELS = {"pretrain": Wav2Vec2ForPreTraining, "ctc": Wav2Vec2ForCTC, "encoder": Wav2Vec2Encoder}


def build(model_config):
  """The Flax module for `model_config` (ModelConfig, ConfigDict or dict), chosen by its `task`.

  Raises ValueError naming the field for an invalid configuration, before anything is compiled.
  """
  cfg = ModelConfig.from_any(model_config)
  return _MODELS[cfg.task](cfg)


__all__ = ["ModelConfig", "build", "FeatureEncoder", "GumbelQuantizer", "TransformerEncoder",
           "Wav2Vec2Backbone", "Wav2Vec2Encoder", "Wav2Vec2ForCTC", "Wav2Vec2ForPreTraining",
           "frame_padding_mask", "output_lengths", "layer_layout", "stack_layers", "unstack_layers"]
