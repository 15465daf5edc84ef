"""Inference with a fine-tuned CTC model: load it, transcribe audio, evaluate WER/CER on a manifest.

  rec = Recognizer.load(path)      a Hugging Face Wav2Vec2ForCTC directory, one of our fine-tuning run
                                   directories (its export/), or a fairseq CTC .pt with dict.ltr.txt
  rec.transcribe(audios)           list of 1-D float32 16 kHz arrays -> list of transcripts
  rec.transcribe_long(audio)       one long recording, in overlapping chunks (bounded device memory)
  rec.word_timings(frame_logits)   [{"word", "start", "end"}] in seconds
  evaluate(rec, source)            WER / CER over a labeled manifest, skipping unusable items
  main_evaluate(argv), main_transcribe(argv)   the `w2v2 evaluate` / `w2v2 transcribe` commands

Static shapes: every forward pass pads its batch to a power-of-two number of rows and its length up to
a multiple of `bucket_samples` (1 s by default), so a handful of shapes compile however long the
utterances are. Padding is marked in the padding mask; the model ignores padded frames, except that
the per-utterance GroupNorm of "default"-extractor models (BASE) computes its statistics over the
padded length too (as fairseq and Hugging Face do in batched inference), so their logits move slightly
with the bucket and with the longest utterance of the batch (`batch_seconds=0`, one utterance per
pass, and audio of whole buckets avoid that). Layer-norm-extractor models (LARGE LV-60k) give the same
logits however they are padded and batched.

Waveform normalisation (zero mean, unit variance per utterance) follows the checkpoint: a Hugging Face
directory's preprocessor_config.json `do_normalize`; without one (and for fairseq checkpoints) the
wav2vec 2.0 recipes' convention: normalise for layer-norm-extractor models, not for group-norm ones.
`Recognizer(..., normalize=True/False)` overrides it.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from w2v2_jax import convert, decode
from w2v2_jax import evaluate as scoring
from w2v2_jax.data import text as text_lib
from w2v2_jax.data.audio import AudioError, load_audio, normalize_waveform
from w2v2_jax.data.source import ManifestSource
from w2v2_jax.data.text import Vocabulary
from w2v2_jax.models import ModelConfig, build

log = logging.getLogger(__name__)

__all__ = ["LongTranscript", "Recognizer", "evaluate", "export_hf", "main_evaluate", "main_transcribe",
           "open_labeled_source", "plan_batches"]

SAMPLE_RATE = 16000
DEFAULT_BATCH_SECONDS = 64.0       # audio per forward pass, padding included
DEFAULT_BUCKET_SAMPLES = SAMPLE_RATE
FRAME_BUCKET = 512                 # decoding pads frame counts to a multiple of this (few greedy compiles)
PREPROCESSOR_CONFIG = "preprocessor_config.json"
FAIRSEQ_DICT = "dict.ltr.txt"
EXPORT_DIRS = ("export", os.path.join("best", "export"))   # where a fine-tuning run keeps its HF export


class LongTranscript(NamedTuple):
  """`Recognizer.transcribe_long`'s result: the text, the stitched frame logits (T, V) float32 and their
  frame padding (T,) bool (all False: every stitched frame is a real frame)."""
  text: str
  logits: np.ndarray
  frame_padding: np.ndarray


def _bucketed(num_samples: int, bucket: int) -> int:
  return max(bucket, -(-int(num_samples) // bucket) * bucket)


def plan_batches(lengths: Sequence[int], max_samples: int, bucket_samples: int) -> list[list[int]]:
  """Groups utterances (by index) into forward batches, longest first.

  Each batch holds a power-of-two number of utterances of the same bucket (length rounded up to
  `bucket_samples`) whose padded size stays within `max_samples`; an utterance longer than that budget
  gets a batch of its own. So every batch needs no dummy rows, the shapes that compile are
  (2^k, multiple of bucket_samples), and every utterance is padded to its own bucket whatever it is
  batched with: a group-norm conv encoder (whose statistics include padding, as in the reference)
  gives the same transcript in `transcribe`, `evaluate` and fine-tuning validation.
  """
  lengths = [int(n) for n in lengths]
  order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
  batches = []
  start = 0
  while start < len(order):
    padded = _bucketed(lengths[order[start]], bucket_samples)
    same = start
    while same < len(order) and _bucketed(lengths[order[same]], bucket_samples) == padded:
      same += 1
    take = min(max(1, int(max_samples) // padded), same - start)
    take = 1 << (take.bit_length() - 1)
    batches.append(order[start:start + take])
    start += take
  return batches


def _is_hf_dir(directory: str) -> bool:
  return (os.path.isfile(os.path.join(directory, "config.json"))
          and any(os.path.isfile(os.path.join(directory, name)) for name in convert.HF_WEIGHT_FILES))


def _read_do_normalize(directory: str) -> bool | None:
  path = os.path.join(directory, PREPROCESSOR_CONFIG)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    cfg = json.load(f)
  rate = cfg.get("sampling_rate", SAMPLE_RATE)
  if int(rate) != SAMPLE_RATE:
    raise ValueError(f"{path}: sampling_rate={rate}, but the models here take {SAMPLE_RATE} Hz audio")
  return bool(cfg.get("do_normalize", True))   # Wav2Vec2FeatureExtractor's default


class Recognizer:
  """A CTC model ready for inference: config, params (on the default device), vocabulary.

  Args:
    model_config: a CTC ModelConfig (or dict / ConfigDict) whose vocab_size equals the vocabulary's.
    params: the model's params tree (or the {'params': ...} variables dict).
    vocab: the output Vocabulary (blank, delimiter, letters).
    normalize: normalise each waveform (zero mean, unit variance) before the model; None picks the
      recipes' convention (True for layer-norm-extractor models, False for group-norm ones).
    bucket_samples: forward passes pad the length to a multiple of this.
  """

  def __init__(self, model_config: Any, params: Mapping[str, Any], vocab: Vocabulary, *,
               normalize: bool | None = None, bucket_samples: int = DEFAULT_BUCKET_SAMPLES):
    cfg = ModelConfig.from_any(model_config)
    if cfg.task != "ctc":
      raise ValueError(f"Recognizer needs a CTC model, got task={cfg.task!r} (fine-tune it first)")
    if cfg.vocab_size != vocab.size:
      raise ValueError(f"the model has {cfg.vocab_size} outputs but the vocabulary {vocab.size} symbols")
    if set(params) == {"params"}:
      params = params["params"]
    self.model_config = cfg
    self.vocab = vocab
    self.sample_rate = SAMPLE_RATE
    self.normalize = (cfg.extractor_mode == "layer_norm") if normalize is None else bool(normalize)
    self.bucket_samples = max(int(bucket_samples), cfg.receptive_field)
    self.params = jax.device_put(params)
    self.compiled_shapes: set = set()     # (rows, samples) of the forward passes compiled so far
    module = build(cfg)

    def forward(params, audio, padding_mask):
      out = module.apply({"params": params}, audio, padding_mask, deterministic=True)
      return out["logits"], out["frame_padding_mask"]

    self._forward = jax.jit(forward)

  # -- loading --------------------------------------------------------------------------------------

  @classmethod
  def load(cls, path: str, **kwargs) -> Recognizer:
    """A Recognizer from `path`:

    - a Hugging Face Wav2Vec2ForCTC directory: config.json, weights (`convert.from_hf`), vocab.json
      (+ tokenizer_config.json: `Vocabulary.from_hf_vocab`), optional preprocessor_config.json;
    - one of our fine-tuning run directories: its `export/` (or `best/export/`), the Hugging Face
      directory the fine-tuning loop writes when it saves its best checkpoint;
    - a fairseq CTC checkpoint (.pt, `convert.from_fairseq`; unpickles the file: trusted files only)
      with the fine-tuning dictionary `dict.ltr.txt` next to it.

    kwargs go to `Recognizer(...)` (normalize, bucket_samples). Raises FileNotFoundError naming the
    path and what was looked for, ValueError for a model that is not a CTC model or does not match its
    vocabulary.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
      for candidate in (path,) + tuple(os.path.join(path, d) for d in EXPORT_DIRS):
        if _is_hf_dir(candidate):
          return cls._load_hf(candidate, **kwargs)
      raise FileNotFoundError(
          f"{path}: not a model directory: no config.json with weights ({', '.join(convert.HF_WEIGHT_FILES)}) in "
          f"it, nor in {' or '.join(os.path.join(path, d) for d in EXPORT_DIRS)} (a fine-tuning run writes "
          "export/ when it saves its best checkpoint)")
    if os.path.isfile(path):
      return cls._load_fairseq(path, **kwargs)
    raise FileNotFoundError(f"{path}: no such checkpoint (expected a Hugging Face directory, a fine-tuning "
                            f"run directory with export/, or a fairseq .pt)")

  @classmethod
  def _load_hf(cls, directory: str, **kwargs) -> Recognizer:
    vocab_path = os.path.join(directory, "vocab.json")
    if not os.path.isfile(vocab_path):
      raise FileNotFoundError(f"{directory}: no vocab.json (the CTC output symbols) next to config.json")
    cfg, params = convert.from_hf(directory)
    if cfg.task != "ctc":
      raise ValueError(f"{directory}: a {cfg.task!r} model, not Wav2Vec2ForCTC (no lm_head): fine-tune it first")
    vocab = Vocabulary.from_hf_vocab(directory)
    if kwargs.get("normalize") is None:
      kwargs["normalize"] = _read_do_normalize(directory)
    log.info("loaded %s: %d layers, dim %d, %d symbols", directory, cfg.encoder_layers,
             cfg.encoder_embed_dim, vocab.size)
    return cls(cfg, params, vocab, **kwargs)

  @classmethod
  def _load_fairseq(cls, path: str, **kwargs) -> Recognizer:
    dict_path = os.path.join(os.path.dirname(os.path.abspath(path)), FAIRSEQ_DICT)
    if not os.path.isfile(dict_path):
      raise FileNotFoundError(f"{path}: a fairseq checkpoint needs its fine-tuning dictionary {dict_path}")
    cfg, params = convert.from_fairseq(path)
    if cfg.task != "ctc":
      raise ValueError(f"{path}: a fairseq {cfg.task!r} checkpoint, not a CTC fine-tuned one")
    vocab = Vocabulary.from_fairseq_dict(dict_path)
    log.info("loaded %s: %d layers, dim %d, %d symbols", path, cfg.encoder_layers, cfg.encoder_embed_dim,
             vocab.size)
    return cls(cfg, params, vocab, **kwargs)

  # -- forward --------------------------------------------------------------------------------------

  @property
  def frame_seconds(self) -> float:
    """Seconds between output frames (0.02 for the standard conv stack at 16 kHz)."""
    return self.model_config.hop / self.sample_rate

  def prepare(self, audio: Any) -> np.ndarray:
    """A 1-D waveform (16 kHz) -> contiguous float32, normalised if this model wants it."""
    audio = np.asarray(audio, np.float32)
    if audio.ndim != 1:
      raise ValueError(f"expected a 1-D mono waveform, got shape {audio.shape} (load files with "
                       "w2v2_jax.data.audio.load_audio, which downmixes and resamples)")
    if not np.all(np.isfinite(audio)):
      raise ValueError(f"waveform has {int(np.sum(~np.isfinite(audio)))} non-finite samples")
    if self.normalize and audio.size:
      audio = normalize_waveform(audio)
    return np.ascontiguousarray(audio)

  def _run(self, audio: np.ndarray, padding_mask: np.ndarray):
    """Jitted forward on a padded batch: rows to a power of two, length to the bucket.

    Returns device arrays (logits (B, T', V), frame padding (B, T')) for the B given rows, T' the frames
    of the bucketed length (the extra ones marked as padding)."""
    rows, length = audio.shape
    padded_rows = 1 << max(rows - 1, 0).bit_length()
    padded_len = _bucketed(length, self.bucket_samples)
    if (padded_rows, padded_len) != (rows, length):
      full = np.zeros((padded_rows, padded_len), np.float32)
      full[:rows, :length] = audio
      mask = np.zeros((padded_rows, padded_len), bool)   # dummy rows: silence, unpadded
      mask[:rows, :length] = padding_mask
      mask[:rows, length:] = True
      audio, padding_mask = full, mask
    if (padded_rows, padded_len) not in self.compiled_shapes:
      log.info("compiling the forward pass for %d x %d samples", padded_rows, padded_len)
      self.compiled_shapes.add((padded_rows, padded_len))
    logits, frame_pad = self._forward(self.params, audio, padding_mask)
    return logits[:rows], frame_pad[:rows]

  def logits(self, audio: Any, padding_mask: Any = None):
    """The model's eval forward pass on a batch.

    Args:
      audio: (B, L) float32, as the model takes it (not normalised here: see `prepare`).
      padding_mask: (B, L) bool, True at padding; None for none.

    Returns:
      (logits (B, T, V) np.float32, frame_padding (B, T) bool), T = the model's frames for L samples.
    """
    audio = np.asarray(audio, np.float32)
    if audio.ndim != 2:
      raise ValueError(f"audio must be (batch, samples), got shape {audio.shape}")
    padding_mask = (np.zeros(audio.shape, bool) if padding_mask is None
                    else np.asarray(padding_mask, bool))
    if padding_mask.shape != audio.shape:
      raise ValueError(f"padding_mask shape {padding_mask.shape} does not match audio {audio.shape}")
    logits, frame_pad = self._run(audio, padding_mask)
    frames = max(self.model_config.num_frames(audio.shape[1]), 0)
    logits, frame_pad = jax.device_get((logits[:, :frames], frame_pad[:, :frames]))
    return np.asarray(logits, np.float32), np.asarray(frame_pad, bool)

  def _run_utterances(self, audios: Sequence[np.ndarray]):
    """Prepared 1-D waveforms -> device (logits, frame padding) of one padded batch."""
    length = max(a.size for a in audios)
    batch = np.zeros((len(audios), length), np.float32)
    mask = np.ones((len(audios), length), bool)
    for row, a in enumerate(audios):
      batch[row, :a.size] = a
      mask[row, :a.size] = False
    return self._run(batch, mask)

  def utterance_logits(self, audios: Sequence[Any], *, batch_seconds: float = DEFAULT_BATCH_SECONDS,
                       chunk_seconds: float | None = None, overlap_seconds: float = 2.0
                       ) -> list[np.ndarray]:
    """Frame logits (T_i, V) float32 of each waveform's valid frames, in input order.

    Waveforms are batched by length (`plan_batches`, `batch_seconds` of padded audio per forward pass);
    ones longer than `chunk_seconds` (if given) go through `chunk_logits`.
    """
    prepared = [self.prepare(a) for a in audios]
    out: list[np.ndarray | None] = [None] * len(prepared)
    for i in self._long_indices(prepared, chunk_seconds):
      out[i] = self._chunk_logits_prepared(prepared[i], chunk_seconds, overlap_seconds, batch_seconds)
    short = [i for i, o in enumerate(out) if o is None]
    for batch in plan_batches([prepared[i].size for i in short], self._batch_samples(batch_seconds),
                              self.bucket_samples):
      ids = [short[j] for j in batch]
      logits, frame_pad = jax.device_get(self._run_utterances([prepared[i] for i in ids]))
      for row, i in enumerate(ids):
        out[i] = np.asarray(logits[row][~np.asarray(frame_pad[row])], np.float32)
    return out

  def _batch_samples(self, batch_seconds: float) -> int:
    return max(int(batch_seconds * self.sample_rate), 1)

  def _long_indices(self, prepared: Sequence[np.ndarray], chunk_seconds: float | None) -> list[int]:
    if not chunk_seconds:
      return []
    limit = chunk_seconds * self.sample_rate
    return [i for i, a in enumerate(prepared) if a.size > limit]

  # -- decoding -------------------------------------------------------------------------------------

  def _decode(self, logits, frame_padding, beam_width: int, lm_path: str | None, alpha: float,
              beta: float) -> list[str]:
    if lm_path is not None and beam_width <= 1:
      log.warning("LM decoding with beam width 1 keeps a single prefix per frame: pass a wider beam")
    return decode.decode_batch(logits, frame_padding, self.vocab, beam_width=beam_width, lm_path=lm_path,
                               alpha=alpha, beta=beta)

  def decode_frames(self, logits: np.ndarray, *, beam_width: int = 1, lm_path: str | None = None,
                    alpha: float = 0.5, beta: float = 1.5) -> str:
    """One utterance's frame logits (T, V) -> transcript (greedy, or beam search for beam_width > 1)."""
    logits = np.asarray(logits, np.float32)
    frames = logits.shape[0]
    padded = max(-(-frames // FRAME_BUCKET) * FRAME_BUCKET, FRAME_BUCKET)
    full = np.zeros((1, padded, logits.shape[1]), np.float32)
    full[0, :frames] = logits
    pad = np.arange(padded)[None, :] >= frames
    return self._decode(full, pad, beam_width, lm_path, alpha, beta)[0]

  def transcribe(self, audios: Sequence[Any], *, batch_seconds: float = DEFAULT_BATCH_SECONDS,
                 beam_width: int = 1, lm_path: str | None = None, alpha: float = 0.5, beta: float = 1.5,
                 chunk_seconds: float | None = None, overlap_seconds: float = 2.0) -> list[str]:
    """Transcribes 1-D float32 16 kHz waveforms; returns one transcript per waveform, in input order.

    Waveforms are sorted by length and batched (`batch_seconds` of padded audio per forward pass), and
    each batch decoded as it comes: greedy for beam_width 1, else `decode.beam_search` (with a KenLM
    model at `lm_path`, weight `alpha`, word bonus `beta`). Waveforms longer than `chunk_seconds` (if
    given) are transcribed with `transcribe_long`.
    """
    prepared = [self.prepare(a) for a in audios]
    texts: list[str | None] = [None] * len(prepared)
    for i in self._long_indices(prepared, chunk_seconds):
      logits = self._chunk_logits_prepared(prepared[i], chunk_seconds, overlap_seconds, batch_seconds)
      texts[i] = self.decode_frames(logits, beam_width=beam_width, lm_path=lm_path, alpha=alpha, beta=beta)
    short = [i for i, t in enumerate(texts) if t is None]
    for batch in plan_batches([prepared[i].size for i in short], self._batch_samples(batch_seconds),
                              self.bucket_samples):
      ids = [short[j] for j in batch]
      logits, frame_pad = self._run_utterances([prepared[i] for i in ids])
      for i, text in zip(ids, self._decode(logits, frame_pad, beam_width, lm_path, alpha, beta)):
        texts[i] = text
    return texts

  # -- long recordings ------------------------------------------------------------------------------

  def chunk_logits(self, audio: Any, *, chunk_seconds: float = 30.0, overlap_seconds: float = 2.0,
                   batch_seconds: float = DEFAULT_BATCH_SECONDS) -> np.ndarray:
    """Frame logits (T, V) of one long waveform, computed in overlapping chunks.

    Chunks of `chunk_seconds` start every chunk - overlap seconds at multiples of the conv hop, so
    their frames are the recording's frames; the last chunk ends at the end of the audio. Between two
    chunks the frames are cut in the middle of their overlap: each chunk keeps its central part, losing
    at least half the overlap at each inner edge, where its context is cut short. T equals the frames of
    one unchunked pass. The waveform is normalised once, as a whole, not per chunk.

    Equivalence with one unchunked pass: the conv features are identical for layer-norm-extractor
    models (the group-norm extractor's per-utterance GroupNorm makes each chunk's features differ
    slightly); the positional conv sees the same frames when half the overlap exceeds half its kernel
    (64 frames = 1.28 s for BASE/LARGE); self-attention sees only its chunk, so logits agree up to the
    context beyond the chunk, which matters little for chunks of tens of seconds.
    """
    return self._chunk_logits_prepared(self.prepare(audio), chunk_seconds, overlap_seconds, batch_seconds)

  def _chunk_layout(self, num_samples: int, chunk_seconds: float, overlap_seconds: float):
    """[(start sample, end sample, first kept local frame, end kept local frame)] for each chunk."""
    cfg = self.model_config
    hop = cfg.hop
    chunk = max(round(chunk_seconds * self.sample_rate / hop) * hop, hop)
    min_overlap = -(-max(cfg.receptive_field - hop, 0) // (2 * hop)) * 2 * hop
    overlap = max(round(overlap_seconds * self.sample_rate / (2 * hop)) * 2 * hop, min_overlap, 2 * hop)
    if chunk < cfg.receptive_field or chunk <= overlap:
      raise ValueError(f"chunk_seconds={chunk_seconds} must exceed overlap_seconds={overlap_seconds} "
                       f"({overlap} samples after rounding to the hop) and the receptive field "
                       f"({cfg.receptive_field} samples)")
    if num_samples <= chunk:
      return [(0, num_samples, 0, max(cfg.num_frames(num_samples), 0))]
    starts = list(range(0, num_samples - chunk, chunk - overlap))
    starts.append(-(-(num_samples - chunk) // hop) * hop)
    spans = [(s, min(s + chunk, num_samples)) for s in starts]
    first = [s // hop for s, _ in spans]
    count = [cfg.num_frames(e - s) for s, e in spans]
    cuts = [0] + [(first[i + 1] + first[i] + count[i]) // 2 for i in range(len(spans) - 1)]
    cuts.append(cfg.num_frames(num_samples))
    return [(s, e, cuts[i] - first[i], cuts[i + 1] - first[i]) for i, (s, e) in enumerate(spans)]

  def _chunk_logits_prepared(self, audio: np.ndarray, chunk_seconds: float, overlap_seconds: float,
                             batch_seconds: float) -> np.ndarray:
    layout = self._chunk_layout(audio.size, chunk_seconds, overlap_seconds)
    pieces: list[np.ndarray | None] = [None] * len(layout)
    plan = plan_batches([e - s for s, e, _, _ in layout], self._batch_samples(batch_seconds),
                        self.bucket_samples)
    for batch in plan:
      logits, _ = jax.device_get(self._run_utterances([audio[layout[i][0]:layout[i][1]] for i in batch]))
      for row, i in enumerate(batch):
        _, _, lo, hi = layout[i]
        pieces[i] = np.asarray(logits[row, lo:hi], np.float32)
    if len(layout) > 1:
      log.info("%.1f s of audio in %d chunks", audio.size / self.sample_rate, len(layout))
    if not pieces:
      return np.zeros((0, self.vocab.size), np.float32)
    return np.concatenate(pieces, axis=0)

  def transcribe_long(self, audio: Any, *, chunk_seconds: float = 30.0, overlap_seconds: float = 2.0,
                      batch_seconds: float = DEFAULT_BATCH_SECONDS, beam_width: int = 1,
                      lm_path: str | None = None, alpha: float = 0.5, beta: float = 1.5) -> LongTranscript:
    """Transcribes one recording of any length with bounded device memory.

    Frame logits come from `chunk_logits` (overlapping chunks, central parts kept, concatenated); the
    whole recording is then decoded once, so no word is cut or doubled at a chunk boundary.
    Returns LongTranscript(text, logits (T, V), frame_padding (T,)).
    """
    logits = self.chunk_logits(audio, chunk_seconds=chunk_seconds, overlap_seconds=overlap_seconds,
                               batch_seconds=batch_seconds)
    text = self.decode_frames(logits, beam_width=beam_width, lm_path=lm_path, alpha=alpha, beta=beta)
    return LongTranscript(text, logits, np.zeros(logits.shape[0], bool))

  # -- word times -----------------------------------------------------------------------------------

  def word_timings(self, logits: Any, frame_padding: Any = None, *, offset_seconds: float = 0.0
                   ) -> list[dict[str, Any]]:
    """Words of one utterance with start and end times in seconds (`decode.word_alignment`).

    Args:
      logits: (T, V) frame logits of one utterance (`utterance_logits`, `transcribe_long(...).logits`).
      frame_padding: (T,) bool, True at padding frames, or None.
      offset_seconds: added to every time (the utterance's start in a longer recording).

    Returns:
      [{"word": str, "start": s, "end": s}], times rounded to milliseconds; the end is exclusive (the
      end of the word's last frame). The words are those of greedy decoding.
    """
    logits = np.asarray(logits, np.float32)
    if logits.ndim != 2:
      raise ValueError(f"word_timings takes one utterance's (T, V) logits, got shape {logits.shape}")
    pad = None if frame_padding is None else np.asarray(frame_padding, bool)[None]
    words = decode.word_alignment(logits[None], pad, self.vocab, frame_seconds=self.frame_seconds)[0]
    return [{"word": w, "start": round(offset_seconds + a, 3), "end": round(offset_seconds + b, 3)}
            for w, a, b in words]


# ========================================================================================= export

def export_hf(model_config: Any, params: Mapping[str, Any], vocab: Vocabulary, out_dir: str, *,
              normalize: bool = False) -> str:
  """Writes a complete Hugging Face Wav2Vec2ForCTC directory that `Recognizer.load` and transformers'
  `pipeline("automatic-speech-recognition", model=out_dir)` both read.

  config.json + model.safetensors (`convert.to_hf`), vocab.json (`Vocabulary.to_hf_vocab`), and,
  written directly (transformers is not needed), tokenizer_config.json (Wav2Vec2CTCTokenizer: blank as
  pad_token, word delimiter, unk) and preprocessor_config.json (Wav2Vec2FeatureExtractor: 16 kHz,
  do_normalize=`normalize`, the data.normalize the model was fine-tuned with). Returns out_dir.
  """
  cfg = ModelConfig.from_any(model_config)
  convert.to_hf(cfg, params, out_dir)
  vocab.to_hf_vocab(out_dir)
  specials = {name: (tok if tok in vocab.symbols else None)
              for name, tok in (("bos_token", "<s>"), ("eos_token", "</s>"))}
  tokenizer = {
      "tokenizer_class": "Wav2Vec2CTCTokenizer",
      "processor_class": "Wav2Vec2Processor",
      "pad_token": vocab.blank,
      "unk_token": vocab.unk,
      "word_delimiter_token": vocab.word_delimiter,
      "do_lower_case": False,
      "replace_word_delimiter_char": " ",
      **specials,
  }
  feature_extractor = {
      "feature_extractor_type": "Wav2Vec2FeatureExtractor",
      "processor_class": "Wav2Vec2Processor",
      "feature_size": 1,
      "sampling_rate": SAMPLE_RATE,
      "padding_side": "right",
      "padding_value": 0.0,
      "do_normalize": bool(normalize),
      # HF's convention: only layer-norm-extractor models are given an attention mask.
      "return_attention_mask": cfg.extractor_mode == "layer_norm",
  }
  for name, content in (("tokenizer_config.json", tokenizer), (PREPROCESSOR_CONFIG, feature_extractor)):
    with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
      json.dump(content, f, indent=2, sort_keys=True)
      f.write("\n")
  return out_dir


# ========================================================================================= evaluation

def open_labeled_source(manifest: str, label: str | None = None) -> ManifestSource:
  """A ManifestSource with transcripts: `label` "wrd" or "ltr", or None for "wrd" if the manifest has
  a .wrd file next to it, else "ltr". Raises ValueError if it has neither."""
  source = ManifestSource(manifest)
  available = source.manifest.labels
  if label is None:
    label = next((k for k in ("wrd", "ltr") if k in available), None)
    if label is None:
      stem = os.path.splitext(manifest)[0]
      raise ValueError(f"{manifest}: no transcripts: expected {stem}.wrd or {stem}.ltr next to it")
  return ManifestSource(source.manifest, label=label)


def _reference(vocab: Vocabulary, label: str | None, label_key: str):
  """(normalised reference words, None) or (None, (reason key, message)) for an unusable transcript."""
  if label is None:
    return None, ("text:missing", "no transcript")
  words = text_lib.ltr_to_words(label) if label_key == "ltr" else label
  ref = vocab.normalize(words)
  _, status = vocab.encode_with_status(ref, on_oov="skip")
  if not status.ok:
    detail = f" (characters outside the vocabulary: {''.join(status.oov)!r})" if status.oov else ""
    return None, (f"text:{status.reason}", f"{status.reason} transcript {label[:60]!r}{detail}")
  return ref, None


def evaluate(recognizer: Recognizer, source: Any, *, label: str | None = None,
             batch_seconds: float = DEFAULT_BATCH_SECONDS, beam_width: int = 1, lm_path: str | None = None,
             alpha: float = 0.5, beta: float = 1.5, chunk_seconds: float | None = None,
             out_path: str | None = None, num_threads: int = 4, log_every: int = 50) -> dict[str, Any]:
  """Word and character error rates of `recognizer` over every item of a labeled source.

  Args:
    source: a Source with transcripts (`ManifestSource(tsv, label="wrd"|"ltr")`; .ltr lines are turned
      into words with `text.ltr_to_words`) or a manifest path (`open_labeled_source(path, label)`).
    batch_seconds, beam_width, lm_path, alpha, beta, chunk_seconds: as `Recognizer.transcribe`.
    out_path: if given, a TSV of id (the item's path), reference, hypothesis and error counts
      (`evaluate.write_hypotheses`).
    num_threads: audio decoding threads; the next batch is decoded while the model runs.

  Items whose audio cannot be used (audio.AudioError) or whose reference is empty or has characters
  outside the vocabulary (after `Vocabulary.normalize`) are skipped, each with a warning naming it.
  References and hypotheses are compared after `Vocabulary.normalize`.

  Returns:
    dict: wer, cer (fractions; nan when no item could be evaluated), utterances (evaluated), skipped,
    skipped_reasons ({"audio:<AudioError reason>" or "text:<empty|oov|missing>": count}),
    utterances_per_second, audio_seconds, seconds (wall time), hypotheses_path (out_path or None).
  """
  if isinstance(source, (str, os.PathLike)):
    source = open_labeled_source(os.fspath(source), label)
  label_key = getattr(source, "label_key", None)
  if label_key is None:
    raise ValueError("evaluate needs a source with transcripts (ManifestSource(..., label='wrd'|'ltr'))")
  vocab = recognizer.vocab
  skipped: dict[str, int] = {}

  def skip(index: int, why) -> None:
    key, message = why
    log.warning("skipping %s: %s", source.describe(index), message)
    skipped[key] = skipped.get(key, 0) + 1

  labels = getattr(getattr(source, "manifest", None), "labels", {}).get(label_key)
  refs: dict[int, str] = {}
  todo = []
  for i in range(len(source)):
    if labels is None:          # a Source without a label table: transcripts come with the audio
      todo.append(i)
      continue
    ref, why = _reference(vocab, labels[i], label_key)
    if ref is None:
      skip(i, why)
    else:
      refs[i] = ref
      todo.append(i)
  sizes = np.asarray(source.sizes)
  plan = plan_batches([int(sizes[i]) for i in todo], recognizer._batch_samples(batch_seconds),
                      recognizer.bucket_samples)
  plan = [[todo[j] for j in batch] for batch in plan]

  def load(index):
    try:
      return source.load(index, sample_rate=recognizer.sample_rate, normalize=False)
    except AudioError as e:
      return e

  hyps: dict[int, str] = {}
  audio_samples = 0
  started = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(max(int(num_threads), 1)) as pool:
    pending = [pool.submit(load, i) for i in plan[0]] if plan else []
    for step, batch in enumerate(plan):
      loaded = [f.result() for f in pending]
      pending = [pool.submit(load, i) for i in plan[step + 1]] if step + 1 < len(plan) else []
      keep, audios = [], []
      for index, item in zip(batch, loaded):
        if isinstance(item, AudioError):
          skip(index, (f"audio:{item.reason}", str(item)))
          continue
        if index not in refs:
          ref, why = _reference(vocab, item.label, label_key)
          if ref is None:
            skip(index, why)
            continue
          refs[index] = ref
        keep.append(index)
        audios.append(item.audio)
      if not keep:
        continue
      texts = recognizer.transcribe(audios, batch_seconds=batch_seconds, beam_width=beam_width,
                                    lm_path=lm_path, alpha=alpha, beta=beta, chunk_seconds=chunk_seconds)
      for index, text, audio in zip(keep, texts, audios):
        hyps[index] = vocab.normalize(text)
        audio_samples += audio.size
      if log_every and (step + 1) % log_every == 0:
        log.info("evaluated %d utterances (%d/%d batches)", len(hyps), step + 1, len(plan))
  seconds = time.perf_counter() - started
  order = sorted(hyps)
  ref_list = [refs[i] for i in order]
  hyp_list = [hyps[i] for i in order]
  if order:
    wer, cer = scoring.wer(ref_list, hyp_list), scoring.cer(ref_list, hyp_list)
  else:
    log.error("no utterance could be evaluated")
    wer = cer = float("nan")
  if out_path:
    scoring.write_hypotheses(out_path, [source.describe(i) for i in order], ref_list, hyp_list)
  n_skipped = sum(skipped.values())
  result = {
      "wer": wer,
      "cer": cer,
      "utterances": len(order),
      "skipped": n_skipped,
      "skipped_reasons": skipped,
      "utterances_per_second": len(order) / seconds if seconds > 0 else float("inf"),
      "audio_seconds": audio_samples / recognizer.sample_rate,
      "seconds": seconds,
      "hypotheses_path": out_path or None,
  }
  log.info("WER %.4f CER %.4f over %d utterances (%d skipped) in %.1f s", wer, cer, len(order), n_skipped,
           seconds)
  return result


# ========================================================================================= commands

def _add_decoding_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--beam", type=int, default=1, help="beam width (1: greedy)")
  parser.add_argument("--lm", default=None, help="KenLM model (ARPA or binary) for beam search")
  parser.add_argument("--alpha", type=float, default=0.5, help="LM weight")
  parser.add_argument("--beta", type=float, default=1.5, help="word insertion bonus")
  parser.add_argument("--batch-seconds", type=float, default=DEFAULT_BATCH_SECONDS,
                      help="padded audio per forward pass")
  parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                      help="normalise waveforms (default: as the checkpoint says)")


def main_evaluate(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """`w2v2 evaluate --checkpoint CKPT --data MANIFEST.tsv [--label wrd|ltr] [--beam N --lm PATH --alpha A
  --beta B] [--out hyps.tsv]`: prints WER, CER, utterances/s and skipped items; exits with status 1 if
  no utterance could be evaluated. Returns the `evaluate` dict."""
  parser = argparse.ArgumentParser(prog="w2v2 evaluate",
                                   description="WER/CER of a CTC checkpoint on a labeled manifest.")
  parser.add_argument("--checkpoint", required=True,
                      help="Hugging Face directory, fine-tuning run directory (its export/), or fairseq .pt")
  parser.add_argument("--data", required=True,
                      help="manifest .tsv with a .wrd or .ltr file next to it, or tfds:SPLIT (e.g. "
                           "tfds:test_clean; needs the tfds extra and a prepared --tfds-data-dir)")
  parser.add_argument("--tfds-name", default="librispeech")
  parser.add_argument("--tfds-data-dir", default=None)
  parser.add_argument("--label", choices=("wrd", "ltr"), default=None, help="default: wrd if present")
  parser.add_argument("--out", default=None, help="write per-utterance hypotheses (TSV) here")
  parser.add_argument("--chunk-seconds", type=float, default=None,
                      help="transcribe utterances longer than this in overlapping chunks")
  _add_decoding_flags(parser)
  args = parser.parse_args(argv)
  recognizer = Recognizer.load(args.checkpoint, normalize=args.normalize)
  if args.data.startswith("tfds:"):
    from w2v2_jax.data.tfds_source import TfdsSource  # pylint: disable=import-outside-toplevel
    source = TfdsSource(args.data[len("tfds:"):], name=args.tfds_name, data_dir=args.tfds_data_dir)
  else:
    source = open_labeled_source(args.data, args.label)
  result = evaluate(recognizer, source, batch_seconds=args.batch_seconds, beam_width=args.beam,
                    lm_path=args.lm, alpha=args.alpha, beta=args.beta, chunk_seconds=args.chunk_seconds,
                    out_path=args.out)
  print(f"WER {100 * result['wer']:.2f}%  CER {100 * result['cer']:.2f}%  "
        f"utterances {result['utterances']}  skipped {result['skipped']}  "
        f"{result['utterances_per_second']:.2f} utterances/s")
  if result["skipped"]:
    print("skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(result["skipped_reasons"].items())))
  if result["hypotheses_path"]:
    print(f"hypotheses: {result['hypotheses_path']}")
  if not result["utterances"]:
    raise SystemExit("w2v2 evaluate: no utterance could be evaluated")
  return result


def main_transcribe(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """`w2v2 transcribe FILE... [--checkpoint CKPT] [--json] [--chunk-seconds 30]`.

  Prints `FILE<TAB>TRANSCRIPT`, one line per file, or with --json one JSON list of {"file", "text",
  "duration", "words": [{"word", "start", "end"}]}. Files are decoded with `load_audio` (any rate or
  channel count); ones longer than --chunk-seconds are transcribed in overlapping chunks. A file that
  cannot be read is reported (an "error" entry in JSON) and the command exits with status 1 at the end.
  --checkpoint defaults to $W2V2_CHECKPOINT. Returns the per-file results.
  """
  parser = argparse.ArgumentParser(prog="w2v2 transcribe", description="Transcribe audio files.")
  parser.add_argument("files", nargs="+", help="audio files (any format soundfile or librosa reads)")
  parser.add_argument("--checkpoint", default=os.environ.get("W2V2_CHECKPOINT"),
                      help="Hugging Face directory, fine-tuning run directory (its export/), or fairseq .pt "
                           "(default: $W2V2_CHECKPOINT)")
  parser.add_argument("--json", action="store_true", help="print JSON with word timings")
  parser.add_argument("--chunk-seconds", type=float, default=30.0,
                      help="transcribe longer files in chunks of this length")
  parser.add_argument("--overlap-seconds", type=float, default=2.0, help="overlap between chunks")
  _add_decoding_flags(parser)
  args = parser.parse_args(argv)
  if not args.checkpoint:
    parser.error("no checkpoint: pass --checkpoint or set W2V2_CHECKPOINT")
  recognizer = Recognizer.load(args.checkpoint, normalize=args.normalize)
  results: list[dict[str, Any]] = []
  audios, readable = [], []
  for path in args.files:
    try:
      audios.append(load_audio(path, recognizer.sample_rate))
      readable.append(len(results))
      results.append({"file": path})
    except AudioError as e:
      log.error("cannot transcribe %s", e)
      results.append({"file": path, "error": str(e)})
  decoding = {"beam_width": args.beam, "lm_path": args.lm, "alpha": args.alpha, "beta": args.beta}
  if args.json:
    frame_logits = recognizer.utterance_logits(audios, batch_seconds=args.batch_seconds,
                                               chunk_seconds=args.chunk_seconds,
                                               overlap_seconds=args.overlap_seconds)
    for slot, audio, logits in zip(readable, audios, frame_logits):
      results[slot].update(text=recognizer.decode_frames(logits, **decoding),
                           duration=round(audio.size / recognizer.sample_rate, 3),
                           words=recognizer.word_timings(logits))
    print(json.dumps(results, indent=2, ensure_ascii=False))
  else:
    texts = recognizer.transcribe(audios, batch_seconds=args.batch_seconds, chunk_seconds=args.chunk_seconds,
                                  overlap_seconds=args.overlap_seconds, **decoding)
    for slot, text in zip(readable, texts):
      results[slot]["text"] = text
    for item in results:
      if "text" in item:
        print(f"{item['file']}\t{item['text']}")
  if len(readable) < len(results):
    raise SystemExit(f"w2v2 transcribe: {len(results) - len(readable)} file(s) could not be read")
  return results
