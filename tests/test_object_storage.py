"""Every path on gs://, against a real GCS API server on loopback (tests/gcs_server.py).

The README's pod command in miniature: audio in a bucket, `w2v2 manifest` writes the manifests there,
`pretrain` checkpoints there and resumes from there, `pack` writes ArrayRecord shards there, `finetune` trains on them from the
bucket's pretraining run and writes its metrics,
best.json, valid.jsonl and export/ there, and `evaluate` and `transcribe` read the model and the audio
from the bucket. Nothing is written to the local disk but what the test itself puts there.
"""
import hashlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

import gcs_server

pytest.importorskip("gcsfs")
pytest.importorskip("gcp_storage_emulator")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTES = {147: "B", 196: "C", 247: "D", 330: "E"}
CLI = [sys.executable, "-m", "w2v2_jax.cli"]


def note_clips(count=24, seed=3):
  """{name: (FLAC bytes, transcript words)}: 3-5 notes per clip, 1.1-2.6 s."""
  rng = np.random.default_rng(seed)
  clips = {}
  for i in range(count):
    pieces, words = [], []
    for _ in range(rng.integers(3, 6)):
      f0 = int(rng.choice(list(NOTES)))
      t = np.arange(int(rng.uniform(0.3, 0.45) * 16000)) / 16000
      pieces += [np.hanning(len(t)) * np.sin(2 * np.pi * f0 * t), np.zeros(800)]
      words.append(NOTES[f0])
    x = (0.3 * np.concatenate(pieces) + 0.01 * rng.standard_normal(sum(map(len, pieces)))).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, x, 16000, format="FLAC")
    clips[f"c{i:02d}.flac"] = (buf.getvalue(), words)
  return clips


