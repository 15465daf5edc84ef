"""The `w2v2` command: one entry point, one subcommand per job.

  w2v2 pretrain --config=configs/pretrain.py:base --workdir=DIR [--config.train.steps=1000 ...]
  w2v2 finetune --config=configs/finetune.py:base_10m --workdir=DIR --config.init=PRETRAINED
  w2v2 evaluate --checkpoint CKPT --data MANIFEST.tsv [--lm ARPA_OR_BIN]
  w2v2 transcribe FILE... --checkpoint CKPT [--json]
  w2v2 manifest --root DIR --out DIR [--valid-percent 0.01] [--ext flac,wav]
  w2v2 convert SRC OUT_DIR            (Hugging Face dir or fairseq .pt -> Hugging Face dir)

The CLI only wires flags to library functions.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

COMMANDS = ("pretrain", "finetune", "evaluate", "transcribe", "manifest", "convert")


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
          "convert": _convert, "evaluate": _evaluate, "transcribe": _transcribe}
  jobs[argv[0]](argv[1:])


if __name__ == "__main__":
  main()
