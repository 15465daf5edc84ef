"""CTC decoding: greedy (jitted, batched), prefix beam search (numpy, optional KenLM) and word times.

Shapes: B batch, T frames, V vocabulary. `frame_padding_mask` is (B,T) bool with True at padding
frames (the model's `out["frame_padding_mask"]`), or None for no padding. Padding frames are
removed before decoding: they neither emit tokens nor separate repeats.

- `greedy` / `greedy_ids` / `greedy_text`: best path (argmax per frame), repeats collapsed, blanks
  dropped. The collapse runs in JAX with static shapes; text is made on the host.
- `beam_search`: CTC prefix beam search over labellings (sums over paths, so it can beat greedy).
  backend="numpy" is implemented here with no extra dependency; with `lm_path` it adds a word-level
  KenLM score (needs the `kenlm` package, the `lm` extra). backend="pyctcdecode" uses pyctcdecode's
  decoder instead (needs `pyctcdecode`; every release pins numpy<2, so install it with
  `pip install --no-deps pyctcdecode pygtrie`).
- `word_alignment`: (word, start s, end s) from the greedy path.
"""
from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from w2v2_jax.data.text import Vocabulary

log = logging.getLogger(__name__)

LN10 = math.log(10.0)
_LM_HINT = ("install the 'lm' extra (pip install 'w2v2_jax[lm]', which builds kenlm from source and "
            "needs a C++ compiler and cmake)")
_PYCTC_HINT = ("pyctcdecode is not installed: every release pins numpy<2, which jax needs, so install "
               "it without its pins: pip install --no-deps pyctcdecode pygtrie (plus kenlm for an LM)")


# -- greedy -----------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("blank_id",))
def greedy(logits, frame_padding_mask=None, blank_id: int = 0):
  """Best-path CTC decoding: argmax per frame, collapse repeats, drop blanks.

  Args:
    logits: (B,T,V) scores or log-probabilities (any float dtype).
    frame_padding_mask: (B,T) bool, True at padding frames, or None.
    blank_id: static, the blank's index.

  Returns:
    tokens: (B,T) int32, each row's decoded ids first, then -1.
    lengths: (B,) int32, number of decoded ids per row.
  """
  ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # (B,T)
  batch, frames = ids.shape
  if frame_padding_mask is None:
    valid = jnp.ones((batch, frames), bool)
  else:
    valid = ~jnp.asarray(frame_padding_mask).astype(bool)
  t = jnp.arange(frames, dtype=jnp.int32)
  # Id of the previous valid frame (-1 if none), so padding inside a row does not split repeats.
  last_valid = jax.lax.cummax(jnp.where(valid, t[None, :], -1), axis=1)
  prev_idx = jnp.concatenate([jnp.full((batch, 1), -1, jnp.int32), last_valid[:, :-1]], axis=1)
  prev = jnp.where(prev_idx >= 0, jnp.take_along_axis(ids, jnp.maximum(prev_idx, 0), axis=1), -1)
  keep = valid & (ids != blank_id) & (ids != prev)
  pos = jnp.cumsum(keep, axis=1, dtype=jnp.int32) - 1
  dest = jnp.where(keep, pos, frames)  # out of range: dropped by the scatter
  rows = jnp.arange(batch)[:, None]
  tokens = jnp.full((batch, frames), -1, jnp.int32).at[rows, dest].set(ids, mode="drop")
  return tokens, jnp.sum(keep, axis=1, dtype=jnp.int32)


def greedy_ids(logits, frame_padding_mask=None, blank_id: int = 0) -> list[list[int]]:
  """`greedy`, as B Python lists of token ids."""
  tokens, lengths = jax.device_get(greedy(logits, frame_padding_mask, blank_id=blank_id))
  return [row[:n].tolist() for row, n in zip(np.asarray(tokens), np.asarray(lengths))]


def greedy_text(logits, frame_padding_mask, vocab: Vocabulary) -> list[str]:
  """Greedy decoding of (B,T,V) logits to B transcripts (`vocab.decode` of the collapsed ids)."""
  return [vocab.decode(ids) for ids in greedy_ids(logits, frame_padding_mask, vocab.blank_id)]


# -- beam search ------------------------------------------------------------------------------------


