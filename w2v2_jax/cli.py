"""The `w2v2` command: one entry point, one subcommand per job.

  w2v2 pretrain --config=configs/pretrain.py:base --workdir=DIR [--config.train.steps=1000 ...]
  w2v2 finetune --config=configs/finetune.py:base_10m --workdir=DIR --config.init=PRETRAINED
  w2v2 evaluate --checkpoint CKPT --data MANIFEST.tsv [--lm ARPA_OR_BIN]
  w2v2 transcribe FILE... --checkpoint CKPT [--json]
  w2v2 manifest --root DIR --out DIR [--valid-percent 0.01] [--ext flac,wav]
  w2v2 convert SRC OUT_DIR            (Hugging Face dir or fairseq .pt -> Hugging Face dir)
  w2v2 make-corpus --out DIR [--hours 1] (offline English speech from the OS's TTS engines)
  w2v2 build-lm --text FILE --out LM.arpa [--order 4]   (Kneser-Ney word n-gram for beam search)
  w2v2 demo [--out runs/demo] [--scale 1]  (corpus -> pretrain -> fine-tune -> evaluate -> report)
  w2v2 compile-check --config=configs/pretrain.py:base --topology=v5e-8   (TPU compiler: fits? FLOPs?)

The CLI only wires flags to library functions.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

COMMANDS = ("pretrain", "finetune", "evaluate", "transcribe", "manifest", "convert", "make-corpus", "build-lm",
            "demo", "compile-check")


def _pretrain(argv: List[str], job: str = "pretrain") -> None:
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/pretrain.py:base",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics (local path or gs://).")
  flags.DEFINE_integer("max_steps", None, "Stop after this many updates in this invocation (then resume).")
  flags.mark_flags_as_required(["config", "workdir"])

  def main(_):
    from w2v2_jax.train import loop  # pylint: disable=import-outside-toplevel
    _quiet_libraries()
    getattr(loop, job)(flags.FLAGS.config, flags.FLAGS.workdir, max_steps=flags.FLAGS.max_steps)

  app.run(main, argv=[f"w2v2 {job}"] + argv)


def _compile_check(argv: List[str]) -> None:
  """Compiles the train step of a config for a TPU slice with libtpu's compiler, on this (CPU) host."""
  import os  # pylint: disable=import-outside-toplevel
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  config_flags.DEFINE_config_file("config", None, "Pretraining or fine-tuning config, e.g. configs/pretrain.py:base",
                                  lock_config=True)
  flags.DEFINE_string("topology", None, "TPU slice, e.g. v5e-8, v4-32, v5p-64, v6e-8 (v4/v5p count TensorCores)")
  flags.DEFINE_integer("bucket", None, "Bucket (samples per row) to compile; default the largest of data.buckets")
  flags.DEFINE_float("target_hours", None, "Wall-clock goal for config.train.steps updates: prints the MFU it needs")
  flags.DEFINE_string("json", None, "Also append the figures as one JSON line to this file")
  flags.DEFINE_integer("top_ops", 12, "Print the costliest ops (by FLOPs) of the update")
  flags.mark_flags_as_required(["config", "topology"])

  def main(_):
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_platforms", "cpu")        # the host compiles; libtpu is not initialised as a backend
    from w2v2_jax.train import aot  # pylint: disable=import-outside-toplevel
    _quiet_libraries()
    try:
      report = aot.compile_check(flags.FLAGS.config, flags.FLAGS.topology, bucket=flags.FLAGS.bucket,
                                 target_hours=flags.FLAGS.target_hours)
    except (aot.CompileError, RuntimeError, ValueError) as e:
      sys.exit(f"w2v2 compile-check: {e}")
    print(aot.format_report(report, top_ops=flags.FLAGS.top_ops), flush=True)
    if flags.FLAGS.json:
      import json  # pylint: disable=import-outside-toplevel
      with open(flags.FLAGS.json, "a") as f:
        f.write(json.dumps({k: v for k, v in report.items() if k != "buckets"}) + "\n")
    if not report["fits"]:
      sys.exit(f"w2v2 compile-check: the step needs {report['total_bytes'] / aot.GIB:.2f} GiB per chip, more than "
               f"the {report['hbm_gib']:g} GiB of a {report['chip']}")

  app.run(main, argv=["w2v2 compile-check"] + argv)


