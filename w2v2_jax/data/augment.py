"""Waveform augmentation on the fly: synthetic speech made to sound more like a recording.

Each transform is applied to an utterance with its own probability, in this order:

  speed      resampling by a factor in `speed` (tempo and pitch together, as Kaldi's speed
             perturbation); skipped when the result would not fit the batch's length;
  reverb     convolution with a synthetic room impulse response: a direct path, then exponentially
             decaying Gaussian noise whose RT60 (time to fall 60 dB) is drawn from `rt60` seconds,
             mixed at a direct-to-reverberant ratio from `drr` dB;
  bandlimit  a 4th-order Butterworth band-pass: high-pass corner from `highpass` (0: none), low-pass
             corner from `lowpass` Hz (3.4 kHz is a telephone channel);
  noise      additive coloured noise (white, pink or brown, equally likely; pink and brown have no
             energy below 20 Hz) at an SNR from `snr` dB, against the utterance's mean power;
  gain       a gain from `gain_db` dB (irrelevant with data.normalize, which undoes it);
  eq         a random timbre: EQ_BANDS peaking filters in series (the RBJ audio-EQ biquad), each centred
             at a frequency drawn log-uniformly from `eq_hz`, with a gain from `eq_gain_db` dB and a
             quality factor from `eq_q` (bandwidth about centre / Q); last, so its draws do not change
             any other transform's.

Ranges are (low, high), drawn uniformly. Every draw comes from a generator seeded by (data.seed,
epoch, utterance index), so a batch is the same whatever the thread count or host, and after a resume.
Audio is float32 (samples,) at `sample_rate` Hz, in and out.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Tuple

import numpy as np

Range = Tuple[float, float]
NOISE_COLOURS = ("white", "pink", "brown")
POSITIVE = ("speed", "rt60", "eq_hz", "eq_q")   # ranges whose values must be > 0
NOISE_LOW_HZ = 20.0                            # coloured noise has no energy below this ...
NOISE_FLAT_HZ = 50.0                           # ... and a flat spectrum from there to this
EQ_BANDS = 3                                   # peaking filters of one `eq` draw


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Probabilities (0 = never) and ranges of each transform; all probabilities 0: no augmentation."""
  speed_prob: float = 0.0
  speed: Range = (0.9, 1.1)
  reverb_prob: float = 0.0
  rt60: Range = (0.15, 0.8)
  drr: Range = (0.0, 12.0)
  bandlimit_prob: float = 0.0
  highpass: Range = (50.0, 300.0)
  lowpass: Range = (3000.0, 7500.0)
  noise_prob: float = 0.0
  snr: Range = (5.0, 30.0)
  gain_prob: float = 0.0
  gain_db: Range = (-12.0, 6.0)
  eq_prob: float = 0.0
  eq_hz: Range = (150.0, 6000.0)
  eq_gain_db: Range = (-9.0, 9.0)
  eq_q: Range = (0.7, 2.0)

  @property
  def enabled(self) -> bool:
    return any(p > 0 for p in (self.speed_prob, self.reverb_prob, self.bandlimit_prob, self.noise_prob,
                               self.gain_prob, self.eq_prob))

  @classmethod
  def from_any(cls, spec: Any) -> "AugmentConfig":
    """From None, an AugmentConfig, or a mapping / ConfigDict of its fields (unknown names raise)."""
    if spec is None:
      return cls()
    if isinstance(spec, cls):
      return spec
    values = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f"data.augment: unknown field(s) {unknown}; known: {sorted(names)}")
    for name, value in values.items():
      if name.endswith("_prob"):
        if not 0.0 <= float(value) <= 1.0:
          raise ValueError(f"data.augment.{name} must be in [0, 1], got {value}")
        continue
      if not isinstance(value, (tuple, list)) or len(value) != 2 or float(value[0]) > float(value[1]):
        raise ValueError(f"data.augment.{name} must be a (low, high) pair with low <= high, got {value!r}")
      low, high = float(value[0]), float(value[1])
      if name in POSITIVE and low <= 0:
        raise ValueError(f"data.augment.{name} must be positive, got {value!r}")
      if name in ("highpass", "lowpass") and low < 0:
        raise ValueError(f"data.augment.{name} must be >= 0 Hz, got {value!r}")
      values[name] = (low, high)
    return cls(**values)


