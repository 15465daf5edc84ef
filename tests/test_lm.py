"""The Kneser-Ney ARPA estimator: hand-computed probabilities, normalisation, and KenLM agreement."""
import math

import pytest

from w2v2_jax import lm


def test_counts_pad_sentences_and_reject_reserved_tokens():
  counts = lm.count(["a b", "", "a c"], order=2)
  assert counts[0][("<s>",)] == 2 and counts[0][("</s>",)] == 2 and counts[0][("a",)] == 2
  assert counts[1][("<s>", "a")] == 2 and counts[1][("a", "b")] == 1 and counts[1][("c", "</s>")] == 1
  with pytest.raises(ValueError, match="reserved"):
    lm.count(["a </s> b"], order=2)
  with pytest.raises(ValueError, match="order"):
    lm.count(["a b"], order=1)


def test_hand_computed_bigram_model():
  # "<s> a b </s>", "<s> a c </s>". Unigram continuation counts: a 1, b 1, c 1, </s> 2 (total 5,
  # 4 types); counts of counts n1=3, n2=1 -> D1 = 3/5; gamma = 0.6 * 4 / 5 = 0.48 spread over
  # a, b, c, </s>, <unk> (5). Bigrams (raw): n1=4, n2=1 -> D2 = 4/6.
  model = lm.estimate(lm.count(["a b", "a c"], order=2))
  assert model.discounts == pytest.approx([0.6, 2 / 3])
  p_a = 0.4 / 5 + 0.48 / 5
  assert lm.probability(model, [], "a") == pytest.approx(p_a)
  assert lm.probability(model, [], "</s>") == pytest.approx(1.4 / 5 + 0.48 / 5)
  assert lm.probability(model, [], "zebra") == pytest.approx(0.48 / 5)          # <unk>
  # P(b | a) = (1 - 2/3) / 2 + gamma(a) P(b), gamma(a) = (2/3) * 2 / 2.
  assert lm.probability(model, ["a"], "b") == pytest.approx((1 / 3) / 2 + (2 / 3) * p_a)
  # P(a | <s>) = (2 - 2/3) / 2 + gamma(<s>) P(a), gamma(<s>) = (2/3) * 1 / 2; unseen after <s>: back off.
  assert lm.probability(model, ["<s>"], "a") == pytest.approx((4 / 3) / 2 + p_a / 3)
  assert lm.probability(model, ["<s>"], "b") == pytest.approx(p_a / 3)


SENTENCES = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog", "the cat ran",
             "on the mat the dog sat", "the the the", "and so on"]
HISTORIES = [[], ["the"], ["on", "the"], ["sat", "on", "the"], ["zebra", "the"], ["the", "cat", "sat"]]


@pytest.mark.parametrize("order", [2, 3, 4])
def test_every_conditional_distribution_sums_to_one(order):
  model = lm.estimate(lm.count(SENTENCES, order))
  vocab = sorted({w for s in SENTENCES for w in s.split()}) + ["</s>", "<unk>"]
  assert model.vocab_size == len(vocab)
  for history in HISTORIES:
    total = sum(lm.probability(model, ["<s>"] + history, w) for w in vocab)
    assert total == pytest.approx(1.0, abs=1e-9), history


@pytest.mark.parametrize("order", [2, 4])
def test_kenlm_reads_the_arpa_and_agrees(tmp_path, order):
  kenlm = pytest.importorskip("kenlm")
  model = lm.estimate(lm.count(SENTENCES, order))
  path = str(tmp_path / "lm.arpa")
  lm.write_arpa(model, path)
  ken = kenlm.Model(path)
  assert ken.order == order
  vocab = sorted({w for s in SENTENCES for w in s.split()}) + ["</s>", "zebra"]
  for history in HISTORIES:
    state = kenlm.State()
    ken.BeginSentenceWrite(state)
    for word in history:
      out = kenlm.State()
      ken.BaseScore(state, word, out)
      state = out
    for word in vocab:
      ours = math.log10(lm.probability(model, ["<s>"] + history, word))
      assert ken.BaseScore(state, word, kenlm.State()) == pytest.approx(ours, abs=2e-6), (history, word)
  # Whole sentences: KenLM's total log10 probability is the sum of ours.
  sentence = "the cat sat on the log"
  words = sentence.split() + ["</s>"]
  ours = sum(math.log10(lm.probability(model, ["<s>"] + words[:i], w)) for i, w in enumerate(words))
  assert ken.score(sentence, bos=True, eos=True) == pytest.approx(ours, abs=1e-5)


def test_build_arpa_reports_and_rejects_empty_text(tmp_path):
  path = str(tmp_path / "sub" / "lm.arpa")
  stats = lm.build_arpa(SENTENCES, path, order=3)
  assert stats["sentences"] == len(SENTENCES) and stats["words"] == sum(len(s.split()) for s in SENTENCES)
  with open(path, encoding="utf-8") as f:
    text = f.read()
  assert text.startswith("\\data\\\n") and text.rstrip().endswith("\\end\\")
  assert [int(line.split("=")[1]) for line in text.splitlines() if line.startswith("ngram ")] == stats["ngrams"]
  with pytest.raises(ValueError, match="no sentences"):
    lm.build_arpa(["", "  "], str(tmp_path / "empty.arpa"))


def test_build_lm_command(tmp_path, capsys):
  from w2v2_jax import cli
  text = tmp_path / "lm.txt"
  text.write_text("The cat sat on the mat.\nthe dog sat on the log\nA zebra grazed\n", encoding="utf-8")
  held = tmp_path / "test.wrd"
  held.write_text("A ZEBRA GRAZED\n", encoding="utf-8")
  out = tmp_path / "lm.arpa"
  cli.main(["build-lm", "--text", str(text), "--exclude", str(held), "--out", str(out), "--order", "3"])
  assert f"wrote {out}: 3-gram, 2 sentences, 12 words" in capsys.readouterr().out
  arpa = out.read_text(encoding="utf-8")
  assert "\tTHE CAT SAT" in arpa and "ZEBRA" not in arpa          # normalised; the excluded line is gone
  with pytest.raises(SystemExit, match="cannot read .*missing.txt"):
    cli.main(["build-lm", "--text", str(tmp_path / "missing.txt"), "--out", str(out)])
  with pytest.raises(SystemExit, match="no sentences.*text: "):
    cli.main(["build-lm", "--text", str(held), "--exclude", str(held), "--out", str(out)])
