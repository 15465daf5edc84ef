"""w2v2_jax.export: the exported Hugging Face directory transcribes the same through transformers' ASR
pipeline as a directory assembled by hand with transformers' own processor classes."""
import os

from tiny_ctc import VOCAB, noise, random_params, spaces, transformers  # noqa: F401
from w2v2_jax import convert, export
from w2v2_jax.models import ModelConfig
from w2v2_jax.recognizer import Recognizer


def test_export_matches_transformers_pipeline(tmp_path):
  # The BASE layout (group-norm conv stack, no conv bias). Its per-utterance GroupNorm counts padding, so
  # the audio is whole buckets and batch_seconds=0 runs one utterance per pass: no padding at all, as in
  # the pipeline.
  cfg = ModelConfig(task="ctc", vocab_size=VOCAB.size, conv_layers=((16, 10, 5),) + ((16, 3, 2),) * 4
                    + ((16, 2, 2),) * 2, extractor_mode="default", encoder_embed_dim=32, encoder_layers=2,
                    encoder_ffn_embed_dim=64, encoder_attention_heads=2, conv_pos=16, conv_pos_groups=2,
                    mask_prob=0.0)
  params = random_params(cfg, seed=1)
  rec = Recognizer(cfg, params, VOCAB, normalize=False)
  audios = noise(1, 16000, 32000)
  texts = rec.transcribe(audios, batch_seconds=0)
  assert all(texts)

  manual = str(tmp_path / "manual")
  convert.to_hf(cfg, params, manual)
  VOCAB.to_hf_vocab(manual)
  processor = transformers.Wav2Vec2Processor(
      feature_extractor=transformers.Wav2Vec2FeatureExtractor(
          feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=False,
          return_attention_mask=False),
      tokenizer=transformers.Wav2Vec2CTCTokenizer(os.path.join(manual, "vocab.json")))
  processor.save_pretrained(manual)
  exported = export.export_hf(cfg, params, VOCAB, str(tmp_path / "exported"), normalize=False)
  for directory in (manual, exported):
    pipe = transformers.pipeline("automatic-speech-recognition", model=directory, framework="pt",
                                 device=-1)
    assert [spaces(pipe(a)["text"]) for a in audios] == texts
  assert not Recognizer.load(exported).normalize
