"""The voice inventory of the OS's TTS engines and its split into train / valid / test speakers.

A voice is one speaker timbre of one engine. Test and validation voices are never used for training,
so a test error measures generalisation to unseen speakers:

  espeak-ng  ~50 timbre variants (m1..m8, f1..f5, klatt*, named ones) x 8 English accents; the
             accent is drawn per utterance, the variant (the speaker) belongs to one split.
  flite      kal, kal16, awb (train), rms (valid), slt (test).
  festival   kal_diphone, ked_diphone (train), cmu_us_slt_arctic_hts (test: the same CMU speaker
             "slt" as flite's slt, so both sit in test).
  pico       SVOX Pico's en-US and en-GB voices (train; both female, the only natural-sounding
             female English voices the training split can have: `pico`).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys

from w2v2_jax.corpus import pico

ESPEAK_ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd",
                  "en-029", "en-us-nyc")
# Variant names are file names in espeak-ng-data/voices/!v and case-sensitive: espeak-ng silently falls
# back to its default voice for a name it does not find (so "alicia" would be the same speaker as "mike").
ESPEAK_VARIANTS = {
    "train": ("m1", "m2", "m5", "m7", "m8", "f1", "f3", "f5", "klatt", "klatt4", "adam", "Andy", "Annie",
              "aunty", "belinda", "benjamin", "boris", "caleb", "david", "ed", "Gene", "grandpa", "iven",
              "john", "max", "Michael", "Mike", "norbert", "pablo", "paul", "quincy", "rob", "robert",
              "travis", "victor", "zac"),
    "valid": ("m3", "f2", "klatt2", "linda", "steph", "edward"),
    "test": ("m4", "m6", "f4", "klatt3", "Alicia", "grandma", "shelby"),
}
FLITE_VOICES = {"train": ("kal", "kal16", "awb"), "valid": ("rms",), "test": ("slt",)}
FESTIVAL_VOICES = {"train": ("kal_diphone", "ked_diphone"), "valid": (), "test": ("cmu_us_slt_arctic_hts",)}
PICO_VOICES = {"train": pico.VOICES, "valid": (), "test": ()}
# Festival voice -> the Debian package that holds it (voices of other languages: the unlabeled split).
UNLABELED_VOICES = {
    "upc_ca_ona_hts": "festvox-ca-ona-hts",        # Catalan, female (HTS, as the test voice slt)
    "czech_dita": "festvox-czech-dita",            # Czech, female
    "suo_fi_lj_diphone": "festvox-suopuhe-lj",     # Finnish, female
    "lp_diphone": "festvox-italp16k",              # Italian, female
    "pc_diphone": "festvox-itapc16k",              # Italian, male
    "czech_machac": "festvox-czech-machac",        # Czech, male
    "hy_fi_mv_diphone": "festvox-suopuhe-mv",      # Finnish, male
}
FESTIVAL_VOICE_DIRS = ("/usr/share/festival/voices", "/usr/lib/festival/voices")
# Share of utterances per engine (renormalised over the engines a split has: valid and test, which have
# no Pico voice, keep 0.7 / 0.2 / 0.1).
ENGINE_WEIGHTS = {"espeak-ng": 0.7, "flite": 0.2, "festival": 0.1, "pico": 0.15}
ENGINE_PROGRAMS = {"espeak-ng": "espeak-ng", "flite": "flite", "festival": "text2wave", "pico": None}

SPLITS = ("train", "valid", "test")


@dataclasses.dataclass(frozen=True)
class Voice:
  engine: str     # espeak-ng | flite | festival | pico
  name: str       # espeak variant, flite, festival or Pico voice
  split: str      # train | valid | test


class EngineUnavailable(RuntimeError):
  """No usable TTS engine (or sox) is installed."""


def available_engines(requested=tuple(ENGINE_WEIGHTS)) -> tuple[str, ...]:
  """The requested engines whose program is on PATH (sox is required by all)."""
  if shutil.which("sox") is None:
    raise EngineUnavailable("sox is not installed; run `make corpus-deps` (apt-get install sox)")
  unknown = set(requested) - set(ENGINE_WEIGHTS)
  if unknown:
    raise ValueError(f"unknown TTS engine(s) {sorted(unknown)}; choose from {sorted(ENGINE_WEIGHTS)}")
  found = tuple(e for e in requested if engine_installed(e))
  if not found:
    raise EngineUnavailable(
        f"none of the TTS engines {list(requested)} is installed; run `make corpus-deps` "
        "(apt-get install espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts sox)")
  return found


def engine_installed(engine: str) -> bool:
  """Whether `engine` can render: its program on PATH (Pico: the `ttspico` Python module)."""
  return pico.installed() if engine == "pico" else shutil.which(ENGINE_PROGRAMS[engine]) is not None


def inventory(engines) -> dict[str, list[Voice]]:
  """split -> voices of the given engines."""
  table = {"espeak-ng": ESPEAK_VARIANTS, "flite": FLITE_VOICES, "festival": FESTIVAL_VOICES, "pico": PICO_VOICES}
  out = {split: [] for split in SPLITS}
  for engine in engines:
    for split in SPLITS:
      out[split].extend(Voice(engine, name, split) for name in table[engine][split])
  for split, voices in out.items():
    if not voices:
      raise EngineUnavailable(f"no {split} voices with engines {list(engines)}; install espeak-ng or flite")
  return out


def unlabeled_voices() -> list[Voice]:
  """The voices of the unlabeled split; raises EngineUnavailable naming the packages when festival or
  one of UNLABELED_VOICES is missing (the plan must not depend on what happens to be installed)."""
  if shutil.which(ENGINE_PROGRAMS["festival"]) is None:
    raise EngineUnavailable("unlabeled audio needs festival (text2wave); run `make corpus-deps`")
  installed = {name for root in FESTIVAL_VOICE_DIRS if os.path.isdir(root)
               for language in os.listdir(root) if os.path.isdir(os.path.join(root, language))
               for name in os.listdir(os.path.join(root, language))}
  missing = [package for name, package in UNLABELED_VOICES.items() if name not in installed]
  if missing:
    raise EngineUnavailable(f"unlabeled audio needs the festival voices of packages {missing} (not found under "
                            f"{' or '.join(FESTIVAL_VOICE_DIRS)}); run `make corpus-deps` "
                            f"(apt-get install {' '.join(missing)})")
  return [Voice("festival", name, "unlabeled") for name in UNLABELED_VOICES]


def command(voice: Voice, text: str, wav_path: str, *, accent: str, speed: int, pitch: int) -> tuple[list, str | None]:
  """(argv, stdin text or None) that writes `text` spoken by `voice` to `wav_path` (engine's own rate).

  accent/speed/pitch apply to espeak-ng only (speed in words per minute, pitch 0..99). The text goes to
  the engine in lower case: espeak-ng spells some all-caps words ("IT" -> "I T", "US" -> "U S")."""
  text = text.lower()
  if voice.engine == "espeak-ng":
    return ["espeak-ng", "-v", f"{accent}+{voice.name}", "-s", str(speed), "-p", str(pitch), "-w", wav_path,
            "--", text], None
  if voice.engine == "flite":
    return ["flite", "-voice", voice.name, "-t", text, "-o", wav_path], None
  if voice.engine == "festival":
    return ["text2wave", "-eval", f"(voice_{voice.name})", "-o", wav_path], text
  if voice.engine == "pico":
    return [sys.executable, "-m", "w2v2_jax.corpus.pico", voice.name, wav_path], text
  raise ValueError(f"unknown engine {voice.engine!r}")