def log_softmax(logits) -> np.ndarray:
  """float64 numpy log-softmax over the last axis."""
  x = np.asarray(logits, np.float64)
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class KenLMScorer:
  """Word-level KenLM shallow fusion for `prefix_beam_search`.

  A completed word adds alpha * ln P_lm(word | history) + beta (natural log, like pyctcdecode);
  the end of the utterance adds alpha * ln P_lm(</s> | history). Words are `vocab.decode` of the
  letters between delimiters, so the LM's words must be spelled like the vocabulary (LibriSpeech
  ARPA files are upper case, as is `Vocabulary.default_letters()`).
  """

  def __init__(self, lm_path: str, vocab: Vocabulary, alpha: float = 0.5, beta: float = 1.5):
    try:
      import kenlm
    except ImportError as e:
      raise ImportError(f"KenLM decoding needs the kenlm package: {_LM_HINT}") from e
    self._kenlm = kenlm
    self.model = _load_kenlm(lm_path)
    self.vocab = vocab
    self.alpha = float(alpha)
    self.beta = float(beta)
    self.delimiter_id = vocab.delimiter_id
    self._cache = {}

  def start(self):
    state = self._kenlm.State()
    self.model.BeginSentenceWrite(state)
    return state

  def score_word(self, state, word_ids: tuple[int, ...]):
    """(score added for this word, state after it); cached on (state, word)."""
    key = (state, word_ids)
    hit = self._cache.get(key)
    if hit is None:
      word = self.vocab.decode(word_ids)
      out = self._kenlm.State()
      logp10 = self.model.BaseScore(state, word, out) if word else 0.0
      hit = (self.alpha * LN10 * logp10 + (self.beta if word else 0.0), out if word else state)
      self._cache[key] = hit
    return hit

  def score_end(self, state) -> float:
    out = self._kenlm.State()
    return self.alpha * LN10 * self.model.BaseScore(state, "</s>", out)


@functools.lru_cache(maxsize=4)
def _load_kenlm(path: str):
  import kenlm
  log.info("loading KenLM %s", path)
  return kenlm.Model(path)


def prefix_beam_search(log_probs, blank_id: int = 0, beam_width: int = 32,
                       lm: KenLMScorer | None = None) -> list[tuple[tuple[int, ...], float]]:
  """CTC prefix beam search over one utterance (numpy).

  Keeps the `beam_width` best labelling prefixes, each with its probability of ending in a blank
  and in a non-blank, summed over all CTC paths. With a wide enough beam (at least the number of
  distinct prefixes) the result is the exact most probable labelling. Beam width 1 is not always
  greedy: it ranks prefixes by their summed probability, greedy by a single path; on peaked
  outputs (a trained model's) they agree.

  Args:
    log_probs: (T,V) log-probabilities (normalised per frame) of the valid frames.
    blank_id: the blank's index.
    beam_width: prefixes kept per frame.
    lm: optional `KenLMScorer`; its scores are part of the ranking and of the returned scores.

  Returns:
    up to beam_width (label ids, score) pairs, best first; score is ln P_ctc(labelling) plus the LM
    terms (with an lm).
  """
  lp = np.asarray(log_probs, np.float64)
  frames, vocab_size = lp.shape
  neg_inf = -np.inf
  prefixes: list[tuple[int, ...]] = [()]
  p_b = np.array([0.0])
  p_nb = np.array([neg_inf])
  lm_total = np.array([0.0])
  lm_state = [lm.start()] if lm else [None]
  word_start = [0]
  cols = np.arange(vocab_size)
  delim = lm.delimiter_id if lm else -1
  for t in range(frames):
    row = lp[t]
    k = len(prefixes)
    last = np.array([p[-1] if p else -1 for p in prefixes])
    p_tot = np.logaddexp(p_b, p_nb)
    # Same prefix: a blank, or the last label repeated.
    stay_b = p_tot + row[blank_id]
    stay_nb = np.where(last >= 0, p_nb + row[np.maximum(last, 0)], neg_inf)
    # New label c: after a blank only, if c repeats the last label.
    ext = np.where(cols[None, :] == last[:, None], p_b[:, None], p_tot[:, None]) + row[None, :]
    ext[:, blank_id] = neg_inf
    # A prefix already in the beam also receives its parent's extension.
    index = {p: i for i, p in enumerate(prefixes)}
    for i, p in enumerate(prefixes):
      if p:
        j = index.get(p[:-1])
        if j is not None and np.isfinite(ext[j, p[-1]]):
          stay_nb[i] = np.logaddexp(stay_nb[i], ext[j, p[-1]])
          ext[j, p[-1]] = neg_inf
    bonus = np.zeros(k)
    new_state = list(lm_state)
    if lm:
      for i, p in enumerate(prefixes):
        word = p[word_start[i]:]
        if word:
          bonus[i], new_state[i] = lm.score_word(lm_state[i], word)
    rank_ext = ext + lm_total[:, None]
    if lm:
      rank_ext[:, delim] += bonus
    rank = np.concatenate([np.logaddexp(stay_b, stay_nb) + lm_total, rank_ext.reshape(-1)])
    order = np.argsort(-rank, kind="stable")[:beam_width]
    order = order[np.isfinite(rank[order])]
    nxt, nb, nnb, nlm, nstate, nstart = [], [], [], [], [], []
    for o in order.tolist():
      if o < k:
        nxt.append(prefixes[o])
        nb.append(stay_b[o])
        nnb.append(stay_nb[o])
        nlm.append(lm_total[o])
        nstate.append(lm_state[o])
        nstart.append(word_start[o])
      else:
        j, c = divmod(o - k, vocab_size)
        p = prefixes[j] + (c,)
        nxt.append(p)
        nb.append(neg_inf)
        nnb.append(ext[j, c])
        if c == delim:
          nlm.append(lm_total[j] + bonus[j])
          nstate.append(new_state[j])
          nstart.append(len(p))
        else:
          nlm.append(lm_total[j])
          nstate.append(lm_state[j])
          nstart.append(word_start[j])
    prefixes, p_b, p_nb = nxt, np.array(nb), np.array(nnb)
    lm_total, lm_state, word_start = np.array(nlm), nstate, nstart
  final = np.logaddexp(p_b, p_nb) + lm_total
  if lm:
    for i, p in enumerate(prefixes):
      state = lm_state[i]
      word = p[word_start[i]:]
      if word:
        b, state = lm.score_word(state, word)
        final[i] += b
      final[i] += lm.score_end(state)
  order = np.argsort(-final, kind="stable")
  return [(prefixes[i], float(final[i])) for i in order]


