"""Fine-tuning validation sharded over every device of every host: greedy WER / CER of the current params.

Every process plans the same batches from the manifest (`inference.plan_batches`: longest first, each
utterance padded to its own bucket, so its transcript does not depend on what it is batched with),
reads only its share of each batch's rows, and the eval forward pass with greedy CTC decoding runs
under the train step's `DataParallel` on the params the step holds. The decoded ids are gathered to
every process and scored on the host. The numbers equal `w2v2 evaluate` (greedy) of the same params
on the same manifest (tested), whatever the device count.
"""
from __future__ import annotations

import concurrent.futures
import logging
from typing import Any, Dict, Optional

import numpy as np

from w2v2_jax import decode, evaluate as scoring, inference, models
from w2v2_jax.data import batching
from w2v2_jax.data.audio import AudioError
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
    batch_seconds, bucket_samples: as `inference.Recognizer` (padded audio per forward pass; the
      length granularity), so the transcripts are the ones `w2v2 evaluate` gives.
  """

  def __init__(self, runner: DataParallel, model_config: Any, vocab: Vocabulary, manifest: str, *,
               label: Optional[str] = None, normalize: bool = False,
               batch_seconds: float = inference.DEFAULT_BATCH_SECONDS,
               bucket_samples: int = inference.DEFAULT_BUCKET_SAMPLES, num_threads: int = 4):
    import jax  # pylint: disable=import-outside-toplevel
    cfg = models.ModelConfig.from_any(model_config)
    self.vocab, self.normalize, self.num_threads = vocab, bool(normalize), int(num_threads)
    self.source = inference.open_labeled_source(manifest, label)
    self.runner = runner
    self.num_devices = runner.num_devices
    self.process_index, self.process_count = jax.process_index(), jax.process_count()
    labels = self.source.manifest.labels[self.source.label_key]
    self.refs: Dict[int, str] = {}
    self.text_skipped: Dict[str, int] = {}
    for i in range(len(self.source)):
      ref, why = inference._reference(vocab, labels[i], self.source.label_key)  # pylint: disable=protected-access
      if ref is None:
        log.warning("validation: skipping %s: %s", self.source.describe(i), why[1])
        self.text_skipped[why[0]] = self.text_skipped.get(why[0], 0) + 1
      else:
        self.refs[i] = ref
    todo = sorted(self.refs)
    sizes = np.asarray(self.source.sizes)
    self.bucket_samples = max(int(bucket_samples), cfg.receptive_field)
    budget = max(int(batch_seconds * inference.SAMPLE_RATE), 1)
    plan = inference.plan_batches([int(sizes[i]) for i in todo], budget, self.bucket_samples)
    self.plan = [[todo[j] for j in batch] for batch in plan]
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
      return self.source.load(index, sample_rate=inference.SAMPLE_RATE, normalize=self.normalize).audio
    except AudioError as e:
      return e

  def __call__(self, state: Any) -> Dict[str, Any]:
    """Scores the params of `state` (as the step holds it). Returns wer, cer, utterances, skipped."""
    hyps: Dict[int, str] = {}
    skipped = dict(self.text_skipped)
    with concurrent.futures.ThreadPoolExecutor(max(self.num_threads, 1)) as pool:
      for batch in self.plan:
        rows = self._rows(batch)
        lo, hi = batching.host_slice(rows, self.process_index, self.process_count)
        length = inference._bucketed(max(int(self.source.sizes[i]) for i in batch),  # pylint: disable=protected-access
                                     self.bucket_samples)
        audio = np.zeros((hi - lo, length), np.float32)
        padding = np.ones((hi - lo, length), bool)
        ok = np.zeros((hi - lo,), bool)
        mine = [(r, batch[r]) for r in range(lo, min(hi, len(batch)))]
        for (r, index), item in zip(mine, pool.map(lambda ri: self._load(ri[1]), mine)):
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
    refs = [self.refs[i] for i in order]
    hyp_list = [hyps[i] for i in order]
    wer = scoring.wer(refs, hyp_list) if order else float("nan")
    cer = scoring.cer(refs, hyp_list) if order else float("nan")
    return {"wer": wer, "cer": cer, "utterances": len(order), "skipped": sum(skipped.values()),
            "skipped_reasons": skipped}
