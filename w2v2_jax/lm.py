"""Word n-gram language models for CTC beam search, estimated here and written as ARPA files.

The pip `kenlm` package (the `lm` extra) can query ARPA files but cannot estimate them (KenLM's
`lmplz` is a separate C++ build), so this module estimates an interpolated Kneser-Ney model (Chen &
Goodman, 1998; one absolute discount per order) from normalised sentences, in pure Python. It suits
corpora up to tens of millions of words (the demo's King James Bible: 0.8M words, 4-gram, seconds);
for LibriSpeech's 800M-word LM corpus use the official ARPA models or `lmplz`.

  sentences -> count(order) -> Counts -> estimate -> NgramModel -> write_arpa(path)

Model (order N, history h = h_1..h_{n-1}, its suffix h' = h_2..h_{n-1}):

  P(w | h) = max(c(h w) - D_n, 0) / c(h .)  +  gamma(h) P(w | h'),   gamma(h) = D_n N1+(h .) / c(h .)

c is the raw count at the highest order and for n-grams that start with <s>; at lower orders it is the
continuation count N1+(. h w) (how many distinct words precede h w). The unigram level interpolates
with the uniform distribution over the vocabulary plus <unk>. D_n = n1 / (n1 + 2 n2) from the counts
of counts of order n. In ARPA form the stored probability of a seen n-gram is the interpolated
P(w | h) and the back-off weight of h is gamma(h), so back-off reproduces the interpolated model
exactly; every conditional distribution sums to one (over the vocabulary, </s> and <unk>).
"""
from __future__ import annotations

import collections
import logging
import math
import os
from collections.abc import Iterable
from typing import NamedTuple

log = logging.getLogger(__name__)

__all__ = ["BOS", "EOS", "UNK", "NgramModel", "build_arpa", "count", "estimate", "probability", "write_arpa"]

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
DEFAULT_DISCOUNT = 0.5       # used for an order whose counts of counts cannot give one
LOG10_ZERO = -99.0           # ARPA's log10 probability of <s> (never predicted)


class NgramModel(NamedTuple):
  """An estimated model. probs[n-1] maps n-gram tuples to P(w | h) (float, natural, not log);
  backoffs[n-1] maps n-grams that are histories of longer ones to gamma (absent = 1.0); vocab_size
  counts the words plus </s> and <unk> (what the unigram level spreads its uniform mass over)."""
  order: int
  probs: list[dict[tuple[str, ...], float]]
  backoffs: list[dict[tuple[str, ...], float]]
  discounts: list[float]
  vocab_size: int


def count(sentences: Iterable[str], order: int) -> list[collections.Counter]:
  """Raw n-gram counts, n = 1..order, over sentences padded with <s> ... </s>.

  Args:
    sentences: whitespace-separated words, one sentence per item (empty ones are skipped).
    order: the highest n (>= 2: KenLM loads no unigram-only model).

  Returns:
    counts[n-1]: Counter of n-gram tuples. The unigram <s> is counted once per sentence.
  """
  if order < 2:
    raise ValueError(f"order must be >= 2 (KenLM loads no unigram model), got {order}")
  counts = [collections.Counter() for _ in range(order)]
  for sentence in sentences:
    words = sentence.split()
    if not words:
      continue
    if any(w in (BOS, EOS, UNK) for w in words):
      raise ValueError(f"sentence uses a reserved token ({BOS}, {EOS}, {UNK}): {sentence[:80]!r}")
    tokens = [BOS] + words + [EOS]
    for n in range(1, order + 1):
      table = counts[n - 1]
      for i in range(len(tokens) - n + 1):
        table[tuple(tokens[i:i + n])] += 1
  return counts


def _adjusted(counts: list[collections.Counter]) -> list[collections.Counter]:
  """Kneser-Ney counts: raw at the highest order and for n-grams starting with <s>, continuation
  counts (distinct left neighbours) elsewhere."""
  order = len(counts)
  adjusted = [collections.Counter() for _ in range(order)]
  adjusted[-1] = collections.Counter(counts[-1])
  for n in range(order - 1, 0, -1):
    table = adjusted[n - 1]
    for gram in counts[n]:               # each distinct (n+1)-gram adds one left extension of gram[1:]
      table[gram[1:]] += 1
    for gram, c in counts[n - 1].items():
      if gram[0] == BOS:
        table[gram] = c
  return adjusted


