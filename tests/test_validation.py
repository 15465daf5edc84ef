"""Fine-tuning validation under the train step's DataParallel: the same WER / CER as `w2v2 evaluate`
(greedy, one device) on 1 device, 8 devices (shard_map) and 8 devices (pmap), bad files skipped alike."""
import os

import jax
import numpy as np
import pytest

from w2v2_jax.configs.model import get_config
from test_finetune_loop import labeled_corpus
from w2v2_jax import models
from w2v2_jax.evaluate import evaluate
from w2v2_jax.recognizer import Recognizer
from w2v2_jax.data.text import Vocabulary
from w2v2_jax.train import parallel, validation
from w2v2_jax.train import step as train_step


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  data = tmp_path_factory.mktemp("data")
  labeled_corpus(str(data), count=100)
  with open(data / "audio" / "broken.flac", "wb") as f:      # a damaged file in the valid manifest
    f.write(b"fLaC" + bytes(100))
  with open(data / "valid.tsv", "a") as tsv, open(data / "valid.ltr", "a") as ltr:
    tsv.write("broken.flac\t16000\n")
    ltr.write("A | B |\n")
  vocab = Vocabulary.default_letters()
  cfg = models.ModelConfig.from_any(get_config("tiny")).replace(task="ctc", vocab_size=len(vocab))
  module = models.build(cfg)
  params = jax.device_get(module.init({"params": jax.random.PRNGKey(0), "mask": jax.random.PRNGKey(1)},
                                      np.zeros((1, 16000), np.float32))["params"])
  # Favour a few letters so greedy decoding emits text (a random head mostly emits blanks).
  params["proj"]["bias"] = params["proj"]["bias"] + np.where(np.arange(len(vocab)) % 5 == 1, 1.5, 0.0)
  reference = evaluate(Recognizer(cfg, params, vocab), str(data / "valid.tsv"), label="ltr")
  return cfg, params, vocab, str(data / "valid.tsv"), reference


@pytest.mark.parametrize("mode,devices", [("shard_map", 1), ("shard_map", 8), ("pmap", 8)])
def test_sharded_validation_equals_evaluate(setup, mode, devices):
  cfg, params, vocab, manifest, reference = setup
  assert reference["utterances"] == 20 and reference["skipped"] == 1
  assert reference["cer"] > 0 and np.isfinite(reference["wer"])          # non-empty hypotheses
  runner = parallel.DataParallel(lambda state, batch: (state, {}), mode, jax.devices()[:devices])
  state = runner.put_state({"params": params})
  validator = validation.Validator(runner, cfg, vocab, manifest, label="ltr")
  scores = validator(state)
  assert scores["utterances"] == reference["utterances"]
  assert scores["skipped"] == reference["skipped"] == 1
  assert scores["wer"] == pytest.approx(reference["wer"], abs=1e-9)
  assert scores["cer"] == pytest.approx(reference["cer"], abs=1e-9)
  # Runs again on new params without recompiling anything new for the same batches.
  again = validator(state)
  assert again["cer"] == scores["cer"]
