"""fairseq-style audio manifests: `train.tsv` / `valid.tsv`, the root directory (or URL) on the first line,
then one `relative/path<TAB>num_samples` line per utterance. Optional label files next to a manifest
(`train.ltr` letters, `train.wrd` words) hold one transcript per utterance, in the same order.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
from collections.abc import Sequence

import numpy as np
import soundfile as sf

from w2v2_jax import storage
from w2v2_jax.data.audio import resampled_length

log = logging.getLogger(__name__)

LABEL_EXTS = ("ltr", "wrd")


@dataclasses.dataclass
class Manifest:
  """An audio manifest.

  root: directory the paths are relative to; paths: N relative (or absolute) paths;
  sizes: (N,) int64 utterance lengths in samples; labels: label-file extension -> N transcripts.
  """
  root: str
  paths: list[str]
  sizes: np.ndarray
  labels: dict[str, list[str]] = dataclasses.field(default_factory=dict)

  def __len__(self) -> int:
    return len(self.paths)

  def path(self, index: int) -> str:
    """Full path (or URL) of utterance `index`."""
    return storage.join(self.root, self.paths[index])


def write_manifest(root: str, out_dir: str, valid_percent: float = 0.01,
                   exts: Sequence[str] = ("flac", "wav"), seed: int = 42,
                   sample_rate: int | None = 16000, num_threads: int = 8) -> dict[str, int]:
  """Scan `root` recursively for audio and write `train.tsv` (and `valid.tsv` if valid_percent > 0).

  `root` and `out_dir` may be local or object-store URLs (gs://, s3://; see `storage`).
  Only headers are read (soundfile.info). Files are sorted by relative path and each goes to valid
  with probability `valid_percent` (a fraction, 0.01 = 1%) from np.random.default_rng(seed): the
  split is deterministic and disjoint. Sizes are in samples at `sample_rate` Hz, i.e. the length
  `load_audio` returns (ceil(frames * sample_rate / file_rate)); identical to fairseq's frame count
  for files already at that rate; `sample_rate=None` writes the files' own frame counts.
  Files whose header cannot be read are skipped with a warning. Headers are read by `num_threads`.

  Returns counts {"train", "valid", "skipped", "total_samples"}.
  """
  if not 0.0 <= valid_percent <= 1.0:
    raise ValueError(f"valid_percent must be a fraction in [0, 1], got {valid_percent}")
  if not storage.is_remote(root):
    root = os.path.realpath(root)
  if not storage.isdir(root):
    raise FileNotFoundError(f"manifest root {root} is not a directory")
  suffixes = tuple("." + e.lower().lstrip(".") for e in exts)
  rel_paths = sorted(rel for rel in storage.walk_files(root) if rel.lower().endswith(suffixes))

  draws = np.random.default_rng(seed).random(len(rel_paths))
  with concurrent.futures.ThreadPoolExecutor(max(num_threads, 1)) as pool:
    sizes = list(pool.map(lambda rel: _header_size(storage.join(root, rel), sample_rate), rel_paths))
  counts = {"train": 0, "valid": 0, "skipped": 0, "total_samples": 0}
  lines = {"train": [root], "valid": [root]}
  for rel, draw, size in zip(rel_paths, draws, sizes):
    if size is None:
      counts["skipped"] += 1
      continue
    split = "valid" if draw < valid_percent else "train"
    lines[split].append(f"{rel}\t{size}")
    counts[split] += 1
    counts["total_samples"] += size
  storage.makedirs(out_dir)
  for split in ["train"] + (["valid"] if valid_percent > 0 else []):
    storage.write_text(storage.join(out_dir, f"{split}.tsv"), "\n".join(lines[split]) + "\n")
  log.info("manifest %s -> %s: %s", root, out_dir, counts)
  return counts


def _header_size(path: str, sample_rate: int | None) -> int | None:
  """Samples per the header (at `sample_rate` Hz if given), or None with a warning if unreadable."""
  try:
    if storage.is_remote(path):
      with storage.open_file(path, "rb") as f:
        info = sf.info(f)
    else:
      info = sf.info(path)
  except (RuntimeError, OSError, ValueError) as e:
    log.warning("manifest: skipping %s: unreadable header (%s: %s)", path, type(e).__name__, e)
    return None
  if sample_rate is None:
    return int(info.frames)
  return resampled_length(int(info.frames), int(info.samplerate), sample_rate)


def read_manifest(tsv_path: str, label_exts: Sequence[str] = LABEL_EXTS) -> Manifest:
  """Read a fairseq manifest and the label files `<stem>.<ext>` next to it that exist.

  Raises ValueError naming the file and line for a malformed line or a label file whose line count
  differs from the manifest's.
  """
  lines = storage.read_text(tsv_path).splitlines()
  if not lines or not lines[0].strip():
    raise ValueError(f"{tsv_path}:1: expected the root directory on the first line")
  root = lines[0].strip()
  paths, sizes = [], []
  for lineno, line in enumerate(lines[1:], start=2):
    if not line.strip():
      continue
    parts = line.split("\t")
    if len(parts) < 2:
      raise ValueError(f"{tsv_path}:{lineno}: expected 'path<TAB>num_samples', got {line!r}")
    try:
      size = int(parts[1])
    except ValueError:
      raise ValueError(f"{tsv_path}:{lineno}: num_samples {parts[1]!r} is not an integer") from None
    if size < 0:
      raise ValueError(f"{tsv_path}:{lineno}: negative num_samples {size}")
    paths.append(parts[0])
    sizes.append(size)
  stem = storage.splitext(tsv_path)[0]
  labels = {}
  for ext in label_exts:
    label_path = f"{stem}.{ext}"
    if storage.exists(label_path):
      labels[ext] = read_labels(label_path, len(paths))
  return Manifest(root, paths, np.asarray(sizes, dtype=np.int64), labels)


def read_labels(path: str, expected: int) -> list[str]:
  """One transcript per line; raises ValueError naming `path` if there are not `expected` lines."""
  labels = storage.read_text(path).splitlines()
  if len(labels) != expected:
    raise ValueError(f"{path}:{len(labels)}: {len(labels)} label lines for {expected} manifest entries")
  return labels
