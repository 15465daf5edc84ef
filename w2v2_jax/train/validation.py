"""Fine-tuning validation sharded over every device of every host: greedy WER / CER of the current params.

Every process plans the same batches from the manifest (`data/labeled.py`, as `w2v2 evaluate`: longest first, each
utterance padded to its own bucket, so its transcript does not depend on what it is batched with),
reads only its share of each batch's rows, and the eval forward pass with greedy CTC decoding runs
under the train step's `DataParallel` on the params the step holds. The decoded ids are gathered to
every process and scored on the host. The numbers equal `w2v2 evaluate` (greedy) of the same params
on the same manifest (tested), whatever the device count.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import numpy as np

from w2v2_jax import decode, models, scoring
from w2v2_jax.data import batching, labeled
from w2v2_jax.data.audio import SAMPLE_RATE, AudioError
from w2v2_jax.recognizer import DEFAULT_BATCH_SECONDS, DEFAULT_BUCKET_SAMPLES
from w2v2_jax.data.text import Vocabulary
from w2v2_jax.train.parallel import DataParallel

log = logging.getLogger(__name__)


class Validator:
  """WER / CER of a CTC model over a labeled manifest, computed with `runner`'s devices.

  Args:
    runner: the fine-tuning step's DataParallel (its devices, mode and state layout).
    model_config: the CTC ModelConfig being trained.
    vocab: its vocabulary. manifest / label: the valid .tsv and its transcripts ("ltr" | "wrd" | None).
    normalize: per-utterance waveform normalisation, as training.
    batch_seconds, bucket_samples: as `recognizer.Recognizer` (padded audio per forward pass; the
      length granularity), so the transcripts are the ones `w2v2 evaluate` gives.
  """

  def __init__(self, runner: DataParallel, model_config: Any, vocab: Vocabulary, manifest: str, *,
               label: Optional[str] = None, normalize: bool = False,
               batch_seconds: float = DEFAULT_BATCH_SECONDS,
               bucket_samples: int = DEFAULT_BUCKET_SAMPLES, num_threads: int = 4):
    import jax  # pylint: disable=import-outside-toplevel
    cfg = models.ModelConfig.from_any(model_config)
    self.vocab, self.normalize, self.num_threads = vocab, bool(normalize), int(num_threads)
    self.source = labeled.open_labeled_source(manifest, label)
    self.runner = runner
    self.num_devices = runner.num_devices
    self.process_index, self.process_count = jax.process_index(), jax.process_count()
    self.refs = labeled.References(self.source, vocab, what="validation: ")
    self.bucket_samples = max(int(bucket_samples), cfg.receptive_field)
    budget = max(int(batch_seconds * SAMPLE_RATE), 1)
    self.plan = labeled.padded_batches(self.source, self.refs.todo, budget, self.bucket_samples)
    self.shares = [self._share(batch) for batch in self.plan]   # fixed by the plan: computed once
    module = models.build(cfg)

    def forward(params, rows):
      out = module.apply({"params": params}, rows["audio"], rows["padding_mask"], deterministic=True)
      tokens, lengths = decode.greedy(out["logits"], out["frame_padding_mask"], vocab.blank_id)
      return {"tokens": tokens, "lengths": lengths, "ok": rows["ok"]}

    self._run = runner.map_rows(forward)

  def _rows(self, batch):
    """Global rows of a batch: its utterances, then dummy rows up to a multiple of the device count."""
    n = self.num_devices
    return -(-len(batch) // n) * n

  def _load(self, index: int):
    try:
      return self.source.load(index, sample_rate=SAMPLE_RATE, normalize=self.normalize).audio
    except AudioError as e:
      return e

  def _share(self, batch):
    """lo, hi (this process's global rows of `batch`) and its [(row, index)] (dummy rows are nobody's)."""
    lo, hi = batching.host_slice(self._rows(batch), self.process_index, self.process_count)
    return lo, hi, [(r, batch[r]) for r in range(lo, min(hi, len(batch)))]

  def __call__(self, state: Any) -> Dict[str, Any]:
    """Scores the params of `state` (as the step holds it). Returns wer, cer, utterances, skipped."""
    hyps: Dict[int, str] = {}
    skipped = dict(self.refs.skipped)
    mine = [[index for _, index in rows] for _, _, rows in self.shares]
    loading = labeled.load_ahead(self._load, mine, self.num_threads)
    for batch, (lo, hi, rows), (_, loaded) in zip(self.plan, self.shares, loading):
      length = batching.padded_length(max(int(self.source.sizes[i]) for i in batch), self.bucket_samples)
      audio = np.zeros((hi - lo, length), np.float32)
      padding = np.ones((hi - lo, length), bool)
      ok = np.zeros((hi - lo,), bool)
      for (r, index), item in zip(rows, loaded):
        if isinstance(item, AudioError):
          log.warning("validation: skipping %s: %s", self.source.describe(index), item)
          continue
        audio[r - lo, :item.size] = item
        padding[r - lo, :item.size] = False
        ok[r - lo] = True
      out = self._run(state, {"audio": audio, "padding_mask": padding, "ok": ok})
      for r, index in enumerate(batch):
        if not out["ok"][r]:
          skipped["audio"] = skipped.get("audio", 0) + 1
          continue
        ids = out["tokens"][r][:int(out["lengths"][r])].tolist()
        hyps[index] = self.vocab.normalize(self.vocab.decode(ids))
    order = sorted(hyps)
    refs = [self.refs.text[i] for i in order]
    hyp_list = [hyps[i] for i in order]
    wer = scoring.wer(refs, hyp_list) if order else float("nan")
    cer = scoring.cer(refs, hyp_list) if order else float("nan")
    return {"wer": wer, "cer": cer, "utterances": len(order), "skipped": sum(skipped.values()),
            "skipped_reasons": skipped}
