"""Tests for w2v2_jax.inference: loading, logits and transcripts against transformers, the HF export through
transformers' ASR pipeline, evaluation over a manifest with bad items, files at other rates, chunked long
audio, and the transcribe command's JSON. Tiny random models, no downloads."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
import soundfile as sf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from w2v2_jax import convert, inference
from w2v2_jax import evaluate as scoring
from w2v2_jax.data.audio import load_audio
from w2v2_jax.data.text import Vocabulary
from w2v2_jax.models import ModelConfig, build

torch.set_flush_denormal(True)
VOCAB = Vocabulary.default_letters()
FAVOURED = ("<pad>", "|", "E", "T", "A")   # the only symbols the biased heads can emit
CONV = {"conv_dim": (16,) * 7, "conv_kernel": (10, 3, 3, 3, 3, 2, 2), "conv_stride": (5, 2, 2, 2, 2, 2, 2)}


def head_bias(vocab=VOCAB):
  bias = np.full(vocab.size, -30.0, np.float32)
  bias[[vocab.id_of(s) for s in FAVOURED]] = 0.0
  return bias


def spaces(text):
  return " ".join(text.split())


def noise(seed, *lengths):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(n).astype(np.float32) for n in lengths]


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
  """A random transformers Wav2Vec2ForCTC (layer-norm conv stack, post-LN) saved with its vocab.json and a
  feature extractor that normalises: (torch model, directory)."""
  path = str(tmp_path_factory.mktemp("hf_ctc"))
  config = transformers.Wav2Vec2Config(
      **CONV, feat_extract_norm="layer", conv_bias=True, do_stable_layer_norm=False, hidden_size=32,
      num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_conv_pos_embeddings=16,
      num_conv_pos_embedding_groups=2, vocab_size=VOCAB.size, hidden_dropout=0.0, attention_dropout=0.0,
      activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0)
  torch.manual_seed(0)
  model = transformers.Wav2Vec2ForCTC(config).eval()
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.lm_head.weight.normal_(0.0, 0.5, generator=g)
    model.lm_head.bias.copy_(torch.from_numpy(head_bias()))
  model.save_pretrained(path)
  VOCAB.to_hf_vocab(path)
  transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                        do_normalize=True, return_attention_mask=True).save_pretrained(path)
  return model, path


@pytest.fixture(scope="module")
def recognizer(hf_model):
  return inference.Recognizer.load(hf_model[1])


def test_hf_directory_matches_transformers(hf_model, recognizer):
  model, path = hf_model
  assert recognizer.normalize and recognizer.vocab == VOCAB
  audios = noise(0, 5000, 12000, 21000)
  prepared = [recognizer.prepare(a) for a in audios]
  batch = np.zeros((3, 21000), np.float32)
  pad = np.ones((3, 21000), bool)
  for i, a in enumerate(prepared):
    batch[i, :a.size], pad[i, :a.size] = a, False
  logits, frame_pad = recognizer.logits(batch, pad)
  assert logits.dtype == np.float32 and logits.shape[:2] == frame_pad.shape
  extractor = transformers.Wav2Vec2FeatureExtractor.from_pretrained(path)
  ids = []
  for i, audio in enumerate(audios):         # the reference: one unpadded utterance at a time
    inputs = extractor(audio, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
      ref = model(inputs.input_values).logits[0].numpy()
    ours = logits[i][~frame_pad[i]]
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    ids.append(ref.argmax(-1).tolist())
  tokenizer = transformers.Wav2Vec2CTCTokenizer(os.path.join(path, "vocab.json"))
  expected = [spaces(t) for t in tokenizer.batch_decode(ids)]
  texts = recognizer.transcribe(audios)
  assert texts == expected and all(texts)
  # Every forward pass so far: a power-of-two batch and a whole number of buckets.
  assert all(b & (b - 1) == 0 and n % 16000 == 0 for b, n in recognizer.compiled_shapes)


def test_load_run_directory_and_errors(hf_model, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(hf_model[1], run / "best" / "export")
  (run / "config.json").write_text("{}")               # a training config is not a model
  rec = inference.Recognizer.load(str(run))
  assert rec.model_config.vocab_size == VOCAB.size and rec.normalize
  with pytest.raises(FileNotFoundError, match="nothing_here"):
    inference.Recognizer.load(str(tmp_path / "nothing_here"))
  (tmp_path / "empty_run").mkdir()
  with pytest.raises(FileNotFoundError, match="empty_run.*export"):
    inference.Recognizer.load(str(tmp_path / "empty_run"))
  (tmp_path / "model.pt").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="dict.ltr.txt"):
    inference.Recognizer.load(str(tmp_path / "model.pt"))


def random_params(cfg, seed):
  """Random params for `cfg` without compiling anything (shapes from jax.eval_shape)."""
  shapes = jax.eval_shape(lambda: build(cfg).init(jax.random.key(0), np.zeros((1, 800), np.float32)))["params"]
  rng = np.random.default_rng(seed)
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  values = []
  for path, leaf in flat:
    name = jax.tree_util.keystr(path)
    x = 0.1 * rng.standard_normal(leaf.shape).astype(np.float32)
    if "'scale'" in name or "weight_g" in name:
      x = 1.0 + x
    values.append(x)
  params = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), values)
  params["proj"]["kernel"] = rng.normal(0.0, 0.5, params["proj"]["kernel"].shape).astype(np.float32)
  params["proj"]["bias"] = head_bias()
  return params


def test_export_matches_transformers_pipeline(tmp_path):
  # The BASE layout (group-norm conv stack, no conv bias). Its per-utterance GroupNorm counts padding, so
  # the audio is whole buckets and batch_seconds=0 runs one utterance per pass: no padding at all, as in
  # the pipeline.
  cfg = ModelConfig(task="ctc", vocab_size=VOCAB.size, conv_layers=((16, 10, 5),) + ((16, 3, 2),) * 4
                    + ((16, 2, 2),) * 2, extractor_mode="default", encoder_embed_dim=32, encoder_layers=2,
                    encoder_ffn_embed_dim=64, encoder_attention_heads=2, conv_pos=16, conv_pos_groups=2,
                    mask_prob=0.0)
  params = random_params(cfg, seed=1)
  rec = inference.Recognizer(cfg, params, VOCAB, normalize=False)
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
  exported = inference.export_hf(cfg, params, VOCAB, str(tmp_path / "exported"), normalize=False)
  for directory in (manual, exported):
    pipe = transformers.pipeline("automatic-speech-recognition", model=directory, framework="pt",
                                 device=-1)
    assert [spaces(pipe(a)["text"]) for a in audios] == texts
  assert not inference.Recognizer.load(exported).normalize


def write_corpus(tmp_path):
  """A manifest of 6 items: 4 good flac files, one missing file, one empty transcript."""
  root = tmp_path / "audio"
  root.mkdir()
  audios = noise(2, 9000, 16000, 20000, 12000, 8000)
  names = ["a.flac", "b.flac", "c.flac", "d.flac", "missing.flac", "e.flac"]
  words = ["hello world", "A CAT", "THE   END", "TEA  TIME", "GONE", ""]
  sizes = [9000, 16000, 20000, 12000, 5000, 8000]
  for name, audio in zip(names[:4] + names[5:], audios):
    sf.write(str(root / name), audio * 0.25, 16000)
  (tmp_path / "test.tsv").write_text(str(root) + "\n" + "".join(f"{n}\t{s}\n" for n, s in zip(names, sizes)))
  (tmp_path / "test.wrd").write_text("\n".join(words) + "\n")
  good = [str(root / n) for n in names[:4]]
  return str(tmp_path / "test.tsv"), good, [VOCAB.normalize(w) for w in words[:4]]


def test_evaluate_skips_bad_items(recognizer, tmp_path, caplog, capsys, monkeypatch):
  tsv, good, refs = write_corpus(tmp_path)
  out = str(tmp_path / "hyps.tsv")
  result = inference.evaluate(recognizer, tsv, batch_seconds=2.0, out_path=out, num_threads=2)
  assert result["utterances"] == 4 and result["skipped"] == 2
  assert result["skipped_reasons"] == {"audio:missing": 1, "text:empty": 1}
  assert "missing.flac" in caplog.text and "e.flac" in caplog.text
  hyps = recognizer.transcribe([load_audio(p) for p in good])
  assert result["wer"] == pytest.approx(scoring.wer(refs, hyps))
  assert result["cer"] == pytest.approx(scoring.cer(refs, hyps))
  assert result["utterances_per_second"] > 0 and result["hypotheses_path"] == out
  with open(out) as f:
    lines = f.read().splitlines()
  assert len(lines) == 5 and lines[1].split("\t")[:3] == [good[0], refs[0], hyps[0]]
  # The command, with beam search (the loaded checkpoint is the recognizer above).
  monkeypatch.setattr(inference.Recognizer, "load", classmethod(lambda cls, p, **kw: recognizer))
  result = inference.main_evaluate(["--checkpoint", "ckpt", "--data", tsv, "--beam", "4", "--batch-seconds", "2"])
  printed = capsys.readouterr().out
  assert "WER" in printed and "CER" in printed and "utterances 4" in printed and "skipped 2" in printed
  beam = recognizer.transcribe([load_audio(p) for p in good], beam_width=4, batch_seconds=2.0)
  assert result["wer"] == pytest.approx(scoring.wer(refs, beam))


def test_transcribe_command_on_stereo_44k(recognizer, hf_model, tmp_path, capsys, monkeypatch):
  path = str(tmp_path / "stereo.wav")
  stereo = 0.3 * np.random.default_rng(3).standard_normal((57330, 2)).astype(np.float32)
  sf.write(path, stereo, 44100)                     # 1.3 s
  audio = load_audio(path)
  assert audio.ndim == 1 and audio.size == 20800
  expected = recognizer.transcribe([audio])[0]
  # The command loads the same directory; reuse the compiled recognizer to keep the test quick.
  monkeypatch.setattr(inference.Recognizer, "load", classmethod(lambda cls, p, **kw: recognizer))
  inference.main_transcribe([path, "--checkpoint", hf_model[1]])
  assert capsys.readouterr().out == f"{path}\t{expected}\n"
  inference.main_transcribe([path, "--checkpoint", hf_model[1], "--json"])
  (item,) = json.loads(capsys.readouterr().out)
  assert item["file"] == path and item["text"] == expected and item["duration"] == 1.3
  assert " ".join(w["word"] for w in item["words"]) == expected
  times = [t for w in item["words"] for t in (w["start"], w["end"])]
  assert times == sorted(times) and 0 <= times[0] and times[-1] <= 1.3


def test_transcribe_long_matches_one_pass(recognizer):
  audio = noise(4, 117000)[0]                      # 7.3 s, chunks of 2 s overlapping by 1 s
  # With the attention's output projection zeroed the model is local (conv stack, positional conv,
  # per-frame layers), so chunking must reproduce one pass exactly, frame for frame.
  params = jax.tree_util.tree_map(np.asarray, recognizer.params)
  for name, layer in params["wav2vec2"]["encoder"].items():
    if name.startswith("layers_"):
      layer["self_attn"]["out_proj"]["kernel"] = np.zeros_like(layer["self_attn"]["out_proj"]["kernel"])
  local = inference.Recognizer(recognizer.model_config, params, VOCAB, normalize=True)
  whole, frame_pad = local.logits(local.prepare(audio)[None])
  assert not frame_pad.any()
  chunked = local.transcribe_long(audio, chunk_seconds=2.0, overlap_seconds=1.0, batch_seconds=4.0)
  assert chunked.logits.shape == whole[0].shape == (recognizer.model_config.num_frames(117000), VOCAB.size)
  np.testing.assert_allclose(chunked.logits, whole[0], atol=1e-4, rtol=0)
  assert chunked.text == local.transcribe([audio])[0]
  # With attention each chunk sees only itself; the frames still line up and decode once.
  long = recognizer.transcribe_long(audio, chunk_seconds=2.0, overlap_seconds=1.0, batch_seconds=4.0)
  assert long.logits.shape == chunked.logits.shape and not long.frame_padding.any()
  assert long.text == recognizer.decode_frames(long.logits)
  assert recognizer.transcribe([audio], chunk_seconds=2.0, overlap_seconds=1.0,
                               batch_seconds=4.0) == [long.text]


def test_batches_never_mix_buckets_so_transcripts_do_not_depend_on_batch_mates():
  from w2v2_jax.inference import plan_batches
  lengths = [15000, 16000, 17000, 31000, 33000, 47000, 48000, 1000, 2000, 3000]
  batches = plan_batches(lengths, max_samples=10 ** 7, bucket_samples=16000)
  assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
  for b in batches:
    assert len({-(-lengths[i] // 16000) for i in b}) == 1          # one bucket per batch
    assert len(b) & (len(b) - 1) == 0                               # a power of two