def _pyctcdecode_decoder(vocab: Vocabulary, lm_path: str | None, alpha: float, beta: float):
  """pyctcdecode's decoder (cached), after checking that its packages import."""
  try:
    import pyctcdecode  # noqa: F401
  except ImportError as e:
    raise ImportError(_PYCTC_HINT) from e
  if lm_path is not None:
    try:
      import kenlm  # noqa: F401
    except ImportError as e:
      raise ImportError(f"LM decoding needs the kenlm package: {_LM_HINT}") from e
  return _build_pyctcdecode(vocab, lm_path, alpha, beta)


@functools.lru_cache(maxsize=4)
def _build_pyctcdecode(vocab: Vocabulary, lm_path: str | None, alpha: float, beta: float):
  import pyctcdecode
  labels = [_pyctc_label(vocab, i) for i in _pyctc_columns(vocab)]
  return pyctcdecode.build_ctcdecoder(labels, kenlm_model_path=lm_path, alpha=alpha, beta=beta)


def _pyctc_columns(vocab: Vocabulary) -> list[int]:
  """Vocabulary ids given to pyctcdecode: the blank, the delimiter and the letters (special symbols,
  unk included, are left out, as `Vocabulary.decode` drops them)."""
  keep = vocab.text_mask
  keep[[vocab.blank_id, vocab.delimiter_id]] = True
  return np.flatnonzero(keep).tolist()


def _pyctc_label(vocab: Vocabulary, i: int) -> str:
  if i == vocab.blank_id:
    return ""
  if i == vocab.delimiter_id:
    return " "
  return vocab.symbols[i]


