"""WER / CER of a CTC model over a labeled source: the loop behind `w2v2 evaluate` and the demo's scores.

  evaluate(Recognizer.load(path), "test.tsv")     {"wer", "cer", "utterances", "skipped", ...}

The data side (references, skips, padded batches, loading ahead) is `data/labeled.py`, shared with
fine-tuning validation; transcription is `Recognizer.transcribe`; the rates are `scoring`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

from w2v2_jax import scoring
from w2v2_jax.data import augment as augment_lib
from w2v2_jax.data import labeled
from w2v2_jax.data.audio import AudioError
from w2v2_jax.recognizer import DEFAULT_BATCH_SECONDS, Recognizer

log = logging.getLogger(__name__)


def evaluate(recognizer: Recognizer, source: Any, *, label: str | None = None,
             batch_seconds: float = DEFAULT_BATCH_SECONDS, beam_width: int = 1, lm_path: str | None = None,
             alpha: float = 0.5, beta: float = 1.5, chunk_seconds: float | None = None,
             out_path: str | None = None, num_threads: int = 4, log_every: int = 50, augment: Any = None,
             augment_seed: int = 0) -> dict[str, Any]:
  """Word and character error rates of `recognizer` over every item of a labeled source.

  Args:
    source: a Source with transcripts (`ManifestSource(tsv, label="wrd"|"ltr")`; .ltr lines are turned
      into words with `text.ltr_to_words`; `TfdsSource`) or a manifest path
      (`labeled.open_labeled_source(path, label)`).
    batch_seconds, beam_width, lm_path, alpha, beta, chunk_seconds: as `Recognizer.transcribe`.
    out_path: if given, a TSV of id (the item's path), reference, hypothesis and error counts
      (`scoring.write_hypotheses`).
    num_threads: audio decoding threads; the next batch is decoded while the model runs.
    augment: score under a perturbed condition: an `augment.AugmentConfig`, a mapping of its fields or
      the name of one of `augment.CONDITIONS` (e.g. "telephone"); each utterance is perturbed (speed
      first, then `augment.augment`) with draws from `augment.utterance_rng(augment_seed, 0, index)`,
      so a condition is the same audio on every run and machine. None: the audio as it is.

  Items whose audio cannot be used (audio.AudioError) or whose reference is empty or has characters
  outside the vocabulary (after `Vocabulary.normalize`) are skipped, each with a warning naming it.
  References and hypotheses are compared after `Vocabulary.normalize`.

  Returns:
    dict: wer, cer (fractions; nan when no item could be evaluated), utterances (evaluated), skipped,
    skipped_reasons ({"audio:<AudioError reason>" or "text:<empty|oov|missing>": count}),
    utterances_per_second, audio_seconds, seconds (wall time), hypotheses_path (out_path or None).
  """
  if isinstance(source, (str, os.PathLike)):
    source = labeled.open_labeled_source(os.fspath(source), label)
  condition = augment_lib.condition(augment) if augment is not None else None
  vocab = recognizer.vocab
  refs = labeled.References(source, vocab)
  batches = labeled.padded_batches(source, refs.todo, recognizer._batch_samples(batch_seconds),  # pylint: disable=protected-access
                                   recognizer.bucket_samples)

  def load(index):
    try:
      item = source.load(index, sample_rate=recognizer.sample_rate, normalize=False)
    except AudioError as e:
      return e
    if condition is not None:
      item = dataclasses.replace(item, audio=augment_lib.perturb(item.audio, condition, augment_lib.utterance_rng(
          augment_seed, 0, index), recognizer.sample_rate))
    return item

  hyps: dict[int, str] = {}
  audio_samples = 0
  started = time.perf_counter()
  for step, (batch, loaded) in enumerate(labeled.load_ahead(load, batches, num_threads)):
    keep, audios = [], []
    for index, item in zip(batch, loaded):
      if isinstance(item, AudioError):
        refs.skip(index, (f"audio:{item.reason}", str(item)))
        continue
      if index not in refs.text and not refs.add(index, item.label):
        continue
      keep.append(index)
      audios.append(item.audio)
    if not keep:
      continue
    texts = recognizer.transcribe(audios, batch_seconds=batch_seconds, beam_width=beam_width,
                                  lm_path=lm_path, alpha=alpha, beta=beta, chunk_seconds=chunk_seconds)
    for index, text, audio in zip(keep, texts, audios):
      hyps[index] = vocab.normalize(text)
      audio_samples += audio.size
    if log_every and (step + 1) % log_every == 0:
      log.info("evaluated %d utterances (%d/%d batches)", len(hyps), step + 1, len(batches))
  seconds = time.perf_counter() - started
  order = sorted(hyps)
  ref_list = [refs.text[i] for i in order]
  hyp_list = [hyps[i] for i in order]
  if order:
    wer, cer = scoring.wer(ref_list, hyp_list), scoring.cer(ref_list, hyp_list)
  else:
    log.error("no utterance could be evaluated")
    wer = cer = float("nan")
  if out_path:
    scoring.write_hypotheses(out_path, [source.describe(i) for i in order], ref_list, hyp_list)
  n_skipped = sum(refs.skipped.values())
  result = {
      "wer": wer,
      "cer": cer,
      "utterances": len(order),
      "skipped": n_skipped,
      "skipped_reasons": dict(refs.skipped),
      "utterances_per_second": len(order) / seconds if seconds > 0 else float("inf"),
      "audio_seconds": audio_samples / recognizer.sample_rate,
      "seconds": seconds,
      "hypotheses_path": out_path or None,
  }
  log.info("WER %.4f CER %.4f over %d utterances (%d skipped) in %.1f s", wer, cer, len(order), n_skipped,
           seconds)
  return result