def _uniform(rng: np.random.Generator, bounds: Range) -> float:
  return float(rng.uniform(bounds[0], bounds[1])) if bounds[1] > bounds[0] else float(bounds[0])


def speed_factor(cfg: AugmentConfig, rng: np.random.Generator) -> float:
  """The speed factor of one utterance (1.0 when not drawn): its output has n / factor samples."""
  return _uniform(rng, cfg.speed) if rng.random() < cfg.speed_prob else 1.0


def change_speed(audio: np.ndarray, factor: float) -> np.ndarray:
  """Plays `audio` `factor` times faster (pitch rises with it): soxr resampling, float32 (~n/factor,)."""
  if factor == 1.0:
    return audio
  import soxr  # pylint: disable=import-outside-toplevel
  return soxr.resample(audio, 1.0, 1.0 / factor, quality="HQ").astype(np.float32)


def room_impulse_response(rng: np.random.Generator, sample_rate: int, rt60: float, drr_db: float) -> np.ndarray:
  """A synthetic impulse response (samples,): 1 at t=0, then Gaussian noise decaying 60 dB in `rt60`
  seconds from 2.5 ms on, scaled so direct / reverberant energy is `drr_db` dB; 1.5 x rt60 long."""
  length = max(int(1.5 * rt60 * sample_rate), 2)
  t = np.arange(length) / sample_rate
  tail = rng.standard_normal(length) * 10.0 ** (-3.0 * t / rt60)
  tail[: int(0.0025 * sample_rate) + 1] = 0.0
  energy = float(np.sum(tail ** 2))
  if energy > 0:
    tail *= np.sqrt(10.0 ** (-drr_db / 10.0) / energy)
  tail[0] = 1.0
  return tail


def coloured_noise(rng: np.random.Generator, n: int, colour: str, sample_rate: int = 16000) -> np.ndarray:
  """Unit-power noise (n,) with a 1/f^0 (white), 1/f (pink) or 1/f^2 (brown) power spectrum above
  NOISE_FLAT_HZ, flat from NOISE_LOW_HZ to there and empty below (for pink and brown: otherwise almost
  all their power would sit below the speech band, and the SNR would not be the one heard)."""
  exponent = {"white": 0.0, "pink": 1.0, "brown": 2.0}[colour]
  spectrum = np.fft.rfft(rng.standard_normal(n))
  if exponent:
    freqs = np.fft.rfftfreq(n, 1.0 / sample_rate)
    spectrum = spectrum / np.maximum(freqs, NOISE_FLAT_HZ) ** (exponent / 2.0)
    spectrum[freqs < NOISE_LOW_HZ] = 0.0
  noise = np.fft.irfft(spectrum, n)
  return noise / max(float(np.sqrt(np.mean(noise ** 2))), 1e-12)


def peaking_biquad(centre_hz: float, gain_db: float, q: float, sample_rate: int) -> np.ndarray:
  """One peaking EQ section as second-order sections (1, 6): `gain_db` at `centre_hz`, 0 dB far from it
  (the audio-EQ-cookbook biquad, normalised so a0 = 1)."""
  a = 10.0 ** (gain_db / 40.0)
  w0 = 2.0 * np.pi * centre_hz / sample_rate
  alpha = np.sin(w0) / (2.0 * q)
  b = np.array([1.0 + alpha * a, -2.0 * np.cos(w0), 1.0 - alpha * a])
  den = np.array([1.0 + alpha / a, -2.0 * np.cos(w0), 1.0 - alpha / a])
  return np.concatenate([b / den[0], den / den[0]])[None, :]


