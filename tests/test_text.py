"""Tests for w2v2_jax.data.text: vocabulary formats, encode/decode, bad transcripts."""
import json
import os

import numpy as np
import pytest

from w2v2_jax.data import text
from w2v2_jax.data.text import Vocabulary

# fairseq's LibriSpeech dict.ltr.txt (counts from the 960 h training transcripts).
LIBRISPEECH_DICT = """| 94802
E 51860
T 38431
A 33152
O 31495
N 28855
I 28794
H 27187
S 26071
R 23546
D 18289
L 16308
U 12400
M 10685
W 10317
C 9844
F 9062
G 8924
Y 8226
P 6890
B 6339
V 3936
K 3456
' 1023
X 636
J 598
Q 437
Z 213
"""

# wav2vec2-base-960h's vocab.json
HF_960H = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "E": 5, "T": 6, "A": 7, "O": 8, "N": 9,
           "I": 10, "H": 11, "S": 12, "R": 13, "D": 14, "L": 15, "U": 16, "M": 17, "W": 18, "C": 19,
           "F": 20, "G": 21, "Y": 22, "P": 23, "B": 24, "V": 25, "K": 26, "'": 27, "X": 28, "J": 29,
           "Q": 30, "Z": 31}

TEXTS = ["HELLO WORLD", "IT'S A TEST", "A", "BOOKKEEPER ALL ALL", "QUIZ JAX VEX"]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
  transformers = pytest.importorskip("transformers")
  path = tmp_path_factory.mktemp("hf") / "vocab.json"
  Vocabulary.default_letters().to_hf_vocab(str(path))
  return transformers.Wav2Vec2CTCTokenizer(str(path))


def test_default_letters_are_hf_960h_ids():
  v = Vocabulary.default_letters()
  assert {s: i for i, s in enumerate(v.symbols)} == HF_960H
  assert (v.size, v.blank_id, v.delimiter_id, v.unk_id) == (32, 0, 4, 3)
  assert v.text_mask.sum() == 27  # 26 letters and the apostrophe


def test_fairseq_dict_round_trip(tmp_path):
  path = tmp_path / "dict.ltr.txt"
  path.write_text(LIBRISPEECH_DICT)
  v = Vocabulary.from_fairseq_dict(str(path))
  # fairseq ids: <s>=0 (the CTC blank, called <pad> here as by HF's converter), <pad>=1, </s>=2,
  # <unk>=3, then the file's symbols in order.
  assert v == Vocabulary.default_letters()
  assert v.blank_id == 0 and v.id_of("|") == 4 and v.id_of("Z") == 31
  assert v.counts[4:6] == (94802, 51860)
  out = tmp_path / "out.txt"
  v.to_fairseq_dict(str(out))
  assert out.read_text() == LIBRISPEECH_DICT
  # fairseq's own loader rules: duplicates need #fairseq:overwrite, counts must be integers.
  bad = tmp_path / "bad.txt"
  bad.write_text("A 1\nA 2\n")
  with pytest.raises(ValueError, match="duplicate"):
    Vocabulary.from_fairseq_dict(str(bad))
  bad.write_text("A x\n")
  with pytest.raises(ValueError, match="integer"):
    Vocabulary.from_fairseq_dict(str(bad))


def test_hf_vocab_round_trip(tmp_path, hf_tokenizer):
  v = Vocabulary.default_letters()
  path = v.to_hf_vocab(str(tmp_path))
  assert json.load(open(path)) == HF_960H
  assert Vocabulary.from_hf_vocab(path) == v
  # A saved tokenizer directory: tokens come from tokenizer_config.json.
  d = tmp_path / "tok"
  hf_tokenizer.save_pretrained(str(d))
  assert Vocabulary.from_hf_vocab(str(d)) == v
  # Other special-token names.
  custom = {"[PAD]": 0, "[UNK]": 1, "_": 2, "a": 3, "b": 4}
  p = tmp_path / "custom.json"
  p.write_text(json.dumps(custom))
  c = Vocabulary.from_hf_vocab(str(p), blank="[PAD]", word_delimiter="_", unk="[UNK]")
  assert (c.blank_id, c.delimiter_id, c.unk_id) == (0, 2, 1)
  assert c.encode("A b").tolist() == [3, 2, 4, 2]  # lower-case vocabulary: text lower-cased
  p.write_text(json.dumps({"<pad>": 0, "|": 2}))
  with pytest.raises(ValueError, match="gaps"):
    Vocabulary.from_hf_vocab(str(p))


@pytest.mark.parametrize("sentence", TEXTS)
def test_encode_matches_hf_tokenizer(sentence, hf_tokenizer):
  hf_ids = hf_tokenizer(sentence).input_ids
  no_trailing = Vocabulary.default_letters(trailing_delimiter=False)
  assert no_trailing.encode(sentence).tolist() == hf_ids
  # fairseq convention (default): a "|" after the last word too.
  assert Vocabulary.default_letters().encode(sentence).tolist() == hf_ids + [4]


def test_decode_matches_hf_tokenizer(hf_tokenizer):
  v = Vocabulary.default_letters()
  rng = np.random.default_rng(0)
  for _ in range(50):
    ids = rng.choice([4] + list(range(5, 32)), size=rng.integers(1, 30)).tolist()
    hf = hf_tokenizer.decode(ids, group_tokens=False, clean_up_tokenization_spaces=False)
    assert v.decode(ids) == " ".join(hf.split())
  for sentence in TEXTS:
    assert v.decode(v.encode(sentence)) == sentence
  # Specials and the blank are dropped, negative (padding) ids ignored; repeats are kept.
  assert v.decode([0, 11, 1, 5, 2, 15, 15, 3, 8, 4, 4, -1, -1]) == "HELLO"
  with pytest.raises(ValueError, match="out of range"):
    v.decode([40])


