"""The `w2v2` command: one entry point, one subcommand per job, absl flags for every one of them.

`w2v2 --help` lists the subcommands; `w2v2 SUBCOMMAND --help` their flags. Flags are written
`--name=value` or `--name value`, booleans `--name` / `--noname`, lists comma-separated (`--ext=flac,wav`);
a dash in a flag's name may stand for its underscore (`--batch-seconds` = `--batch_seconds`). Training
configs are ml_collections config files: `--config=pretrain:base` names a packaged one
(`w2v2_jax/configs/`), `--config=my_config.py:arg` a file of your own, and `--config.train.steps=1000`
overrides a field. The CLI only wires flags to library functions.

Length: every subcommand's flags live here, in one place, so that one style holds for all of them.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import tempfile
from typing import Any, Callable, List, Optional

from absl import flags

from w2v2_jax import configs as packaged


@dataclasses.dataclass(frozen=True)
class Command:
  """A subcommand: usage (after `w2v2 NAME`), one-line purpose, its flags and what it runs.

  define(flag_values, argv) declares the flags (argv: where the config flag finds its overrides);
  run(flag_values, positional_args) does the job and may return a result (`run` returns it);
  positional: "none", "files" (one or more) or "src_out" (exactly two)."""
  usage: str
  purpose: str
  define: Callable[[flags.FlagValues, List[str]], None]
  run: Callable[[flags.FlagValues, List[str]], Any]
  positional: str = "none"


# ---------------------------------------------------------------------------------------- training

def _define_training(fv: flags.FlagValues, argv: List[str]) -> None:
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", None, "Config: a packaged one (pretrain:base, finetune:base_10m, ...) "
                                  "or FILE.py:ARG of your own; --config.FIELD=VALUE overrides a field",
                                  flag_values=fv, lock_config=True, sys_argv=argv)
  flags.mark_flag_as_required("config", flag_values=fv)


def _define_train(fv: flags.FlagValues, argv: List[str]) -> None:
  _define_training(fv, argv)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics (local path or gs://)", flag_values=fv)
  flags.DEFINE_integer("max_steps", None, "Stop after this many updates in this invocation (then resume)",
                       flag_values=fv)
  flags.mark_flag_as_required("workdir", flag_values=fv)


def _run_pretrain(fv: flags.FlagValues, _: List[str]) -> None:
  from w2v2_jax.train import loop  # pylint: disable=import-outside-toplevel
  loop.pretrain(fv.config, fv.workdir, max_steps=fv.max_steps)


def _run_finetune(fv: flags.FlagValues, _: List[str]) -> None:
  from w2v2_jax.train import loop  # pylint: disable=import-outside-toplevel
  loop.finetune(fv.config, fv.workdir, max_steps=fv.max_steps)


def _define_compile_check(fv: flags.FlagValues, argv: List[str]) -> None:
  _define_training(fv, argv)
  flags.DEFINE_string("topology", None, "TPU slice, e.g. v5e-8, v4-32, v5p-64, v6e-8 (v4/v5p count TensorCores)",
                      flag_values=fv)
  flags.DEFINE_integer("bucket", None, "Bucket (samples per row) to compile; default the largest of data.buckets",
                       flag_values=fv)
  flags.DEFINE_float("target_hours", None, "Wall-clock goal for config.train.steps updates: prints the MFU it needs",
                     flag_values=fv)
  flags.DEFINE_string("json", None, "Also append the figures as one JSON line to this file", flag_values=fv)
  flags.DEFINE_integer("top_ops", 12, "Print the costliest ops (by FLOPs) of the update", flag_values=fv)
  flags.mark_flag_as_required("topology", flag_values=fv)


def _run_compile_check(fv: flags.FlagValues, _: List[str]) -> dict:
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_platforms", "cpu")        # the host compiles; libtpu is not initialised as a backend
  from w2v2_jax.train import aot  # pylint: disable=import-outside-toplevel
  try:
    report = aot.compile_check(fv.config, fv.topology, bucket=fv.bucket, target_hours=fv.target_hours)
  except (aot.CompileError, RuntimeError, ValueError) as e:
    sys.exit(f"w2v2 compile-check: {e}")
  print(aot.format_report(report, top_ops=fv.top_ops), flush=True)
  if fv.json:
    import json  # pylint: disable=import-outside-toplevel
    with open(fv.json, "a") as f:
      f.write(json.dumps({k: v for k, v in report.items() if k != "buckets"}) + "\n")
  if not report["fits"]:
    sys.exit(f"w2v2 compile-check: the step needs {report['total_bytes'] / aot.GIB:.2f} GiB per chip, more than "
             f"the {report['hbm_gib']:g} GiB of a {report['chip']}")
  return report


# ---------------------------------------------------------------------------------------- data

def _define_pack(fv: flags.FlagValues, _: List[str]) -> None:
  flags.DEFINE_integer("shards", 1, "Number of ArrayRecord shards", flag_values=fv)


def _run_pack(fv: flags.FlagValues, args: List[str]) -> dict:
  from w2v2_jax.data import packed  # pylint: disable=import-outside-toplevel
  manifest, out_prefix = args
  try:
    result = packed.pack(manifest, out_prefix, shards=fv.shards)
  except (OSError, ValueError) as e:
    sys.exit(f"w2v2 pack: {e}")
  print(f"packed {result['utterances']} utterances ({result['bytes'] / 1e6:.1f} MB of audio) into "
        f"{result['shards']} shards; train on --config.data.train_manifest={result['index']}")
  return result


def _define_manifest(fv: flags.FlagValues, _: List[str]) -> None:
  flags.DEFINE_string("root", None, "Folder searched recursively for audio", flag_values=fv)
  flags.DEFINE_string("out", None, "Output folder for train.tsv / valid.tsv", flag_values=fv)
  flags.DEFINE_float("valid_percent", 0.01, "Fraction of the files that go to valid.tsv", flag_values=fv)
  flags.DEFINE_list("ext", ["flac", "wav"], "Audio file extensions", flag_values=fv)
  flags.DEFINE_integer("seed", 42, "Seed of the train/valid split", flag_values=fv)
  flags.mark_flags_as_required(["root", "out"], flag_values=fv)


def _run_manifest(fv: flags.FlagValues, _: List[str]) -> dict:
  from w2v2_jax.data.manifest import write_manifest  # pylint: disable=import-outside-toplevel
  counts = write_manifest(fv.root, fv.out, valid_percent=fv.valid_percent,
                          exts=tuple(e.strip().lstrip(".") for e in fv.ext if e.strip()), seed=fv.seed)
  print(" ".join(f"{k}={v}" for k, v in counts.items()))
  return counts


def _define_make_corpus(fv: flags.FlagValues, _: List[str]) -> None:
  flags.DEFINE_string("out", None, "Output folder", flag_values=fv)
  flags.DEFINE_float("hours", 1.0, "Hours of train audio", flag_values=fv)
  flags.DEFINE_float("eval_minutes", 5.0, "Minutes of valid and of test audio", flag_values=fv)
  flags.DEFINE_float("labeled_minutes", 10.0, "Minutes of the labeled subset train_<M>m", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed: voices, sentences, prosody", flag_values=fv)
  from w2v2_jax.corpus import voices  # pylint: disable=import-outside-toplevel
  flags.DEFINE_list("engines", list(voices.ENGINE_WEIGHTS), "TTS engines (default: all; those not installed are "
                    "left out)", flag_values=fv)
  flags.DEFINE_string("text", None, "Text file (one paragraph per line) instead of the KJV Bible", flag_values=fv)
  flags.DEFINE_integer("workers", None, "Parallel renders (default: the CPU count)", flag_values=fv)
  flags.DEFINE_float("voice_shift", 0.0, "Share of train utterances given a new speaker by a vocal tract and pitch "
                     "shift (valid and test never)", flag_values=fv)
  flags.DEFINE_float("unlabeled_hours", 0.0, "Hours of unlabeled audio for pretraining (pretrain.tsv = train + "
                     "unlabeled.tsv), spoken by festival's voices of other languages", flag_values=fv)
  flags.mark_flag_as_required("out", flag_values=fv)


def _run_make_corpus(fv: flags.FlagValues, _: List[str]) -> dict:
  from w2v2_jax.corpus import sentences, synthesize, voices  # pylint: disable=import-outside-toplevel
  from w2v2_jax.progress import ProgressBar  # pylint: disable=import-outside-toplevel
  try:
    summary = synthesize.make_corpus(
        fv.out, fv.hours, eval_minutes=fv.eval_minutes, labeled_minutes=fv.labeled_minutes, seed=fv.seed,
        engines=[e.strip() for e in fv.engines if e.strip()], text_file=fv.text, workers=fv.workers,
        voice_shift=fv.voice_shift, unlabeled_hours=fv.unlabeled_hours, progress=ProgressBar("synthesising"))
  except (voices.EngineUnavailable, sentences.TextUnavailable, ValueError) as e:  # ValueError: bad --engines/--hours
    sys.exit(f"w2v2 make-corpus: {e}")
  for name, split in summary["splits"].items():
    print(f"{name:>10}: {split['utterances']:6d} utterances {split['hours'] * 60:7.1f} min "
          f"{len(split['voices']):3d} voices")
  if summary["failed"]:
    print(f"{len(summary['failed'])} utterances failed (see the log); run again to retry them")
  print(f"wrote {fv.out}")
  return summary


def _define_build_lm(fv: flags.FlagValues, _: List[str]) -> None:
  flags.DEFINE_list("text", None, "UTF-8 text file(s), one sentence per line", flag_values=fv)
  flags.DEFINE_string("out", None, "The ARPA file to write", flag_values=fv)
  flags.DEFINE_integer("order", 4, "n-gram order (>= 2)", flag_values=fv)
  flags.DEFINE_list("exclude", [], "Files whose lines (after normalisation) are left out, e.g. valid.wrd,test.wrd",
                    flag_values=fv)
  flags.mark_flags_as_required(["text", "out"], flag_values=fv)


def _run_build_lm(fv: flags.FlagValues, _: List[str]) -> dict:
  from w2v2_jax import lm  # pylint: disable=import-outside-toplevel
  from w2v2_jax.corpus.sentences import normalize  # pylint: disable=import-outside-toplevel

  def lines(path):
    try:
      with open(path, encoding="utf-8") as f:
        return [normalize(line) for line in f]
    except (OSError, UnicodeDecodeError) as e:
      sys.exit(f"w2v2 build-lm: cannot read {path}: {e}")

  excluded = {line for path in fv.exclude for line in lines(path)}
  text = [line for path in fv.text for line in lines(path) if line and line not in excluded]
  try:
    stats = lm.build_arpa(text, fv.out, order=fv.order)
  except ValueError as e:
    sys.exit(f"w2v2 build-lm: {e} (text: {', '.join(fv.text)})")
  print(f"wrote {fv.out}: {stats['order']}-gram, {stats['sentences']} sentences, {stats['words']} words, "
        f"n-grams {stats['ngrams']}")
  return stats


# ---------------------------------------------------------------------------------------- models

def _define_convert(fv: flags.FlagValues, _: List[str]) -> None:
  del fv    # SRC OUT_DIR are positional


def _run_convert(_: flags.FlagValues, args: List[str]) -> None:
  from w2v2_jax import convert  # pylint: disable=import-outside-toplevel
  src, out_dir = args
  cfg, params = convert.from_hf(src) if os.path.isdir(src) else convert.from_fairseq(src)
  convert.to_hf(cfg, params, out_dir)
  print(f"wrote {out_dir} ({cfg.task})")


def _define_decoding(fv: flags.FlagValues) -> None:
  from w2v2_jax.recognizer import DEFAULT_BATCH_SECONDS  # pylint: disable=import-outside-toplevel
  flags.DEFINE_integer("beam", 1, "Beam width (1: greedy)", flag_values=fv)
  flags.DEFINE_string("lm", None, "KenLM model (ARPA or binary) for beam search", flag_values=fv)
  flags.DEFINE_float("alpha", 0.5, "LM weight", flag_values=fv)
  flags.DEFINE_float("beta", 1.5, "Word insertion bonus", flag_values=fv)
  flags.DEFINE_float("batch_seconds", DEFAULT_BATCH_SECONDS, "Padded audio per forward pass", flag_values=fv)
  flags.DEFINE_bool("normalize", None, "Normalise waveforms (default: as the checkpoint says)", flag_values=fv)


def _define_evaluate(fv: flags.FlagValues, _: List[str]) -> None:
  from w2v2_jax.data.augment import CONDITIONS  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("checkpoint", None, "Hugging Face directory, fine-tuning run directory (its export/), or "
                      "fairseq .pt", flag_values=fv)
  flags.DEFINE_string("data", None, "Manifest .tsv with a .wrd or .ltr file next to it, or tfds:SPLIT (e.g. "
                      "tfds:test_clean; needs the tfds extra and a prepared --tfds_data_dir)", flag_values=fv)
  flags.DEFINE_string("tfds_name", "librispeech", "tfds dataset name for --data=tfds:SPLIT", flag_values=fv)
  flags.DEFINE_string("tfds_data_dir", None, "tfds data dir", flag_values=fv)
  flags.DEFINE_enum("label", None, ["wrd", "ltr"], "Transcripts to score against (default: wrd if present)",
                    flag_values=fv)
  flags.DEFINE_string("out", None, "Write per-utterance hypotheses (TSV) here", flag_values=fv)
  flags.DEFINE_float("chunk_seconds", None, "Transcribe utterances longer than this in overlapping chunks",
                     flag_values=fv)
  flags.DEFINE_enum("condition", None, sorted(CONDITIONS),
                    "Score under a perturbed acoustic condition (w2v2_jax/data/augment.py CONDITIONS): "
                    "telephone band 300-3400 Hz, noisy (coloured noise at 5-15 dB SNR) or reverberant "
                    "(RT60 0.5-1 s); the same perturbation of each utterance on every run", flag_values=fv)
  flags.DEFINE_integer("condition_seed", 0, "Seed of the --condition draws", flag_values=fv)
  flags.DEFINE_bool("by_voice", False, "Also print the CER of each voice, worst first: for a local corpus made "
                    "by `w2v2 make-corpus` (its plan.jsonl, beside the manifest, names each utterance's voice)",
                    flag_values=fv)
  _define_decoding(fv)
  flags.mark_flags_as_required(["checkpoint", "data"], flag_values=fv)


def _run_evaluate(fv: flags.FlagValues, _: List[str]) -> dict:
  """Prints WER, CER, utterances/s and skipped items; exits with status 1 if no utterance could be
  evaluated. Returns `evaluate.evaluate`'s dict."""
  from w2v2_jax.corpus import by_voice  # pylint: disable=import-outside-toplevel
  from w2v2_jax.data.labeled import open_labeled_source  # pylint: disable=import-outside-toplevel
  from w2v2_jax.evaluate import evaluate  # pylint: disable=import-outside-toplevel
  from w2v2_jax.recognizer import Recognizer  # pylint: disable=import-outside-toplevel
  corpus_dir = _by_voice_corpus(fv.data) if fv.by_voice else None     # checked before any work
  recognizer = Recognizer.load(fv.checkpoint, normalize=fv.normalize)
  if fv.data.startswith("tfds:"):
    from w2v2_jax.data.tfds_source import TfdsSource  # pylint: disable=import-outside-toplevel
    source = TfdsSource(fv.data[len("tfds:"):], name=fv.tfds_name, data_dir=fv.tfds_data_dir)
  else:
    source = open_labeled_source(fv.data, fv.label)
  with tempfile.TemporaryDirectory(prefix="w2v2-evaluate-") as tmp:
    out_path = fv.out or (os.path.join(tmp, "hypotheses.tsv") if corpus_dir else None)
    result = evaluate(recognizer, source, batch_seconds=fv.batch_seconds, beam_width=fv.beam, lm_path=fv.lm,
                      alpha=fv.alpha, beta=fv.beta, chunk_seconds=fv.chunk_seconds, out_path=out_path,
                      augment=fv.condition, augment_seed=fv.condition_seed)
    voices = by_voice.error_rates(out_path, corpus_dir) if corpus_dir and result["utterances"] else []
  if not fv.out:
    result["hypotheses_path"] = None
  if fv.condition:
    print(f"condition: {fv.condition} (seed {fv.condition_seed})")
  print(f"WER {100 * result['wer']:.2f}%  CER {100 * result['cer']:.2f}%  "
        f"utterances {result['utterances']}  skipped {result['skipped']}  "
        f"{result['utterances_per_second']:.2f} utterances/s")
  if result["skipped"]:
    print("skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(result["skipped_reasons"].items())))
  if result["hypotheses_path"]:
    print(f"hypotheses: {result['hypotheses_path']}")
  if not result["utterances"]:
    raise SystemExit("w2v2 evaluate: no utterance could be evaluated")
  if corpus_dir:
    result["by_voice"] = voices
    print("by voice (share of the reference letters):")
    for row in voices:
      print(f"  {row['voice']:<36} CER {100 * row['cer']:6.2f}%  WER {100 * row['wer']:6.2f}%  "
            f"{row['utterances']:5d} utterances  {100 * row['share']:5.1f}%")
  return result


def _by_voice_corpus(data: str) -> str:
  """The corpus folder of a local manifest made by `w2v2 make-corpus` (holding plan.jsonl)."""
  if data.startswith("tfds:") or "://" in data:
    raise SystemExit(f"w2v2 evaluate: --by_voice needs a local manifest of a `w2v2 make-corpus` corpus, got {data}")
  corpus_dir = os.path.dirname(os.path.abspath(data))
  if not os.path.exists(os.path.join(corpus_dir, "plan.jsonl")):
    raise SystemExit(f"w2v2 evaluate: --by_voice: no plan.jsonl beside {data}; it needs a corpus made by "
                     "`w2v2 make-corpus`, whose plan names each utterance's voice")
  return corpus_dir


def _define_transcribe(fv: flags.FlagValues, _: List[str]) -> None:
  flags.DEFINE_string("checkpoint", os.environ.get("W2V2_CHECKPOINT"), "Hugging Face directory, fine-tuning run "
                      "directory (its export/), or fairseq .pt (default: $W2V2_CHECKPOINT)", flag_values=fv)
  flags.DEFINE_bool("json", False, "Print JSON with durations and word timings", flag_values=fv)
  flags.DEFINE_float("chunk_seconds", 30.0, "Transcribe longer files in chunks of this length", flag_values=fv)
  flags.DEFINE_float("overlap_seconds", 2.0, "Overlap between chunks", flag_values=fv)
  _define_decoding(fv)


def _run_transcribe(fv: flags.FlagValues, files: List[str]) -> list:
  """Prints `FILE<TAB>TRANSCRIPT`, one line per file, or with --json one JSON list of {"file", "text",
  "duration", "words": [{"word", "start", "end"}]}. Files are decoded with `load_audio` (any rate or
  channel count); ones longer than --chunk_seconds are transcribed in overlapping chunks. A file that
  cannot be read is reported (an "error" entry in JSON) and the command exits with status 1 at the end.
  Returns the per-file results."""
  import json  # pylint: disable=import-outside-toplevel
  from w2v2_jax.data.audio import AudioError, load_audio  # pylint: disable=import-outside-toplevel
  from w2v2_jax.recognizer import Recognizer  # pylint: disable=import-outside-toplevel
  if not fv.checkpoint:
    sys.exit("w2v2 transcribe: no checkpoint: pass --checkpoint or set W2V2_CHECKPOINT")
  recognizer = Recognizer.load(fv.checkpoint, normalize=fv.normalize)
  results: list = []
  audios, readable = [], []
  for path in files:
    try:
      audio = load_audio(path, recognizer.sample_rate)
      field = recognizer.model_config.receptive_field
      if audio.size < field:     # the conv encoder gives no output frame: an empty line would look like silence
        raise AudioError(path, "too_short", f"{audio.size} samples; one output frame needs {field} "
                         f"({1000 * field / recognizer.sample_rate:g} ms)")
      audios.append(audio)
      readable.append(len(results))
      results.append({"file": path})
    except AudioError as e:
      logging.getLogger(__name__).error("cannot transcribe %s", e)
      results.append({"file": path, "error": str(e)})
  decoding = {"beam_width": fv.beam, "lm_path": fv.lm, "alpha": fv.alpha, "beta": fv.beta}
  if fv.json:
    frame_logits = recognizer.utterance_logits(audios, batch_seconds=fv.batch_seconds,
                                               chunk_seconds=fv.chunk_seconds, overlap_seconds=fv.overlap_seconds)
    for slot, audio, logits in zip(readable, audios, frame_logits):
      results[slot].update(text=recognizer.decode_frames(logits, **decoding),
                           duration=round(audio.size / recognizer.sample_rate, 3),
                           words=recognizer.word_timings(logits))
    print(json.dumps(results, indent=2, ensure_ascii=False))
  else:
    texts = recognizer.transcribe(audios, batch_seconds=fv.batch_seconds, chunk_seconds=fv.chunk_seconds,
                                  overlap_seconds=fv.overlap_seconds, **decoding)
    for slot, text in zip(readable, texts):
      results[slot]["text"] = text
    for item in results:
      if "text" in item:
        print(f"{item['file']}\t{item['text']}")
  if len(readable) < len(results):
    raise SystemExit(f"w2v2 transcribe: {len(results) - len(readable)} file(s) could not be read")
  return results


# ---------------------------------------------------------------------------------------- demo

def _define_demo(fv: flags.FlagValues, _: List[str]) -> None:
  flags.DEFINE_string("out", "runs/demo", "Run folder (checkpoints, plots, report)", flag_values=fv)
  flags.DEFINE_string("corpus", "data/tts_corpus", "Corpus folder (reused when present)", flag_values=fv)
  flags.DEFINE_float("hours", 1.0, "Hours of synthetic train audio", flag_values=fv)
  flags.DEFINE_float("scale", 1.0, "Multiplies the updates of every training stage", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of the corpus, the data order and the models", flag_values=fv)
  flags.DEFINE_float("eval_minutes", 5.0, "Minutes of valid and of test audio", flag_values=fv)
  flags.DEFINE_float("labeled_minutes", 60.0, "Minutes of labeled audio to fine-tune on (split train_<M>m)",
                     flag_values=fv)
  flags.DEFINE_string("finetune_config", "small_1h", "finetune config (small_10m for --labeled_minutes=10)",
                      flag_values=fv)
  flags.DEFINE_bool("compare", False, "Add the baselines: the same fine-tuning from random initialisation, the "
                    "pair again on --low_minutes of labels, and linear CTC probes of the pretrained and a random "
                    "model's frozen features (5 more fine-tuning runs)", flag_values=fv)
  flags.DEFINE_float("low_minutes", 10.0, "Labeled minutes of the low-resource comparison (split train_<M>m)",
                     flag_values=fv)
  flags.DEFINE_string("low_config", "small_10m", "finetune config of the low-resource comparison", flag_values=fv)
  flags.DEFINE_float("unlabeled_hours", None, "Hours of unlabeled audio (festival's voices of other languages reading "
                     "English text) that only pretraining hears; default: as much as --hours", flag_values=fv)


def _run_demo(fv: flags.FlagValues, _: List[str]) -> dict:
  from w2v2_jax import demo  # pylint: disable=import-outside-toplevel
  from w2v2_jax.corpus import sentences, voices  # pylint: disable=import-outside-toplevel
  try:
    return demo.run(fv.out, fv.corpus, hours=fv.hours, scale=fv.scale, seed=fv.seed, eval_minutes=fv.eval_minutes,
                    labeled_minutes=fv.labeled_minutes, finetune_config=fv.finetune_config, compare=fv.compare,
                    low_minutes=fv.low_minutes, low_config=fv.low_config, unlabeled_hours=fv.unlabeled_hours,
                    say=lambda line: print(line, flush=True))
  except (voices.EngineUnavailable, sentences.TextUnavailable, ValueError) as e:
    sys.exit(f"w2v2 demo: {e}")


COMMANDS = {
    "pretrain": Command("--config=pretrain:base --workdir=DIR [--config.train.steps=1000 ...]",
                        "self-supervised pretraining (contrastive + diversity loss) on unlabeled audio",
                        _define_train, _run_pretrain),
    "finetune": Command("--config=finetune:base_10m --workdir=DIR --config.init=PRETRAINED",
                        "CTC fine-tuning on labeled audio; exports the best model as a Hugging Face directory",
                        _define_train, _run_finetune),
    "evaluate": Command("--checkpoint=CKPT --data=MANIFEST.tsv [--beam=32 --lm=LM.arpa]",
                        "WER / CER of a CTC model on a labeled manifest", _define_evaluate, _run_evaluate),
    "transcribe": Command("FILE... [--checkpoint=CKPT] [--json]", "transcribe audio files (word timings with --json)",
                          _define_transcribe, _run_transcribe, positional="files"),
    "manifest": Command("--root=DIR --out=DIR [--valid_percent=0.01] [--ext=flac,wav]",
                        "write fairseq train.tsv / valid.tsv for a folder of audio", _define_manifest, _run_manifest),
    "pack": Command("MANIFEST.tsv OUT_PREFIX [--shards=N]",
                    "pack a manifest's audio and transcripts into ArrayRecord shards (local or gs://)",
                    _define_pack, _run_pack, positional="src_out"),
    "convert": Command("SRC OUT_DIR", "Hugging Face directory or fairseq .pt -> Hugging Face directory",
                       _define_convert, _run_convert, positional="src_out"),
    "make-corpus": Command("--out=DIR [--hours=1]",
                           "synthesise a transcribed English corpus offline (espeak-ng, flite, festival)",
                           _define_make_corpus, _run_make_corpus),
    "build-lm": Command("--text=FILE[,FILE] --out=LM.arpa [--order=4]",
                        "Kneser-Ney word n-gram LM (ARPA) for beam search", _define_build_lm, _run_build_lm),
    "demo": Command("[--out=runs/demo] [--scale=1] [--compare]",
                    "the whole system on a CPU: corpus, pretrain, fine-tune, evaluate, report", _define_demo, _run_demo),
    "compile-check": Command("--config=pretrain:base --topology=v5e-8",
                             "compile the train step for a TPU slice on this host: fits? FLOPs? MFU needed?",
                             _define_compile_check, _run_compile_check),
}


def usage() -> str:
  """`w2v2 --help`: every subcommand with its purpose and usage."""
  width = max(map(len, COMMANDS))
  lines = ["usage: w2v2 SUBCOMMAND [flags]   (w2v2 SUBCOMMAND --help: its flags)", ""]
  for name, cmd in COMMANDS.items():
    lines.append(f"  {name:<{width}}  {cmd.purpose}")
    lines.append(f"  {'':<{width}}    w2v2 {name} {cmd.usage}")
  return "\n".join(lines + ["", __doc__.strip().split("\n\n", 1)[1]])


def _normalized(argv: List[str]) -> List[str]:
  """Dashes in flag names -> underscores; `--config NAME:ARG` of a packaged config -> its file path."""
  out, config_next = [], False
  for arg in argv:
    if config_next:
      out.append(packaged.resolve(arg))
      config_next = False
      continue
    if arg == "--":
      out.append(arg)
      continue
    m = re.match(r"^(--?)([A-Za-z][\w.-]*)(=.*)?$", arg)
    if m and not m.group(2).startswith("config."):
      name = m.group(2).replace("-", "_")
      value = m.group(3) or ""
      if name == "config":
        if value:
          value = "=" + packaged.resolve(value[1:])
        else:
          config_next = True
      arg = m.group(1) + name + value
    out.append(arg)
  return out


class _DropChatter(logging.Filter):
  """Orbax logs every step of every save at INFO through absl; keep its warnings and errors."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def main(argv: Optional[List[str]] = None) -> None:
  """The `w2v2` console script: runs `w2v2 SUBCOMMAND ...` (argv: sys.argv[1:] by default). Returns
  None, so that the script's exit status is 0 on success (`sys.exit(main())`)."""
  run(argv)


def run(argv: Optional[List[str]] = None) -> Any:
  """Runs `w2v2 SUBCOMMAND ...` and returns what the subcommand returns (for Python callers and tests)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(usage())
    return None
  name, rest = argv[0], _normalized(argv[1:])
  if name not in COMMANDS:
    sys.exit(f"w2v2: unknown subcommand {name!r}; choose one of {', '.join(COMMANDS)} (w2v2 --help)")
  cmd = COMMANDS[name]
  full = [f"w2v2 {name}"] + rest
  fv = flags.FlagValues()
  cmd.define(fv, full)
  if any(a in ("-h", "--help", "--helpfull") for a in rest):
    print(f"usage: w2v2 {name} {cmd.usage}\n\n{cmd.purpose}\n\nflags:")
    print(fv.get_help(prefix="  ", include_special_flags=False))
    return None
  try:
    args = fv(full)[1:]
  except flags.Error as e:
    sys.exit(f"w2v2 {name}: {e} (w2v2 {name} --help lists the flags)")
  if cmd.positional == "none" and args:
    sys.exit(f"w2v2 {name}: unexpected argument(s) {' '.join(args)} (w2v2 {name} --help lists the flags)")
  if cmd.positional == "files" and not args:
    sys.exit(f"w2v2 {name}: no input files (usage: w2v2 {name} {cmd.usage})")
  if cmd.positional == "src_out" and len(args) != 2:
    sys.exit(f"w2v2 {name}: expected SRC OUT_DIR, got {args} (usage: w2v2 {name} {cmd.usage})")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for handler in logging.getLogger().handlers:
    handler.addFilter(_DropChatter())
  return cmd.run(fv, args)


if __name__ == "__main__":
  main()
