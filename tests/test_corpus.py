"""Tests of w2v2_jax.corpus: text normalisation, the voice split, the plan, rendering and `make-corpus`.

They run the real TTS engines (espeak-ng, flite, festival, sox, bible; `make corpus-deps` installs
them; SVOX Pico comes from the `ttspico` pip package) on corpora of a few dozen utterances.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import soundfile as sf

from w2v2_jax.corpus import by_voice, pico, sentences, synthesize, voices
from w2v2_jax.data.manifest import read_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINES = tuple(voices.ENGINE_WEIGHTS)
TABLES = {"espeak-ng": voices.ESPEAK_VARIANTS, "flite": voices.FLITE_VOICES, "festival": voices.FESTIVAL_VOICES,
          "pico": voices.PICO_VOICES}
# A tiny corpus: ~25 utterances and a few unlabeled ones. Its plan for SEED has every engine in every split
# that has its voices.
TINY = dict(hours=0.01, eval_minutes=0.2, labeled_minutes=0.2, unlabeled_hours=0.004, workers=2)
SEED, OTHER_SEED = 16, 22
LABELED = "train_0.2m"
MANIFESTS = ("train", "valid", "test", LABELED)


@pytest.fixture(scope="module")
def texts():
  return sentences.sentences(sentences.bible_verses())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """(out_dir, summary) of the tiny corpus for SEED; tests that change it work on a copy."""
  out = str(tmp_path_factory.mktemp("corpus"))
  return out, synthesize.make_corpus(out, seed=SEED, **TINY)


@pytest.fixture(scope="module")
def other_corpus(tmp_path_factory):
  """(out_dir, summary) of the tiny corpus for OTHER_SEED."""
  out = str(tmp_path_factory.mktemp("other_corpus"))
  return out, synthesize.make_corpus(out, seed=OTHER_SEED, **TINY)


def tiny_plan(texts, seed=SEED, **kwargs):
  args = dict(hours=TINY["hours"], eval_minutes=TINY["eval_minutes"], seed=seed, engines=ENGINES)
  return synthesize.plan(texts, **{**args, **kwargs})


def file_hashes(out_dir):
  """Relative path -> sha256 of every file, manifests without their first line (the absolute root)."""
  out = {}
  for dirpath, _, names in os.walk(out_dir):
    for name in names:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        data = f.read()
      if name.endswith(".tsv") and name != "voices.tsv":
        data = data.split(b"\n", 1)[1]
      out[os.path.relpath(path, out_dir)] = hashlib.sha256(data).hexdigest()
  return out


def flac_mtimes(out_dir):
  return {p: os.stat(os.path.join(out_dir, p)).st_mtime_ns for p in file_hashes(out_dir) if p.endswith(".flac")}


def read_plan(out_dir):
  with open(os.path.join(out_dir, "plan.jsonl"), encoding="utf-8") as f:
    return {e["id"]: e for e in map(json.loads, f)}


def copy_corpus(corpus, tmp_path):
  out = str(tmp_path / "copy")
  shutil.copytree(corpus[0], out)
  return out


@pytest.fixture
def rendered(monkeypatch):
  """The ids `synthesize.render` is called for (it still renders)."""
  ids, render = [], synthesize.render

  def spy(utt, out_dir, **kwargs):
    ids.append(utt.id)
    return render(utt, out_dir, **kwargs)

  monkeypatch.setattr(synthesize, "render", spy)
  return ids


def fail_on(monkeypatch, text):
  """Makes the TTS command of utterances with this text exit 1."""
  command = voices.command

  def faulty(voice, words, wav_path, **kwargs):
    return (["false"], None) if words == text else command(voice, words, wav_path, **kwargs)

  monkeypatch.setattr(voices, "command", faulty)


# -- sentences ------------------------------------------------------------------------------------

def test_normalize():
  assert (sentences.normalize('  "Thou shalt not," saith the LORD\'s  well-beloved \u2014 \'friend\'.  ')
          == "THOU SHALT NOT SAITH THE LORD'S WELL BELOVED FRIEND")
  assert sentences.normalize("'Tis 3 o'clock, the sons\u2019 wives!") == "TIS O'CLOCK THE SONS WIVES"
  assert sentences.normalize("ab12cd (x)") == "ABCD X"
  assert sentences.normalize(" -- ' ; ") == ""


def test_split_clauses():
  genesis = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
             "and darkness was upon the face of the deep.")
  assert sentences.split_clauses(genesis, 3, 12) == [
      "IN THE BEGINNING GOD CREATED THE HEAVEN AND THE EARTH", "AND THE EARTH WAS WITHOUT FORM AND VOID",
      "AND DARKNESS WAS UPON THE FACE OF THE DEEP"]
  # Short clauses are rejoined while they fit; a piece left under min_words is dropped.
  assert sentences.split_clauses("Jesus wept. He said: Go home. Amen.", 3, 12) == ["JESUS WEPT HE SAID GO HOME AMEN"]
  assert sentences.split_clauses("Jesus wept. He said: Go home. Amen.", 3, 4) == ["JESUS WEPT HE SAID", "GO HOME AMEN"]
  assert sentences.split_clauses("Jesus wept.", 3, 12) == []
  # A sentence over max_words is cut at commas too; a comma piece still over max_words is dropped.
  day = ("And God called the light Day, and the darkness he called Night, "
         "and the evening and the morning were the first day.")
  assert sentences.split_clauses(day, 3, 6) == ["AND GOD CALLED THE LIGHT DAY", "AND THE DARKNESS HE CALLED NIGHT"]
  assert all(3 <= len(c.split()) <= 12 for c in sentences.split_clauses(day * 5, 3, 12))


def test_sentences_deduplicates_in_first_seen_order():
  paragraphs = ["Let us go. Let us go.", "Let us go; and they went out.", "And they went out!"]
  assert sentences.sentences(paragraphs, min_words=3, max_words=4) == ["LET US GO", "AND THEY WENT OUT"]


def test_letters_line_and_vocabulary():
  assert sentences.letters_line("IN THE LORD'S") == "I N | T H E | L O R D ' S |"
  assert sentences.letters_line("") == ""
  sentences.check_vocabulary(["IN THE LORD'S HOUSE"])
  with pytest.raises(ValueError, match=r"\['1', 'a'\]"):
    sentences.check_vocabulary(["ABC", "a1"])


def test_read_text(tmp_path):
  path = tmp_path / "text.txt"
  path.write_text("  First line.  \n\n\t\nSecond, line\n", encoding="utf-8")
  assert sentences.read_text(str(path)) == ["First line.", "Second, line"]


def test_bible(texts):
  verses = sentences.bible_verses()
  assert len(verses) == 31102
  assert verses[0] == "In the beginning God created the heaven and the earth."
  assert verses[-1] == "The grace of our Lord Jesus Christ be with you all. Amen."
  assert not any(":" in v.split()[0] for v in verses)  # no "Ge1:1" references left
  assert len(texts) > 50000 and len(set(texts)) == len(texts)
  sentences.check_vocabulary(texts)
  assert all(3 <= len(t.split()) <= 12 for t in texts)


# -- voices ---------------------------------------------------------------------------------------

def test_voice_tables_split_speakers():
  for engine, table in TABLES.items():
    names = {split: set(table[split]) for split in voices.SPLITS}
    assert all(len(names[s]) == len(table[s]) for s in voices.SPLITS), engine
    assert not names["train"] & names["valid"], engine
    assert not names["train"] & names["test"], engine
    assert not names["valid"] & names["test"], engine
  # festival's slt HTS voice is flite's CMU speaker slt: both are test voices.
  assert "slt" in voices.FLITE_VOICES["test"] and "cmu_us_slt_arctic_hts" in voices.FESTIVAL_VOICES["test"]
  table = voices.inventory(ENGINES)
  assert {v.engine for v in table["valid"]} == {"espeak-ng", "flite"}
  assert all(v.split == split for split, vs in table.items() for v in vs)
  with pytest.raises(voices.EngineUnavailable, match="no valid voices"):
    voices.inventory(("festival",))


def test_every_voice_is_its_own_speaker(tmp_path):
  """Each voice gives different audio for the same input than every voice of another split, and no
  espeak-ng variant is the default voice espeak-ng falls back to for a variant name it lacks."""
  def wav_hash(voice):
    wav = str(tmp_path / f"{voice.engine}-{voice.name}.wav")
    argv, stdin = voices.command(voice, "AND GOD SAID LET THERE BE LIGHT", wav, accent="en", speed=170, pitch=50)
    subprocess.run(argv, input=stdin, check=True, capture_output=True, text=True)
    with open(wav, "rb") as f:
      return hashlib.sha256(f.read()).hexdigest()

  fallback = wav_hash(voices.Voice("espeak-ng", "no-such-variant", "train"))
  splits_of = collections.defaultdict(set)
  for split, vs in voices.inventory(ENGINES).items():
    for voice in vs:
      digest = wav_hash(voice)
      assert digest != fallback, voice
      splits_of[digest].add(split)
  assert all(len(s) == 1 for s in splits_of.values())


def test_pico_voices_speak_english_apart(tmp_path):
  """Both Pico voices render through the command-line entry the corpus runs, at 16 kHz, about as long
  as the other engines take for the same words, and differently from each other; bad input is named."""
  durations, digests = {}, set()
  for voice in (v for v in voices.inventory(ENGINES)["train"] if v.engine == "pico"):
    wav = str(tmp_path / f"{voice.name}.wav")
    argv, stdin = voices.command(voice, "AND GOD SAID LET THERE BE LIGHT", wav, accent="en", speed=170, pitch=50)
    subprocess.run(argv, input=stdin, check=True, capture_output=True, text=True)
    audio, rate = sf.read(wav)
    assert rate == pico.SAMPLE_RATE == 16000 and np.abs(audio).max() > 0.05, voice
    durations[voice.name] = len(audio) / rate
    digests.add(hashlib.sha256(audio.tobytes()).hexdigest())
  assert sorted(durations) == sorted(pico.VOICES) and len(digests) == 2
  assert all(1.0 < d < 3.5 for d in durations.values()), durations        # 7 words: not silence, not a loop
  cli = [sys.executable, "-m", "w2v2_jax.corpus.pico"]
  bad = subprocess.run(cli + ["en-AU", str(tmp_path / "x.wav")], input="hello", capture_output=True, text=True)
  assert bad.returncode == 1 and "unknown Pico voice 'en-AU'" in bad.stderr and "en-GB" in bad.stderr
  empty = subprocess.run(cli + ["en-GB", str(tmp_path / "x.wav")], input=" \n", capture_output=True, text=True)
  assert empty.returncode == 2 and "no text" in empty.stderr and not os.path.exists(tmp_path / "x.wav")


def test_unlabeled_voices_speak_apart():
  """The unlabeled split's festival voices are installed (`make corpus-deps`), are none of the English
  voices, and each speaks the same text differently from the others."""
  unlabeled = voices.unlabeled_voices()
  assert [v.name for v in unlabeled] == list(voices.UNLABELED_VOICES) and {v.split for v in unlabeled} == {"unlabeled"}
  english = {v.name for vs in voices.inventory(ENGINES).values() for v in vs}
  assert not english & set(voices.UNLABELED_VOICES)
  digests = set()
  with tempfile.TemporaryDirectory() as tmp:
    for voice in unlabeled:
      wav = os.path.join(tmp, f"{voice.name}.wav")
      argv, stdin = voices.command(voice, "AND GOD SAID LET THERE BE LIGHT", wav, accent="en", speed=170, pitch=50)
      subprocess.run(argv, input=stdin, check=True, capture_output=True, text=True)
      audio, _ = sf.read(wav)
      assert len(audio) > 8000 and np.abs(audio).max() > 0.01, voice      # speech, not an empty file
      digests.add(hashlib.sha256(audio.tobytes()).hexdigest())
  assert len(digests) == len(unlabeled)


def test_corpus_deps_installs_every_voice():
  """`make corpus-deps` (the Makefile's TTS_PACKAGES) installs the package of every unlabeled voice."""
  with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as f:
    makefile = f.read().replace("\\\n", " ")
  packages = next(line.split(":=", 1)[1].split() for line in makefile.splitlines() if line.startswith("TTS_PACKAGES"))
  assert set(voices.UNLABELED_VOICES.values()) <= set(packages)
  voice_dirs = next(line for line in makefile.splitlines() if line.startswith("TTS_VOICE_DIRS"))
  assert all(f"/{name}" in voice_dirs for name in voices.UNLABELED_VOICES)


def test_missing_unlabeled_voices_are_named(monkeypatch, tmp_path, texts):
  (tmp_path / "catalan" / "upc_ca_ona_hts").mkdir(parents=True)
  monkeypatch.setattr(voices, "FESTIVAL_VOICE_DIRS", (str(tmp_path),))
  with pytest.raises(voices.EngineUnavailable, match=r"festvox-czech-dita.*make corpus-deps") as e:
    voices.unlabeled_voices()
  assert "festvox-ca-ona-hts" not in str(e.value)
  with pytest.raises(voices.EngineUnavailable, match="festvox-suopuhe-lj"):
    tiny_plan(texts, unlabeled_hours=0.01)
  assert tiny_plan(texts) == tiny_plan(texts, unlabeled_hours=0.0)     # no unlabeled audio: no festival voices needed


def test_engines_get_lower_case_text():
  # espeak-ng spells some all-caps words: "US" -> "U S".
  phonemes = [subprocess.run(["espeak-ng", "-q", "-x", w], check=True, capture_output=True, text=True).stdout
              for w in ("US", "us")]
  assert phonemes[0] != phonemes[1]
  for vs in voices.inventory(ENGINES).values():
    for voice in vs:
      argv, stdin = voices.command(voice, "LET US SEE IT", "x.wav", accent="en", speed=170, pitch=50)
      assert "let us see it" in argv + [stdin] and "LET US SEE IT" not in argv + [stdin]


def test_available_engines(tmp_path, monkeypatch):
  assert voices.available_engines() == ENGINES
  assert voices.available_engines(("flite",)) == ("flite",)
  with pytest.raises(ValueError, match="nosuch"):
    voices.available_engines(("flite", "nosuch"))
  # sox but no engine on PATH: Pico, a Python module, is all that is left; then without it, nothing.
  os.symlink(shutil.which("sox"), tmp_path / "sox")
  monkeypatch.setenv("PATH", str(tmp_path))
  assert voices.available_engines() == ("pico",)
  monkeypatch.setattr(pico, "installed", lambda: False)
  with pytest.raises(voices.EngineUnavailable, match="make corpus-deps"):
    voices.available_engines()
  os.remove(tmp_path / "sox")
  with pytest.raises(voices.EngineUnavailable, match="sox.*make corpus-deps"):
    voices.available_engines()
  with pytest.raises(sentences.TextUnavailable, match="make corpus-deps"):
    sentences.bible_verses()
  with pytest.raises(voices.EngineUnavailable, match="make corpus-deps"):
    synthesize.make_corpus(str(tmp_path / "out"), **TINY)


# -- plan -----------------------------------------------------------------------------------------

def test_plan_is_deterministic_for_a_seed(texts):
  assert tiny_plan(texts) == tiny_plan(texts)
  assert tiny_plan(texts) != tiny_plan(texts, seed=SEED + 1)
  assert {(u.split, u.engine) for u in tiny_plan(texts)} == {
      (split, engine) for engine, table in TABLES.items() for split in voices.SPLITS if table[split]}


def test_pico_leaves_valid_and_test_unchanged(texts):
  """Pico speaks train only: valid and test are the same utterances with or without it, so a model's
  test CER stays comparable with the corpora made before Pico was an engine."""
  without = tuple(e for e in ENGINES if e != "pico")
  for kwargs in ({}, {"hours": 0.2, "eval_minutes": 2.0}):
    with_pico, without_pico = tiny_plan(texts, **kwargs), tiny_plan(texts, engines=without, **kwargs)
    held_out = lambda utts: [u for u in utts if u.split in ("valid", "test")]  # noqa: E731
    assert held_out(with_pico) == held_out(without_pico) and held_out(with_pico)
    assert {u.engine for u in with_pico if u.split == "train"} == set(ENGINES)


def test_plan_splits_sentences_and_voices(texts):
  utts = tiny_plan(texts, hours=0.1, eval_minutes=1.0)
  by_split = {s: [u for u in utts if u.split == s] for s in voices.SPLITS}
  text_sets = {s: {u.text for u in us} for s, us in by_split.items()}
  assert sum(map(len, text_sets.values())) == len(utts)  # no sentence twice, within or across splits
  table = voices.inventory(ENGINES)
  for split, us in by_split.items():
    allowed = {(v.engine, v.name) for v in table[split]}
    assert {(u.engine, u.voice) for u in us} <= allowed
    assert [u.id for u in us] == [f"{split}-{i:06d}" for i in range(len(us))]
  train_voices = {(u.engine, u.voice) for u in by_split["train"]}
  assert not train_voices & {(u.engine, u.voice) for u in by_split["test"] + by_split["valid"]}
  for split, minutes in (("train", 6.0), ("valid", 1.0), ("test", 1.0)):
    seconds = [synthesize._estimate_seconds(u.text, u.tempo) for u in by_split[split]]
    assert sum(seconds[:-1]) < minutes * 60 <= sum(seconds)
  for u in utts:
    assert u.accent in voices.ESPEAK_ACCENTS and 140 <= u.speed <= 200 and 30 <= u.pitch <= 70
    assert 0.9 <= u.tempo <= 1.12 and -150 <= u.cents <= 150 and -12 <= u.gain_db <= -1


def test_more_hours_extend_train_and_keep_eval(texts):
  small, large = tiny_plan(texts), tiny_plan(texts, hours=0.05)
  for split in ("test", "valid"):
    assert [u for u in small if u.split == split] == [u for u in large if u.split == split]
  small_train, large_train = [u for u in small if u.split == "train"], [u for u in large if u.split == "train"]
  assert len(large_train) > 3 * len(small_train)
  assert large_train[:len(small_train)] == small_train


def test_plan_errors(texts):
  with pytest.raises(ValueError, match="positive"):
    tiny_plan(texts, hours=0)
  with pytest.raises(ValueError, match="not enough sentences"):
    tiny_plan(texts[:10])
  assert {u.engine for u in tiny_plan(texts, engines=("flite",))} == {"flite"}


def test_unlabeled_split_follows_and_changes_nothing_else(texts):
  plain, more = tiny_plan(texts), tiny_plan(texts, unlabeled_hours=0.05)
  assert more[:len(plain)] == plain            # test, valid and train as without unlabeled audio
  unlabeled = more[len(plain):]
  assert [u.id for u in unlabeled] == [f"unlabeled-{i:06d}" for i in range(len(unlabeled))]
  assert {u.split for u in unlabeled} == {"unlabeled"} and {u.engine for u in unlabeled} == {"festival"}
  assert {u.voice for u in unlabeled} <= set(voices.UNLABELED_VOICES) and len({u.voice for u in unlabeled}) >= 4
  assert not {u.text for u in unlabeled} & {u.text for u in plain}       # sentences after train's
  seconds = [synthesize._estimate_seconds(u.text, u.tempo) for u in unlabeled]
  assert sum(seconds[:-1]) < 0.05 * 3600 <= sum(seconds)
  with pytest.raises(ValueError, match="unlabeled_hours"):
    tiny_plan(texts, unlabeled_hours=-1)


def test_voice_shift_changes_only_train_voices(texts):
  plain, shifted = tiny_plan(texts, hours=0.3), tiny_plan(texts, hours=0.3, voice_shift=0.5)
  assert len(plain) == len(shifted)
  moved = []
  for a, b in zip(plain, shifted):
    assert a.formant == 1.0
    if b.formant == 1.0:
      assert a == b
      continue
    moved.append(b)
    assert b.split == "train" and synthesize.VOICE_SHIFT_RANGE[0] <= b.formant <= synthesize.VOICE_SHIFT_RANGE[1]
    # every other field as in the unshifted plan; the pitch moves twice as far as the formants (in cents)
    assert b.cents - a.cents == round(2 * 1200 * np.log2(b.formant))
    assert dataclasses.replace(b, formant=1.0, cents=a.cents) == a
  train = [u for u in shifted if u.split == "train"]
  assert 0.35 < len(moved) / len(train) < 0.65
  everyone = [u.formant for u in tiny_plan(texts, hours=0.3, voice_shift=1.0) if u.split == "train"]
  assert sum(f == 1.0 for f in everyone) < 0.01 * len(everyone)    # only a factor drawn as 1.000
  with pytest.raises(ValueError, match="voice_shift"):
    tiny_plan(texts, voice_shift=1.5)


def median_f0(wave, rate=16000):
  """Median autocorrelation pitch (Hz) of the clearly voiced 40 ms frames of `wave`."""
  size, lags = int(0.04 * rate), np.arange(rate // 400, rate // 60)
  f0 = []
  for start in range(0, len(wave) - size, size // 2):
    frame = wave[start:start + size] - wave[start:start + size].mean()
    energy = float(frame @ frame)
    if energy < 1e-4 * size:
      continue
    corr = np.array([frame[:-lag] @ frame[lag:] for lag in lags]) / energy
    if corr.max() > 0.6:
      f0.append(rate / lags[corr.argmax()])
  return float(np.median(f0))


def test_shifted_voice_is_higher_and_as_long(texts, tmp_path):
  """A male flite voice scaled by f = 1.2: its pitch rises by about f**3, its duration stays."""
  utt = next(u for u in tiny_plan(texts, hours=0.3) if u.engine == "flite" and u.split == "train")
  utt = dataclasses.replace(utt, voice="kal16", cents=0, tempo=1.0)
  up = dataclasses.replace(utt, id=utt.id + "-up", formant=1.2, cents=round(2 * 1200 * np.log2(1.2)))
  waves = {}
  for u in (utt, up):
    synthesize.render(u, str(tmp_path))
    waves[u.formant], rate = sf.read(str(tmp_path / u.path))
  assert abs(len(waves[1.2]) / len(waves[1.0]) - 1) < 0.05
  ratio = median_f0(waves[1.2], rate) / median_f0(waves[1.0], rate)
  assert 1.2 ** 3 * 0.85 < ratio < 1.2 ** 3 * 1.15, ratio


# -- make_corpus ----------------------------------------------------------------------------------

def test_make_corpus_files_and_manifests(corpus):
  out, summary = corpus
  assert summary["failed"] == {} and summary["seed"] == SEED and summary["engines"] == list(ENGINES)
  plan = read_plan(out)
  # Without voice shifts the plan's entries are those written before the option existed (no re-render).
  assert summary["voice_shift"] == 0.0 and not [e for e in plan.values() if "formant" in e]
  manifests = {name: read_manifest(os.path.join(out, f"{name}.tsv")) for name in MANIFESTS}
  on_disk = set()
  for dirpath, dirnames, names in os.walk(out):
    assert not [d for d in dirnames if d.startswith(".w2v2-tts-")]  # no temporary files left
    on_disk |= {os.path.relpath(os.path.join(dirpath, n), out) for n in names if n.endswith(".flac")}
  unlabeled, pretrain = (read_manifest(os.path.join(out, f"{name}.tsv")) for name in ("unlabeled", "pretrain"))
  assert on_disk == {p for name in voices.SPLITS for p in manifests[name].paths} | set(unlabeled.paths) == {
      f"audio/{e['split']}/{i}.flac" for i, e in plan.items()}

  # The unlabeled split: a manifest without transcripts; pretraining reads train and unlabeled.
  assert len(unlabeled) > 0 and unlabeled.labels == {} and unlabeled.root == os.path.realpath(out)
  assert not [n for n in os.listdir(out) if n.startswith("unlabeled.") and n != "unlabeled.tsv"]
  assert all(p.startswith("audio/unlabeled/") for p in unlabeled.paths)
  assert {plan[os.path.basename(p)[:-len(".flac")]]["voice"] for p in unlabeled.paths} <= set(voices.UNLABELED_VOICES)
  assert pretrain.paths == manifests["train"].paths + unlabeled.paths
  assert list(pretrain.sizes) == list(manifests["train"].sizes) + list(unlabeled.sizes)
  for i in range(len(unlabeled)):
    info = sf.info(unlabeled.path(i))
    assert (info.samplerate, info.channels, info.frames) == (16000, 1, unlabeled.sizes[i])
  assert summary["unlabeled_hours_requested"] == TINY["unlabeled_hours"]
  assert summary["splits"]["unlabeled"]["utterances"] == len(unlabeled)

  for name, m in manifests.items():
    split = name.split("_")[0]
    assert m.root == os.path.realpath(out) and len(m) > 0
    assert len(m.labels["wrd"]) == len(m.labels["ltr"]) == len(m)
    assert m.labels["ltr"] == [sentences.letters_line(w) for w in m.labels["wrd"]]
    for i, rel in enumerate(m.paths):
      entry = plan[os.path.basename(rel)[:-len(".flac")]]
      assert rel.startswith(f"audio/{split}/") and entry["split"] == split
      assert m.labels["wrd"][i] == entry["text"]
      info = sf.info(m.path(i))
      assert (info.samplerate, info.channels, info.format, info.subtype) == (16000, 1, "FLAC", "PCM_16")
      assert info.frames == m.sizes[i]
      assert summary["splits"][name]["utterances"] == len(m)
      assert summary["splits"][name]["hours"] == round(m.sizes.sum() / 16000 / 3600, 4)

  # The audio is speech at the planned level, about as long as planned.
  for i in range(len(manifests["test"])):
    entry = plan[f"test-{i:06d}"]
    audio, _ = sf.read(manifests["test"].path(i))
    assert abs(20 * np.log10(np.abs(audio).max()) - entry["gain_db"]) < 0.5
    assert 0.4 < len(audio) / 16000 / synthesize._estimate_seconds(entry["text"], entry["tempo"]) < 2.5

  # train_<M>m: the first train utterances up to M minutes of audio.
  train, labeled = manifests["train"], manifests[LABELED]
  assert train.paths[:len(labeled)] == labeled.paths and len(labeled) < len(train)
  assert labeled.sizes[:-1].sum() < 0.2 * 60 * 16000 <= labeled.sizes.sum()

  # Test and valid speakers are never in train.
  split_voices = {s: {(e["engine"], e["voice"]) for e in plan.values() if e["split"] == s} for s in voices.SPLITS}
  assert not split_voices["train"] & (split_voices["valid"] | split_voices["test"])
  assert {e["engine"] for e in plan.values()} == set(ENGINES)

  with open(os.path.join(out, "corpus.json"), encoding="utf-8") as f:
    assert json.load(f) == summary
  with open(os.path.join(out, "voices.tsv"), encoding="utf-8") as f:
    header, *rows = [line.rstrip("\n").split("\t") for line in f]
  assert header == ["split", "engine", "voice", "utterances", "seconds"]
  for split in voices.SPLITS:
    split_rows = [r for r in rows if r[0] == split]
    assert {f"{r[1]}:{r[2]}" for r in split_rows} == set(summary["splits"][split]["voices"]) == {
        f"{e}:{v}" for e, v in split_voices[split]}
    assert sum(int(r[3]) for r in split_rows) == len(manifests[split])
    assert sum(float(r[4]) for r in split_rows) == pytest.approx(manifests[split].sizes.sum() / 16000, abs=0.5)
  with open(os.path.join(out, "dict.ltr.txt"), encoding="utf-8") as f:
    counts = [(c, int(n)) for c, n in (line.split() for line in f)]
  assert counts == collections.Counter(" ".join(train.labels["ltr"]).split()).most_common()
  # The language-model text has the train sentences and never a valid or test one.
  with open(os.path.join(out, "lm.txt"), encoding="utf-8") as f:
    lm_text = f.read().splitlines()
  assert set(train.labels["wrd"]) <= set(lm_text)
  assert not set(lm_text) & set(manifests["valid"].labels["wrd"] + manifests["test"].labels["wrd"])
  assert len(lm_text) == len(set(lm_text)) > len(train)


def test_error_rates_by_voice(corpus, tmp_path):
  """Per-voice CER of a hypotheses file equals jiwer's CER over that voice's utterances alone; a line of
  another corpus or a file that is not a hypotheses file is refused with its name."""
  import jiwer
  from w2v2_jax import scoring
  out, _ = corpus
  test = read_manifest(os.path.join(out, "test.tsv"), label_exts=("wrd",))
  refs = test.labels["wrd"]
  hyps = [r[: len(r) // 2].strip() + " X" if i % 2 else r.replace("E", "A") for i, r in enumerate(refs)]
  ids = [test.path(i) for i in range(len(test))]
  hyp_tsv = str(tmp_path / "hyp.tsv")
  scoring.write_hypotheses(hyp_tsv, ids, refs, hyps)
  plan = read_plan(out)
  rows = by_voice.error_rates(hyp_tsv, out)
  assert by_voice.error_rates(hyp_tsv, out, by_voice.voice_of_utterance(out)) == rows   # the map read once
  merged = by_voice.error_rates(hyp_tsv, out, {u: "all:one" for u in by_voice.voice_of_utterance(out)})
  assert [(r["voice"], r["utterances"]) for r in merged] == [("all:one", len(ids))]   # the given map is the one used
  groups = collections.defaultdict(list)
  for i, path in enumerate(ids):
    entry = plan[os.path.splitext(os.path.basename(path))[0]]
    groups[f"{entry['engine']}:{entry['voice']}"].append(i)
  assert sorted(r["voice"] for r in rows) == sorted(groups) and len(groups) > 1
  for r in rows:
    members = groups[r["voice"]]
    assert r["utterances"] == len(members)
    assert r["cer"] == pytest.approx(jiwer.cer([refs[i] for i in members], [hyps[i] for i in members]), abs=1e-9)
  assert [r["cer"] for r in rows] == sorted((r["cer"] for r in rows), reverse=True)
  assert sum(r["share"] for r in rows) == pytest.approx(1.0)
  scoring.write_hypotheses(hyp_tsv, ids[:-1] + ["/elsewhere/other-000000.flac"], refs, hyps)
  with pytest.raises(ValueError, match=r"hyp.tsv:%d: utterance 'other-000000' is not in" % (len(ids) + 1)):
    by_voice.error_rates(hyp_tsv, out)
  with pytest.raises(ValueError, match="not a hypotheses file"):
    by_voice.error_rates(os.path.join(out, "test.tsv"), out)
  scoring.write_hypotheses(hyp_tsv, ids, refs, hyps)
  with open(hyp_tsv, "a", encoding="utf-8") as f:
    f.write("cut\tshort\n")
  with pytest.raises(ValueError, match=r"hyp.tsv:%d: 2 fields, not 7" % (len(ids) + 2)):
    by_voice.error_rates(hyp_tsv, out)
  with pytest.raises(FileNotFoundError, match="no plan.jsonl"):
    by_voice.error_rates(hyp_tsv, str(tmp_path))


def test_bad_plan_line_is_named_and_nothing_is_rendered(corpus, tmp_path, rendered):
  """A plan.jsonl line that is not an entry stops both its readers (a resumed make_corpus and the per-voice
  join) with its file and line number, before any file is rendered or removed."""
  out = copy_corpus(corpus, tmp_path)
  plan_path = os.path.join(out, "plan.jsonl")
  lines = len(read_plan(out))
  with open(plan_path, "a", encoding="utf-8") as f:
    f.write('{"id": "half-writ\n')
  before = file_hashes(out)
  with pytest.raises(ValueError, match=r"plan.jsonl:%d: not a plan entry" % (lines + 1)):
    synthesize.make_corpus(out, seed=SEED, **TINY)
  assert rendered == [] and file_hashes(out) == before
  with pytest.raises(ValueError, match=r"plan.jsonl:%d: not a plan entry" % (lines + 1)):
    by_voice.voice_of_utterance(out)


def test_same_seed_same_bytes(corpus, tmp_path):
  """Every file but the manifests' root line is byte-identical (sox runs with -R: fixed dither seed)."""
  out = str(tmp_path / "again")
  assert synthesize.make_corpus(out, seed=SEED, **TINY) == corpus[1]
  assert file_hashes(out) == file_hashes(corpus[0])


def test_resume_renders_only_missing_files(corpus, tmp_path, rendered):
  out = copy_corpus(corpus, tmp_path)
  before = flac_mtimes(out)
  missing = ["audio/test/test-000001.flac", "audio/train/train-000003.flac"]
  for rel in missing:
    os.remove(os.path.join(out, rel))
  assert synthesize.make_corpus(out, seed=SEED, **TINY) == corpus[1]
  assert sorted(rendered) == ["test-000001", "train-000003"]
  after = flac_mtimes(out)
  assert {p: t for p, t in after.items() if p not in missing} == {p: t for p, t in before.items() if p not in missing}
  assert file_hashes(out) == file_hashes(corpus[0])


def test_other_seed_rerenders_changed_entries(corpus, other_corpus, tmp_path, rendered):
  out = copy_corpus(corpus, tmp_path)
  old = read_plan(out)
  assert synthesize.make_corpus(out, seed=OTHER_SEED, **TINY) == other_corpus[1]
  new = read_plan(out)
  assert sorted(rendered) == sorted(i for i, e in new.items() if old.get(i) != e)
  hashes, fresh_hashes = file_hashes(out), file_hashes(other_corpus[0])
  assert {p: h for p, h in hashes.items() if p in fresh_hashes} == fresh_hashes
  # Left over: the old plan's files beyond the new one's (in no manifest).
  assert {os.path.basename(p)[:-5] for p in hashes.keys() - fresh_hashes.keys()} == old.keys() - new.keys()


def test_failed_utterance_is_skipped_then_retried(corpus, texts, tmp_path, monkeypatch, rendered):
  utts = {u.id: u for u in tiny_plan(texts)}
  out = str(tmp_path / "out")
  with monkeypatch.context() as patch:
    fail_on(patch, utts["test-000002"].text)
    summary = synthesize.make_corpus(out, seed=SEED, **TINY)
  assert list(summary["failed"]) == ["test-000002"] and "false" in summary["failed"]["test-000002"]
  test = read_manifest(os.path.join(out, "test.tsv"))
  assert "audio/test/test-000002.flac" not in test.paths
  assert utts["test-000002"].text not in test.labels["wrd"]
  assert len(test) == corpus[1]["splits"]["test"]["utterances"] - 1
  rendered.clear()
  assert synthesize.make_corpus(out, seed=SEED, **TINY) == corpus[1]
  assert rendered == ["test-000002"]
  assert file_hashes(out) == file_hashes(corpus[0])


def test_failed_rerender_does_not_keep_stale_audio(corpus, other_corpus, texts, tmp_path, monkeypatch):
  """A changed entry whose render fails loses its old file, so the next run renders it anew."""
  out = copy_corpus(corpus, tmp_path)
  utt = next(u for u in tiny_plan(texts, seed=OTHER_SEED) if u.split == "train")
  with monkeypatch.context() as patch:
    fail_on(patch, utt.text)
    assert list(synthesize.make_corpus(out, seed=OTHER_SEED, **TINY)["failed"]) == [utt.id]
  assert not os.path.exists(os.path.join(out, utt.path))
  assert synthesize.make_corpus(out, seed=OTHER_SEED, **TINY) == other_corpus[1]
  assert file_hashes(out)[utt.path] == file_hashes(other_corpus[0])[utt.path]


def test_render_with_temp_dir_on_another_file_system(texts, tmp_path, monkeypatch):
  if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
    pytest.skip("needs /dev/shm on a file system other than the test's temporary directory")
  monkeypatch.setattr(tempfile, "tempdir", tempfile.mkdtemp(dir="/dev/shm"))
  utt = tiny_plan(texts)[0]
  frames = synthesize.render(utt, str(tmp_path))
  assert sf.info(str(tmp_path / utt.path)).frames == frames > 16000
  shutil.rmtree(tempfile.tempdir)


# -- the command line -----------------------------------------------------------------------------

def test_cli_make_corpus(tmp_path):
  with open(os.path.join(ROOT, "w2v2_jax", "cli.py"), encoding="utf-8") as f:
    assert 'if __name__ == "__main__":\n  main()' in f.read()
  cmd = [sys.executable, "-m", "w2v2_jax.cli", "make-corpus", "--out", str(tmp_path / "c"), "--hours", "0.01",
         "--eval-minutes", "0.2", "--labeled-minutes", "0.2", "--seed", str(SEED), "--workers", "2"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr
  # By default every engine speaks, as in make_corpus (and `make demo`); SEED's plan has them all.
  assert {e["engine"] for e in read_plan(str(tmp_path / "c")).values()} == set(ENGINES)
  lines = proc.stdout.splitlines()
  assert [line.split(":")[0].strip() for line in lines[:4]] == list(MANIFESTS)
  assert "utterances" in lines[0] and "voices" in lines[0] and lines[-1] == f"wrote {tmp_path / 'c'}"
  assert "synthesising [" in proc.stderr
  test = read_manifest(str(tmp_path / "c" / "test.tsv"))
  assert f"test: {len(test):6d} utterances" in proc.stdout

  proc = subprocess.run(cmd[:-2] + ["--engines", "espeak-ng,nosuch"], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, check=False)
  assert proc.returncode != 0 and "nosuch" in proc.stderr and "Traceback" not in proc.stderr