class _DropChatter(logging.Filter):
  """Orbax logs every step of every save at INFO through absl; keep its warnings and errors."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def _quiet_libraries() -> None:
  for handler in logging.getLogger().handlers:
    handler.addFilter(_DropChatter())


def _manifest(argv: List[str]) -> None:
  parser = argparse.ArgumentParser(prog="w2v2 manifest",
                                   description="Write fairseq-style train.tsv / valid.tsv for a folder of audio.")
  parser.add_argument("--root", required=True, help="folder searched recursively for audio")
  parser.add_argument("--out", required=True, help="output folder for train.tsv / valid.tsv")
  parser.add_argument("--valid-percent", type=float, default=0.01)
  parser.add_argument("--ext", default="flac,wav", help="comma-separated extensions")
  parser.add_argument("--seed", type=int, default=42)
  args = parser.parse_args(argv)
  from w2v2_jax.data.manifest import write_manifest  # pylint: disable=import-outside-toplevel
  counts = write_manifest(args.root, args.out, valid_percent=args.valid_percent,
                          exts=tuple(e.strip().lstrip(".") for e in args.ext.split(",") if e.strip()),
                          seed=args.seed)
  print(" ".join(f"{k}={v}" for k, v in counts.items()))


def _convert(argv: List[str]) -> None:
  parser = argparse.ArgumentParser(prog="w2v2 convert",
                                   description="Convert a Hugging Face directory or fairseq .pt checkpoint "
                                               "to a Hugging Face directory (config.json + model.safetensors).")
  parser.add_argument("src")
  parser.add_argument("out_dir")
  args = parser.parse_args(argv)
  import os  # pylint: disable=import-outside-toplevel
  from w2v2_jax import convert  # pylint: disable=import-outside-toplevel
  cfg, params = convert.from_hf(args.src) if os.path.isdir(args.src) else convert.from_fairseq(args.src)
  convert.to_hf(cfg, params, args.out_dir)
  print(f"wrote {args.out_dir} ({cfg.task})")


def _make_corpus(argv: List[str]) -> None:
  parser = argparse.ArgumentParser(
      prog="w2v2 make-corpus",
      description="Synthesise a transcribed English corpus offline with espeak-ng / flite / festival + sox: "
                  "16 kHz FLAC and fairseq manifests train / train_<M>m / valid / test, with valid and "
                  "test voices and sentences never seen in train. Deterministic for a seed; re-running "
                  "resumes (finished files are kept).")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--hours", type=float, default=1.0, help="hours of train audio (default 1)")
  parser.add_argument("--eval-minutes", type=float, default=5.0, help="minutes of valid and of test audio")
  parser.add_argument("--labeled-minutes", type=float, default=10.0,
                      help="minutes of the labeled subset train_<M>m (default 10 -> train_10m)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--engines", default="espeak-ng,flite,festival", help="comma-separated TTS engines")
  parser.add_argument("--text", default=None, help="text file (one paragraph per line) instead of the KJV Bible")
  parser.add_argument("--workers", type=int, default=None, help="parallel renders (default: CPU count)")
  args = parser.parse_args(argv)
  from w2v2_jax.corpus import synthesize, voices, sentences  # pylint: disable=import-outside-toplevel
  from w2v2_jax.progress import ProgressBar  # pylint: disable=import-outside-toplevel
  try:
    summary = synthesize.make_corpus(
        args.out, args.hours, eval_minutes=args.eval_minutes, labeled_minutes=args.labeled_minutes,
        seed=args.seed, engines=[e.strip() for e in args.engines.split(",") if e.strip()], text_file=args.text,
        workers=args.workers, progress=ProgressBar("synthesising"))
  except (voices.EngineUnavailable, sentences.TextUnavailable, ValueError) as e:  # ValueError: bad --engines/--hours
    sys.exit(f"w2v2 make-corpus: {e}")
  for name, split in summary["splits"].items():
    print(f"{name:>10}: {split['utterances']:6d} utterances {split['hours'] * 60:7.1f} min "
          f"{len(split['voices']):3d} voices")
  if summary["failed"]:
    print(f"{len(summary['failed'])} utterances failed (see the log); run again to retry them")
  print(f"wrote {args.out}")


def _build_lm(argv: List[str]) -> None:
  parser = argparse.ArgumentParser(
      prog="w2v2 build-lm",
      description="Estimate a word n-gram language model (interpolated Kneser-Ney) and write it as an ARPA "
                  "file for `w2v2 evaluate/transcribe --beam N --lm FILE`. Text: one sentence per line, "
                  "normalised to the letter vocabulary (A-Z, apostrophe, space), e.g. a corpus's lm.txt "
                  "(`w2v2 make-corpus` writes one without its valid and test sentences).")
  parser.add_argument("--text", required=True, nargs="+", help="UTF-8 text file(s), one sentence per line")
  parser.add_argument("--out", required=True, help="the ARPA file to write")
  parser.add_argument("--order", type=int, default=4, help="n-gram order (>= 2, default 4)")
  parser.add_argument("--exclude", nargs="*", default=[],
                      help="files whose lines (after normalisation) are left out, e.g. valid.wrd test.wrd")
  args = parser.parse_args(argv)
  from w2v2_jax import lm  # pylint: disable=import-outside-toplevel
  from w2v2_jax.corpus.sentences import normalize  # pylint: disable=import-outside-toplevel

  def lines(path):
    try:
      with open(path, encoding="utf-8") as f:
        return [normalize(line) for line in f]
    except (OSError, UnicodeDecodeError) as e:
      sys.exit(f"w2v2 build-lm: cannot read {path}: {e}")

  excluded = {line for path in args.exclude for line in lines(path)}
  text = [line for path in args.text for line in lines(path) if line and line not in excluded]
  try:
    stats = lm.build_arpa(text, args.out, order=args.order)
  except ValueError as e:
    sys.exit(f"w2v2 build-lm: {e} (text: {', '.join(args.text)})")
  print(f"wrote {args.out}: {stats['order']}-gram, {stats['sentences']} sentences, {stats['words']} words, "
        f"n-grams {stats['ngrams']}")


def _demo(argv: List[str]) -> None:
  parser = argparse.ArgumentParser(
      prog="w2v2 demo",
      description="The whole system on 2 CPU cores: synthesise a corpus (cached), pretrain the small model, "
                  "fine-tune it with CTC on the labeled hour (with --compare also from random initialisation, "
                  "both on 10 labeled minutes, and linear probes of frozen features), evaluate on unseen "
                  "voices, transcribe a file, plot the curves and write a report. A killed demo resumes where "
                  "it stopped.")
  parser.add_argument("--out", default="runs/demo", help="run folder (checkpoints, plots, report)")
  parser.add_argument("--corpus", default="data/tts_corpus", help="corpus folder (reused when present)")
  parser.add_argument("--hours", type=float, default=1.0, help="hours of synthetic train audio")
  parser.add_argument("--scale", type=float, default=1.0,
                      help="multiplies the updates of every training stage")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--eval-minutes", type=float, default=5.0, help="minutes of valid and of test audio")
  parser.add_argument("--labeled-minutes", type=float, default=60.0,
                      help="minutes of labeled audio to fine-tune on (the corpus split train_<M>m; default 60)")
  parser.add_argument("--finetune-config", default="small_1h",
                      help="configs/finetune.py entry (default small_1h; small_10m for --labeled-minutes 10)")
  parser.add_argument("--compare", action="store_true",
                      help="add the baselines: the same fine-tuning from random initialisation, the pair again "
                           "on --low-minutes of labels, and linear CTC probes of the pretrained and a random "
                           "model's frozen features (5 more fine-tuning runs)")
  parser.add_argument("--low-minutes", type=float, default=10.0,
                      help="labeled minutes of the low-resource comparison (split train_<M>m; default 10)")
  parser.add_argument("--low-config", default="small_10m", help="configs/finetune.py entry for it")
  parser.add_argument("--configs", default=None, help="configs folder (default: the checkout's configs/)")
  args = parser.parse_args(argv)
  from w2v2_jax import demo  # pylint: disable=import-outside-toplevel
  from w2v2_jax.corpus import voices, sentences  # pylint: disable=import-outside-toplevel
  _quiet_libraries()
  try:
    demo.run(args.out, args.corpus, hours=args.hours, scale=args.scale, seed=args.seed, configs=args.configs,
             eval_minutes=args.eval_minutes, labeled_minutes=args.labeled_minutes,
             finetune_config=args.finetune_config, compare=args.compare, low_minutes=args.low_minutes,
             low_config=args.low_config, say=lambda line: print(line, flush=True))
  except (voices.EngineUnavailable, sentences.TextUnavailable, ValueError) as e:
    sys.exit(f"w2v2 demo: {e}")


def _evaluate(argv: List[str]) -> None:
  from w2v2_jax import inference  # pylint: disable=import-outside-toplevel
  inference.main_evaluate(argv)


def _transcribe(argv: List[str]) -> None:
  from w2v2_jax import inference  # pylint: disable=import-outside-toplevel
  inference.main_transcribe(argv)


def main(argv: Optional[List[str]] = None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
    print(__doc__.strip())
    if argv and argv[0] not in ("-h", "--help"):
      sys.exit(f"w2v2: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}")
    return
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  jobs = {"pretrain": _pretrain, "finetune": lambda a: _pretrain(a, "finetune"), "manifest": _manifest,
          "convert": _convert, "evaluate": _evaluate, "transcribe": _transcribe,
          "make-corpus": _make_corpus, "build-lm": _build_lm, "demo": _demo, "compile-check": _compile_check}
  jobs[argv[0]](argv[1:])


if __name__ == "__main__":
  main()
