"""Error rates of a synthetic corpus's split per voice: which unseen speakers a model hears worst.

`w2v2 evaluate --out=HYP.tsv` (and `make demo`'s test_hypotheses.tsv) holds one line per utterance;
the corpus's plan.jsonl says which engine and voice spoke it. Joined on the utterance id (the audio
file's name without its extension).
"""
from __future__ import annotations

import collections
import csv
import os
from typing import Any, Mapping

from w2v2_jax import scoring
from w2v2_jax.corpus import synthesize


def voice_of_utterance(corpus_dir: str) -> dict[str, str]:
  """Utterance id -> "engine:voice", from CORPUS/plan.jsonl (`synthesize.read_plan`)."""
  path = os.path.join(corpus_dir, "plan.jsonl")
  out = {}
  for utt_id, entry in synthesize.read_plan(path).items():
    try:
      out[utt_id] = f"{entry['engine']}:{entry['voice']}"
    except KeyError as e:
      raise ValueError(f"{path}: entry {utt_id!r} has no {e}") from None
  return out


def error_rates(hypotheses_tsv: str, corpus_dir: str,
                voices: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
  """Per voice, worst CER first: voice ("engine:voice"), utterances, ref_chars, char_errors, cer, wer and
  share (of the split's reference characters). Every line of the TSV must belong to a planned utterance.

  voices: `voice_of_utterance(corpus_dir)`, for a caller that scores several files of one corpus (read
  once); None reads it here."""
  if voices is None:
    voices = voice_of_utterance(corpus_dir)
  totals = collections.defaultdict(collections.Counter)
  with open(hypotheses_tsv, encoding="utf-8", newline="") as f:
    rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  if not rows or tuple(rows[0]) != scoring.HYPOTHESES_HEADER:
    raise ValueError(f"{hypotheses_tsv}: not a hypotheses file (first line must be "
                     f"{' '.join(scoring.HYPOTHESES_HEADER)})")
  columns = {name: i for i, name in enumerate(scoring.HYPOTHESES_HEADER)}
  for number, row in enumerate(rows[1:], 2):
    if len(row) != len(columns):
      raise ValueError(f"{hypotheses_tsv}:{number}: {len(row)} fields, not {len(columns)}")
    utt = os.path.splitext(os.path.basename(row[columns["id"]]))[0]
    if utt not in voices:
      raise ValueError(f"{hypotheses_tsv}:{number}: utterance {utt!r} is not in {corpus_dir}/plan.jsonl")
    counts = totals[voices[utt]]
    counts["utterances"] += 1
    for key in ("char_errors", "ref_chars", "word_errors", "ref_words"):
      counts[key] += int(row[columns[key]])
  all_chars = sum(c["ref_chars"] for c in totals.values())
  out = [{"voice": voice, "utterances": c["utterances"], "ref_chars": c["ref_chars"],
          "char_errors": c["char_errors"], "cer": c["char_errors"] / max(c["ref_chars"], 1),
          "wer": c["word_errors"] / max(c["ref_words"], 1), "share": c["ref_chars"] / max(all_chars, 1)}
         for voice, c in totals.items()]
  return sorted(out, key=lambda r: (-r["cer"], r["voice"]))
