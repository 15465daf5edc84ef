"""An offline, transcribed English speech corpus synthesised with the OS's TTS engines.

  sentences   public-domain text (the King James Bible of Debian's bible-kjv) -> normalised clauses
  voices      the voice inventory of espeak-ng / flite / festival, split so test voices are unseen
  synthesize  the plan (deterministic for a seed), parallel rendering to 16 kHz FLAC, manifests

`w2v2 make-corpus --out DIR --hours H` is the command.
"""