def augment(audio: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator, sample_rate: int) -> np.ndarray:
  """Reverb, band limit, noise, gain and EQ (each with its probability) on one utterance, float32 (samples,).
  Speed is separate (`speed_factor`, `change_speed`): it changes the length, which the caller checks."""
  from scipy import signal  # pylint: disable=import-outside-toplevel
  x = np.asarray(audio, np.float64)
  n = x.shape[0]
  if n == 0:
    return np.asarray(audio, np.float32)
  if rng.random() < cfg.reverb_prob:
    rir = room_impulse_response(rng, sample_rate, _uniform(rng, cfg.rt60), _uniform(rng, cfg.drr))
    x = signal.fftconvolve(x, rir)[:n]
  if rng.random() < cfg.bandlimit_prob:
    nyquist = sample_rate / 2.0
    low = min(_uniform(rng, cfg.highpass), 0.45 * nyquist)
    high = min(_uniform(rng, cfg.lowpass), 0.95 * nyquist)
    if low <= 0:        # no high-pass corner: low-pass only
      x = signal.sosfilt(signal.butter(4, high, btype="lowpass", fs=sample_rate, output="sos"), x)
    elif high > 1.5 * low:
      sos = signal.butter(4, [low, high], btype="bandpass", fs=sample_rate, output="sos")
      x = signal.sosfilt(sos, x)
  if rng.random() < cfg.noise_prob:
    power = float(np.mean(x ** 2))
    snr = _uniform(rng, cfg.snr)
    colour = NOISE_COLOURS[int(rng.integers(len(NOISE_COLOURS)))]
    x = x + coloured_noise(rng, n, colour, sample_rate) * np.sqrt(power / 10.0 ** (snr / 10.0))
  if rng.random() < cfg.gain_prob:
    x = x * 10.0 ** (_uniform(rng, cfg.gain_db) / 20.0)
  if cfg.eq_prob > 0 and rng.random() < cfg.eq_prob:    # drawn only when on: older configs' draws are unchanged
    log_hz = np.log(np.minimum(cfg.eq_hz, 0.45 * sample_rate))
    sos = np.concatenate([peaking_biquad(float(np.exp(_uniform(rng, tuple(log_hz)))), _uniform(rng, cfg.eq_gain_db),
                                         _uniform(rng, cfg.eq_q), sample_rate) for _ in range(EQ_BANDS)])
    x = signal.sosfilt(sos, x)
  return x.astype(np.float32)


def perturb(audio: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator, sample_rate: int) -> np.ndarray:
  """Speed (`speed_factor`, `change_speed`; no length limit), then `augment`: one utterance, float32."""
  return augment(change_speed(np.asarray(audio, np.float32), speed_factor(cfg, rng)), cfg, rng, sample_rate)


# Fixed acoustic conditions to score a model under (`w2v2 evaluate --condition=NAME`, the demo's
# robustness lines): every transform at probability 1, so each utterance is perturbed.
CONDITIONS = {
    "telephone": AugmentConfig(bandlimit_prob=1.0, highpass=(300.0, 300.0), lowpass=(3400.0, 3400.0)),
    "noisy": AugmentConfig(noise_prob=1.0, snr=(5.0, 15.0)),
    "reverberant": AugmentConfig(reverb_prob=1.0, rt60=(0.5, 1.0), drr=(0.0, 6.0)),
}


def condition(spec: Any) -> AugmentConfig:
  """An AugmentConfig from the name of one of CONDITIONS, an AugmentConfig or a mapping of its fields."""
  if isinstance(spec, str):
    if spec not in CONDITIONS:
      raise ValueError(f"unknown condition {spec!r}; choose one of {sorted(CONDITIONS)}")
    return CONDITIONS[spec]
  return AugmentConfig.from_any(spec)


def utterance_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  """The generator of one utterance's draws in one epoch."""
  return np.random.default_rng([int(seed), int(epoch), int(index), 0xA06])


def config_dict(**fields) -> Any:
  """An ml_collections.ConfigDict of every AugmentConfig field (the configs' `data.augment`; all
  probabilities 0 unless given), so `--config.data.augment.noise_prob=0.5` works on the command line."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  return ml_collections.ConfigDict(dataclasses.asdict(AugmentConfig(**fields)))


def describe(cfg: AugmentConfig) -> Mapping[str, Any]:
  """The enabled transforms with their probability and ranges (for logs and reports)."""
  out = {}
  for name, keys in (("speed", ("speed",)), ("reverb", ("rt60", "drr")), ("bandlimit", ("highpass", "lowpass")),
                     ("noise", ("snr",)), ("gain", ("gain_db",)), ("eq", ("eq_hz", "eq_gain_db", "eq_q"))):
    prob = getattr(cfg, f"{name}_prob")
    if prob > 0:
      out[name] = {"prob": prob, **{k: getattr(cfg, k) for k in keys}}
  return out