def beam_search(logits, vocab: Vocabulary, frame_padding_mask=None, *, beam_width: int = 32,
                lm_path: str | None = None, alpha: float = 0.5, beta: float = 1.5,
                backend: str = "numpy") -> list[str]:
  """CTC beam search, optionally with a KenLM n-gram (ARPA or binary) language model.

  Args:
    logits: (B,T,V) or (T,V) scores (numpy or JAX); log-softmax is applied here.
    vocab: the model's vocabulary (V symbols).
    frame_padding_mask: (B,T) bool, True at padding frames, or None.
    beam_width: prefixes kept per frame.
    lm_path: KenLM model; None decodes without an LM.
    alpha: LM weight (on natural-log probabilities); beta: bonus per word. Tune both on dev data.
    backend: "numpy" (`prefix_beam_search`; an LM needs kenlm) or "pyctcdecode" (its decoder; only
      the blank, delimiter and letter columns are passed, after the log-softmax over all V).

  Returns:
    B transcripts (one string for (T,V) input), words separated by single spaces.

  Raises:
    ImportError naming the `lm` extra if kenlm (or, for that backend, pyctcdecode) is missing.
  """
  logits = np.asarray(jax.device_get(logits))
  single = logits.ndim == 2
  if single:
    logits = logits[None]
  if logits.shape[-1] != vocab.size:
    raise ValueError(f"logits have {logits.shape[-1]} classes, the vocabulary {vocab.size}")
  if frame_padding_mask is None:
    valid = np.ones(logits.shape[:2], bool)
  else:
    valid = ~np.asarray(jax.device_get(frame_padding_mask)).astype(bool)
  log_probs = log_softmax(logits)
  if backend == "numpy":
    lm = KenLMScorer(lm_path, vocab, alpha, beta) if lm_path is not None else None
    out = []
    for b in range(log_probs.shape[0]):
      hyps = prefix_beam_search(log_probs[b][valid[b]], vocab.blank_id, beam_width, lm=lm)
      out.append(vocab.decode(hyps[0][0]) if hyps else "")
  elif backend == "pyctcdecode":
    decoder = _pyctcdecode_decoder(vocab, lm_path, float(alpha), float(beta))
    cols = _pyctc_columns(vocab)
    out = []
    for b in range(log_probs.shape[0]):
      lp = log_probs[b][valid[b]][:, cols].astype(np.float32)
      out.append(" ".join(decoder.decode(lp, beam_width=beam_width).split()) if lp.shape[0] else "")
  else:
    raise ValueError(f"backend must be 'numpy' or 'pyctcdecode', got {backend!r}")
  return out[0] if single else out


# -- word times -------------------------------------------------------------------------------------


def word_alignment(logits, frame_padding_mask, vocab: Vocabulary,
                   frame_seconds: float = 0.02) -> list[list[tuple[str, float, float]]]:
  """Word start/end times from the greedy CTC path.

  A word spans from the first frame of its first letter to the last frame of its last letter
  (a letter's frames: its run of repeated argmax ids); end times are exclusive, (last + 1) *
  frame_seconds, as HF's `output_word_offsets`. Words are `vocab.decode` of their letters; the
  blank and special symbols belong to no word; the delimiter ends a word.

  Args:
    logits: (B,T,V). frame_padding_mask: (B,T) bool, True at padding, or None.
    frame_seconds: seconds per frame (wav2vec 2.0: 320 samples at 16 kHz = 0.02).

  Returns:
    B lists of (word, start_s, end_s).
  """
  ids = np.asarray(jax.device_get(jnp.argmax(jnp.asarray(logits), axis=-1)))
  if frame_padding_mask is None:
    valid = np.ones(ids.shape, bool)
  else:
    valid = ~np.asarray(jax.device_get(frame_padding_mask)).astype(bool)
  text = vocab.text_mask
  delim = vocab.delimiter_id
  out = []
  for row, ok in zip(ids, valid):
    frames = np.flatnonzero(ok)
    path = row[frames]
    words = []
    if path.size:
      starts = np.concatenate([[0], np.flatnonzero(path[1:] != path[:-1]) + 1])
      ends = np.concatenate([starts[1:], [path.size]]) - 1  # inclusive
      cur, first, last = [], 0, 0
      for s, e in zip(starts.tolist(), ends.tolist()):
        token = int(path[s])
        if token == delim:
          if cur:
            words.append((vocab.decode(cur), first, last))
          cur = []
        elif text[token]:
          if not cur:
            first = int(frames[s])
          cur.append(token)
          last = int(frames[e])
      if cur:
        words.append((vocab.decode(cur), first, last))
    out.append([(w, a * frame_seconds, (b + 1) * frame_seconds) for w, a, b in words])
  return out


def decode_batch(logits, frame_padding_mask, vocab: Vocabulary, *, beam_width: int = 1,
                 **beam_kwargs) -> list[str]:
  """Greedy for beam_width 1 (jitted), else `beam_search(..., beam_width, **beam_kwargs)`."""
  if beam_width <= 1 and beam_kwargs.get("lm_path") is None:
    return greedy_text(logits, frame_padding_mask, vocab)
  return beam_search(logits, vocab, frame_padding_mask, beam_width=beam_width, **beam_kwargs)


__all__ = ["greedy", "greedy_ids", "greedy_text", "prefix_beam_search", "beam_search",
           "KenLMScorer", "word_alignment", "decode_batch", "log_softmax"]
