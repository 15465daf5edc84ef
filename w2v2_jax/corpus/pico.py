"""SVOX Pico as a command-line TTS engine for the corpus: text on stdin, a 16 kHz WAV out.

Pico is the HMM synthesiser of Android's open source tree (Apache 2.0). The PyPI package `ttspico`
(installed by the `corpus` and `test` extras; it compiles a C extension) bundles it with two English
voices, both female: "en-US" (lh0) and "en-GB" (kh0). They are the only English voices of a
natural-sounding engine besides Debian's flite and festival ones (see `voices`).

  echo "in the beginning" | python -m w2v2_jax.corpus.pico en-GB out.wav

The corpus runs it as a subprocess, as it runs espeak-ng, flite and festival: one interpreter per
utterance, so rendering threads never share the engine.
"""
from __future__ import annotations

import importlib.util
import sys

import numpy as np

VOICES = ("en-US", "en-GB")
SAMPLE_RATE = 16000          # Pico's output: 16-bit mono PCM at 16 kHz


def installed() -> bool:
  """Whether the `ttspico` module can be imported (without importing it)."""
  return importlib.util.find_spec("ttspico") is not None


def synthesize(text: str, voice: str) -> np.ndarray:
  """int16 samples (n,) at SAMPLE_RATE of `text` spoken by `voice` (one of VOICES)."""
  if voice not in VOICES:
    raise ValueError(f"unknown Pico voice {voice!r}; choose from {list(VOICES)}")
  if not installed():
    raise RuntimeError("SVOX Pico is not installed: pip install ttspico (or `make install`)")
  import ttspico  # pylint: disable=import-outside-toplevel
  pcm = ttspico.TtsEngine(voice).speak(text) or b""
  return np.frombuffer(pcm, dtype=np.int16)


def main(argv=None) -> int:
  import soundfile as sf  # pylint: disable=import-outside-toplevel
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 2:
    sys.stderr.write("usage: python -m w2v2_jax.corpus.pico VOICE OUT.wav < text\n")
    return 2
  voice, out = argv
  text = sys.stdin.read().strip()
  if not text:
    sys.stderr.write("pico: no text on stdin\n")
    return 2
  try:
    samples = synthesize(text, voice)
  except (ValueError, RuntimeError) as e:
    sys.stderr.write(f"pico: {e}\n")
    return 1
  if samples.size == 0:
    sys.stderr.write(f"pico: no audio for {text[:80]!r}\n")
    return 1
  sf.write(out, samples, SAMPLE_RATE, subtype="PCM_16")
  return 0


if __name__ == "__main__":
  sys.exit(main())