def test_normalize():
  v = Vocabulary.default_letters()
  assert v.normalize("  it\u2019s\tthe  \u2018end\u2019\n") == "IT'S THE 'END'"
  assert v.normalize("\uff28\uff29 a|b") == "HI A B"  # NFKC full-width letters; "|" is a word break
  assert v.normalize("caf\u00e9") == "CAF\u00c9"  # accents kept: encode reports them


def test_ltr_and_words_give_the_same_labels():
  v = Vocabulary.default_letters()
  assert text.ltr_to_words("H E L L O | W O R L D |") == "HELLO WORLD"
  for sentence in TEXTS:
    ltr = " ".join(" ".join(w) + " |" for w in sentence.split())
    assert v.encode(ltr, ltr=True).tolist() == v.encode(sentence).tolist()
  batch_w = v.encode_batch(TEXTS, 40)
  batch_l = v.encode_batch([" ".join(" ".join(w) + " |" for w in s.split()) for s in TEXTS], 40, ltr=True)
  np.testing.assert_array_equal(batch_w.labels, batch_l.labels)


def test_encode_oov_policies():
  v = Vocabulary.default_letters()
  with pytest.raises(text.TextError, match=r"\['\u00c9', '-'\]") as e:
    v.encode("caf\u00e9 rock-n-roll")
  assert e.value.status.reason == text.OOV
  assert v.decode(v.encode("caf\u00e9 rock-n-roll", on_oov="drop")) == "CAF ROCKNROLL"
  assert v.encode("a\u00e9", on_oov="unk").tolist() == [7, 3, 4]
  ids, status = v.encode_with_status("\u00e9 ok", on_oov="drop")
  assert status.ok and status.oov == ("\u00c9",) and v.decode(ids) == "OK"
  assert v.encode("").tolist() == []
  no_unk = Vocabulary(("<pad>", "|", "A"), unk=None)
  with pytest.raises(ValueError, match="unknown symbol"):
    no_unk.encode_batch(["A"], on_oov="unk")


def test_encode_batch_reports_bad_items():
  v = Vocabulary.default_letters()
  texts = ["hello", "", "   \t", "na\u00efve caf\u00e9", "a very long transcript indeed", "hi?", "ok"]
  batch = v.encode_batch(texts, max_len=10)
  assert batch.labels.shape == batch.label_padding.shape == (7, 10)
  assert batch.labels.dtype == np.int32 and batch.label_padding.dtype == bool
  reasons = [s.reason for s in batch.status]
  assert reasons == ["ok", "empty", "empty", "oov", "too_long", "oov", "ok"]
  assert batch.status[3].oov == ("\u00cf", "\u00c9")
  assert batch.status[5].oov == ("?",)
  assert batch.status[4].length == 30 and not batch.status[4].ok
  np.testing.assert_array_equal(batch.valid, [1, 0, 0, 0, 0, 0, 1])
  assert batch.counts() == {"ok": 2, "empty": 2, "oov": 2, "too_long": 1}
  # Good rows: ids then padding (blank id); bad rows all padding.
  np.testing.assert_array_equal(batch.labels[0, :6], v.encode("HELLO"))
  assert not batch.label_padding[0, :6].any() and batch.label_padding[0, 6:].all()
  assert batch.label_padding[1:6].all() and (batch.labels[1:6] == 0).all()
  # min CTC frames: labels + repeated neighbours (HELLO| has one repeat).
  assert batch.status[0].min_frames == 7
  # "drop" keeps the item; max_len None: the longest good item.
  dropped = v.encode_batch(texts, on_oov="drop")
  assert [s.reason for s in dropped.status][3:6] == ["ok", "ok", "ok"]
  assert dropped.labels.shape == (7, 30)
  assert v.decode(dropped.labels[3][~dropped.label_padding[3]]) == "NAVE CAF"
  empty = v.encode_batch(["", "?"])
  assert empty.labels.shape == (2, 1) and not empty.valid.any()


def test_labels_feed_the_ctc_loss():
  import jax.numpy as jnp

  from w2v2_jax import losses
  v = Vocabulary.default_letters()
  batch = v.encode_batch(["HELLO", "", "A B"], max_len=8)
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 20, v.size)), jnp.float32)
  out = losses.ctc(logits, None, batch.labels, batch.label_padding, blank_id=v.blank_id)
  assert np.isfinite(np.asarray(out["per_utterance"])).all()
  assert float(out["num_label_tokens"]) == 6 + 4


def test_constructor_errors():
  with pytest.raises(ValueError, match="duplicate"):
    Vocabulary(("<pad>", "|", "A", "A"))
  with pytest.raises(ValueError, match="blank"):
    Vocabulary(("|", "A"), unk=None)
  with pytest.raises(ValueError, match="unk"):
    Vocabulary(("<pad>", "|", "A"))
  with pytest.raises(ValueError, match="whitespace"):
    Vocabulary(("<pad>", "|", " "), unk=None)
  with pytest.raises(ValueError, match="fairseq"):
    Vocabulary(("<pad>", "|", "A"), unk=None).to_fairseq_dict(os.devnull)
