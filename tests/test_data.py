"""Tests of w2v2_jax.data: decoding, manifests, the global batch plan, host sharding, the pipeline."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st

from w2v2_jax.data import audio, batching, manifest, pipeline
from w2v2_jax.data.audio import AudioError
from w2v2_jax.data.source import ManifestSource

SETTINGS = settings(deadline=None, max_examples=40, derandomize=True)


def sine(freq, seconds, rate, amp=0.5):
  t = np.arange(int(round(seconds * rate))) / rate
  return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(x, rate):
  spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
  return np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spectrum)]


def truncate(path, keep=0.5):
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:int(len(data) * keep)])


# --- audio -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("rate,freq,seconds", [(8000, 440.0, 1.0), (44100, 1000.0, 0.5)])
def test_load_audio_resamples_to_16k(tmp_path, rate, freq, seconds):
  path = str(tmp_path / f"s{rate}.wav")
  sf.write(path, sine(freq, seconds, rate), rate)
  x, info = audio.load_audio_with_info(path)
  assert x.dtype == np.float32 and x.shape == (int(seconds * 16000),)
  assert info.resampled and not info.downmixed and info.orig_sample_rate == rate
  assert abs(peak_hz(x, 16000) - freq) <= 16000 / len(x)
  assert np.sqrt(np.mean(x[1000:-1000] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


def test_load_audio_16k_flac_is_exact_and_stereo_is_downmixed(tmp_path):
  left, right = sine(300, 0.25, 16000), sine(700, 0.25, 16000, amp=0.25)
  sf.write(str(tmp_path / "mono.flac"), left, 16000, subtype="PCM_24")
  np.testing.assert_allclose(audio.load_audio(str(tmp_path / "mono.flac")), left, atol=2e-7)
  sf.write(str(tmp_path / "stereo.wav"), np.stack([left, right], 1), 16000, subtype="FLOAT")
  x, info = audio.load_audio_with_info(str(tmp_path / "stereo.wav"))
  assert info.downmixed and info.channels == 2 and not info.resampled
  np.testing.assert_allclose(x, (left + right) / 2, atol=1e-7)


def test_load_audio_normalize(tmp_path):
  path = str(tmp_path / "n.wav")
  sf.write(path, 0.3 + sine(200, 0.5, 16000, amp=0.1), 16000, subtype="FLOAT")
  x = audio.load_audio(path, normalize=True)
  assert abs(x.mean()) < 1e-5 and x.std() == pytest.approx(1.0, abs=1e-3)


def test_load_audio_librosa_fallback(tmp_path, monkeypatch):
  path = str(tmp_path / "f.wav")
  sf.write(path, sine(440, 0.2, 16000), 16000)

  def refuse(*args, **kwargs):
    raise sf.LibsndfileError(0, "pretend libsndfile cannot read this format")

  monkeypatch.setattr(audio.sf, "read", refuse)
  monkeypatch.setattr(audio.sf, "info", refuse)      # a format libsndfile does not know at all
  np.testing.assert_allclose(audio.load_audio(path), sine(440, 0.2, 16000), atol=1e-4)


def test_damaged_file_of_a_known_format_is_not_half_decoded_by_the_fallback(tmp_path, monkeypatch):
  """A truncated FLAC: libsndfile parses its header but fails on the frames. The fallback decoder
  (librosa -> audioread -> ffmpeg where installed) would return the frames before the cut without an
  error; the file must be reported as truncated, never trained on as a shorter utterance, and the
  fallback is not even asked (this holds with and without ffmpeg on the machine)."""
  import librosa
  path = str(tmp_path / "cut.flac")
  sf.write(path, np.random.default_rng(0).uniform(-.5, .5, 16000), 16000)
  truncate(path)
  calls = []
  real_load = librosa.load

  def spy(*args, **kwargs):
    calls.append(args)
    return real_load(*args, **kwargs)

  monkeypatch.setattr(librosa, "load", spy)
  for source in (path, open(path, "rb").read()):
    with pytest.raises(AudioError) as err:
      audio.load_audio_with_info(source, name=path)
    assert err.value.reason == "truncated" and "of the 16000 frames its FLAC header declares" in str(err.value)
    decoded = int(str(err.value).split("decoded ")[1].split(" ")[0])
    assert 0 < decoded < 16000 and path in str(err.value)
  assert not calls


FFMPEG = shutil.which("ffmpeg")
needs_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="ffmpeg is not installed (`make test` installs it)")


def write_adts(path, seconds, rate=16000):
  """An AAC (ADTS) file made by ffmpeg: a format libsndfile does not know, which the fallback decodes."""
  subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                  f"sine=frequency=440:duration={seconds}:sample_rate={rate}", "-c:a", "aac", "-f", "adts",
                  "-y", path], check=True)


@needs_ffmpeg
def test_fallback_decoder_through_ffmpeg(tmp_path):
  """With ffmpeg installed, librosa (audioread) decodes what libsndfile cannot; a file cut short in such
  a format decodes without an error, and only a length to compare with can catch it (the pipeline's
  manifest check, below)."""
  path = str(tmp_path / "tone.aac")
  write_adts(path, 1)
  x, info = audio.load_audio_with_info(path)
  assert info.orig_sample_rate == 16000 and 16000 <= x.size < 18000   # AAC adds encoder padding
  assert abs(peak_hz(x, 16000) - 440) < 5
  truncate(path)
  cut, _ = audio.load_audio_with_info(path)
  assert 0 < cut.size < 12000


def test_pipeline_counts_a_decoded_length_short_of_the_manifest_as_truncated(tmp_path, caplog):
  """Whatever decoder decoded it, a file shorter than its manifest size is `truncated`, never used; a
  manifest of the file's own frames at another rate (fairseq's) is not mistaken for that."""
  d = str(tmp_path)
  tone_file(os.path.join(d, "whole.wav"), 1, 6400)
  tone_file(os.path.join(d, "short.wav"), 2, 4000)             # the manifest says 6400
  tone_file(os.path.join(d, "low.wav"), 3, 6400, rate=8000)      # own frames: 6400 at 8 kHz
  tone_file(os.path.join(d, "low16.wav"), 4, 3200, rate=8000)    # 16 kHz samples: 6400
  names = ["whole.wav", "short.wav", "low.wav", "low16.wav"]
  if FFMPEG:
    write_adts(os.path.join(d, "cut.aac"), 1)
    truncate(os.path.join(d, "cut.aac"))
    names.append("cut.aac")
  sizes = np.array([6400, 6400, 6400, 6400, 16000][:len(names)])
  kw = dict(ONE_BUCKET, buckets=(3200,), batch_samples=len(names) * 3200, min_sample_size=3200, multiple_of=1)
  it = pipeline.make_iterator(manifest.Manifest(d, names, sizes), epochs=1, num_threads=0, **kw)
  batches = collect(it)
  assert len(batches) == 1
  assert it.totals["truncated"] == len(names) - 3 and it.totals["too_short"] == 0
  assert {utterance_of(r) for r in batches[0]["audio"][0]} == {1, 3, 4}
  assert "short.wav: truncated (decoded 4000 samples; the source says 6400)" in caplog.text
  if FFMPEG:
    assert "cut.aac: truncated" in caplog.text


def write_bad_files(d):
  """{reason: path} for each kind of unusable file, created in directory d."""
  d = str(d)
  paths = {"missing": os.path.join(d, "missing.flac")}
  paths["empty"] = os.path.join(d, "empty.wav")
  open(paths["empty"], "wb").close()
  paths["empty_frames"] = os.path.join(d, "empty_frames.wav")
  sf.write(paths["empty_frames"], np.zeros(0, np.float32), 16000)
  paths["undecodable"] = os.path.join(d, "garbage.wav")
  with open(paths["undecodable"], "wb") as f:
    f.write(b"this is not audio" * 20)
  paths["truncated"] = os.path.join(d, "truncated.wav")
  sf.write(paths["truncated"], sine(440, 0.5, 16000), 16000)
  truncate(paths["truncated"])
  paths["truncated_flac"] = os.path.join(d, "truncated.flac")
  sf.write(paths["truncated_flac"], np.random.default_rng(0).uniform(-.5, .5, 16000), 16000)
  truncate(paths["truncated_flac"])
  paths["non_finite"] = os.path.join(d, "nan.wav")
  x = sine(440, 0.5, 16000)
  x[100] = np.nan
  sf.write(paths["non_finite"], x, 16000, subtype="FLOAT")
  return paths


EXPECTED_REASON = {"missing": "missing", "empty": "empty", "empty_frames": "empty",
                   "undecodable": "undecodable", "truncated": "truncated",
                   "truncated_flac": "truncated", "non_finite": "non_finite"}


def test_load_audio_bad_files_raise_audio_error(tmp_path):
  for kind, path in write_bad_files(tmp_path).items():
    with pytest.raises(AudioError) as err:
      audio.load_audio(path)
    assert isinstance(err.value, ValueError)
    assert err.value.reason == EXPECTED_REASON[kind], kind
    assert path in str(err.value) and EXPECTED_REASON[kind] in str(err.value)


# --- manifest --------------------------------------------------------------------------------------

def make_corpus(root, n=20):
  """n 16 kHz files (flac and wav, in subfolders), one 8 kHz file, one junk .wav, one .txt."""
  rng = np.random.default_rng(1)
  frames = {}
  for i in range(n):
    rel = os.path.join(f"spk{i % 3}", f"utt{i:02d}.{'flac' if i % 2 else 'wav'}")
    os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
    frames[rel] = int(rng.integers(1000, 9000))
    sf.write(os.path.join(root, rel), rng.uniform(-.3, .3, frames[rel]), 16000)
  sf.write(os.path.join(root, "low.wav"), sine(300, 0.5, 8000), 8000)
  with open(os.path.join(root, "junk.wav"), "wb") as f:
    f.write(b"RIFF????WAVEjunk")
  with open(os.path.join(root, "notes.txt"), "w") as f:
    f.write("not audio")
  return frames


def test_write_manifest_reads_headers_and_splits_deterministically(tmp_path, caplog):
  frames = make_corpus(str(tmp_path / "audio"))
  counts = manifest.write_manifest(str(tmp_path / "audio"), str(tmp_path / "m1"), valid_percent=0.3)
  assert "junk.wav: unreadable header" in caplog.text
  assert counts["skipped"] == 1 and counts["train"] + counts["valid"] == len(frames) + 1
  assert counts["train"] > 0 and counts["valid"] > 0
  train = manifest.read_manifest(str(tmp_path / "m1" / "train.tsv"))
  valid = manifest.read_manifest(str(tmp_path / "m1" / "valid.tsv"))
  assert train.root == valid.root == os.path.realpath(tmp_path / "audio")
  assert not set(train.paths) & set(valid.paths)
  got = dict(zip(train.paths + valid.paths, np.concatenate([train.sizes, valid.sizes]).tolist()))
  assert got == {**frames, "low.wav": 8000}  # 4000 frames at 8 kHz = 8000 samples at 16 kHz
  assert train.sizes.dtype == np.int64
  manifest.write_manifest(str(tmp_path / "audio"), str(tmp_path / "m2"), valid_percent=0.3)
  for split in ("train.tsv", "valid.tsv"):
    assert (tmp_path / "m1" / split).read_text() == (tmp_path / "m2" / split).read_text()
  native = manifest.write_manifest(str(tmp_path / "audio"), str(tmp_path / "m3"), valid_percent=0,
                                   exts=("wav",), sample_rate=None)
  assert not (tmp_path / "m3" / "valid.tsv").exists()
  m3 = manifest.read_manifest(str(tmp_path / "m3" / "train.tsv"))
  assert native["train"] == len(m3) == 11 and dict(zip(m3.paths, m3.sizes))["low.wav"] == 4000


def test_read_manifest_labels_and_errors(tmp_path):
  tsv = tmp_path / "train.tsv"
  tsv.write_text("/data\na.flac\t100\nb/c.wav\t200\n")
  (tmp_path / "train.ltr").write_text("H I |\nT H E R E |\n")
  (tmp_path / "train.wrd").write_text("HI\nTHERE\n")
  m = manifest.read_manifest(str(tsv))
  assert m.paths == ["a.flac", "b/c.wav"] and m.sizes.tolist() == [100, 200]
  assert m.labels == {"ltr": ["H I |", "T H E R E |"], "wrd": ["HI", "THERE"]}
  assert m.path(1) == "/data/b/c.wav"
  assert ManifestSource(m, label="wrd").label_key == "wrd"
  (tmp_path / "train.wrd").write_text("HI\n")
  with pytest.raises(ValueError, match="train.wrd"):
    manifest.read_manifest(str(tsv))
  bad = tmp_path / "bad.tsv"
  bad.write_text("/data\na.flac\t100\nb.flac 200\n")
  with pytest.raises(ValueError, match=r"bad.tsv:3"):
    manifest.read_manifest(str(bad))
  bad.write_text("/data\na.flac\tmany\n")
  with pytest.raises(ValueError, match=r"bad.tsv:2: num_samples"):
    manifest.read_manifest(str(bad))


# --- the global plan -------------------------------------------------------------------------------

PLAN = dict(buckets=(32000, 64000, 128000, 250000), batch_samples=1_000_000, min_sample_size=32000,
            max_sample_size=250000, multiple_of=4, accumulate=2, seed=3)


def lengths(n=3000, seed=0):
  return np.random.default_rng(seed).integers(5000, 400000, n)


def check_plan(plan, sizes, mode, buckets, batch_samples, min_size, max_size, multiple_of, accumulate):
  b_arr = np.asarray(buckets)
  seen = []
  for e in plan:
    assert e.bucket_len in buckets and e.batch_size * e.bucket_len <= batch_samples
    assert e.batch_size % multiple_of == 0 and e.batch_size >= multiple_of
    assert e.indices.shape == (accumulate, e.batch_size)
    n = sizes[e.indices]
    assert (n >= min_size).all()
    if mode == "crop":  # never pads: the largest bucket <= min(n, max)
      expect = b_arr[np.searchsorted(b_arr, np.minimum(n, max_size), side="right") - 1]
    else:  # never crops: the smallest bucket >= n
      assert (n <= max_size).all()
      expect = b_arr[np.searchsorted(b_arr, n)]
    assert (expect == e.bucket_len).all()
    seen.extend(e.indices.ravel().tolist())
  return seen


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_plan_invariants(mode):
  sizes = lengths()
  plan = batching.make_plan(sizes, mode=mode, epoch=0, **PLAN)
  seen = check_plan(plan, sizes, mode, PLAN["buckets"], PLAN["batch_samples"], PLAN["min_sample_size"],
                    PLAN["max_sample_size"], PLAN["multiple_of"], PLAN["accumulate"])
  assert len(seen) == len(set(seen))  # every kept utterance once per epoch
  dropped = plan.dropped
  assert dropped["too_short"] == int((sizes < PLAN["min_sample_size"]).sum())
  assert dropped["too_long"] == (int((sizes > 250000).sum()) if mode == "pad" else 0)
  assert len(seen) + sum(dropped.values()) == len(sizes)
  # The remainder is under one entry (accumulate x batch) per bucket.
  caps = batching.bucket_batch_sizes(PLAN["buckets"], PLAN["batch_samples"], PLAN["multiple_of"])
  assert caps == {32000: 28, 64000: 12, 128000: 4, 250000: 4}
  assert dropped["remainder"] < sum(PLAN["accumulate"] * b for b in caps.values())
  # In pad mode the smallest bucket only takes utterances of exactly min_sample_size samples.
  assert {e.bucket_len for e in plan} == set(PLAN["buckets"][mode == "pad":])
  assert [e.bucket_len for e in plan] != sorted(e.bucket_len for e in plan)  # buckets interleave


def test_plan_deterministic_and_epochs_differ():
  sizes = lengths()
  a = batching.make_plan(sizes, epoch=0, **PLAN)
  b = batching.make_plan(sizes, epoch=0, **PLAN)
  c = batching.make_plan(sizes, epoch=1, **PLAN)
  assert len(a) == len(b) == len(c)
  assert all(x.bucket_len == y.bucket_len and np.array_equal(x.indices, y.indices) for x, y in zip(a, b))
  assert not all(np.array_equal(x.indices, y.indices) for x, y in zip(a, c) if x.bucket_len == y.bucket_len)
  assert set(np.concatenate([e.indices.ravel() for e in a])) != set(
      np.concatenate([e.indices.ravel() for e in c]))  # a different remainder is left out
  assert batching.crop_offset(3, 0, 7, 100000, 32000) == batching.crop_offset(3, 0, 7, 100000, 32000)
  offsets = {batching.crop_offset(3, e, 7, 100000, 32000) for e in range(10)}
  assert len(offsets) > 5 and all(0 <= o <= 68000 for o in offsets)


def test_plan_keep_remainder_wraps_around():
  sizes = lengths(500)
  plan = batching.make_plan(sizes, epoch=0, drop_remainder=False, **PLAN)
  seen = set(np.concatenate([e.indices.ravel() for e in plan]).tolist())
  assert plan.dropped["remainder"] == 0
  assert seen == set(np.flatnonzero(sizes >= PLAN["min_sample_size"]).tolist())


@SETTINGS
@given(st.lists(st.integers(0, 2000), min_size=0, max_size=300), st.sampled_from(["crop", "pad"]),
       st.integers(1, 3), st.sampled_from([1, 2, 4]), st.integers(0, 3))
def test_plan_property(sizes, mode, accumulate, multiple_of, epoch):
  sizes = np.asarray(sizes, np.int64)
  kw = dict(buckets=(100, 250, 600), batch_samples=2400, min_sample_size=80, max_sample_size=900,
            multiple_of=multiple_of, accumulate=accumulate)
  plan = batching.make_plan(sizes, mode=mode, seed=1, epoch=epoch, **kw)
  seen = check_plan(plan, sizes, mode, kw["buckets"], kw["batch_samples"], kw["min_sample_size"],
                    kw["max_sample_size"], multiple_of, accumulate)
  assert len(seen) == len(set(seen)) and len(seen) + sum(plan.dropped.values()) == len(sizes)
  assert len(plan) == len(batching.make_plan(sizes, mode=mode, seed=1, epoch=epoch + 1, **kw))
  for e in plan:
    halves = [batching.host_rows(e, h, 2) for h in (0, 1)] if e.batch_size % 2 == 0 else []
    if halves:
      assert np.array_equal(np.concatenate(halves, axis=1), e.indices)


def test_plan_argument_errors():
  with pytest.raises(ValueError, match="multiple_of"):
    batching.bucket_batch_sizes((1000,), 3000, multiple_of=4)
  with pytest.raises(ValueError, match="increasing"):
    batching.make_plan(np.array([10]), buckets=(20, 10), batch_samples=100, min_sample_size=1,
                       max_sample_size=20, multiple_of=1)
  e = batching.PlanEntry(10, 6, np.zeros((1, 6), np.int64))
  with pytest.raises(ValueError, match="divisible"):
    batching.host_rows(e, 0, 4)
  assert batching.batch_shapes((1000, 2000), 8000, 2, accumulate=3, process_count=2) == [
      (3, 4, 1000), (3, 2, 2000)]


# --- the pipeline ----------------------------------------------------------------------------------

def tone_file(path, uid, n, rate=16000, channels=1):
  """A file whose samples all equal uid/1000 (so a row names its utterance), n frames."""
  x = np.full((n, channels), uid / 1000, np.float32)
  sf.write(path, x if channels > 1 else x[:, 0], rate, subtype="FLOAT")


def utterance_of(row, pad=None):
  """The uid of a tone_file row: the median of its valid samples (resampling rings at the edges)."""
  valid = row if pad is None else row[~pad]
  return int(round(float(np.median(valid)) * 1000))


def build_corpus(d, num_good=25, bucket=3200, labels=False):
  """A hand-written manifest: num_good good 16 kHz files, then 7 problem files (the manifest sizes
  of the bad ones claim they are usable). Returns (tsv path, {index: kind})."""
  d = str(d)
  rng = np.random.default_rng(5)
  lines, kinds = [], {}
  for i in range(num_good):
    n = int(rng.integers(bucket, 3 * bucket))
    tone_file(os.path.join(d, f"g{i}.wav"), i + 1, n)
    lines.append((f"g{i}.wav", n))
  bad = write_bad_files(d)
  for kind in ("missing", "empty", "truncated", "non_finite"):
    kinds[len(lines)] = kind
    lines.append((os.path.basename(bad[kind]), 2 * bucket))
  kinds[len(lines)] = "short"      # shorter than its manifest size: truncated
  tone_file(os.path.join(d, "short.wav"), 500, bucket // 4)
  lines.append(("short.wav", 2 * bucket))
  kinds[len(lines)] = "resampled"
  tone_file(os.path.join(d, "low.wav"), 600, bucket, rate=8000)
  lines.append(("low.wav", 2 * bucket))
  kinds[len(lines)] = "downmixed"
  tone_file(os.path.join(d, "stereo.wav"), 700, 2 * bucket, channels=2)
  lines.append(("stereo.wav", 2 * bucket))
  tsv = os.path.join(d, "train.tsv")
  with open(tsv, "w") as f:
    f.write(d + "\n" + "".join(f"{p}\t{n}\n" for p, n in lines))
  if labels:
    with open(os.path.join(d, "train.wrd"), "w") as f:
      f.write("".join(f"utt {p}\n" for p, _ in lines))
  return tsv, kinds


ONE_BUCKET = dict(buckets=(3200,), batch_samples=4 * 3200, min_sample_size=1600,
                  max_sample_size=12000, multiple_of=2, seed=11)
BAD_KINDS = {"missing", "empty", "truncated", "non_finite", "short"}


def collect(it, n=None):
  out = []
  for batch in it:
    out.append(batch)
    if n is not None and len(out) == n:
      break
  return out


def test_pipeline_epoch_over_bad_files(tmp_path, caplog):
  tsv, kinds = build_corpus(tmp_path)
  it = pipeline.make_iterator(tsv, epochs=1, num_threads=2, prefetch=2, **ONE_BUCKET)
  batches = collect(it)
  plan = batching.make_plan(manifest.read_manifest(tsv).sizes, epoch=0, **ONE_BUCKET)
  # 32 utterances, micro-batches of 4, no remainder; a micro-batch of only bad rows is skipped.
  all_bad = sum(all(kinds.get(i) in BAD_KINDS for i in e.indices[0]) for e in plan)
  assert len(plan) == 8 and len(batches) == 8 - all_bad
  for batch in batches:
    assert batch["audio"].shape == batch["padding_mask"].shape == (1, 4, 3200)
    assert batch["audio"].dtype == np.float32 and not batch["padding_mask"].any()
    np.testing.assert_array_equal(batch["row_ids"], [[0, 1, 2, 3]])
    used = {utterance_of(r) for r in batch["audio"][0]}
    assert used <= set(range(1, 26)) | {600, 700}  # only good utterances, bad rows replaced
  totals = it.totals
  for kind in ("missing", "empty", "non_finite", "resampled", "downmixed"):
    assert totals[kind] == 1, kind
  assert totals["truncated"] == 2 and totals["too_short"] == 0   # truncated.wav, short.wav
  assert totals["replaced"] == 5 - 4 * all_bad and totals["skipped_entries"] == all_bad
  assert totals == {k: sum(b["stats"][k] for b in batches) for k in pipeline.STAT_KEYS}
  for name, reason in [("missing.flac", "missing"), ("empty.wav", "empty"), ("nan.wav", "non_finite"),
                       ("truncated.wav", "truncated"), ("short.wav", "truncated")]:
    assert f"{name}: {reason}" in caplog.text, name


def test_pipeline_skips_micro_batches_without_usable_rows(tmp_path):
  tsv, _ = build_corpus(tmp_path, num_good=9)
  tone_file(str(tmp_path / "g0.wav"), 1, 7000)
  m = manifest.read_manifest(tsv)
  # Bucket 6400: g0 and 7 bad files, two micro-batches of 4: the one without g0 has no usable row.
  # Bucket 3200: g1..g8, one micro-batch of 8. low.wav and stereo.wav: dropped by the plan.
  bad = ["missing.flac", "empty.wav", "truncated.wav", "nan.wav", "short.wav", "garbage.wav",
         "truncated.flac"]
  paths = m.paths[:9] + bad + ["low.wav", "stereo.wav"]
  sizes = np.array([7000] + [3300] * 8 + [7000] * 7 + [0, 0])
  kw = dict(ONE_BUCKET, buckets=(3200, 6400), batch_samples=8 * 3200)
  it = pipeline.make_iterator(manifest.Manifest(m.root, paths, sizes), epochs=1, num_threads=0, **kw)
  batches = collect(it)
  assert sorted(b["audio"].shape for b in batches) == [(1, 4, 6400), (1, 8, 3200)]
  expected = dict(pipeline.zero_stats(), missing=1, empty=1, truncated=3, non_finite=1, undecodable=1,
                  replaced=3, skipped_entries=1)   # truncated: .wav, .flac and short.wav (7000 claimed)
  assert it.totals == expected
  six = next(b for b in batches if b["audio"].shape[-1] == 6400)
  assert {utterance_of(r) for r in six["audio"][0]} <= {1, 600, 700}
  # Nothing usable at all: an infinite iterator gives up instead of spinning.
  only_bad = manifest.Manifest(m.root, bad, np.full(len(bad), 7000))
  it = pipeline.make_iterator(only_bad, epochs=None, num_threads=0, **dict(kw, buckets=(6400,)))
  with pytest.raises(RuntimeError, match="no usable audio"):
    next(it)


def split_batch(batches_by_host):
  """Concatenate the hosts' rows of one step."""
  return {k: np.concatenate([b[k] for b in batches_by_host], axis=1)
          for k in ("audio", "padding_mask", "row_ids")}


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_two_hosts_make_the_single_host_batches(tmp_path, mode):
  tsv, _ = build_corpus(tmp_path, labels=True)
  kw = dict(ONE_BUCKET, buckets=(3200, 6400, 9600), batch_samples=4 * 9600, max_sample_size=9600,
            mode=mode, epochs=2, num_threads=2, prefetch=3)
  source = ManifestSource(tsv, label="wrd")
  single = collect(pipeline.make_iterator(source, **kw))
  hosts = [collect(pipeline.make_iterator(source, process_index=h, process_count=2, **kw))
           for h in (0, 1)]
  assert len(single) == len(hosts[0]) == len(hosts[1]) > 0
  for s, h0, h1 in zip(single, *hosts):
    assert h0["audio"].shape == h1["audio"].shape
    assert h0["audio"].shape[1] * 2 == s["audio"].shape[1]
    joined = split_batch([h0, h1])
    for k, v in joined.items():
      np.testing.assert_array_equal(v, s[k])
    np.testing.assert_array_equal(np.concatenate([h0["labels"], h1["labels"]], 1), s["labels"])
    for k in pipeline.STAT_KEYS:
      assert h0["stats"][k] + h1["stats"][k] == s["stats"][k]
    # Labels follow their audio (a replaced row copies both).
    for row, label, pad in zip(s["audio"][0], s["labels"][0], s["padding_mask"][0]):
      if label.startswith("utt g"):
        assert utterance_of(row, pad) == int(label[5:-4]) + 1
      if mode == "pad":
        valid = int((~pad).sum())
        assert (row[valid:] == 0).all() and valid > 0
      else:
        assert not pad.any()


