"""w2v2_jax.recognizer: loading, logits and transcripts against transformers, files at other rates,
chunked long audio, batching that does not change transcripts, and the transcribe command's output.
Tiny random models (tests/tiny_ctc.py), no downloads."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
import soundfile as sf

from tiny_ctc import VOCAB, hf_model, noise, recognizer, spaces, torch, transformers  # noqa: F401  (fixtures)
from w2v2_jax import cli
from w2v2_jax.data import batching
from w2v2_jax.data.audio import load_audio
from w2v2_jax.recognizer import Recognizer


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
  rec = Recognizer.load(str(run))
  assert rec.model_config.vocab_size == VOCAB.size and rec.normalize
  with pytest.raises(FileNotFoundError, match="nothing_here"):
    Recognizer.load(str(tmp_path / "nothing_here"))
  (tmp_path / "empty_run").mkdir()
  with pytest.raises(FileNotFoundError, match="empty_run.*export"):
    Recognizer.load(str(tmp_path / "empty_run"))
  (tmp_path / "model.pt").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="dict.ltr.txt"):
    Recognizer.load(str(tmp_path / "model.pt"))


def test_transcribe_command_on_stereo_44k(recognizer, hf_model, tmp_path, capsys, monkeypatch):
  path = str(tmp_path / "stereo.wav")
  stereo = 0.3 * np.random.default_rng(3).standard_normal((57330, 2)).astype(np.float32)
  sf.write(path, stereo, 44100)                     # 1.3 s
  audio = load_audio(path)
  assert audio.ndim == 1 and audio.size == 20800
  expected = recognizer.transcribe([audio])[0]
  # The command loads the same directory; reuse the compiled recognizer to keep the test quick.
  monkeypatch.setattr(Recognizer, "load", classmethod(lambda cls, p, **kw: recognizer))
  cli.main(["transcribe", path, "--checkpoint", hf_model[1]])
  assert capsys.readouterr().out == f"{path}\t{expected}\n"
  cli.main(["transcribe", path, "--checkpoint", hf_model[1], "--json"])
  (item,) = json.loads(capsys.readouterr().out)
  assert item["file"] == path and item["text"] == expected and item["duration"] == 1.3
  assert " ".join(w["word"] for w in item["words"]) == expected
  times = [t for w in item["words"] for t in (w["start"], w["end"])]
  assert times == sorted(times) and 0 <= times[0] and times[-1] <= 1.3


def test_transcribe_command_reports_unusable_files(recognizer, hf_model, tmp_path, capsys, monkeypatch, caplog):
  """A file too short for one output frame and a truncated FLAC are reported by name, never printed as
  (empty or partial) transcripts; the good file is still transcribed and the exit status says so."""
  good, tiny, cut = (str(tmp_path / n) for n in ("good.wav", "tiny.wav", "cut.flac"))
  rng = np.random.default_rng(4)
  sf.write(good, 0.3 * rng.standard_normal(16000).astype(np.float32), 16000)
  sf.write(tiny, 0.3 * rng.standard_normal(300).astype(np.float32), 16000)
  sf.write(cut, 0.3 * rng.standard_normal(16000).astype(np.float32), 16000)
  data = open(cut, "rb").read()
  open(cut, "wb").write(data[:len(data) // 2])
  monkeypatch.setattr(Recognizer, "load", classmethod(lambda cls, p, **kw: recognizer))
  with pytest.raises(SystemExit, match="2 file"):
    cli.main(["transcribe", good, tiny, cut, "--checkpoint", hf_model[1]])
  out = capsys.readouterr().out.splitlines()
  assert [line.split("\t")[0] for line in out] == [good]
  assert f"{tiny}: too_short (300 samples; one output frame needs 400 (25 ms))" in caplog.text
  assert f"{cut}: truncated (decoded" in caplog.text


def test_transcribe_long_matches_one_pass(recognizer):
  audio = noise(4, 117000)[0]                      # 7.3 s, chunks of 2 s overlapping by 1 s
  # With the attention's output projection zeroed the model is local (conv stack, positional conv,
  # per-frame layers), so chunking must reproduce one pass exactly, frame for frame.
  params = jax.tree_util.tree_map(np.asarray, recognizer.params)
  for name, layer in params["wav2vec2"]["encoder"].items():
    if name.startswith("layers_"):
      layer["self_attn"]["out_proj"]["kernel"] = np.zeros_like(layer["self_attn"]["out_proj"]["kernel"])
  local = Recognizer(recognizer.model_config, params, VOCAB, normalize=True)
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
  lengths = [15000, 16000, 17000, 31000, 33000, 47000, 48000, 1000, 2000, 3000]
  batches = batching.plan_padded_batches(lengths, max_samples=10 ** 7, bucket_samples=16000)
  assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
  for b in batches:
    assert len({-(-lengths[i] // 16000) for i in b}) == 1          # one bucket per batch
    assert len(b) & (len(b) - 1) == 0                               # a power of two
