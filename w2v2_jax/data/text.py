"""Letter vocabulary for CTC fine-tuning: transcripts <-> label ids (numpy only, no JAX).

Conventions (checked against fairseq and Hugging Face):

- fairseq: `Dictionary()` starts with bos "<s>" = 0, pad "<pad>" = 1, eos "</s>" = 2, unk "<unk>" = 3,
  then the symbols of `dict.ltr.txt` ("SYMBOL COUNT" lines) in file order from id 4. The CTC blank is
  id 0: `AudioFinetuningTask` sets `blank_symbol = "<s>"` and the ctc criterion takes
  `target_dictionary.index(task.blank_symbol)` (older versions: `target_dictionary.bos()`); the
  wav2letter decoders also fall back to `bos()`. Labels are the `.ltr` line split on whitespace,
  encoded without eos ("H E L L O | W O R L D |": one "|" after every word, the last included).
- Hugging Face: `vocab.json` maps symbol -> id; `Wav2Vec2CTCTokenizer` uses the pad token as the CTC
  blank and "|" as word delimiter. facebook/wav2vec2-base-960h has "<pad>" 0, "<s>" 1, "</s>" 2,
  "<unk>" 3, "|" 4, then E T A O N I H S R D L U M W C F G Y P B V K ' X J Q Z (ids 5..31): the
  fairseq ids unchanged, with the names of ids 0 and 1 swapped by HF's converter, so that the blank
  is called "<pad>". Its tokenizer does not append "|" after the last word.

Here: the blank is a symbol of the vocabulary (by default "<pad>", id 0, as in HF); a fairseq
dictionary is loaded with HF's names (id 0 "<pad>" = blank, id 1 "<s>"; ids unchanged). Symbols
written <...> or [...], and any other multi-character symbol, are "special": never produced by
`encode`, dropped by `decode`. The others are single characters (letters, apostrophe) plus the
word delimiter. By default `encode` follows fairseq and ends with "|" (`trailing_delimiter=True`);
`decode` gives words separated by single spaces either way.

Bad transcripts never raise inside `encode_batch`: each item gets an `EncodeStatus` whose `reason`
is one of `REASONS` (empty, characters outside the vocabulary, longer than `max_len`), so a caller
can skip and count them.

Length: over 400 lines because the conventions above (two file formats, blank and delimiter rules,
normalisation, per-item status) are one Vocabulary class; every part reads the same symbol table.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import unicodedata
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from w2v2_jax import storage

log = logging.getLogger(__name__)

# EncodeStatus.reason values.
OK = "ok"
EMPTY = "empty"
OOV = "oov"
TOO_LONG = "too_long"
REASONS = (OK, EMPTY, OOV, TOO_LONG)

# What to do with characters outside the vocabulary: mark the item bad ("skip"), remove them
# ("drop"), map them to the unknown symbol ("unk"), or raise TextError ("error", `encode` only).
OOV_POLICIES = ("skip", "drop", "unk", "error")

LIBRISPEECH_LETTERS = "ETAONIHSRDLUMWCFGYPBVK'XJQZ"  # fairseq's LibriSpeech dict.ltr.txt order
HF_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # fairseq Dictionary ids 0..3

# Typographic apostrophes/quotes mapped to "'" by `normalize`: ‘ ’ ʼ ′ ´ `
_APOSTROPHES = str.maketrans({c: "'" for c in "\u2018\u2019\u02bc\u2032\u00b4`"})


class TextError(ValueError):
  """A transcript that cannot be encoded; `status` says why."""

  def __init__(self, status: "EncodeStatus", text: str):
    self.status = status
    detail = f" {list(status.oov)}" if status.oov else ""
    super().__init__(f"cannot encode {text[:80]!r}: {status.reason}{detail}")


@dataclasses.dataclass(frozen=True)
class EncodeStatus:
  """Outcome of encoding one transcript.

  ok: the item can be used; reason: one of `REASONS`; length: number of label ids (also given for
  "too_long"; 0 for "empty"/"oov"); oov: the distinct characters (or .ltr tokens) outside the
  vocabulary in order of first appearance, also when they were dropped or mapped to unk;
  min_frames: the fewest CTC frames these labels need (length + repeated consecutive labels).
  """
  ok: bool
  reason: str
  length: int = 0
  oov: tuple[str, ...] = ()
  min_frames: int = 0


class LabelBatch(NamedTuple):
  """Labels for a batch of transcripts.

  labels: (B, N) int32, right-padded; padding entries hold the blank id.
  label_padding: (B, N) bool, True marks padding (as `losses.ctc` wants). Rows of bad items are
    all padding: skip them with `valid`, do not feed them to the loss as empty transcripts.
  status: B `EncodeStatus`.
  """
  labels: np.ndarray
  label_padding: np.ndarray
  status: list

  @property
  def valid(self) -> np.ndarray:
    """(B,) bool, True for items that encoded fine."""
    return np.array([s.ok for s in self.status], bool)

  def counts(self) -> dict[str, int]:
    """Number of items per reason (every reason present, zeros included)."""
    out = dict.fromkeys(REASONS, 0)
    for s in self.status:
      out[s.reason] += 1
    return out


def _is_special(symbol: str) -> bool:
  return len(symbol) > 1


def ltr_to_words(line: str) -> str:
  """fairseq .ltr line -> words: "H E L L O | W O R L D |" -> "HELLO WORLD".

  Tokens are joined; "|" tokens become spaces. A token of several characters is kept as is
  (`encode` then reports its characters as outside the vocabulary).
  """
  return " ".join("".join(" " if tok == "|" else tok for tok in line.split()).split())


def _min_ctc_frames(ids: np.ndarray) -> int:
  if ids.size == 0:
    return 0
  return int(ids.size + np.count_nonzero(ids[1:] == ids[:-1]))


@dataclasses.dataclass(frozen=True, eq=True)
class Vocabulary:
  """A CTC letter vocabulary.

  symbols: the V symbols, index = id. blank: the CTC blank's symbol. word_delimiter: the symbol
  between words ("|"). unk: the unknown symbol, or None. trailing_delimiter: `encode` ends a
  non-empty transcript with the delimiter (fairseq's .ltr convention; HF's tokenizer does not).
  counts: optional per-symbol counts (from a fairseq dict), written back by `to_fairseq_dict`.
  """
  symbols: tuple[str, ...]
  blank: str = "<pad>"
  word_delimiter: str = "|"
  unk: str | None = "<unk>"
  trailing_delimiter: bool = True
  counts: tuple[int, ...] | None = dataclasses.field(default=None, compare=False, repr=False)

  def __post_init__(self):
    symbols = tuple(self.symbols)
    object.__setattr__(self, "symbols", symbols)
    if len(set(symbols)) != len(symbols):
      dup = sorted({s for s in symbols if symbols.count(s) > 1})
      raise ValueError(f"duplicate symbols in vocabulary: {dup}")
    for name in ("blank", "word_delimiter"):
      if getattr(self, name) not in symbols:
        raise ValueError(f"{name} {getattr(self, name)!r} is not in the vocabulary")
    if self.unk is not None and self.unk not in symbols:
      raise ValueError(f"unk {self.unk!r} is not in the vocabulary (pass unk=None if it has none)")
    if self.blank == self.word_delimiter:
      raise ValueError("the blank and the word delimiter must differ")
    if any(s == "" or any(c.isspace() for c in s) for s in symbols):
      raise ValueError("symbols must be non-empty and contain no whitespace")
    index = {s: i for i, s in enumerate(symbols)}
    letters = {s: i for s, i in index.items()
               if not _is_special(s) and s not in (self.blank, self.word_delimiter)}
    odd = [s for s in symbols if _is_special(s) and s[0] + s[-1] not in ("<>", "[]")]
    if odd:
      log.warning("multi-character symbols %s are treated as special (never encoded, dropped by decode)",
                  odd[:5])
    cased = [s for s in letters if s.lower() != s.upper()]
    if cased and all(s == s.upper() for s in cased):
      case = "upper"
    elif cased and all(s == s.lower() for s in cased):
      case = "lower"
    else:
      case = None
    text = np.zeros(len(symbols), bool)
    text[list(letters.values())] = True
    object.__setattr__(self, "_index", index)
    object.__setattr__(self, "_letters", letters)
    object.__setattr__(self, "_case", case)
    object.__setattr__(self, "_is_text", text)  # (V,) letters only
    if self.counts is not None and len(self.counts) != len(symbols):
      raise ValueError(f"{len(self.counts)} counts for {len(symbols)} symbols")

  def __hash__(self):
    return hash((self.symbols, self.blank, self.word_delimiter, self.unk, self.trailing_delimiter))

  # -- constructors -------------------------------------------------------------------------------

  @classmethod
  def default_letters(cls, trailing_delimiter: bool = True) -> "Vocabulary":
    """The 32-symbol LibriSpeech letter vocabulary of wav2vec 2.0 (HF's wav2vec2-base-960h vocab.json).

    "<pad>" 0 (CTC blank), "<s>" 1, "</s>" 2, "<unk>" 3, "|" 4, E T A O N I H S R D L U M W C F G Y P
    B V K ' X J Q Z (5..31). Same ids as fairseq's dictionary built from LibriSpeech dict.ltr.txt.
    """
    return cls(HF_SPECIALS + ("|",) + tuple(LIBRISPEECH_LETTERS), trailing_delimiter=trailing_delimiter)

  @classmethod
  def from_fairseq_dict(cls, path: str, trailing_delimiter: bool = True) -> "Vocabulary":
    """Loads a fairseq `dict.ltr.txt` ("SYMBOL COUNT [#fairseq:overwrite]" per line).

    Ids are fairseq's: 4 specials, then the file's symbols in order from id 4. Id 0 (fairseq's
    "<s>", the CTC blank) is named "<pad>" and id 1 (fairseq's "<pad>") "<s>", as HF's converter
    does, so that `to_hf_vocab` gives a vocab.json whose pad token is the blank.
    """
    symbols = list(HF_SPECIALS)
    counts = [0, 0, 0, 0]
    with storage.open_file(path, "r") as f:
      for lineno, raw in enumerate(f, 1):
        line = raw.rstrip("\n").rstrip()
        if not line:
          continue
        parts = line.rsplit(" ", 1)
        overwrite = len(parts) == 2 and parts[1] == "#fairseq:overwrite"
        if overwrite:
          parts = parts[0].rsplit(" ", 1)
        if len(parts) != 2:
          raise ValueError(f"{path}:{lineno}: expected 'SYMBOL COUNT', got {line!r}")
        word, count = parts
        try:
          count = int(count)
        except ValueError:
          raise ValueError(f"{path}:{lineno}: count {count!r} is not an integer") from None
        fairseq_name = {"<s>": "<pad>", "<pad>": "<s>"}.get(word, word)  # our name of that id
        if fairseq_name in symbols:
          if not overwrite:
            raise ValueError(f"{path}:{lineno}: duplicate symbol {word!r} (fairseq needs #fairseq:overwrite)")
          counts[symbols.index(fairseq_name)] = count
          continue
        symbols.append(word)
        counts.append(count)
    return cls(tuple(symbols), trailing_delimiter=trailing_delimiter, counts=tuple(counts))

  @classmethod
  def from_hf_vocab(cls, path: str, blank: str | None = None, word_delimiter: str | None = None,
                    unk: str | None = None, trailing_delimiter: bool = True) -> "Vocabulary":
    """Loads a Hugging Face `vocab.json` (symbol -> id), or a directory holding one.

    From a directory, `tokenizer_config.json` (if present) supplies pad_token (the blank),
    word_delimiter_token and unk_token; arguments override; defaults "<pad>", "|", "<unk>" (unk
    None if the vocabulary has no such symbol). Ids must be 0..V-1.
    """
    cfg = {}
    if storage.isdir(path):
      cfg_path = storage.join(path, "tokenizer_config.json")
      if storage.exists(cfg_path):
        cfg = json.loads(storage.read_text(cfg_path))
      path = storage.join(path, "vocab.json")
    mapping = json.loads(storage.read_text(path))
    if not isinstance(mapping, dict) or not all(isinstance(v, int) for v in mapping.values()):
      raise ValueError(f"{path}: expected a flat JSON object symbol -> int id (multi-lingual vocabularies "
                       "are not supported)")
    ids = sorted(mapping.values())
    if ids != list(range(len(ids))):
      raise ValueError(f"{path}: ids must be 0..{len(ids) - 1} without gaps or repeats")
    symbols = [None] * len(ids)
    for s, i in mapping.items():
      symbols[i] = s

    def _tok(key, default):
      v = cfg.get(key, default)
      return v.get("content", default) if isinstance(v, dict) else v

    blank = blank or _tok("pad_token", "<pad>")
    word_delimiter = word_delimiter or _tok("word_delimiter_token", "|")
    if unk is None:
      unk = _tok("unk_token", "<unk>")
      unk = unk if unk in mapping else None
    return cls(tuple(symbols), blank=blank, word_delimiter=word_delimiter, unk=unk,
               trailing_delimiter=trailing_delimiter)

  def to_hf_vocab(self, path: str) -> str:
    """Writes `vocab.json` (symbol -> id) to `path` (a file, or a directory to write it in).

    HF's Wav2Vec2CTCTokenizer uses its pad_token ("<pad>" by default) as the blank: if the blank
    is called otherwise, pass pad_token=<blank> to the tokenizer. Returns the file written.
    """
    if os.path.isdir(path):
      path = os.path.join(path, "vocab.json")
    if self.blank != "<pad>":
      log.warning("blank is %r: give HF's tokenizer pad_token=%r", self.blank, self.blank)
    with open(path, "w", encoding="utf-8") as f:
      json.dump({s: i for i, s in enumerate(self.symbols)}, f, ensure_ascii=False, indent=2)
    return path

  def to_fairseq_dict(self, path: str) -> str:
    """Writes a fairseq `dict.ltr.txt`: the symbols from id 4 on, "SYMBOL COUNT" (0 if unknown).

    Requires ids 0..3 to be the blank, "<s>", "</s>", "<unk>" (fairseq's 4 specials).
    """
    if self.symbols[:4] != HF_SPECIALS or self.blank != "<pad>":
      raise ValueError(f"ids 0..3 must be {HF_SPECIALS} with the blank at 0 for a fairseq dict, "
                       f"got {self.symbols[:4]}")
    counts = self.counts or (0,) * len(self.symbols)
    with open(path, "w", encoding="utf-8") as f:
      for s, c in zip(self.symbols[4:], counts[4:]):
        f.write(f"{s} {c}\n")
    return path

  # -- ids ----------------------------------------------------------------------------------------

  def __len__(self) -> int:
    return len(self.symbols)

  @property
  def size(self) -> int:
    """V, the model's output size."""
    return len(self.symbols)

  @property
  def blank_id(self) -> int:
    return self._index[self.blank]

  @property
  def delimiter_id(self) -> int:
    return self._index[self.word_delimiter]

  @property
  def unk_id(self) -> int | None:
    return None if self.unk is None else self._index[self.unk]

  @property
  def text_mask(self) -> np.ndarray:
    """(V,) bool, True for letters (symbols that appear in decoded text; not the delimiter)."""
    return self._is_text.copy()

  def id_of(self, symbol: str) -> int:
    return self._index[symbol]

  # -- text -> ids --------------------------------------------------------------------------------

  def normalize(self, text: str) -> str:
    """Normalises a transcript; characters outside the vocabulary are kept (encode reports them).

    Unicode NFKC; typographic apostrophes (‘ ’ ʼ ′ ´ `) -> "'"; upper case if every cased letter of
    the vocabulary is upper case (lower case if all are lower); the delimiter symbol and any
    whitespace run -> one space; leading/trailing space removed. Accents are not stripped.
    """
    text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES)
    if self._case == "upper":
      text = text.upper()
    elif self._case == "lower":
      text = text.lower()
    return " ".join(text.replace(self.word_delimiter, " ").split())

  def encode_with_status(self, text: str, *, max_len: int | None = None, on_oov: str = "skip",
                         ltr: bool = False) -> tuple[np.ndarray, EncodeStatus]:
    """Encodes one transcript without raising for bad input.

    Args:
      text: plain words ("HELLO WORLD", a .wrd line) or, with ltr=True, a fairseq .ltr line
        ("H E L L O | W O R L D |"); both give the same ids.
      max_len: longer label sequences get reason "too_long" (not truncated).
      on_oov: "skip" (item not ok, reason "oov"), "drop" (remove those characters; a word left
        empty disappears), "unk" (map them to the unknown symbol).

    Returns:
      (ids (L,) int32, status). ids is empty unless status.ok (for "too_long" it holds the ids).
    """
    if on_oov not in ("skip", "drop", "unk"):
      raise ValueError(f"on_oov must be 'skip', 'drop' or 'unk', got {on_oov!r}")
    if on_oov == "unk" and self.unk is None:
      raise ValueError("on_oov='unk' needs a vocabulary with an unknown symbol")
    words = self.normalize(ltr_to_words(text) if ltr else text).split(" ")
    oov = {}
    out = []
    for word in words:
      ids = []
      for c in word:
        i = self._letters.get(c)
        if i is None:
          oov.setdefault(c, None)
          if on_oov == "unk":
            ids.append(self.unk_id)
          continue
        ids.append(i)
      if ids:
        out.extend(ids)
        out.append(self.delimiter_id)
    if out and not self.trailing_delimiter:
      out.pop()
    ids = np.asarray(out, np.int32)
    oov = tuple(oov)
    if oov and on_oov == "skip":
      return np.zeros(0, np.int32), EncodeStatus(False, OOV, 0, oov)
    if ids.size == 0:
      return ids, EncodeStatus(False, EMPTY, 0, oov)
    min_frames = _min_ctc_frames(ids)
    if max_len is not None and ids.size > max_len:
      return ids, EncodeStatus(False, TOO_LONG, int(ids.size), oov, min_frames)
    return ids, EncodeStatus(True, OK, int(ids.size), oov, min_frames)

  def encode(self, text: str, *, on_oov: str = "error", ltr: bool = False) -> np.ndarray:
    """Transcript -> (L,) int32 label ids: letters, with the delimiter after every word (or between
    words if not `trailing_delimiter`). An empty transcript gives (0,).

    on_oov: "error" raises TextError naming the characters outside the vocabulary; "drop"/"unk" as
    in `encode_with_status`. ltr=True reads a fairseq .ltr line.
    """
    policy = "skip" if on_oov == "error" else on_oov
    ids, status = self.encode_with_status(text, on_oov=policy, ltr=ltr)
    if status.reason == OOV:
      raise TextError(status, text)
    return ids

  def encode_batch(self, texts: Sequence[str], max_len: int | None = None, *, on_oov: str = "skip",
                   ltr: bool = False) -> LabelBatch:
    """Encodes B transcripts into fixed-shape labels; never raises for a bad transcript.

    Args:
      texts: B transcripts (plain words, or .ltr lines with ltr=True).
      max_len: N, the labels' width (a static shape); items with more labels are "too_long".
        None: the longest good item (at least 1).
      on_oov: "skip", "drop" or "unk" (see `encode_with_status`).

    Returns:
      LabelBatch(labels (B,N) int32, label_padding (B,N) bool, status): bad items' rows are all
      padding and their status says why (`.valid`, `.counts()` summarise).
    """
    encoded = [self.encode_with_status(t, max_len=max_len, on_oov=on_oov, ltr=ltr) for t in texts]
    if max_len is None:
      max_len = max([s.length for _, s in encoded if s.ok], default=0)
    width = max(int(max_len), 1)
    labels = np.full((len(texts), width), self.blank_id, np.int32)
    padding = np.ones((len(texts), width), bool)
    for row, (ids, status) in enumerate(encoded):
      if status.ok:
        labels[row, :ids.size] = ids
        padding[row, :ids.size] = False
      else:
        log.debug("transcript %d not usable: %s %s", row, status.reason, list(status.oov))
    return LabelBatch(labels, padding, [s for _, s in encoded])

  # -- ids -> text --------------------------------------------------------------------------------

  def decode(self, ids: Iterable[int]) -> str:
    """Collapsed label ids (no CTC repeats left) -> text.

    The delimiter separates words; the blank and special symbols are dropped, negative ids (padding)
    ignored; words are joined by single spaces without leading/trailing space. Repeated ids are
    kept ("L L" -> "LL"): collapse CTC paths first (`decode.greedy`).
    """
    ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
    ids = ids[ids >= 0].astype(np.int64)
    if ids.size and ids.max() >= len(self.symbols):
      raise ValueError(f"id {int(ids.max())} out of range for a vocabulary of {len(self.symbols)}")
    words, cur = [], []
    delim = self.delimiter_id
    for i in ids.tolist():
      if i == delim:
        if cur:
          words.append("".join(cur))
          cur = []
      elif self._is_text[i]:
        cur.append(self.symbols[i])
    if cur:
      words.append("".join(cur))
    return " ".join(words)