def test_pipeline_resume_is_bit_exact(tmp_path):
  tsv, _ = build_corpus(tmp_path, num_good=41, labels=True)
  kw = dict(ONE_BUCKET, buckets=(3200, 6400), batch_samples=4 * 6400, accumulate=2,
            num_threads=3, prefetch=4, epochs=3)
  source = ManifestSource(tsv, label="wrd")
  full = collect(pipeline.make_iterator(source, **kw))
  assert len(full) > 6
  k = len(full) // 2 + 1  # past the first epoch boundary
  it = pipeline.make_iterator(source, **kw)
  collect(it, k)
  state = json.loads(json.dumps(it.get_state()))
  resumed = pipeline.make_iterator(source, **kw)
  resumed.set_state(state)
  rest = collect(resumed)
  assert len(rest) == len(full) - k
  for a, b in zip(full[k:], rest):
    assert a.keys() == b.keys()
    for key in ("audio", "padding_mask", "row_ids", "labels"):
      np.testing.assert_array_equal(a[key], b[key])
    assert a["stats"] == b["stats"]
  assert resumed.totals == {k_: sum(b["stats"][k_] for b in full) for k_ in pipeline.STAT_KEYS}
  # Epochs are shuffled differently.
  per_epoch = len(full) // 3
  first = [utterance_of(b["audio"][0, 0]) for b in full[:per_epoch]]
  second = [utterance_of(b["audio"][0, 0]) for b in full[per_epoch:2 * per_epoch]]
  assert first != second


