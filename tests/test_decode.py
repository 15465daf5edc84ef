"""Tests for w2v2_jax.decode (greedy, beam search, LM, word times) and w2v2_jax.scoring (WER / CER)."""
import itertools
import math
import sys

import numpy as np
import pytest

from w2v2_jax import decode, scoring
from w2v2_jax.data.text import Vocabulary

VOCAB = Vocabulary.default_letters()

# A hand-written bigram ARPA model: "CAT" is likely, "CAD" is not.
TINY_ARPA = """\\data\\
ngram 1=5
ngram 2=2

\\1-grams:
-1.0\t</s>
-99\t<s>\t-0.5
-2.0\t<unk>
-0.3\tCAT\t-0.2
-3.0\tCAD\t-0.2

\\2-grams:
-0.2\t<s> CAT
-0.1\tCAT </s>

\\end\\
"""


def ctc_collapse(path, blank):
  """Reference: collapse repeats, then drop blanks."""
  out, prev = [], None
  for i in path:
    if i != prev and i != blank:
      out.append(int(i))
    prev = i
  return out


def random_logits(seed, batch=4, frames=40, vocab=VOCAB.size, scale=3.0, no_specials=True):
  """Random (B,T,V) logits with many blanks and repeats; ids 1..3 (<s>, </s>, <unk>) never win
  if no_specials (HF's decode would print them), and a suffix padding mask."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(batch, frames, vocab)) * scale
  logits[..., 0] += 2.0 * scale  # blanks win often
  if no_specials:
    logits[..., 1:4] -= 100.0
  # Hold some frames' argmax for a few frames (repeats).
  hold = rng.random((batch, frames)) < 0.3
  for b, t in zip(*np.nonzero(hold)):
    if t:
      logits[b, t] = logits[b, t - 1]
  lengths = rng.integers(1, frames + 1, batch)
  lengths[0] = frames
  padding = np.arange(frames)[None, :] >= lengths[:, None]
  return logits.astype(np.float32), padding


def peaked_log_probs(seed, frames, vocab, scale=12.0):
  rng = np.random.default_rng(seed)
  return decode.log_softmax(rng.normal(size=(frames, vocab)) * scale)


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
  transformers = pytest.importorskip("transformers")
  path = VOCAB.to_hf_vocab(str(tmp_path_factory.mktemp("hf")))
  return transformers.Wav2Vec2CTCTokenizer(path)


@pytest.fixture(scope="module")
def arpa(tmp_path_factory):
  path = tmp_path_factory.mktemp("lm") / "tiny.arpa"
  path.write_text(TINY_ARPA)
  return str(path)


# -- greedy ----------------------------------------------------------------------------------------


def test_greedy_matches_numpy_reference():
  for seed in range(3):
    logits, padding = random_logits(seed, no_specials=False)
    padding[1, 5:9] = True  # padding inside a row: removed, does not separate repeats
    tokens, lengths = decode.greedy(logits, padding, blank_id=0)
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    assert tokens.shape == padding.shape and tokens.dtype == np.int32
    for b in range(logits.shape[0]):
      ref = ctc_collapse(np.argmax(logits[b], -1)[~padding[b]], 0)
      assert lengths[b] == len(ref)
      assert tokens[b, :lengths[b]].tolist() == ref
      assert (tokens[b, lengths[b]:] == -1).all()
  # No mask: every frame counts; another blank id.
  tokens, lengths = decode.greedy(logits, None, blank_id=4)
  ref = ctc_collapse(np.argmax(logits[2], -1), 4)
  assert np.asarray(tokens)[2, :int(lengths[2])].tolist() == ref


def test_greedy_text_matches_hf_batch_decode(hf_tokenizer):
  for seed in range(3):
    logits, padding = random_logits(seed)
    texts = decode.greedy_text(logits, padding, VOCAB)
    argmax = [np.argmax(logits[b], -1)[~padding[b]].tolist() for b in range(len(logits))]
    hf = hf_tokenizer.batch_decode(argmax, clean_up_tokenization_spaces=False)
    assert texts == [" ".join(h.split()) for h in hf]
    # Our decode of the collapsed ids == HF's decode of them without its own grouping.
    for ids, t in zip(decode.greedy_ids(logits, padding, VOCAB.blank_id), texts):
      assert " ".join(hf_tokenizer.decode(ids, group_tokens=False).split()) == t


def test_word_alignment_matches_hf_offsets(hf_tokenizer):
  logits, padding = random_logits(5, frames=60)
  words = decode.word_alignment(logits, padding, VOCAB, frame_seconds=0.02)
  for b in range(len(logits)):
    argmax = np.argmax(logits[b], -1)[~padding[b]].tolist()
    hf = hf_tokenizer.decode(argmax, output_word_offsets=True).word_offsets
    expected = [(w["word"], w["start_offset"] * 0.02, w["end_offset"] * 0.02) for w in hf]
    assert [w for w, _, _ in words[b]] == [w for w, _, _ in expected]
    np.testing.assert_allclose([t for _, s, e in words[b] for t in (s, e)],
                               [t for _, s, e in expected for t in (s, e)])
  # A hand-made path: blank H H blank I | | blank O K blank.
  path = [0, 11, 11, 0, 10, 4, 4, 0, 8, 26, 0]
  logits = np.eye(VOCAB.size, dtype=np.float32)[path][None]
  assert decode.word_alignment(logits, None, VOCAB) == [[("HI", 0.02, 0.1), ("OK", 0.16, 0.2)]]


# -- beam search -----------------------------------------------------------------------------------


def brute_force(log_probs, blank):
  """ln P(labelling) for every labelling, summing the probabilities of all V**T paths."""
  frames, vocab = log_probs.shape
  totals = {}
  for path in itertools.product(range(vocab), repeat=frames):
    lab = tuple(ctc_collapse(path, blank))
    p = math.exp(sum(log_probs[t, c] for t, c in enumerate(path)))
    totals[lab] = totals.get(lab, 0.0) + p
  return {k: math.log(v) for k, v in totals.items()}


def test_beam_width_one_equals_greedy_on_peaked_outputs():
  for seed in range(20):
    lp = peaked_log_probs(seed, 30, 6)
    (ids, _), = decode.prefix_beam_search(lp, blank_id=0, beam_width=1)[:1]
    assert list(ids) == ctc_collapse(np.argmax(lp, -1), 0)


def test_beam_beats_greedy_when_paths_add_up():
  # Two frames, P(A) = 0.4, P(blank) = 0.6 each: the best path is "blank blank" (0.36) -> "",
  # but "A" has paths AA, A-, -A: 0.16 + 0.24 + 0.24 = 0.64.
  lp = np.log(np.array([[0.6, 0.4], [0.6, 0.4]]))
  assert ctc_collapse(np.argmax(lp, -1), 0) == []
  best, score = decode.prefix_beam_search(lp, blank_id=0, beam_width=4)[0]
  assert best == (1,) and score == pytest.approx(math.log(0.64))


@pytest.mark.parametrize("seed", range(4))
def test_beam_equals_brute_force(seed):
  rng = np.random.default_rng(seed)
  frames, vocab = int(rng.integers(2, 6)), int(rng.integers(2, 4))
  lp = decode.log_softmax(rng.normal(size=(frames, vocab)))
  blank = int(rng.integers(0, vocab))
  exact = brute_force(lp, blank)
  hyps = decode.prefix_beam_search(lp, blank_id=blank, beam_width=len(exact) + 5)
  assert len(hyps) == len(exact)
  for ids, score in hyps:
    assert score == pytest.approx(exact[ids], abs=1e-9)
  assert hyps[0][0] == max(exact, key=exact.get)
  assert math.isclose(sum(math.exp(s) for _, s in hyps), 1.0, rel_tol=1e-9)


def test_beam_search_batch_with_padding():
  logits, padding = random_logits(7, batch=3, frames=25, scale=6.0)
  texts = decode.beam_search(logits, VOCAB, padding, beam_width=8)
  lp = decode.log_softmax(logits)
  for b in range(3):
    ids = decode.prefix_beam_search(lp[b][~padding[b]], 0, 8)[0][0]
    assert texts[b] == VOCAB.decode(ids)
  # (T,V) input gives one string; on peaked outputs beam 1 is greedy.
  peaked = logits * 10
  assert decode.beam_search(peaked[0], VOCAB, beam_width=1) == decode.greedy_text(peaked[:1], None, VOCAB)[0]
  with pytest.raises(ValueError, match="classes"):
    decode.beam_search(logits[..., :5], VOCAB)


def lm_case():
  """Log-probs where the acoustics slightly prefer CAD (D 0.5 vs T 0.4) to CAT."""
  spec = [{"C": .9, "<pad>": .1}, {"<pad>": .9, "C": .1}, {"A": .9, "<pad>": .1}, {"<pad>": .9, "A": .1},
          {"D": .5, "T": .4, "<pad>": .1}, {"<pad>": .9, "D": .05, "T": .05}, {"|": .9, "<pad>": .1}]
  lp = np.full((len(spec), VOCAB.size), -30.0)
  for t, probs in enumerate(spec):
    for sym, p in probs.items():
      lp[t, VOCAB.id_of(sym)] = math.log(p)
  return lp


def test_kenlm_changes_the_choice(arpa):
  pytest.importorskip("kenlm")
  lp = lm_case()
  assert decode.beam_search(lp, VOCAB, beam_width=8) == "CAD"
  assert decode.beam_search(lp, VOCAB, beam_width=8, lm_path=arpa, alpha=1.0, beta=0.0) == "CAT"
  assert decode.beam_search(lp, VOCAB, beam_width=8, lm_path=arpa, alpha=0.01, beta=0.0) == "CAD"
  # The score is ln P_ctc + alpha ln P_lm + beta per word.
  scorer = decode.KenLMScorer(arpa, VOCAB, alpha=0.5, beta=2.0)
  hyps = dict(decode.prefix_beam_search(lp, 0, 16, lm=scorer))
  ctc = dict(decode.prefix_beam_search(lp, 0, 16))
  cat = tuple(VOCAB.encode("CAT"))
  lm_cat = (-0.2 - 0.1) * math.log(10)  # <s> CAT, CAT </s>
  assert hyps[cat] == pytest.approx(ctc[cat] + 0.5 * lm_cat + 2.0)


def test_pyctcdecode_backend(arpa):
  pytest.importorskip("pyctcdecode")
  pytest.importorskip("kenlm")
  lp = lm_case()
  assert decode.beam_search(lp, VOCAB, beam_width=8, backend="pyctcdecode") == "CAD"
  assert decode.beam_search(lp, VOCAB, beam_width=8, backend="pyctcdecode", lm_path=arpa,
                            alpha=1.0, beta=0.0) == "CAT"
  logits, padding = random_logits(3, batch=2, frames=30, scale=30.0)
  assert (decode.beam_search(logits, VOCAB, padding, beam_width=4, backend="pyctcdecode")
          == decode.greedy_text(logits, padding, VOCAB))


def test_missing_lm_packages_raise_import_error(monkeypatch, arpa):
  monkeypatch.setitem(sys.modules, "kenlm", None)
  with pytest.raises(ImportError, match="'lm' extra"):
    decode.beam_search(lm_case(), VOCAB, lm_path=arpa)
  monkeypatch.setitem(sys.modules, "pyctcdecode", None)
  with pytest.raises(ImportError, match="pyctcdecode"):
    decode.beam_search(lm_case(), VOCAB, backend="pyctcdecode")


# -- scoring ---------------------------------------------------------------------------------------


def test_wer_cer_hand_computed():
  refs = ["THE CAT SAT", "ON THE MAT", "HELLO"]
  hyps = ["THE CAT SAT", "ON A MAT TODAY", ""]
  # Utterance 2: 1 substitution + 1 insertion; utterance 3: 1 deletion. 3 edits / 7 words.
  assert scoring.wer(refs, hyps) == pytest.approx(3 / 7)
  assert scoring.utterance_errors(refs, hyps) == ([0, 2, 1], [3, 3, 1])
  # Characters (spaces count): "ON THE MAT" -> "ON A MAT TODAY": THE -> A is 2 deletions + 1
  # substitution, then " TODAY" 6 insertions = 9; "HELLO" -> "" 5 deletions. 14 / (11 + 10 + 5).
  assert scoring.utterance_errors(refs, hyps, "char") == ([0, 9, 5], [11, 10, 5])
  assert scoring.cer(refs, hyps) == pytest.approx(14 / 26)
  assert scoring.wer(["A  B "], [" A B"]) == 0.0  # whitespace runs do not count
  assert scoring.wer(["", "A"], ["X", "A"]) == 1.0  # empty reference: an insertion
  assert scoring.wer([""], [""]) == 0.0 and scoring.wer([""], ["A"]) == float("inf")
  assert scoring.wer([], []) == 0.0
  with pytest.raises(ValueError, match="hypotheses"):
    scoring.wer(["A"], [])


def test_write_hypotheses(tmp_path):
  path = tmp_path / "out" / "hyp.tsv"
  summary = scoring.write_hypotheses(str(path), ["u1", "u2"], ["THE CAT", "A\tB"], ["THE BAT", "A B"])
  lines = path.read_text().splitlines()
  assert lines[0].split("\t") == list(scoring.HYPOTHESES_HEADER)
  assert lines[1].split("\t") == ["u1", "THE CAT", "THE BAT", "1", "2", "1", "7"]
  assert lines[2].split("\t") == ["u2", "A B", "A B", "0", "2", "0", "3"]
  assert summary["wer"] == pytest.approx(1 / 4) and summary["ref_words"] == 4
  assert summary["cer"] == pytest.approx(1 / 10) and summary["utterances"] == 2
