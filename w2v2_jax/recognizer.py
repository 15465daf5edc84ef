"""Inference with a fine-tuned CTC model: load it, transcribe audio, time its words.

  rec = Recognizer.load(path)      a Hugging Face Wav2Vec2ForCTC directory, one of our fine-tuning run
                                   directories (its export/), or a fairseq CTC .pt with dict.ltr.txt
  rec.transcribe(audios)           list of 1-D float32 16 kHz arrays -> list of transcripts
  rec.transcribe_long(audio)       one long recording, in overlapping chunks (bounded device memory)
  rec.word_timings(frame_logits)   [{"word", "start", "end"}] in seconds

WER / CER over a labeled manifest: `w2v2_jax.evaluate`; writing a Hugging Face directory:
`w2v2_jax.export`; the `w2v2 transcribe` / `w2v2 evaluate` commands: `w2v2_jax.cli`.

Static shapes: every forward pass pads its batch to a power-of-two number of rows and its length up to
a multiple of `bucket_samples` (1 s by default; `data.batching.plan_padded_batches`), so a handful of
shapes compile however long the utterances are. Padding is marked in the padding mask; the model
ignores padded frames, except that the per-utterance GroupNorm of "default"-extractor models (BASE)
computes its statistics over the padded length too (as fairseq and Hugging Face do in batched
inference), so their logits move slightly with the bucket and with the longest utterance of the batch
(`batch_seconds=0`, one utterance per pass, and audio of whole buckets avoid that). Layer-norm-extractor
models (LARGE LV-60k) give the same logits however they are padded and batched.

Waveform normalisation (zero mean, unit variance per utterance) follows the checkpoint: a Hugging Face
directory's preprocessor_config.json `do_normalize`; without one (and for fairseq checkpoints) the
wav2vec 2.0 recipes' convention: normalise for layer-norm-extractor models, not for group-norm ones.
`Recognizer(..., normalize=True/False)` overrides it.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from w2v2_jax import convert, decode, storage
from w2v2_jax.data import batching
from w2v2_jax.data.audio import SAMPLE_RATE, normalize_waveform
from w2v2_jax.data.text import Vocabulary
from w2v2_jax.export import PREPROCESSOR_CONFIG
from w2v2_jax.models import ModelConfig, build

log = logging.getLogger(__name__)

__all__ = ["LongTranscript", "Recognizer"]

DEFAULT_BATCH_SECONDS = 64.0       # audio per forward pass, padding included
DEFAULT_BUCKET_SAMPLES = SAMPLE_RATE
FRAME_BUCKET = 512                 # decoding pads frame counts to a multiple of this (few greedy compiles)
FAIRSEQ_DICT = "dict.ltr.txt"
EXPORT_DIRS = ("export", os.path.join("best", "export"))   # where a fine-tuning run keeps its HF export


class LongTranscript(NamedTuple):
  """`Recognizer.transcribe_long`'s result: the text, the stitched frame logits (T, V) float32 and their
  frame padding (T,) bool (all False: every stitched frame is a real frame)."""
  text: str
  logits: np.ndarray
  frame_padding: np.ndarray


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
    if storage.is_remote(path):
      return cls.load(storage.local_model_copy(path, ("",) + EXPORT_DIRS, "config.json",
                                                       convert.HF_WEIGHT_FILES, FAIRSEQ_DICT), **kwargs)
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
    padded_len = batching.padded_length(length, self.bucket_samples)
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
    for batch in batching.plan_padded_batches([prepared[i].size for i in short], self._batch_samples(batch_seconds),
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
    for batch in batching.plan_padded_batches([prepared[i].size for i in short], self._batch_samples(batch_seconds),
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
    plan = batching.plan_padded_batches([e - s for s, e, _, _ in layout], self._batch_samples(batch_seconds),
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