def test_pipeline_normalize_and_empty_plan(tmp_path):
  path = str(tmp_path / "a.wav")
  sf.write(path, 0.2 + sine(300, 0.5, 16000, amp=0.1), 16000, subtype="FLOAT")
  m = manifest.Manifest(str(tmp_path), ["a.wav"] * 2, np.array([8000, 8000]))
  it = pipeline.make_iterator(m, buckets=(8000,), batch_samples=16000, min_sample_size=100,
                              max_sample_size=8000, multiple_of=2, normalize=True, epochs=1)
  (batch,) = collect(it)
  assert abs(batch["audio"].mean()) < 1e-4 and batch["audio"].std() == pytest.approx(1, abs=1e-3)
  with pytest.raises(ValueError, match="plan is empty"):
    pipeline.make_iterator(m, buckets=(16000,), batch_samples=32000, min_sample_size=9000,
                           max_sample_size=16000, multiple_of=2, mode="pad")


def test_replacement_reads_across_hosts(tmp_path):
  """Host 1's rows both bad: it copies the next good row of the global micro-batch, held by host 0."""
  for i in range(2):
    tone_file(str(tmp_path / f"g{i}.wav"), i + 1, 4000)
  m = manifest.Manifest(str(tmp_path), ["g0.wav", "g1.wav", "missing1.wav", "missing2.wav"],
                        np.full(4, 4000))
  kw = dict(buckets=(3200,), batch_samples=4 * 3200, min_sample_size=1600, max_sample_size=4000,
            multiple_of=2, epochs=1, num_threads=0)
  seed = next(s for s in range(100) if set(batching.make_plan(
      m.sizes, epoch=0, seed=s, **{k: v for k, v in kw.items() if k not in ("epochs", "num_threads")}
  )[0].indices[0, 2:]) == {2, 3})
  (single,) = collect(pipeline.make_iterator(m, seed=seed, **kw))
  h0, h1 = (collect(pipeline.make_iterator(m, seed=seed, process_index=h, process_count=2, **kw))[0]
            for h in (0, 1))
  np.testing.assert_array_equal(single["audio"][0, 2], single["audio"][0, 0])
  np.testing.assert_array_equal(single["audio"][0, 3], single["audio"][0, 0])
  np.testing.assert_array_equal(np.concatenate([h0["audio"], h1["audio"]], 1), single["audio"])
  assert (h0["stats"]["missing"], h1["stats"]["missing"], single["stats"]["replaced"]) == (0, 2, 2)
