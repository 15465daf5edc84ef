"""Decode and validate one utterance: file -> mono float32 waveform (samples,) at the target rate.

soundfile (libsndfile) decodes; librosa is the fallback for formats libsndfile cannot open (it is
imported only then, its first import takes seconds). Resampling uses soxr's "HQ" quality, the same
computation as `librosa.resample(res_type="soxr_hq")`, without importing librosa.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import struct
from typing import BinaryIO

import numpy as np
import soundfile as sf

from w2v2_jax import storage

log = logging.getLogger(__name__)

# Reasons an utterance cannot be used; `AudioError.reason` is one of these.
MISSING = "missing"
EMPTY = "empty"
UNDECODABLE = "undecodable"
TRUNCATED = "truncated"
NON_FINITE = "non_finite"
REASONS = (MISSING, EMPTY, UNDECODABLE, TRUNCATED, NON_FINITE)

NORM_EPS = 1e-5  # as fairseq's F.layer_norm(wav, wav.shape)
SAMPLE_RATE = 16000  # Hz: the rate every wav2vec 2.0 model takes
SF_UNKNOWN_FRAMES = 2**62  # libsndfile reports a huge frame count when a stream's length is unknown
# Containers whose header frame count is exact (for MP3 / Ogg it can be an estimate).
EXACT_FRAME_COUNTS = ("WAV", "WAVEX", "RF64", "W64", "FLAC", "AIFF", "CAF", "AU")


class AudioError(ValueError):
  """An utterance that cannot be used: `path` names it and `reason` is one of `REASONS`."""

  def __init__(self, path: str, reason: str, detail: str = ""):
    self.path = str(path)
    self.reason = reason
    self.detail = detail
    super().__init__(f"{self.path}: {reason}" + (f" ({detail})" if detail else ""))


@dataclasses.dataclass(frozen=True)
class AudioInfo:
  """What decoding did: original rate (Hz) and channel count, output length (samples), and flags."""
  orig_sample_rate: int
  channels: int
  num_samples: int
  resampled: bool
  downmixed: bool


def resampled_length(num_frames: int, orig_sample_rate: int, sample_rate: int) -> int:
  """Samples after resampling `num_frames` from `orig_sample_rate` to `sample_rate`: ceil(n * sr / orig)."""
  if orig_sample_rate == sample_rate:
    return int(num_frames)
  return -(-int(num_frames) * int(sample_rate) // int(orig_sample_rate))


def normalize_waveform(audio: np.ndarray) -> np.ndarray:
  """Per-utterance zero mean, unit variance: (x - mean) / sqrt(var + 1e-5), float32 (samples,)."""
  x = audio.astype(np.float64)
  return ((x - x.mean()) / np.sqrt(x.var() + NORM_EPS)).astype(np.float32)


def prepare_waveform(data: np.ndarray, orig_sample_rate: int, *, sample_rate: int = 16000,
                     normalize: bool = False, name: str = "<array>") -> tuple[np.ndarray, AudioInfo]:
  """Decoded samples -> validated mono float32 (samples,) at `sample_rate` Hz, and what was done.

  data: (frames,) or (frames, channels); float in [-1, 1] or integer PCM (scaled by its full range).
  Raises AudioError(name, "empty" | "non_finite").
  """
  data = np.asarray(data)
  if np.issubdtype(data.dtype, np.integer):
    data = data.astype(np.float32) / float(-np.iinfo(data.dtype).min)
  data = data.astype(np.float32, copy=False)
  if data.ndim == 1:
    data = data[:, None]
  if data.ndim != 2:
    raise AudioError(name, UNDECODABLE, f"expected (frames, channels), got shape {data.shape}")
  frames, channels = data.shape
  if frames == 0 or channels == 0:
    raise AudioError(name, EMPTY, "0 samples")
  if not np.all(np.isfinite(data)):
    raise AudioError(name, NON_FINITE, f"{int(np.sum(~np.isfinite(data)))} non-finite samples")
  audio = data[:, 0] if channels == 1 else data.mean(axis=1, dtype=np.float32)
  resampled = int(orig_sample_rate) != int(sample_rate)
  if resampled:
    import soxr  # pylint: disable=import-outside-toplevel
    audio = soxr.resample(audio, orig_sample_rate, sample_rate, quality="HQ").astype(np.float32)
    audio = _fix_length(audio, resampled_length(frames, orig_sample_rate, sample_rate))
  if normalize:
    audio = normalize_waveform(audio)
  info = AudioInfo(int(orig_sample_rate), int(channels), int(audio.shape[0]), resampled, channels > 1)
  return np.ascontiguousarray(audio), info


def load_audio_with_info(source: str | os.PathLike | bytes, sample_rate: int = 16000,
                         normalize: bool = False, *, name: str | None = None
                         ) -> tuple[np.ndarray, AudioInfo]:
  """Decode a file path, an object URL (gs://, s3://) or encoded bytes -> (mono float32 (samples,) at
  `sample_rate` Hz, AudioInfo).

  Raises AudioError naming the file for: missing, empty (0 bytes or 0 samples), undecodable,
  truncated (a WAV whose data chunk is shorter than its header says) and non-finite samples.
  """
  if not isinstance(source, bytes) and storage.is_remote(source):
    name = name or os.fspath(source)
    try:
      source = storage.read_bytes(source)
    except FileNotFoundError:
      raise AudioError(name, MISSING, "no such object") from None
    except Exception as e:  # pylint: disable=broad-except  # e.g. a 403: this row is unusable, not the run
      raise AudioError(name, UNDECODABLE, f"cannot read: {type(e).__name__}: {e}") from e
  if isinstance(source, bytes):
    name = name or "<bytes>"
    if not source:
      raise AudioError(name, EMPTY, "0 bytes")
    stream = io.BytesIO(source)
    _check_wav_complete(stream, len(source), name)
    data, rate = _decode(stream, name)
  else:
    path = os.fspath(source)
    name = name or path
    if not os.path.isfile(path):
      raise AudioError(name, MISSING, "no such file")
    size = os.path.getsize(path)
    if size == 0:
      raise AudioError(name, EMPTY, "0 bytes")
    with open(path, "rb") as f:
      _check_wav_complete(f, size, name)
    data, rate = _decode(path, name)
  return prepare_waveform(data, rate, sample_rate=sample_rate, normalize=normalize, name=name)


def load_audio(path: str | os.PathLike, sample_rate: int = 16000, normalize: bool = False
               ) -> np.ndarray:
  """Decode `path` -> mono float32 (samples,) at `sample_rate` Hz, optionally normalised per utterance.

  Stereo and multichannel files are downmixed (mean of channels); other rates are resampled.
  Raises AudioError (a ValueError) with the path and reason; see `load_audio_with_info`.
  """
  return load_audio_with_info(path, sample_rate, normalize)[0]


def _decode(source: str | BinaryIO, name: str) -> tuple[np.ndarray, int]:
  """soundfile, then librosa for formats libsndfile does not know -> ((frames, channels) float32, rate Hz).

  A file in a format libsndfile knows (its header parses) but whose frames fail to decode is damaged:
  AudioError(UNDECODABLE), never a fallback decode of part of it."""
  try:
    with sf.SoundFile(source) as f:
      declared, rate, fmt = f.frames, f.samplerate, f.format
      data = f.read(dtype="float32", always_2d=True)
    if fmt in EXACT_FRAME_COUNTS and data.shape[0] < declared < SF_UNKNOWN_FRAMES:
      raise AudioError(name, TRUNCATED, f"decoded {data.shape[0]} of the {declared} frames its {fmt} header "
                       "declares")
    return data, int(rate)
  except (sf.LibsndfileError, RuntimeError, TypeError) as sf_error:
    first = sf_error
  if hasattr(source, "seek"):
    source.seek(0)
  try:
    known = sf.info(source)
  except (sf.LibsndfileError, RuntimeError, TypeError):
    known = None
  if known is not None:
    # libsndfile parsed the header (it knows the format and the frame count) but not all the frames: a
    # damaged file. Another decoder (librosa -> audioread -> ffmpeg, where installed) would return the
    # frames before the damage without an error, and a cut utterance would pass for a whole one.
    if hasattr(source, "seek"):
      source.seek(0)
    decoded = _decodable_frames(source)
    reason = TRUNCATED if decoded > 0 else UNDECODABLE
    raise AudioError(name, reason, f"decoded {decoded} of the {known.frames} frames its {known.format} "
                     f"header declares, then: {first}")
  if hasattr(source, "seek"):
    source.seek(0)
  try:
    import librosa  # pylint: disable=import-outside-toplevel
    data, rate = librosa.load(source, sr=None, mono=False)
  except Exception as e:  # pylint: disable=broad-except  # any decoder failure is "undecodable"
    raise AudioError(name, UNDECODABLE, f"soundfile: {first}; librosa: {type(e).__name__}: {e}") from e
  data = np.asarray(data, np.float32)
  return (data[:, None] if data.ndim == 1 else data.T), int(rate)


def _decodable_frames(source: str | BinaryIO, block: int = 256) -> int:
  """Frames libsndfile decodes from the start of `source` before its first error, read in blocks of
  `block` (a lower bound: the block that fails is not counted)."""
  count = 0
  try:
    with sf.SoundFile(source) as f:
      while True:
        got = f.read(block, dtype="float32", always_2d=True).shape[0]
        if got == 0:
          return count
        count += got
  except (sf.LibsndfileError, RuntimeError, TypeError):
    return count


def _check_wav_complete(f: BinaryIO, size: int, name: str) -> None:
  """Raise AudioError(TRUNCATED) when a RIFF/WAVE file's data chunk runs past the end of the file.

  f: the file (or bytes) opened for binary reading, `size` bytes long; left at offset 0.
  libsndfile silently returns the frames that are present; this header check makes truncation
  visible. Streamed WAVs (data size 0 or 0xFFFFFFFF) and non-RIFF files pass unchecked.
  """
  try:
    f.seek(0)
    head = f.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
      return
    pos = 12
    while pos + 8 <= size:
      f.seek(pos)
      chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
      if chunk_id == b"data":
        if chunk_size in (0, 0xFFFFFFFF):
          return
        available = size - pos - 8
        if chunk_size > available:
          raise AudioError(name, TRUNCATED, f"data chunk declares {chunk_size} bytes, file holds {available}")
        return
      pos += 8 + chunk_size + (chunk_size & 1)
  finally:
    f.seek(0)


def _fix_length(audio: np.ndarray, length: int) -> np.ndarray:
  """Trim or zero-pad (samples,) to exactly `length` samples."""
  if audio.shape[0] >= length:
    return audio[:length]
  return np.pad(audio, (0, length - audio.shape[0]))
