"""Packed shards: a manifest's encoded audio, lengths and transcripts in ArrayRecord files.

A pod reads millions of small files; opening each is the cost (one object request per utterance on
gs://). `pack` copies every file's bytes as they are (FLAC stays FLAC, nothing is re-encoded) into N
ArrayRecord shards, one record per utterance, in manifest order:

  OUT_PREFIX.packed.json                 the index: format, shard files and record counts, label kinds,
                                         the source manifest; `data.train_manifest` accepts this path
  OUT_PREFIX.sizes.npy                   (N,) int64 lengths in samples (the manifest's), for the plan
  OUT_PREFIX-00000-of-0000N.array_record the shards (group_size 1: random access to any record)

A record is: a little-endian uint32 header length, a UTF-8 JSON header {"path": the manifest's
relative path, "labels": {"ltr": ..., "wrd": ...}}, then the file's bytes.

Chunks are stored uncompressed: the audio is compressed already (FLAC), and a second codec would
only cost CPU on every read.

`PackedSource` reads them with random access through Grain's ArrayRecordDataSource. Utterance i of
the packed form is utterance i of the manifest, with the same size, so the batch plan and every batch
are the same as the manifest's (and resume works the same way). Where the shards are:
  - local files, or gs:// objects: read in place, one ranged read per record (ArrayRecord's own GCS
    reader, google-cloud-cpp: Application Default Credentials, `CLOUD_STORAGE_EMULATOR_ENDPOINT`
    for an emulator, which `storage.configure_emulator` sets);
  - any other object store (s3://, ...), or any remote URL when a cache directory is given
    (`cache_dir` or $W2V2_PACKED_CACHE): each shard is copied whole to that local directory (default
    <tmp>/w2v2_packed_cache, shared by the processes and runs of a host, checked against the
    object's size) the first time it is read.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import struct
import tempfile
import threading
from typing import Any

import numpy as np

from w2v2_jax import storage
from w2v2_jax.data.audio import load_audio_with_info
from w2v2_jax.data.manifest import read_manifest

log = logging.getLogger(__name__)

FORMAT = "w2v2_jax.packed/1"
INDEX_SUFFIX = ".packed.json"
WRITER_OPTIONS = "group_size:1,uncompressed"   # one record per chunk (random access without decoding
                                              # neighbours); FLAC is compressed already


def is_packed(path: str) -> bool:
  """Whether `path` names a packed index (OUT_PREFIX.packed.json)."""
  return os.fspath(path).endswith(INDEX_SUFFIX)


def encode_record(rel_path: str, labels: dict[str, str], audio_bytes: bytes) -> bytes:
  header = json.dumps({"path": rel_path, "labels": labels}, ensure_ascii=False).encode("utf-8")
  return struct.pack("<I", len(header)) + header + audio_bytes


def decode_record(record: bytes) -> tuple[dict[str, Any], bytes]:
  """record -> (header {"path", "labels"}, the file's bytes)."""
  (length,) = struct.unpack_from("<I", record)
  return json.loads(record[4:4 + length].decode("utf-8")), record[4 + length:]


def shard_name(prefix: str, index: int, count: int) -> str:
  return f"{prefix}-{index:05d}-of-{count:05d}.array_record"


def pack(manifest_path: str, out_prefix: str, shards: int = 1) -> dict[str, Any]:
  """Packs the manifest at `manifest_path` (and its .ltr/.wrd files) into `shards` ArrayRecord files.

  Utterances go to shards in contiguous runs of N / shards (rounded), in manifest order. `out_prefix` may
  be local or an object-store URL (shards are written locally first, then uploaded). A file that
  cannot be read stops the packing with an error naming it: nothing is left out silently.
  Returns {"utterances", "shards", "bytes", "index"}.
  """
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  if shards < 1:
    raise ValueError(f"shards must be >= 1, got {shards}")
  manifest = read_manifest(manifest_path)
  count = len(manifest)
  if count == 0:
    raise ValueError(f"{manifest_path}: no utterances to pack")
  shards = min(shards, count)
  bounds = [s * count // shards for s in range(shards + 1)]      # shard s: utterances bounds[s]..bounds[s+1]-1
  remote = storage.is_remote(out_prefix)
  local_prefix = out_prefix
  staging = None
  if remote:
    staging = tempfile.TemporaryDirectory(prefix="w2v2_pack_")
    local_prefix = os.path.join(staging.name, os.path.basename(out_prefix.rstrip("/")))
  else:
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
  total_bytes, records = 0, []
  try:
    for s in range(shards):
      lo, hi = bounds[s], bounds[s + 1]
      local_shard = shard_name(local_prefix, s, shards)
      writer = array_record_module.ArrayRecordWriter(local_shard, WRITER_OPTIONS)
      try:
        for i in range(lo, hi):
          path = manifest.path(i)
          try:
            data = storage.read_bytes(path)
          except Exception as e:  # pylint: disable=broad-except  # any storage error: name the file
            raise OSError(f"{manifest_path}: utterance {i} ({path}): {type(e).__name__}: {e}") from e
          labels = {kind: texts[i] for kind, texts in manifest.labels.items()}
          writer.write(encode_record(manifest.paths[i], labels, data))
          total_bytes += len(data)
      finally:
        writer.close()
      records.append(hi - lo)
      if remote:      # upload each shard as soon as it is written: staging holds one shard at a time
        with open(local_shard, "rb") as src, storage.open_file(shard_name(out_prefix, s, shards), "wb") as dst:
          shutil.copyfileobj(src, dst, 1 << 24)
        os.remove(local_shard)
    index = {"format": FORMAT, "source": os.fspath(manifest_path), "root": manifest.root,
             "utterances": count, "labels": sorted(manifest.labels),
             "shards": [{"file": os.path.basename(shard_name(out_prefix, s, shards)), "records": records[s]}
                        for s in range(shards)]}
    sizes = np.asarray(manifest.sizes, np.int64)
    buf = io.BytesIO()
    np.save(buf, sizes)
    storage.write_bytes(out_prefix + ".sizes.npy", buf.getvalue())
    storage.write_text(out_prefix + INDEX_SUFFIX, json.dumps(index, indent=1) + "\n")
  finally:
    if staging is not None:
      staging.cleanup()
  log.info("packed %s: %d utterances, %d shards, %.1f MB -> %s%s", manifest_path, count, shards,
           total_bytes / 1e6, out_prefix, INDEX_SUFFIX)
  return {"utterances": count, "shards": shards, "bytes": total_bytes, "index": out_prefix + INDEX_SUFFIX}


class PackedSource:
  """Packed shards as a `Source` (see data/source.py); `label` picks "ltr" or "wrd" transcripts."""

  def __init__(self, index_path: str, label: str | None = None, cache_dir: str | None = None):
    self.index_path = os.fspath(index_path)
    try:
      index = json.loads(storage.read_text(self.index_path))
    except (OSError, ValueError) as e:
      raise ValueError(f"{self.index_path}: not a packed index ({e})") from e
    if index.get("format") != FORMAT:
      raise ValueError(f"{self.index_path}: format {index.get('format')!r}, expected {FORMAT!r}")
    prefix = self.index_path[:-len(INDEX_SUFFIX)]
    directory = storage.dirname(self.index_path)
    self.sizes = np.load(storage.bytes_io(prefix + ".sizes.npy"))
    if len(self.sizes) != index["utterances"] or sum(s["records"] for s in index["shards"]) != len(self.sizes):
      raise ValueError(f"{self.index_path}: {len(self.sizes)} sizes, {index['utterances']} utterances and "
                       f"{sum(s['records'] for s in index['shards'])} records disagree")
    if label is not None and label not in index["labels"]:
      raise ValueError(f"label {label!r} requested but {self.index_path} has transcripts {index['labels']}")
    self.label_key = label
    self._shards = [storage.join(directory, s["file"]) for s in index["shards"]]
    self._counts = [int(s["records"]) for s in index["shards"]]
    self._cache_dir = cache_dir or os.environ.get("W2V2_PACKED_CACHE") or None     # "" = no cache
    self._lock = threading.Lock()
    self._reader = None

  def __len__(self) -> int:
    return len(self.sizes)

  def describe(self, index: int) -> str:
    return f"{self.index_path}#{index}"

  def _data_source(self):
    """Grain's ArrayRecordDataSource over the (local or cached) shards, opened on first use."""
    with self._lock:
      if self._reader is None:
        import grain  # pylint: disable=import-outside-toplevel
        paths = [self._local(p) for p in self._shards]
        self._reader = grain.sources.ArrayRecordDataSource(paths)
        if len(self._reader) != len(self.sizes):
          raise ValueError(f"{self.index_path}: the shards hold {len(self._reader)} records, the index "
                           f"{len(self.sizes)}")
      return self._reader

  def _local(self, shard: str) -> str:
    """The path ArrayRecord opens for `shard`: itself (local, or gs:// read in place) or a cached copy."""
    if not storage.is_remote(shard) or (shard.startswith("gs://") and self._cache_dir is None):
      if not storage.isfile(shard):
        raise FileNotFoundError(f"{self.index_path}: shard {shard} is missing")
      return shard
    if self._cache_dir is None:      # shared by runs and processes on this host
      self._cache_dir = os.path.join(tempfile.gettempdir(), "w2v2_packed_cache")
    os.makedirs(self._cache_dir, exist_ok=True)
    tag = hashlib.sha1(shard.encode()).hexdigest()[:12]      # one cache file per URL
    local = os.path.join(self._cache_dir, f"{tag}-{os.path.basename(shard)}")
    if not os.path.isfile(local) or os.path.getsize(local) != storage.getsize(shard):
      tmp = local + f".part{os.getpid()}.{threading.get_ident()}"
      try:
        with storage.open_file(shard, "rb") as src, open(tmp, "wb") as dst:
          shutil.copyfileobj(src, dst, 1 << 24)
        os.replace(tmp, local)
      finally:
        if os.path.exists(tmp):
          os.remove(tmp)
      log.info("cached %s at %s", shard, local)
    return local

  def read(self, index: int) -> tuple[dict[str, Any], bytes]:
    """Utterance `index`'s header {"path", "labels"} and encoded bytes."""
    return decode_record(self._data_source()[int(index)])

  def load(self, index: int, *, sample_rate: int = 16000, normalize: bool = False):
    from w2v2_jax.data.source import Example  # pylint: disable=import-outside-toplevel
    header, data = self.read(index)
    audio, info = load_audio_with_info(data, sample_rate, normalize,
                                       name=f"{self.describe(index)} ({header['path']})")
    label = header["labels"].get(self.label_key) if self.label_key else None
    return Example(audio, info, label)
