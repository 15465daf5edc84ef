"""Waveform augmentation: each transform checked against its definition (SNR, spectral slope, RT60 and
direct-to-reverberant ratio, filter attenuation, speed, gain), and the pipeline's use of it
(deterministic per utterance and epoch, independent of threads, exact on resume, rows still fit)."""
import json
import os

import numpy as np
import pytest
import soundfile as sf

from w2v2_jax.data import augment, pipeline
from w2v2_jax.data.manifest import Manifest

RATE = 16000


def sine(freq, seconds=1.0, amp=0.5):
  t = np.arange(int(seconds * RATE)) / RATE
  return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def power_db(x):
  return 10 * np.log10(np.mean(np.asarray(x, np.float64) ** 2))


def only(**fields):
  return augment.AugmentConfig(**fields)


def response_db(process, freq):
  """Level change (dB) of a 1 s sine at `freq` through `process`, over its second half (past the onset)."""
  x = sine(freq)
  return power_db(process(x)[RATE // 2:]) - power_db(x[RATE // 2:])


def augmented(cfg):
  """`augment.augment` with `cfg` and a fixed generator, as a function of the audio."""
  return lambda x: augment.augment(x, cfg, np.random.default_rng(0), RATE)


def test_noise_is_added_at_the_drawn_snr():
  x = sine(440, 2.0)
  for snr in (0.0, 10.0, 25.0):
    y = augment.augment(x, only(noise_prob=1.0, snr=(snr, snr)), np.random.default_rng(0), RATE)
    assert power_db(x) - power_db(y - x) == pytest.approx(snr, abs=1e-3)


@pytest.mark.parametrize("colour,slope", [("white", 0.0), ("pink", -1.0), ("brown", -2.0)])
def test_noise_colours_have_their_spectral_slope(colour, slope):
  n = 2 ** 16
  spectra = [np.abs(np.fft.rfft(augment.coloured_noise(np.random.default_rng(s), n, colour))) ** 2
             for s in range(8)]
  power = np.mean(spectra, axis=0)
  freqs = np.fft.rfftfreq(n, 1 / RATE)
  band = (freqs > 50) & (freqs < 5000)
  fitted = np.polyfit(np.log10(freqs[band]), np.log10(power[band]), 1)[0]
  assert fitted == pytest.approx(slope, abs=0.1)
  assert np.mean(augment.coloured_noise(np.random.default_rng(0), n, colour) ** 2) == pytest.approx(1.0)


def test_room_impulse_response_decays_60_db_in_rt60_at_the_drawn_ratio():
  rt60, drr = 0.4, 6.0
  rirs = [augment.room_impulse_response(np.random.default_rng(s), RATE, rt60, drr) for s in range(16)]
  assert all(r[0] == 1.0 for r in rirs) and len(rirs[0]) == int(1.5 * rt60 * RATE)
  assert all(10 * np.log10(1.0 / np.sum(r[1:] ** 2)) == pytest.approx(drr, abs=1e-6) for r in rirs)
  energy = np.mean([r ** 2 for r in rirs], axis=0)
  win = int(0.02 * RATE)
  level = lambda t: 10 * np.log10(energy[int(t * RATE):int(t * RATE) + win].mean())  # noqa: E731
  decay_per_second = (level(0.05) - level(0.35)) / 0.3
  assert decay_per_second == pytest.approx(60.0 / rt60, rel=0.1)


def test_reverb_keeps_the_length_and_smears_in_time():
  x = np.zeros(RATE, np.float32)
  x[1000] = 1.0
  y = augment.augment(x, only(reverb_prob=1.0, rt60=(0.3, 0.3), drr=(0.0, 0.0)), np.random.default_rng(1), RATE)
  assert y.shape == x.shape and y.dtype == np.float32
  assert y[1000] == pytest.approx(1.0) and np.sum(y[1001:] ** 2) == pytest.approx(1.0, rel=1e-4)
  assert np.abs(y[:1000]).max() < 1e-12 and np.abs(y[1001:1040]).max() < 1e-12   # causal; the tail starts 2.5 ms late


def test_bandlimit_attenuates_outside_the_band():
  cfg = only(bandlimit_prob=1.0, highpass=(300.0, 300.0), lowpass=(3000.0, 3000.0))
  gain = lambda f: response_db(augmented(cfg), f)  # noqa: E731
  assert abs(gain(1000)) < 1.0
  assert gain(60) < -25 and gain(6000) < -25


def test_bandlimit_without_a_highpass_corner_is_a_lowpass():
  cfg = augment.AugmentConfig.from_any({"bandlimit_prob": 1.0, "highpass": (0.0, 0.0), "lowpass": (3000.0, 3000.0)})
  gain = lambda f: response_db(augmented(cfg), f)  # noqa: E731
  assert abs(gain(60)) < 1.0 and abs(gain(1000)) < 1.0 and gain(6000) < -25


def test_peaking_biquad_has_its_gain_at_the_centre_and_none_far_away():
  from scipy import signal
  boost = augment.peaking_biquad(1000.0, 6.0, 1.0, RATE)
  through = lambda f: response_db(lambda x: signal.sosfilt(boost, x), f)  # noqa: E731
  assert through(1000) == pytest.approx(6.0, abs=0.1)
  assert abs(through(60)) < 0.1 and abs(through(7500)) < 0.5
  cut = augment.peaking_biquad(2000.0, -9.0, 2.0, RATE)
  assert response_db(lambda x: signal.sosfilt(cut, x), 2000) == pytest.approx(-9.0, abs=0.1)


def test_eq_applies_its_bands_in_series():
  """Three bands drawn at one centre and gain: three times the gain there, level far from it."""
  cfg = only(eq_prob=1.0, eq_hz=(1000.0, 1000.0), eq_gain_db=(4.0, 4.0), eq_q=(1.0, 1.0))
  gain = lambda f: response_db(augmented(cfg), f)  # noqa: E731
  assert gain(1000) == pytest.approx(augment.EQ_BANDS * 4.0, abs=0.2)
  assert abs(gain(60)) < 0.3
  drawn = only(eq_prob=1.0)
  a, b = (augment.augment(sine(440), drawn, np.random.default_rng(s), RATE) for s in (0, 1))
  assert not np.allclose(a, b) and np.isfinite(a).all()
  with pytest.raises(ValueError, match="data.augment.eq_hz must be positive"):
    augment.AugmentConfig.from_any({"eq_hz": (0.0, 4000.0)})


@pytest.mark.parametrize("colour", ["pink", "brown"])
def test_coloured_noise_power_is_in_the_audible_band(colour):
  """The drawn SNR is the one heard: nothing below 20 Hz, most power above 50 Hz, whatever the length."""
  for seconds in (1, 10):
    n = seconds * RATE
    noise = augment.coloured_noise(np.random.default_rng(0), n, colour, RATE)
    power = np.abs(np.fft.rfft(noise)) ** 2
    freqs = np.fft.rfftfreq(n, 1 / RATE)
    assert power[freqs < 20].sum() == pytest.approx(0.0, abs=1e-9 * power.sum())
    assert power[freqs >= 50].sum() > 0.6 * power.sum()


def test_speed_changes_length_and_pitch():
  x = sine(440, 2.0)
  y = augment.change_speed(x, 1.1)
  assert len(y) == pytest.approx(len(x) / 1.1, abs=2)
  spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
  assert np.fft.rfftfreq(len(y), 1 / RATE)[np.argmax(spectrum)] == pytest.approx(484.0, abs=1.0)
  assert augment.change_speed(x, 1.0) is x


def test_gain_and_probabilities():
  x = sine(300)
  y = augment.augment(x, only(gain_prob=1.0, gain_db=(-6.0, -6.0)), np.random.default_rng(0), RATE)
  assert power_db(y) - power_db(x) == pytest.approx(-6.0, abs=1e-4)
  np.testing.assert_array_equal(augment.augment(x, only(), np.random.default_rng(0), RATE), x)
  assert not only().enabled and only(noise_prob=0.1).enabled


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="unknown field.*'nosie_prob'"):
    augment.AugmentConfig.from_any({"nosie_prob": 0.5})
  with pytest.raises(ValueError, match="data.augment.noise_prob must be in"):
    augment.AugmentConfig.from_any({"noise_prob": 1.5})
  with pytest.raises(ValueError, match="data.augment.snr must be a"):
    augment.AugmentConfig.from_any({"snr": (30.0, 5.0)})
  with pytest.raises(ValueError, match="data.augment.snr must be a"):
    augment.AugmentConfig.from_any({"snr": 10})
  with pytest.raises(ValueError, match="data.augment.speed must be positive"):
    augment.AugmentConfig.from_any({"speed": (0.0, 1.1)})
  with pytest.raises(ValueError, match="data.augment.rt60 must be positive"):
    augment.AugmentConfig.from_any({"rt60": (0.0, 0.3)})
  cfg = augment.AugmentConfig.from_any(augment.config_dict(noise_prob=0.5))
  assert cfg.noise_prob == 0.5 and cfg.snr == (5.0, 30.0) and augment.AugmentConfig.from_any(None) == only()


ALL = augment.AugmentConfig(speed_prob=0.5, reverb_prob=0.5, bandlimit_prob=0.5, noise_prob=0.5, gain_prob=0.5,
                            eq_prob=0.5)


def corpus(tmp_path, n=12):
  rng = np.random.default_rng(3)
  sizes = rng.integers(6000, 16000, n)
  for i, size in enumerate(sizes):
    sf.write(os.path.join(tmp_path, f"u{i}.wav"), 0.3 * rng.standard_normal(size).astype(np.float32), RATE,
             subtype="FLOAT")
  return Manifest(str(tmp_path), [f"u{i}.wav" for i in range(n)], sizes)


def batches(m, **kw):
  args = dict(buckets=(8000, 16000), batch_samples=32000, min_sample_size=4000, max_sample_size=16000,
              multiple_of=2, seed=5, epochs=2, num_threads=0)
  args.update(kw)
  return list(pipeline.make_iterator(m, **args))


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_pipeline_augments_deterministically_and_rows_fit(tmp_path, mode):
  m = corpus(tmp_path)
  plain = batches(m, mode=mode)
  aug = batches(m, mode=mode, augment=ALL)
  again = batches(m, mode=mode, augment=ALL, num_threads=3, prefetch=2)
  assert len(plain) == len(aug) == len(again)
  changed = 0
  for p, a, b in zip(plain, aug, again):
    np.testing.assert_array_equal(a["audio"], b["audio"])
    np.testing.assert_array_equal(a["padding_mask"], b["padding_mask"])
    np.testing.assert_array_equal(a["row_ids"], p["row_ids"])
    assert np.all(a["audio"][a["padding_mask"]] == 0.0)
    changed += int(not np.array_equal(a["audio"], p["audio"]))
    if mode == "crop":
      assert not a["padding_mask"].any()
  assert changed == len(plain)
  # Epochs draw anew: the same utterance is augmented differently in epoch 2.
  half = len(aug) // 2
  assert not all(np.array_equal(x["audio"], y["audio"]) for x, y in zip(aug[:half], aug[half:]))


def test_pipeline_augmentation_resumes_exactly_and_normalises_after(tmp_path):
  m = corpus(tmp_path, n=30)
  kw = dict(buckets=(8000, 16000), batch_samples=32000, min_sample_size=4000, max_sample_size=16000,
            multiple_of=2, seed=5, epochs=2, num_threads=0, augment=ALL, normalize=True)
  full = list(pipeline.make_iterator(m, **kw))
  k = len(full) // 2 + 1                 # past the first epoch boundary
  it = pipeline.make_iterator(m, **kw)
  for _ in range(k):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  resumed = pipeline.make_iterator(m, **kw)
  resumed.set_state(state)
  rest = list(resumed)
  assert len(rest) == len(full) - k > 0
  for a, b in zip(full[k:], rest):
    np.testing.assert_array_equal(a["audio"], b["audio"])
  # Crops of normalised utterances: near zero mean and unit variance, whatever gain was drawn.
  rows = np.concatenate([b["audio"].reshape(-1, b["audio"].shape[-1]) for b in full])
  assert abs(float(rows.mean())) < 0.1 and float(rows.std()) == pytest.approx(1.0, abs=0.15)


@pytest.mark.parametrize("name", sorted(augment.CONDITIONS))
def test_conditions_perturb_every_utterance(name):
  """Each named condition changes every utterance (probability 1), reproducibly from its generator;
  the telephone band removes the energy above 3.4 kHz."""
  rng = np.random.default_rng(0)
  audio = rng.standard_normal(16000).astype(np.float32) * 0.1
  cond = augment.condition(name)
  a = augment.perturb(audio, cond, augment.utterance_rng(1, 0, 5), 16000)
  b = augment.perturb(audio, cond, augment.utterance_rng(1, 0, 5), 16000)
  np.testing.assert_array_equal(a, b)
  assert a.shape == audio.shape and a.dtype == np.float32 and not np.allclose(a, audio, atol=1e-3)
  if name == "telephone":
    spectrum = np.abs(np.fft.rfft(a)) ** 2
    freqs = np.fft.rfftfreq(a.size, 1 / 16000)
    assert spectrum[freqs > 5000].mean() < 1e-3 * spectrum[(freqs > 800) & (freqs < 3000)].mean()
