"""Where utterances come from: random access to (waveform, transcript) by index, plus every size.

A `Source` is what the pipeline reads. `sizes` (metadata only) plan the batches; `load(i)` decodes
one utterance. Implementations: `ManifestSource` (fairseq manifests, here),
`w2v2_jax.data.packed.PackedSource` (ArrayRecord shards from `w2v2 pack`) and
`w2v2_jax.data.tfds_source.TfdsSource` (tensorflow-datasets, optional extra).
"""
from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import numpy as np

from w2v2_jax.data.audio import AudioInfo, load_audio_with_info
from w2v2_jax.data.manifest import Manifest, read_manifest


@dataclasses.dataclass
class Example:
  """One decoded utterance: audio float32 (samples,) at the requested rate, what decoding did, and
  its transcript (None for a source without labels)."""
  audio: np.ndarray
  info: AudioInfo
  label: str | None = None


@runtime_checkable
class Source(Protocol):
  """Random-access utterances.

  sizes: (N,) int64 lengths in samples at the pipeline's rate (16 kHz), known without decoding;
  label_key: the transcript returned by `load`, or None.
  """
  sizes: np.ndarray
  label_key: str | None

  def __len__(self) -> int:
    ...

  def describe(self, index: int) -> str:
    """A name for log lines (a file path)."""
    ...

  def load(self, index: int, *, sample_rate: int, normalize: bool) -> Example:
    """Decode utterance `index`; raises audio.AudioError for one that cannot be used."""
    ...


class ManifestSource:
  """A fairseq manifest as a Source; `label` picks a label file ("ltr" or "wrd") or None."""

  def __init__(self, manifest: Manifest | str, label: str | None = None):
    self.manifest = read_manifest(manifest) if isinstance(manifest, str) else manifest
    if label is not None and label not in self.manifest.labels:
      raise ValueError(f"label {label!r} requested but the manifest has label files "
                       f"{sorted(self.manifest.labels)} next to it")
    self.label_key = label
    self.sizes = self.manifest.sizes

  def __len__(self) -> int:
    return len(self.manifest)

  def describe(self, index: int) -> str:
    return self.manifest.path(index)

  def load(self, index: int, *, sample_rate: int = 16000, normalize: bool = False) -> Example:
    audio, info = load_audio_with_info(self.manifest.path(index), sample_rate, normalize)
    label = self.manifest.labels[self.label_key][index] if self.label_key else None
    return Example(audio, info, label)


def open_source(path: str, label: str | None = None) -> Source:
  """The Source at `path`: packed shards (an OUT_PREFIX.packed.json from `w2v2 pack`) or a manifest."""
  from w2v2_jax.data import packed  # pylint: disable=import-outside-toplevel
  if packed.is_packed(path):
    return packed.PackedSource(path, label=label)
  return ManifestSource(path, label=label)


def as_source(source: Source | Manifest | str) -> Source:
  """A Source from a Source, a Manifest, or a manifest or packed-index path (without labels)."""
  if isinstance(source, str):
    return open_source(source)
  if isinstance(source, Manifest):
    return ManifestSource(source)
  return source
