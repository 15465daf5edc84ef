"""A complete Hugging Face Wav2Vec2ForCTC directory from our params: what a fine-tuning run exports.

`export_hf` writes the weights and config through `convert.to_hf`, plus what transformers' pipeline and
`Recognizer.load` need to transcribe with it: the vocabulary, the tokenizer's and the feature
extractor's configs.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

from w2v2_jax import convert, storage
from w2v2_jax.data.audio import SAMPLE_RATE
from w2v2_jax.data.text import Vocabulary
from w2v2_jax.models import ModelConfig

PREPROCESSOR_CONFIG = "preprocessor_config.json"   # the feature extractor's file: sampling rate, do_normalize


def export_hf(model_config: Any, params: Mapping[str, Any], vocab: Vocabulary, out_dir: str, *,
              normalize: bool = False) -> str:
  """Writes a complete Hugging Face Wav2Vec2ForCTC directory that `Recognizer.load` and transformers'
  `pipeline("automatic-speech-recognition", model=out_dir)` both read.

  config.json + model.safetensors (`convert.to_hf`), vocab.json (`Vocabulary.to_hf_vocab`), and,
  written directly (transformers is not needed), tokenizer_config.json (Wav2Vec2CTCTokenizer: blank as
  pad_token, word delimiter, unk) and preprocessor_config.json (Wav2Vec2FeatureExtractor: 16 kHz,
  do_normalize=`normalize`, the data.normalize the model was fine-tuned with). Returns out_dir.
  """
  cfg = ModelConfig.from_any(model_config)
  if storage.is_remote(out_dir):          # written locally, then uploaded file by file
    with tempfile.TemporaryDirectory(prefix="w2v2_export_") as local:
      export_hf(cfg, params, vocab, local, normalize=normalize)
      storage.upload_dir(local, out_dir)
    return out_dir
  convert.to_hf(cfg, params, out_dir)
  vocab.to_hf_vocab(out_dir)
  specials = {name: (tok if tok in vocab.symbols else None)
              for name, tok in (("bos_token", "<s>"), ("eos_token", "</s>"))}
  tokenizer = {
      "tokenizer_class": "Wav2Vec2CTCTokenizer",
      "processor_class": "Wav2Vec2Processor",
      "pad_token": vocab.blank,
      "unk_token": vocab.unk,
      "word_delimiter_token": vocab.word_delimiter,
      "do_lower_case": False,
      "replace_word_delimiter_char": " ",
      **specials,
  }
  feature_extractor = {
      "feature_extractor_type": "Wav2Vec2FeatureExtractor",
      "processor_class": "Wav2Vec2Processor",
      "feature_size": 1,
      "sampling_rate": SAMPLE_RATE,
      "padding_side": "right",
      "padding_value": 0.0,
      "do_normalize": bool(normalize),
      # HF's convention: only layer-norm-extractor models are given an attention mask.
      "return_attention_mask": cfg.extractor_mode == "layer_norm",
  }
  for name, content in (("tokenizer_config.json", tokenizer), (PREPROCESSOR_CONFIG, feature_extractor)):
    with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
      json.dump(content, f, indent=2, sort_keys=True)
      f.write("\n")
  return out_dir
