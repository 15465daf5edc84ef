"""Input pipeline throughput: audio-seconds per second one host produces, manifest vs packed shards.

    python benchmarks/data_pipeline.py                      # 240 synthetic FLACs, local disk + GCS emulator
    python benchmarks/data_pipeline.py --manifest=data/tts_corpus/train.tsv --no-emulator

For each source (a manifest of FLAC files; the same files packed by `w2v2 pack` into ArrayRecord
shards), each place (local disk; a GCS API server on loopback in its own process,
`gcp-storage-emulator`, when installed)
and each thread count (1, 2, all cores), one epoch of `pipeline.make_iterator` with `pretrain:base`'s
data settings (crop mode, buckets 2-15.6 s, rows of 4) is timed; audio-seconds per second counts the
samples delivered in batches. Packed shards on gs:// are timed read in place (ranged reads in the bucket,
the default) and through a local shard cache ($W2V2_PACKED_CACHE): the first epoch (with the copy) and
a second one.

Beside them: what the step consumes. This CPU's pretraining step (`pretrain:small`, the demo's model,
`--cpu_steps` updates of the production loop on the same manifest; its logged audio-s/s), and what
one TPU v5e-8 host needs to feed `pretrain:base` at the compile check's ideal update time
(README's compile table: 5000 s of audio per update in 0.194 s at 100% MFU), at 100% and 40% MFU.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import soundfile as sf

os.environ.setdefault("JAX_PLATFORMS", "cpu")     # the CPU step; keeps libtpu (if installed) uninitialised
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

V5E8_AUDIO_PER_UPDATE_S = 8 * 8 * 5 * 250000 / 16000    # accumulation x chips x rows x samples (README table)
V5E8_IDEAL_UPDATE_S = 0.194                             # README compile table, pretrain:base on v5e-8


def synthetic_corpus(directory: str, count: int, seed: int = 0) -> None:
  """`count` FLAC files of 2-16 s: band-limited noise with a moving tone (compresses like speech does not,
  so the decode cost is not flattered)."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  for i in range(count):
    n = int(rng.uniform(2.0, 16.0) * 16000)
    t = np.arange(n) / 16000
    tone = np.sin(2 * np.pi * (150 + 100 * np.sin(2 * np.pi * 0.5 * t)) * t)
    noise = np.convolve(rng.standard_normal(n), np.ones(8) / 8, mode="same")
    sf.write(os.path.join(directory, f"u{i:05d}.flac"), (0.2 * tone + 0.1 * noise).astype(np.float32), 16000)


def epoch_rate(source, threads: int) -> tuple[float, float]:
  """(audio-seconds delivered per wall second, wall seconds) for one epoch with `threads` threads."""
  from w2v2_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  it = pipeline.make_iterator(source, buckets=(32000, 64000, 128000, 250000), batch_samples=4 * 250000,
                              min_sample_size=32000, max_sample_size=250000, multiple_of=1, mode="crop",
                              epochs=1, num_threads=threads, prefetch=2 * threads)
  start = time.perf_counter()
  samples = 0
  for batch in it:
    samples += int((~batch["padding_mask"]).sum())
  wall = time.perf_counter() - start
  return samples / 16000 / wall, wall


