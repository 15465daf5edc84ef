"""Packed ArrayRecord shards (`w2v2 pack`): the same batches as the manifest they came from, exact
resume, the bytes kept as they were, and errors that name what is wrong."""
import json
import os

import numpy as np
import pytest

from test_data import ONE_BUCKET, build_corpus, collect
from w2v2_jax import cli
from w2v2_jax.data import manifest, packed, pipeline
from w2v2_jax.data.source import ManifestSource, open_source
from w2v2_jax.train import loop

pytest.importorskip("array_record")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A manifest of 25 good files and 6 bad ones that exist (empty, garbage, truncated, NaN, short; their
  sizes claim they are usable), with .wrd transcripts, and its packing into 3 shards."""
  d = tmp_path_factory.mktemp("corpus")
  full, _ = build_corpus(d, labels=True)
  m = manifest.read_manifest(full)
  keep = [i for i in range(len(m)) if os.path.exists(m.path(i))]    # `pack` refuses a missing file
  tsv = str(d / "present.tsv")
  with open(tsv, "w") as f:
    f.write(m.root + "\n" + "".join(f"{m.paths[i]}\t{m.sizes[i]}\n" for i in keep))
  with open(d / "present.wrd", "w") as f:
    f.write("".join(m.labels["wrd"][i] + "\n" for i in keep))
  result = packed.pack(tsv, str(d / "packed" / "train"), shards=3)
  return tsv, result["index"]


def assert_same_batches(a, b):
  assert len(a) == len(b) and len(a) > 0
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for key in x:
      if key == "stats":
        assert x[key] == y[key]
      else:
        np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_packed_gives_the_manifests_batches(corpus, mode):
  tsv, index = corpus
  kw = dict(ONE_BUCKET, buckets=(3200, 6400, 9600), batch_samples=4 * 9600, max_sample_size=9600, mode=mode,
            epochs=2, num_threads=2, prefetch=2)
  reference = pipeline.make_iterator(ManifestSource(tsv, label="wrd"), **kw)
  from_manifest = collect(reference)
  it = pipeline.make_iterator(open_source(index, label="wrd"), **kw)
  from_packed = collect(it)
  assert_same_batches(from_manifest, from_packed)
  assert it.totals == reference.totals
  assert it.totals["replaced"] >= 1 and sum(it.totals[k] for k in ("empty", "undecodable", "truncated", "non_finite")) >= 3
  assert any(b.get("labels") is not None and b["labels"].size for b in from_packed)


def test_packed_resume_is_exact(corpus):
  _, index = corpus
  kw = dict(ONE_BUCKET, epochs=None, num_threads=2, prefetch=2)
  straight = collect(pipeline.make_iterator(index, **kw), 9)
  first = pipeline.make_iterator(index, **kw)
  head = collect(first, 4)
  state = json.loads(json.dumps(first.get_state()))       # through JSON, as the checkpoint stores it
  second = pipeline.make_iterator(index, **kw)
  second.set_state(state)
  assert_same_batches(straight, head + collect(second, 5))


def test_records_hold_the_files_bytes(corpus):
  tsv, index = corpus
  m = manifest.read_manifest(tsv)
  source = packed.PackedSource(index)
  assert len(source) == len(m) and np.array_equal(source.sizes, m.sizes)
  for i in range(len(m)):
    header, data = source.read(i)
    assert header["path"] == m.paths[i] and header["labels"] == {"wrd": m.labels["wrd"][i]}
    assert data == open(m.path(i), "rb").read()


def test_pack_command_and_train_config(corpus, tmp_path, capsys):
  tsv, _ = corpus
  result = cli.run(["pack", tsv, str(tmp_path / "p" / "shard"), "--shards=2"])
  assert result["shards"] == 2 and "train_manifest=" in capsys.readouterr().out
  names = sorted(os.listdir(tmp_path / "p"))
  assert names == ["shard-00000-of-00002.array_record", "shard-00001-of-00002.array_record",
                   "shard.packed.json", "shard.sizes.npy"]
  from w2v2_jax import configs
  cfg = configs.get("finetune", "tiny")
  cfg.data.train_manifest = result["index"]
  source = loop.make_source(cfg, "wrd")
  assert isinstance(source, packed.PackedSource) and source.label_key == "wrd"


def test_pack_errors_name_the_problem(tmp_path, corpus):
  tsv, index = corpus
  d = tmp_path / "m"
  d.mkdir()
  (d / "train.tsv").write_text(f"{d}\nmissing.flac\t16000\n")
  with pytest.raises(OSError, match="utterance 0 .*missing.flac"):
    packed.pack(str(d / "train.tsv"), str(tmp_path / "out" / "x"))
  with pytest.raises(SystemExit, match="w2v2 pack: .*missing.flac"):
    cli.run(["pack", str(d / "train.tsv"), str(tmp_path / "out" / "x")])
  with pytest.raises(ValueError, match="shards must be >= 1"):
    packed.pack(tsv, str(tmp_path / "out" / "y"), shards=0)
  with pytest.raises(ValueError, match="label 'ltr' requested"):
    packed.PackedSource(index, label="ltr")
  broken = tmp_path / "broken.packed.json"
  broken.write_text(json.dumps({"format": "something else"}))
  with pytest.raises(ValueError, match="broken.packed.json: format"):
    packed.PackedSource(str(broken))


def test_shards_split_evenly(corpus, tmp_path):
  """31 utterances into 10 shards: every shard holds 3 or 4 records (none empty), all are readable."""
  tsv, _ = corpus
  index = packed.pack(tsv, str(tmp_path / "ten"), shards=10)["index"]
  counts = [s["records"] for s in json.load(open(index))["shards"]]
  assert len(counts) == 10 and sum(counts) == 31 and min(counts) >= 3 and max(counts) <= 4
  source = packed.PackedSource(index)
  assert [source.read(i)[0]["path"] for i in range(31)] == manifest.read_manifest(tsv).paths