def _discount(table: collections.Counter) -> float:
  counts_of_counts = collections.Counter(v for g, v in table.items() if v <= 2 and g[-1] != BOS)
  n1, n2 = counts_of_counts[1], counts_of_counts[2]
  if n1 == 0 or n2 == 0:
    return DEFAULT_DISCOUNT
  return min(max(n1 / (n1 + 2.0 * n2), 0.05), 0.95)


def estimate(counts: list[collections.Counter]) -> NgramModel:
  """Interpolated Kneser-Ney from `count`'s raw counts (see the module docstring)."""
  order = len(counts)
  adjusted = _adjusted(counts)
  discounts = [_discount(table) for table in adjusted]
  words = {g[0] for g in counts[0]} - {BOS}
  vocab_size = len(words | {EOS}) + 1                       # + <unk>

  probs: list[dict] = [dict() for _ in range(order)]
  backoffs: list[dict] = [dict() for _ in range(order)]
  # Per history: total count and number of distinct continuations, per order.
  for n in range(1, order + 1):
    table, d = adjusted[n - 1], discounts[n - 1]
    totals, types = collections.Counter(), collections.Counter()
    for gram, c in table.items():
      if gram[-1] == BOS:
        continue
      totals[gram[:-1]] += c
      types[gram[:-1]] += 1
    gammas = {h: d * types[h] / totals[h] for h in totals}
    if n == 1:
      total, gamma = totals[()], gammas[()]
      for gram, c in table.items():
        if gram == (BOS,):
          continue
        probs[0][gram] = max(c - d, 0.0) / total + gamma / vocab_size
      probs[0][(UNK,)] = gamma / vocab_size
      probs[0][(BOS,)] = 0.0
      continue
    for gram, c in table.items():
      h = gram[:-1]
      probs[n - 1][gram] = max(c - d, 0.0) / totals[h] + gammas[h] * _backed_off(probs, backoffs, gram[1:])
    for h, g in gammas.items():
      if h not in probs[n - 2]:      # cannot happen: every history occurs, with a left neighbour or <s>
        raise AssertionError(f"history {h} of a {n}-gram has no {n - 1}-gram entry")
      backoffs[n - 2][h] = g
  return NgramModel(order, probs, backoffs, discounts, vocab_size)


def _backed_off(probs, backoffs, gram: tuple[str, ...]) -> float:
  """P(w | h) of the model built so far, backing off through shorter histories as ARPA does."""
  weight = 1.0
  while len(gram) > 1:
    p = probs[len(gram) - 1].get(gram)
    if p is not None:
      return weight * p
    weight *= backoffs[len(gram) - 2].get(gram[:-1], 1.0)
    gram = gram[1:]
  return weight * probs[0].get(gram, probs[0][(UNK,)])


def probability(model: NgramModel, history: Iterable[str], word: str) -> float:
  """P(word | history) under `model` (history truncated to order-1 words; unknown words -> <unk>)."""
  known = model.probs[0]
  h = tuple(w if (w,) in known else UNK for w in history)
  h = h[max(0, len(h) - model.order + 1):]
  w = word if (word,) in known else UNK
  return _backed_off(model.probs, model.backoffs, h + (w,))


def write_arpa(model: NgramModel, path: str) -> None:
  """Writes `model` as an ARPA text file (log10 probabilities and back-off weights)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write("\\data\\\n")
    for n, table in enumerate(model.probs, 1):
      f.write(f"ngram {n}={len(table)}\n")
    for n, table in enumerate(model.probs, 1):
      f.write(f"\n\\{n}-grams:\n")
      backoff = model.backoffs[n - 1]
      for gram in sorted(table):
        p = table[gram]
        logp = math.log10(p) if p > 0 else LOG10_ZERO
        line = f"{logp:.6f}\t{' '.join(gram)}"
        if gram in backoff:
          line += f"\t{math.log10(backoff[gram]):.6f}"
        f.write(line + "\n")
    f.write("\n\\end\\\n")
  os.replace(tmp, path)


def build_arpa(sentences: Iterable[str], path: str, order: int = 4) -> dict:
  """count -> estimate -> write_arpa; returns {"order", "sentences", "words", "ngrams", "discounts"}."""
  sentences = [s for s in sentences if s.split()]
  if not sentences:
    raise ValueError("no sentences to estimate a language model from")
  model = estimate(count(sentences, order))
  write_arpa(model, path)
  stats = {"order": order, "sentences": len(sentences), "words": sum(len(s.split()) for s in sentences),
           "ngrams": [len(t) for t in model.probs], "discounts": [round(d, 4) for d in model.discounts]}
  log.info("wrote %s: %s", path, stats)
  return stats
