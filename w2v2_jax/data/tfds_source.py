"""tensorflow-datasets' LibriSpeech (or any dataset with an audio and a text feature) as a Source.

Random access goes through `tfds.data_source`, which needs the dataset prepared in ArrayRecord
format (`tfds build librispeech --file_format=array_record`, or `download_and_prepare=True` here).
Offline use: point `data_dir` at a prepared copy, or put the downloaded archives in `manual_dir`.
TensorFlow and tensorflow-datasets come with the optional extra: pip install 'w2v2_jax[tfds]'.
They are imported only when a TfdsSource is built.

tfds stores no utterance lengths, so `sizes` needs one pass over the split decoding every example;
pass `sizes_cache` (a .npy path) to do it once.

`data_dir` and `sizes_cache` may be gs:// URLs: tfds reads through etils.epath, the ArrayRecord
files through ArrayRecord's own GCS reader (tested against a GCS emulator: tests/test_object_storage.py).
"""
from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np

from w2v2_jax import storage
from w2v2_jax.data.audio import (
  AudioError,
  load_audio_with_info,
  prepare_waveform,
  resampled_length,
)
from w2v2_jax.data.source import Example

log = logging.getLogger(__name__)

EXTRA_HINT = "pip install 'w2v2_jax[tfds]'  (tensorflow-datasets and tensorflow-cpu)"


def import_tfds():
  """tensorflow_datasets, after checking TensorFlow is importable; ImportError naming the extra."""
  try:
    import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"reading tensorflow-datasets needs the 'tfds' extra: {EXTRA_HINT} ({e})") from e
  return tfds


class TfdsSource:
  """One split of a tfds audio dataset (default: librispeech) as a Source.

  split: e.g. "train_clean100", "train_clean100+train_clean360", "dev_clean".
  label: the text feature returned with each utterance ("text"), or None for pretraining.
  sizes: (N,) samples per utterance at `sample_rate` Hz (the pipeline's rate) if already known;
  else read from `sizes_cache` or computed (one full pass) and saved there.
  """

  def __init__(self, split: str, *, name: str = "librispeech", data_dir: str | None = None,
               manual_dir: str | None = None, download_and_prepare: bool = False,
               label: str | None = "text", audio_key: str = "speech",
               sizes: np.ndarray | None = None, sizes_cache: str | None = None,
               sample_rate: int = 16000):
    tfds = import_tfds()
    prepare_kwargs = None
    if download_and_prepare and manual_dir:
      prepare_kwargs = {"download_config": tfds.download.DownloadConfig(manual_dir=manual_dir)}
    self._ds = tfds.data_source(name, split=split, data_dir=data_dir, download=download_and_prepare,
                                download_and_prepare_kwargs=prepare_kwargs)
    self._name = f"{name}/{split}"
    self._audio_key = audio_key
    self.label_key = label
    self.file_sample_rate = _feature_sample_rate(self._ds, audio_key)
    self._sample_rate = sample_rate
    self.sizes = self._sizes(sizes, sizes_cache)

  def __len__(self) -> int:
    return len(self._ds)

  def describe(self, index: int) -> str:
    return f"{self._name}[{index}]"

  def load(self, index: int, *, sample_rate: int = 16000, normalize: bool = False) -> Example:
    try:
      record = self._ds[index]
    except Exception as e:  # pylint: disable=broad-except  # a corrupt record is one bad utterance
      raise AudioError(self.describe(index), "undecodable", f"{type(e).__name__}: {e}") from e
    audio, info = self._decode(record[self._audio_key], index, sample_rate, normalize)
    label = _text(record[self.label_key]) if self.label_key else None
    return Example(audio, info, label)

  def _decode(self, value: Any, index: int, sample_rate: int, normalize: bool):
    name = self.describe(index)
    if isinstance(value, bytes):  # the "lazy_decode" configs keep the encoded file
      return load_audio_with_info(value, sample_rate, normalize, name=name)
    return prepare_waveform(np.asarray(value), self.file_sample_rate, sample_rate=sample_rate,
                            normalize=normalize, name=name)

  def _sizes(self, sizes, cache) -> np.ndarray:
    if sizes is not None:
      sizes = np.asarray(sizes, np.int64)
    elif cache and storage.exists(cache):
      sizes = np.load(storage.bytes_io(cache)).astype(np.int64)
    else:
      log.info("tfds: computing the sizes of %d utterances of %s (one pass)", len(self), self._name)
      sizes = np.asarray([self._length(i) for i in range(len(self))], np.int64)
      if cache:
        buf = io.BytesIO()
        np.save(buf, sizes)
        storage.write_bytes(cache, buf.getvalue())
    if sizes.shape != (len(self),):
      raise ValueError(f"{self._name}: {sizes.shape[0]} sizes for {len(self)} utterances")
    return sizes

  def _length(self, index: int) -> int:
    """Samples at `sample_rate` Hz, without resampling; -1 if unreadable."""
    if index and index % 10000 == 0:
      log.info("tfds: sizes %d / %d", index, len(self))
    try:
      value = self._ds[index][self._audio_key]
      if isinstance(value, bytes):
        import soundfile as sf  # pylint: disable=import-outside-toplevel
        info = sf.info(io.BytesIO(value))
        return resampled_length(info.frames, info.samplerate, self._sample_rate)
      return resampled_length(np.asarray(value).shape[0], self.file_sample_rate, self._sample_rate)
    except Exception as e:  # noqa: BLE001  # a record that cannot be read is one bad utterance
      log.warning("tfds: %s unreadable while sizing (%s); it will be dropped", self.describe(index), e)
      return -1


def _feature_sample_rate(ds, audio_key: str) -> int:
  info = getattr(ds, "dataset_info", None)
  try:
    return int(info.features[audio_key].sample_rate)
  except (AttributeError, KeyError, TypeError):
    log.warning("tfds: no sample rate for feature %r; assuming 16000 Hz", audio_key)
    return 16000


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)
