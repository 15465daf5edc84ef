"""Public-domain sentences normalised to the letter vocabulary (A-Z, apostrophe, space).

The default text is the King James Bible from Debian's `bible-kjv` package (`bible` command): its
31,102 verses are cut at sentence and clause punctuation into utterance-sized pieces.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence

_CLAUSE_END = re.compile(r"(?<=[.;:?!])\s+")
_COMMA = re.compile(r"(?<=,)\s+")
_NON_LETTER = re.compile(r"[^A-Z' ]+")
_VERSE_REF = re.compile(r"^\S+\d+:\d+\s+")


class TextUnavailable(RuntimeError):
  """The default sentence source (Debian's bible-kjv) is not installed."""


def normalize(text: str) -> str:
  """Upper case; '-' -> space; anything but A-Z, apostrophe and space dropped; apostrophes kept only
  inside words ("LORD'S" stays, quotes go); whitespace runs -> one space."""
  text = text.upper().replace("-", " ").replace("\u2019", "'")
  text = _NON_LETTER.sub("", text)
  words = [w.strip("'") for w in text.split()]
  return " ".join(w for w in words if w)


def split_clauses(text: str, min_words: int, max_words: int) -> list[str]:
  """Cuts raw text at . ; : ? ! (then at commas where a piece is still longer than `max_words`) and
  greedily rejoins neighbouring pieces while they fit; returns normalised pieces of
  min_words..max_words words (pieces that cannot be brought into range are dropped)."""
  pieces = []
  for sentence in _CLAUSE_END.split(text):
    words = normalize(sentence).split()
    if len(words) > max_words:
      pieces.extend(normalize(part).split() for part in _COMMA.split(sentence))
    else:
      pieces.append(words)
  out, current = [], []
  for words in pieces:
    if not words:
      continue
    if current and len(current) + len(words) > max_words:
      out.append(current)
      current = []
    current = current + words
  if current:
    out.append(current)
  return [" ".join(w) for w in out if min_words <= len(w) <= max_words]


def bible_verses() -> list[str]:
  """All 31,102 verses of the King James Bible (text only), from Debian's `bible` command."""
  exe = shutil.which("bible")
  if exe is None:
    raise TextUnavailable(
        "the `bible` command (Debian package bible-kjv) is not installed; run `make corpus-deps` "
        "(apt-get install bible-kjv) or pass your own text with --text FILE")
  out = subprocess.run([exe, "-f", "-l", "100000", "Gen1:1-Rev22:21"], check=True, capture_output=True,
                       text=True).stdout
  verses = [_VERSE_REF.sub("", line).strip() for line in out.splitlines()]
  return [v for v in verses if v]


def read_text(path: str) -> list[str]:
  """One paragraph per non-empty line of a UTF-8 text file."""
  with open(path, encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()]


def sentences(paragraphs: Iterable[str], min_words: int = 3, max_words: int = 12) -> list[str]:
  """Normalised, de-duplicated clauses in first-seen order."""
  seen, out = set(), []
  for paragraph in paragraphs:
    for clause in split_clauses(paragraph, min_words, max_words):
      if clause not in seen:
        seen.add(clause)
        out.append(clause)
  return out


def letters_line(words: str) -> str:
  """fairseq .ltr form: "IN THE" -> "I N | T H E |"."""
  return " ".join(" ".join(w) + " |" for w in words.split())


def check_vocabulary(texts: Sequence[str]) -> None:
  bad = sorted({c for t in texts for c in t if not ("A" <= c <= "Z" or c in "' ")})
  if bad:
    raise ValueError(f"normalised text has characters outside A-Z, apostrophe and space: {bad}")
