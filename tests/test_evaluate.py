"""w2v2_jax.evaluate and `w2v2 evaluate`: WER / CER over a manifest with bad items, against the rates of
the recognizer's own transcripts; greedy and beam search."""
import pytest
import soundfile as sf

from tiny_ctc import VOCAB, hf_model, noise, recognizer  # noqa: F401  (fixtures)
from w2v2_jax import cli, scoring
from w2v2_jax.data.audio import load_audio
from w2v2_jax.evaluate import evaluate
from w2v2_jax.recognizer import Recognizer


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
  result = evaluate(recognizer, tsv, batch_seconds=2.0, out_path=out, num_threads=2)
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
  monkeypatch.setattr(Recognizer, "load", classmethod(lambda cls, p, **kw: recognizer))
  result = cli.run(["evaluate", "--checkpoint", "ckpt", "--data", tsv, "--beam", "4", "--batch-seconds", "2"])
  printed = capsys.readouterr().out
  assert "WER" in printed and "CER" in printed and "utterances 4" in printed and "skipped 2" in printed
  beam = recognizer.transcribe([load_audio(p) for p in good], beam_width=4, batch_seconds=2.0)
  assert result["wer"] == pytest.approx(scoring.wer(refs, beam))


def test_evaluate_under_a_condition_scores_the_perturbed_audio(recognizer, tmp_path, capsys, monkeypatch):
  """`condition` perturbs each utterance with draws from (seed, index): the rates are those of the
  recognizer on exactly that audio (the telephone band), the same on a second run, and differ from the
  clean audio's transcripts."""
  from w2v2_jax.data import augment
  tsv, good, refs = write_corpus(tmp_path)
  indices = [0, 1, 2, 3]           # manifest rows of the good files
  phone = augment.CONDITIONS["telephone"]
  perturbed = [augment.perturb(load_audio(p), phone, augment.utterance_rng(7, 0, i), 16000)
               for p, i in zip(good, indices)]
  hyps = recognizer.transcribe(perturbed, batch_seconds=2.0)
  result = evaluate(recognizer, tsv, batch_seconds=2.0, augment="telephone", augment_seed=7)
  assert result["utterances"] == 4
  assert result["cer"] == pytest.approx(scoring.cer(refs, hyps))
  assert result["wer"] == pytest.approx(scoring.wer(refs, hyps))
  assert evaluate(recognizer, tsv, batch_seconds=2.0, augment="telephone", augment_seed=7)["cer"] == result["cer"]
  clean = recognizer.transcribe([load_audio(p) for p in good], batch_seconds=2.0)
  assert hyps != clean            # the band limit changes what the model hears
  with pytest.raises(ValueError, match="unknown condition 'phone'"):
    evaluate(recognizer, tsv, augment="phone")
  monkeypatch.setattr(Recognizer, "load", classmethod(lambda cls, p, **kw: recognizer))
  out = cli.run(["evaluate", "--checkpoint", "ckpt", "--data", tsv, "--batch-seconds", "2",
                 "--condition", "telephone", "--condition_seed", "7"])
  assert out["cer"] == result["cer"] and "condition: telephone (seed 7)" in capsys.readouterr().out


def test_evaluate_by_voice(recognizer, tmp_path, capsys, monkeypatch):
  """--by_voice joins each scored utterance with the voice the corpus's plan.jsonl gives it: per voice,
  the CER of the recognizer's own transcripts of that voice's files; without a plan it stops before
  any work, naming the manifest."""
  import json
  tsv, good, refs = write_corpus(tmp_path)
  voice = {"a": "flite:slt", "b": "espeak-ng:m4", "c": "flite:slt", "d": "espeak-ng:m4", "missing": "flite:slt",
           "e": "espeak-ng:m4"}
  monkeypatch.setattr(Recognizer, "load", classmethod(lambda cls, p, **kw: recognizer))
  with pytest.raises(SystemExit, match=r"no plan.jsonl beside .*test.tsv"):
    cli.run(["evaluate", "--checkpoint", "ckpt", "--data", tsv, "--by_voice"])
  with pytest.raises(SystemExit, match="local manifest"):
    cli.run(["evaluate", "--checkpoint", "ckpt", "--data", "tfds:test_clean", "--by_voice"])
  (tmp_path / "plan.jsonl").write_text("".join(
      json.dumps({"id": k, "engine": v.split(":")[0], "voice": v.split(":")[1], "split": "test"}) + "\n"
      for k, v in voice.items()))
  capsys.readouterr()
  result = cli.run(["evaluate", "--checkpoint", "ckpt", "--data", tsv, "--batch-seconds", "2", "--by_voice"])
  printed = capsys.readouterr().out
  hyps = recognizer.transcribe([load_audio(p) for p in good], batch_seconds=2.0)
  rows = {r["voice"]: r for r in result["by_voice"]}
  assert set(rows) == {"flite:slt", "espeak-ng:m4"} and result["hypotheses_path"] is None
  for name, members in (("flite:slt", [0, 2]), ("espeak-ng:m4", [1, 3])):
    assert rows[name]["utterances"] == 2
    assert rows[name]["cer"] == pytest.approx(scoring.cer([refs[i] for i in members], [hyps[i] for i in members]))
    assert f"  {name}" in printed
  assert "by voice (share of the reference letters):" in printed
