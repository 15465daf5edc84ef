"""Pretraining then CTC fine-tuning end to end through the CLI (one CPU device): the tiny model,
initialised from our pretraining run, learns to transcribe synthetic note sequences; the best model is
exported as a Hugging Face directory that transformers loads and runs with identical logits."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from w2v2_jax import convert, models  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTES = {110: "A", 147: "B", 196: "C", 247: "D", 330: "E", 440: "F"}


def labeled_corpus(directory, count=100, seed=1):
  """Utterances of 3-6 notes; the transcript names the notes, one letter-word per note."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(directory, "audio"), exist_ok=True)
  rows = []
  for i in range(count):
    pieces, words = [], []
    for _ in range(rng.integers(3, 7)):
      f0 = rng.choice(list(NOTES))
      t = np.arange(int(rng.uniform(0.2, 0.35) * 16000)) / 16000
      pieces += [np.hanning(len(t)) * sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 5)),
                 np.zeros(800)]
      words.append(NOTES[f0])
    x = np.concatenate(pieces)
    x = (0.3 * x + 0.01 * rng.standard_normal(len(x))).astype(np.float32)
    name = f"u{i:03d}.flac"
    sf.write(os.path.join(directory, "audio", name), x, 16000)
    rows.append((name, len(x), words))
  for split, part in (("train", rows[:80]), ("valid", rows[80:])):
    with open(os.path.join(directory, f"{split}.tsv"), "w") as tsv, \
         open(os.path.join(directory, f"{split}.ltr"), "w") as ltr:
      tsv.write(os.path.join(directory, "audio") + "\n")
      for name, size, words in part:
        tsv.write(f"{name}\t{size}\n")
        ltr.write(" ".join(f"{w} |" for w in words) + "\n")


def test_finetune_learns_and_exports(tmp_path):
  labeled_corpus(str(tmp_path / "data"))
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)                      # one device, as a user's laptop
  cli = [sys.executable, "-m", "w2v2_jax.cli"]
  # Pretrain the tiny model on the same audio (labels unused): a random frozen conv encoder learns
  # nothing in fine-tuning, as the paper's recipe implies.
  # Run folders are given relative to the working directory, as users type them.
  proc = subprocess.run(cli + ["pretrain", "--config=pretrain:tiny", "--workdir=pretrained",
                               f"--config.data.train_manifest={tmp_path / 'data' / 'train.tsv'}"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

  workdir = tmp_path / "ft"
  cmd = cli + ["finetune", "--config=finetune:tiny",
         "--workdir=ft", "--config.init=pretrained",
         f"--config.data.train_manifest={tmp_path / 'data' / 'train.tsv'}",
         f"--config.data.valid_manifest={tmp_path / 'data' / 'valid.tsv'}",
         "--config.train.steps=800", "--config.train.eval_every=200", "--config.train.log_every=50"]
  proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

  logged = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert logged[-1]["loss"] < 0.5 * logged[0]["loss"]
  valid = [json.loads(line) for line in open(workdir / "valid.jsonl")]
  # Unseen utterances: the character error rate falls as training goes on (from ~0.95 at step 200 to
  # ~0.85 at step 800 in this small setting; longer runs go much lower, see the README).
  assert valid[-1]["valid/cer"] < valid[0]["valid/cer"] - 0.05, valid
  best = json.load(open(workdir / "best.json"))
  assert best["cer"] == min(v["valid/cer"] for v in valid)

  # The exported best model runs in transformers with the same logits as ours.
  export = workdir / "export"
  hf = transformers.Wav2Vec2ForCTC.from_pretrained(export).eval()
  ours_cfg, ours_params = convert.from_hf(str(export))
  audio, _ = sf.read(str(tmp_path / "data" / "audio" / "u085.flac"), dtype="float32")
  with torch.no_grad():
    ref = hf(torch.from_numpy(audio[None])).logits.numpy()
  out = models.build(ours_cfg).apply({"params": ours_params}, audio[None])
  np.testing.assert_allclose(np.asarray(out["logits"]), ref, atol=1e-4)
  assert json.load(open(export / "vocab.json"))["|"] == 4


def test_best_metric_is_checked_before_training(tmp_path):
  from w2v2_jax import configs
  from w2v2_jax.train import loop
  config = configs.get("finetune", "tiny")
  config.train.best_metric = "bleu"
  with pytest.raises(ValueError, match="best_metric"):
    loop.finetune(config, str(tmp_path / "ft"))
  assert not (tmp_path / "ft").exists()
