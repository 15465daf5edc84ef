"""Tests of w2v2_jax.data.tfds_source under tfds.testing.mock_data (needs the 'tfds' extra)."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from w2v2_jax.data import pipeline, tfds_source


def test_missing_extra_names_it(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow", None)  # makes `import tensorflow` fail
  with pytest.raises(ImportError, match=r"w2v2_jax\[tfds\]"):
    tfds_source.TfdsSource("train_clean100")


def test_librispeech_mock_through_the_pipeline(tmp_path):
  pytest.importorskip("tensorflow")
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=40):
    cache = str(tmp_path / "sizes.npy")
    source = tfds_source.TfdsSource("train_clean100", sizes_cache=cache)
    assert len(source) == 40 and source.sizes.shape == (40,) and source.file_sample_rate == 16000
    np.testing.assert_array_equal(np.load(cache), source.sizes)
    again = tfds_source.TfdsSource("train_clean100", sizes_cache=cache)
    np.testing.assert_array_equal(again.sizes, source.sizes)
    ex = source.load(0)
    assert ex.audio.dtype == np.float32 and ex.audio.shape == (source.sizes[0],)
    assert isinstance(ex.label, str) and np.abs(ex.audio).max() <= 1.0
    # mock utterances are a few dozen samples long: tiny buckets.
    kw = dict(buckets=(16, 32, 64), batch_samples=128, min_sample_size=8, max_sample_size=64,
              multiple_of=2, mode="pad", epochs=2, num_threads=2, prefetch=2)
    batches = list(pipeline.make_iterator(source, **kw))
    assert batches
    for b in batches:
      assert b["audio"].shape[-1] in (16, 32, 64) and b["audio"].shape[:2] == b["labels"].shape
      assert all(isinstance(t, str) for t in b["labels"].ravel())
      valid = (~b["padding_mask"]).sum(-1)
      assert (valid >= 8).all()
