"""Word and character error rates (jiwer) and a per-utterance hypotheses file.

Rates are corpus-level: total edits (substitutions + deletions + insertions, Levenshtein via jiwer)
over the total number of reference words (characters), as fairseq and the wav2vec 2.0 paper report
them, not a mean of per-utterance rates. Texts are compared as given, case-sensitive, after
collapsing whitespace runs to one space and stripping the ends; CER counts the spaces between
words as characters. Normalise transcripts first (`Vocabulary.normalize`). An empty reference has
0 words: its hypothesis' words are all insertions. With no reference unit at all the rate is 0.0
if there are no edits, else inf.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import jiwer

from w2v2_jax import storage

log = logging.getLogger(__name__)

HYPOTHESES_HEADER = ("id", "reference", "hypothesis", "word_errors", "ref_words", "char_errors",
                     "ref_chars")


def _clean(text: str) -> str:
  return " ".join(str(text).split())


def _check(refs: Sequence[str], hyps: Sequence[str]) -> tuple[list[str], list[str]]:
  if isinstance(refs, str) or isinstance(hyps, str):
    raise TypeError("refs and hyps are sequences of strings, not strings")
  if len(refs) != len(hyps):
    raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
  return [_clean(r) for r in refs], [_clean(h) for h in hyps]


def _edits(alignment) -> int:
  n = 0
  for chunk in alignment:
    if chunk.type in ("substitute", "delete"):
      n += chunk.ref_end_idx - chunk.ref_start_idx
    elif chunk.type == "insert":
      n += chunk.hyp_end_idx - chunk.hyp_start_idx
  return n


def utterance_errors(refs: Sequence[str], hyps: Sequence[str],
                     unit: str = "word") -> tuple[list[int], list[int]]:
  """Per-utterance (edit counts, reference lengths) in words (unit="word") or characters ("char")."""
  refs, hyps = _check(refs, hyps)
  if not refs:
    return [], []
  if unit == "word":
    out = jiwer.process_words(refs, hyps)
  elif unit == "char":
    out = jiwer.process_characters(refs, hyps)
  else:
    raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")
  errors = [_edits(a) for a in out.alignments]
  lengths = [len(r) for r in out.references]
  return errors, lengths


def _rate(errors: Sequence[int], lengths: Sequence[int]) -> float:
  e, n = sum(errors), sum(lengths)
  if n == 0:
    return 0.0 if e == 0 else float("inf")
  return e / n


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
  """Corpus word error rate, a fraction (0.034 = 3.4%)."""
  return _rate(*utterance_errors(refs, hyps, "word"))


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
  """Corpus character error rate (spaces between words count as characters), a fraction."""
  return _rate(*utterance_errors(refs, hyps, "char"))


def write_hypotheses(path: str, ids: Sequence[str], refs: Sequence[str], hyps: Sequence[str]) -> dict:
  """Writes a TSV, one line per utterance, and returns the corpus totals.

  Columns (`HYPOTHESES_HEADER`, first line): id, reference, hypothesis, word_errors, ref_words,
  char_errors, ref_chars. Tabs and newlines inside fields become spaces.

  Returns:
    dict: wer, cer, word_errors, ref_words, char_errors, ref_chars, utterances.
  """
  if len(ids) != len(refs):
    raise ValueError(f"{len(ids)} ids but {len(refs)} references")
  w_err, w_len = utterance_errors(refs, hyps, "word")
  c_err, c_len = utterance_errors(refs, hyps, "char")
  lines = ["\t".join(HYPOTHESES_HEADER)]
  for row in zip(ids, refs, hyps, w_err, w_len, c_err, c_len):
    lines.append("\t".join([_clean(x) for x in row[:3]] + [str(x) for x in row[3:]]))
  storage.write_text(path, "\n".join(lines) + "\n")     # a local file or an object (gs://...)
  summary = {
    "wer": _rate(w_err, w_len),
    "cer": _rate(c_err, c_len),
    "word_errors": sum(w_err),
    "ref_words": sum(w_len),
    "char_errors": sum(c_err),
    "ref_chars": sum(c_len),
    "utterances": len(refs),
  }
  log.info("wrote %d hypotheses to %s: WER %.4f CER %.4f", len(refs), path, summary["wer"], summary["cer"])
  return summary