def run(args, env, cwd, timeout=600):
  proc = subprocess.run(CLI + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
  return proc


@pytest.fixture(scope="module")
def gcs():
  with gcs_server.running() as server:
    yield server


def test_every_path_on_gcs(gcs, tmp_path):
  env = gcs.env()
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  work = tmp_path / "cwd"
  work.mkdir()
  clips = note_clips()
  for name, (data, _) in clips.items():
    gcs.put(f"corpus/audio/{name}", data)

  # 1. Manifests from the bucket's audio, written to the bucket; transcripts next to them.
  run(["manifest", f"--root={gcs.gs('corpus/audio')}", f"--out={gcs.gs('manifests')}", "--valid_percent=0.25"], env, work)
  splits = {}
  for split in ("train", "valid"):
    lines = gcs.get(f"manifests/{split}.tsv").decode().splitlines()
    assert lines[0] == gcs.gs("corpus/audio")
    splits[split] = [line.split("\t") for line in lines[1:]]
    gcs.put(f"manifests/{split}.ltr", "".join(" ".join(f"{w} |" for w in clips[name][1]) + "\n"
                                               for name, _ in splits[split]))
  assert sorted(n for s in splits.values() for n, _ in s) == sorted(clips)
  assert all(int(size) == sf.info(io.BytesIO(clips[name][0])).frames for name, size in splits["train"])
  assert len(splits["valid"]) >= 2

  # 2. Pretraining in the bucket: stopped after 2 updates, resumed to 4; a local run of 4 updates
  # without the stop gives the same parameters.
  manifest = f"--config.data.train_manifest={gcs.gs('manifests/train.tsv')}"
  pre = ["pretrain", "--config=pretrain:tiny", manifest, "--config.train.steps=4",
         "--config.train.checkpoint_every=2", "--config.train.log_every=1"]
  run(pre + [f"--workdir={gcs.gs('runs/pt')}", "--max_steps=2"], env, work)
  assert any(n.startswith("runs/pt/checkpoints/2/") for n in gcs.list("runs/pt/"))
  resumed = run(pre + [f"--workdir={gcs.gs('runs/pt')}"], env, work)
  assert "resumed from step 2" in resumed.stderr
  stored = gcs.list("runs/pt/")
  assert "runs/pt/metrics.jsonl" in stored and any(n.startswith("runs/pt/checkpoints/4/") for n in stored)
  # The first update of each invocation compiles and is not logged; the resumed run kept step 2's line.
  assert [json.loads(line)["step"] for line in gcs.get("runs/pt/metrics.jsonl").decode().splitlines()
          if '"loss"' in line] == [2, 4]
  # The resume restored step 2's checkpoint from the bucket (Orbax through tensorstore); resume
  # exactness itself is tested locally (test_pretrain_loop's SIGTERM test).

  # 3. Packed shards in the bucket, then fine-tuning on them from the bucket's pretraining run, into
  # the bucket, validating on the bucket's manifest.
  run(["pack", gcs.gs("manifests/train.tsv"), gcs.gs("packed/train"), "--shards=2"], env, work)
  assert gcs.list("packed/") == ["packed/train-00000-of-00002.array_record", "packed/train-00001-of-00002.array_record",
                                 "packed/train.packed.json", "packed/train.sizes.npy"]
  run(["finetune", "--config=finetune:tiny", f"--workdir={gcs.gs('runs/ft')}",
       f"--config.init={gcs.gs('runs/pt')}", f"--config.data.train_manifest={gcs.gs('packed/train.packed.json')}",
       f"--config.data.valid_manifest={gcs.gs('manifests/valid.tsv')}", "--config.data.label=ltr",
       "--config.train.steps=4", "--config.train.eval_every=2", "--config.train.checkpoint_every=4",
       "--config.train.freeze_updates=0", "--config.train.log_every=1"], env, work)
  stored = gcs.list("runs/ft/")
  for name in ("runs/ft/best.json", "runs/ft/valid.jsonl", "runs/ft/metrics.jsonl", "runs/ft/export/config.json",
               "runs/ft/export/model.safetensors", "runs/ft/export/vocab.json",
               "runs/ft/export/preprocessor_config.json"):
    assert name in stored, name
  valid = [json.loads(line) for line in gcs.get("runs/ft/valid.jsonl").decode().splitlines()]
  assert [v["step"] for v in valid] == [2, 4]
  assert valid[0]["valid/utterances"] == len(splits["valid"])

  # 4. Evaluation and transcription read the model and the audio from the bucket.
  out = run(["evaluate", f"--checkpoint={gcs.gs('runs/ft')}", f"--data={gcs.gs('manifests/valid.tsv')}",
             "--label=ltr", f"--out={gcs.gs('eval/hyp.tsv')}"], env, work).stdout
  hyps = gcs.get("eval/hyp.tsv").decode().splitlines()
  assert len(hyps) == 1 + len(splits["valid"]) and "WER" in out.upper()
  first = gcs.gs(f"corpus/audio/{splits['valid'][0][0]}")
  out = run(["transcribe", first, f"--checkpoint={gcs.gs('runs/ft')}"], env, work).stdout
  assert out.startswith(first + "\t")

  # Nothing went to the local disk.
  assert os.listdir(work) == []


READ_PACKED = """
import hashlib, json, os, sys
import w2v2_jax
from w2v2_jax.data import packed
index, order, cache = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] or None
source = packed.PackedSource(index, label="wrd", cache_dir=cache)
rows = []
for i in order:
  header, data = source.read(i)
  example = source.load(i)
  rows.append([header["path"], hashlib.sha1(data).hexdigest(), example.label, len(example.audio)])
print(json.dumps(rows))
"""


def test_packed_shards_are_read_in_place_from_gcs(gcs, tmp_path):
  """gs:// shards are read record by record in the bucket (ranged reads, no local copy) and give the
  local shards' records; with a cache directory they are copied whole once and read from it."""
  audio = tmp_path / "audio"
  audio.mkdir()
  clips = note_clips(count=12, seed=5)
  for name, (data, _) in clips.items():
    (audio / name).write_bytes(data)
  names = sorted(clips)
  (tmp_path / "train.tsv").write_text(str(audio) + "\n" + "".join(
      f"{n}\t{sf.info(io.BytesIO(clips[n][0])).frames}\n" for n in names))
  (tmp_path / "train.wrd").write_text("".join(" ".join(clips[n][1]) + "\n" for n in names))
  from w2v2_jax.data import packed  # pylint: disable=import-outside-toplevel
  index = packed.pack(str(tmp_path / "train.tsv"), str(tmp_path / "packed" / "train"), shards=2)["index"]
  for name in sorted(os.listdir(tmp_path / "packed")):
    gcs.put(f"inplace/{name}", (tmp_path / "packed" / name).read_bytes())

  env = gcs.env()
  env.pop("XLA_FLAGS", None)
  env.pop("W2V2_PACKED_CACHE", None)
  env["JAX_PLATFORMS"] = "cpu"
  env["TMPDIR"] = str(tmp_path / "tmp")       # where the default shard cache would go
  os.mkdir(env["TMPDIR"])

  def read(path, order, cache=""):
    proc = subprocess.run([sys.executable, "-c", READ_PACKED, path, json.dumps(order), cache], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])

  shard = "inplace/train-00001-of-00002.array_record"
  shard_bytes = len(gcs.get(shard))
  order = [9, 2, 11, 0, 6]
  local_source = packed.PackedSource(index, label="wrd")
  local = [[h["path"], hashlib.sha1(d).hexdigest(), local_source.load(i).label, len(local_source.load(i).audio)]
           for i in order for h, d in [local_source.read(i)]]
  remote = read(gcs.gs("inplace/train.packed.json"), order)
  assert remote == local
  assert [row[0] for row in remote] == [names[i] for i in order]
  assert [row[2] for row in remote] == [" ".join(clips[names[i]][1]) for i in order]
  assert os.listdir(env["TMPDIR"]) == []              # no shard was copied
  # One record of shard 1 (records 6-11): every request for the shard is a ranged read (its index from
  # the end, then the record from its offset), none a whole-object download. (The emulator answers a
  # suffix range "bytes=-N" with the whole object; GCS sends the last N bytes.)
  gcs_server.REQUESTS.clear()
  assert read(gcs.gs("inplace/train.packed.json"), [9]) == [local[0]]
  ranges = [r for b, name, r in gcs_server.REQUESTS if (b, name) == (gcs.bucket, shard)]
  assert ranges and all(r and r.startswith("bytes=") for r in ranges), ranges
  record_offsets = [int(r[len("bytes="):].split("-")[0]) for r in ranges if not r.startswith("bytes=-")]
  assert record_offsets and all(0 < o < shard_bytes for o in record_offsets), ranges
  assert not any(name == "inplace/train-00000-of-00002.array_record" and r and not r.startswith("bytes=-")
                 for _, name, r in gcs_server.REQUESTS)       # shard 0's records were not read

  # With a cache directory: each shard copied whole, once; the records are the same.
  cache = tmp_path / "cache"
  assert read(gcs.gs("inplace/train.packed.json"), order, str(cache)) == local
  cached = {name.split("-", 1)[1]: os.path.getsize(cache / name) for name in os.listdir(cache)}
  assert cached == {"train-00000-of-00002.array_record": len(gcs.get("inplace/train-00000-of-00002.array_record")),
                    "train-00001-of-00002.array_record": shard_bytes}


