"""A tiny random CTC model saved as a Hugging Face directory (torch + transformers), shared by the
recognizer, export and evaluation tests. No downloads."""
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from w2v2_jax.data.text import Vocabulary  # noqa: E402
from w2v2_jax.models import build  # noqa: E402
from w2v2_jax.recognizer import Recognizer  # noqa: E402

torch.set_flush_denormal(True)
VOCAB = Vocabulary.default_letters()
FAVOURED = ("<pad>", "|", "E", "T", "A")   # the only symbols the biased heads can emit
CONV = {"conv_dim": (16,) * 7, "conv_kernel": (10, 3, 3, 3, 3, 2, 2), "conv_stride": (5, 2, 2, 2, 2, 2, 2)}


def head_bias(vocab=VOCAB):
  bias = np.full(vocab.size, -30.0, np.float32)
  bias[[vocab.id_of(s) for s in FAVOURED]] = 0.0
  return bias


def spaces(text):
  return " ".join(text.split())


def noise(seed, *lengths):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(n).astype(np.float32) for n in lengths]


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
  """A random transformers Wav2Vec2ForCTC (layer-norm conv stack, post-LN) saved with its vocab.json and a
  feature extractor that normalises: (torch model, directory)."""
  path = str(tmp_path_factory.mktemp("hf_ctc"))
  config = transformers.Wav2Vec2Config(
      **CONV, feat_extract_norm="layer", conv_bias=True, do_stable_layer_norm=False, hidden_size=32,
      num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_conv_pos_embeddings=16,
      num_conv_pos_embedding_groups=2, vocab_size=VOCAB.size, hidden_dropout=0.0, attention_dropout=0.0,
      activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0)
  torch.manual_seed(0)
  model = transformers.Wav2Vec2ForCTC(config).eval()
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.lm_head.weight.normal_(0.0, 0.5, generator=g)
    model.lm_head.bias.copy_(torch.from_numpy(head_bias()))
  model.save_pretrained(path)
  VOCAB.to_hf_vocab(path)
  transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                        do_normalize=True, return_attention_mask=True).save_pretrained(path)
  return model, path


@pytest.fixture(scope="module")
def recognizer(hf_model):
  return Recognizer.load(hf_model[1])


def random_params(cfg, seed):
  """Random params for `cfg` without compiling anything (shapes from jax.eval_shape)."""
  shapes = jax.eval_shape(lambda: build(cfg).init(jax.random.key(0), np.zeros((1, 800), np.float32)))["params"]
  rng = np.random.default_rng(seed)
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  values = []
  for path, leaf in flat:
    name = jax.tree_util.keystr(path)
    x = 0.1 * rng.standard_normal(leaf.shape).astype(np.float32)
    if "'scale'" in name or "weight_g" in name:
      x = 1.0 + x
    values.append(x)
  params = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), values)
  params["proj"]["kernel"] = rng.normal(0.0, 0.5, params["proj"]["kernel"].shape).astype(np.float32)
  params["proj"]["bias"] = head_bias()
  return params
