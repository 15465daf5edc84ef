"""Labeled evaluation data: normalised references, padded forward batches, audio loaded one batch ahead.

Shared by `w2v2 evaluate` (`w2v2_jax.evaluate`) and fine-tuning validation (`train/validation.py`), so
both skip the same items for the same reasons and batch them the same way:

  source = open_labeled_source("valid.tsv")          .wrd if present, else .ltr
  refs = References(source, vocab)                   refs.text[i], refs.todo, refs.skipped
  batches = padded_batches(source, refs.todo, batch_samples, bucket_samples)
  for batch, items in load_ahead(load, batches, num_threads): ...
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from w2v2_jax import storage
from w2v2_jax.data import batching
from w2v2_jax.data import text as text_lib
from w2v2_jax.data.source import ManifestSource
from w2v2_jax.data.text import Vocabulary

log = logging.getLogger(__name__)


def open_labeled_source(manifest: str, label: str | None = None) -> ManifestSource:
  """A ManifestSource with transcripts: `label` "wrd" or "ltr", or None for "wrd" if the manifest has
  a .wrd file next to it, else "ltr". Raises ValueError if it has neither."""
  source = ManifestSource(manifest)
  available = source.manifest.labels
  if label is None:
    label = next((k for k in ("wrd", "ltr") if k in available), None)
    if label is None:
      stem = storage.splitext(manifest)[0]
      raise ValueError(f"{manifest}: no transcripts: expected {stem}.wrd or {stem}.ltr next to it")
  return ManifestSource(source.manifest, label=label)


def reference(vocab: Vocabulary, label: str | None, label_key: str):
  """(normalised reference words, None) or (None, (reason key, message)) for an unusable transcript.

  .ltr lines are turned into words (`text.ltr_to_words`); reason keys are "text:missing", "text:empty"
  and "text:oov" (characters outside the vocabulary after `Vocabulary.normalize`)."""
  if label is None:
    return None, ("text:missing", "no transcript")
  words = text_lib.ltr_to_words(label) if label_key == "ltr" else label
  ref = vocab.normalize(words)
  _, status = vocab.encode_with_status(ref, on_oov="skip")
  if not status.ok:
    detail = f" (characters outside the vocabulary: {''.join(status.oov)!r})" if status.oov else ""
    return None, (f"text:{status.reason}", f"{status.reason} transcript {label[:60]!r}{detail}")
  return ref, None


class References:
  """The references of a labeled source, and the items skipped for their transcript.

  text: {index: normalised reference}; todo: indices to evaluate, ascending; skipped: {reason key:
  count}. A source without a label table (tfds: transcripts come with the audio) has every index in
  `todo` and no text yet: `add(index, label)` scores a transcript when its item is loaded. Every skip is
  logged with the item's name, prefixed by `what`.
  """

  def __init__(self, source: Any, vocab: Vocabulary, *, what: str = ""):
    self.source, self.vocab, self.what = source, vocab, what
    self.label_key = getattr(source, "label_key", None)
    if self.label_key is None:
      raise ValueError("evaluation needs a source with transcripts (ManifestSource(..., label='wrd'|'ltr'))")
    self.text: dict[int, str] = {}
    self.skipped: dict[str, int] = {}
    labels = getattr(getattr(source, "manifest", None), "labels", {}).get(self.label_key)
    if labels is None:
      self.todo = list(range(len(source)))
      return
    self.todo = [i for i in range(len(source)) if self.add(i, labels[i])]

  def add(self, index: int, label: str | None) -> bool:
    """Scores item `index`'s transcript; False (and a logged skip) if it cannot be used."""
    ref, why = reference(self.vocab, label, self.label_key)
    if ref is None:
      self.skip(index, why)
      return False
    self.text[index] = ref
    return True

  def skip(self, index: int, why: tuple[str, str]) -> None:
    """Counts item `index` as skipped for (reason key, message) and logs it."""
    key, message = why
    log.warning("%sskipping %s: %s", self.what, self.source.describe(index), message)
    self.skipped[key] = self.skipped.get(key, 0) + 1


def padded_batches(source: Any, indices: Sequence[int], batch_samples: int,
                   bucket_samples: int) -> list[list[int]]:
  """`batching.plan_padded_batches` over the items `indices` of `source` (its sizes in samples); the
  batches hold source indices."""
  sizes = np.asarray(source.sizes)
  plan = batching.plan_padded_batches([int(sizes[i]) for i in indices], batch_samples, bucket_samples)
  return [[indices[j] for j in batch] for batch in plan]


def load_ahead(load: Callable[[int], Any], batches: Sequence[Sequence[int]],
               num_threads: int) -> Iterator[tuple[Sequence[int], list[Any]]]:
  """Yields (batch, [load(i) for i in batch]) in order; the next batch is loaded on `num_threads`
  threads while the caller works on the current one. `load` should return its errors rather than
  raise them (an exception is re-raised here)."""
  with concurrent.futures.ThreadPoolExecutor(max(int(num_threads), 1)) as pool:
    pending = [pool.submit(load, i) for i in batches[0]] if batches else []
    for step, batch in enumerate(batches):
      loaded = [f.result() for f in pending]
      pending = [pool.submit(load, i) for i in batches[step + 1]] if step + 1 < len(batches) else []
      yield batch, loaded