READ_TFDS = """
import hashlib, json, sys
import w2v2_jax
from w2v2_jax.data import tfds_source
source = tfds_source.TfdsSource("train", name="tone_speech", data_dir=sys.argv[1], sizes_cache=sys.argv[2])
rows = [[source.load(i).label, hashlib.sha1(source.load(i).audio.tobytes()).hexdigest()] for i in range(len(source))]
print(json.dumps({"sizes": source.sizes.tolist(), "rows": rows}))
"""


def test_tfds_data_dir_on_gcs(gcs, tmp_path):
  """A tfds dataset prepared in ArrayRecord format, its data dir in the bucket: the utterances, sizes
  and transcripts the builder wrote, and the sizes cache written to the bucket."""
  pytest.importorskip("tensorflow")
  tfds = pytest.importorskip("tensorflow_datasets")
  import numpy as np  # pylint: disable=import-outside-toplevel,redefined-outer-name,reimported

  class ToneSpeech(tfds.core.GeneratorBasedBuilder):
    """Six tones of 0.6-1.1 s with a text each."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "speech": tfds.features.Audio(sample_rate=16000, dtype=np.int16), "text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(6):
        t = np.arange(9600 + 1600 * i) / 16000
        yield i, {"speech": (8000 * np.sin(2 * np.pi * (200 + 50 * i) * t)).astype(np.int16), "text": f"tone {i}"}

  local_dir = tmp_path / "tfds"
  ToneSpeech(data_dir=str(local_dir), file_format="array_record").download_and_prepare()
  for path in sorted(local_dir.rglob("*")):
    if path.is_file():
      gcs.put(f"tfds/{path.relative_to(local_dir)}", path.read_bytes())
  env = gcs.env()
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"

  def read(data_dir, cache):
    proc = subprocess.run([sys.executable, "-c", READ_TFDS, data_dir, cache], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])

  remote = read(gcs.gs("tfds"), gcs.gs("tfds_sizes.npy"))
  # What the builder wrote, as tfds orders it (by key hash): each label's tone, its length and samples.
  by_label = {f"tone {i}": (8000 * np.sin(2 * np.pi * (200 + 50 * i) * np.arange(9600 + 1600 * i) / 16000))
              .astype(np.int16) for i in range(6)}
  assert sorted(label for label, _ in remote["rows"]) == sorted(by_label)
  assert remote["sizes"] == [len(by_label[label]) for label, _ in remote["rows"]]
  assert [digest for _, digest in remote["rows"]] == [
      hashlib.sha1((by_label[label] / 32768.0).astype(np.float32).tobytes()).hexdigest() for label, _ in remote["rows"]]
  assert np.load(io.BytesIO(gcs.get("tfds_sizes.npy"))).tolist() == remote["sizes"]