def cpu_step_rate(tsv: str, steps: int, workdir: str) -> float:
  """Audio-seconds per second the production pretraining loop consumes on this CPU (pretrain:small)."""
  import json  # pylint: disable=import-outside-toplevel
  from w2v2_jax import configs  # pylint: disable=import-outside-toplevel
  from w2v2_jax.train import loop  # pylint: disable=import-outside-toplevel
  cfg = configs.get("pretrain", "small")
  cfg.data.train_manifest = tsv
  cfg.train.steps = steps
  cfg.train.log_every = 5
  cfg.train.checkpoint_every = 10 * steps
  loop.pretrain(cfg, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rates = [json.loads(line).get("perf/audio_sec_per_sec") for line in f]
  return float(np.median([r for r in rates if r]))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--manifest", help="A manifest to read (default: synthetic FLACs)")
  parser.add_argument("--utterances", type=int, default=240, help="Synthetic utterances")
  parser.add_argument("--shards", type=int, default=4)
  parser.add_argument("--no-emulator", dest="emulator", action="store_false", help="Local disk only")
  parser.add_argument("--cpu_steps", type=int, default=30,
                      help="Updates of pretrain:small timed for this CPU's consumption (0: skip)")
  args = parser.parse_args()
  cores = os.cpu_count() or 1
  threads = sorted({1, 2, cores})

  server = None
  if args.emulator:
    try:
      import gcs_server  # pylint: disable=import-outside-toplevel
      server = gcs_server.GcsServerProcess()    # its own process: the server does not share our GIL
      os.environ.update(server.env({}))   # before w2v2_jax configures its clients
    except ImportError as e:
      print(f"no GCS emulator ({e}): local disk only")
  from w2v2_jax import storage  # pylint: disable=import-outside-toplevel
  from w2v2_jax.data import manifest as manifest_lib, packed  # pylint: disable=import-outside-toplevel
  from w2v2_jax.data.source import open_source  # pylint: disable=import-outside-toplevel

  work = tempfile.mkdtemp(prefix="w2v2_bench_data_")
  tsv = args.manifest
  if tsv is None:
    synthetic_corpus(os.path.join(work, "audio"), args.utterances)
    manifest_lib.write_manifest(os.path.join(work, "audio"), work, valid_percent=0.0)
    tsv = os.path.join(work, "train.tsv")
  m = manifest_lib.read_manifest(tsv)
  hours = float(m.sizes.sum()) / 16000 / 3600
  local_index = packed.pack(tsv, os.path.join(work, "packed", "train"), shards=args.shards)["index"]
  places = {"local disk": (tsv, local_index)}
  if server is not None:
    lines = [server.gs("audio")]
    for i in range(len(m)):
      with open(m.path(i), "rb") as f:
        server.put(f"audio/{m.paths[i]}", f.read())
      lines.append(f"{m.paths[i]}\t{m.sizes[i]}")
    server.put("train.tsv", "\n".join(lines) + "\n")
    remote_index = packed.pack(server.gs("train.tsv"), server.gs("packed/train"), shards=args.shards)["index"]
    places["GCS emulator"] = (server.gs("train.tsv"), remote_index)

  print(f"{len(m)} utterances, {hours:.2f} h of audio, {args.shards} shards; {cores} cores; "
        "audio-seconds per second (per thread), one epoch each")
  print(f"| place | source | {' | '.join(f'{t} thread' + ('s' if t > 1 else '') for t in threads)} |")
  print(f"|---|---|{'---|' * len(threads)}")
  for place, (tsv_path, index) in places.items():
    remote = storage.is_remote(index)
    variants = [("manifest", tsv_path, False), ("packed" + (", read in place (default)" if remote else ""), index, False)]
    if remote:
      variants.append(("packed, `W2V2_PACKED_CACHE`: first epoch (copies the shards)", index, True))
    for name, path, cached in variants:
      cells, second = [], []
      for t in threads:
        os.environ.pop("W2V2_PACKED_CACHE", None)
        if cached:                                   # a cold cache for every run
          os.environ["W2V2_PACKED_CACHE"] = tempfile.mkdtemp(prefix="w2v2_bench_cache_", dir=work)
        source = open_source(path)
        rate, _ = epoch_rate(source, t)
        cell = f"{rate:,.0f} ({rate / t:,.0f})"
        if cached:
          warm, _ = epoch_rate(source, t)            # the shards are cached now
          second.append(f"{warm:,.0f} ({warm / t:,.0f})")
        cells.append(cell)
      print(f"| {place} | {name} | {' | '.join(cells)} |", flush=True)
      if second:
        print(f"| {place} | packed, `W2V2_PACKED_CACHE`: second epoch | {' | '.join(second)} |", flush=True)
  os.environ.pop("W2V2_PACKED_CACHE", None)

  need = V5E8_AUDIO_PER_UPDATE_S / V5E8_IDEAL_UPDATE_S
  print(f"\nconsumption: one TPU v5e-8 host, pretrain:base at the ideal update ({V5E8_IDEAL_UPDATE_S} s for "
        f"{V5E8_AUDIO_PER_UPDATE_S:.0f} s of audio): {need:,.0f} audio-s/s at 100% MFU, {0.4 * need:,.0f} at 40%")
  if args.cpu_steps:
    rate = cpu_step_rate(tsv, args.cpu_steps, os.path.join(work, "run"))
    print(f"consumption: this CPU's step (pretrain:small, {cores} cores, median of the logged windows): "
          f"{rate:,.1f} audio-s/s")
  if server is not None:
    server.stop()


if __name__ == "__main__":
  main()
