"""Training-curve figures from a run directory's JSON-lines logs (needs the `demo` extra: matplotlib).

  <workdir>/metrics.jsonl   one record per logged step (`train.metrics.MetricsWriter`)
  <workdir>/valid.jsonl     fine-tuning only: {"step", "valid/wer", "valid/cer", ...} per validation

`pretrain_figure` draws the contrastive loss against its chance level ln(K+1), the accuracy, the
codebook perplexities and the Gumbel temperature; `finetune_figure` the CTC loss and the validation
error rates. `chance_exit_step` finds the update from which the contrastive loss stays below chance.
Figures are drawn on a `matplotlib.figure.Figure` with the Agg canvas: no pyplot, no global state,
no display needed. matplotlib is imported only when a figure is drawn.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
VALID = "valid.jsonl"
LN2 = math.log(2.0)
# Non-finite numbers as MetricsWriter writes them (strict JSON has no NaN/Infinity).
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


# -- reading -----------------------------------------------------------------------------------

def _as_number(value: Any) -> Any:
  return _NON_FINITE.get(value, value) if isinstance(value, str) else value


def read_jsonl(path: str, *, by_step: bool = True) -> List[Dict[str, Any]]:
  """Reads a JSON-lines log; the strings "NaN", "Infinity", "-Infinity" become floats.

  A line that does not decode (the last line of a killed run, cut mid-write) is skipped with a
  warning. With `by_step`, the records are those of the run as it finally went: a record whose step
  is not after the previous one marks a resume from a checkpoint, and the earlier records from that
  step on (the stale tail of the interrupted run) are dropped, so each step keeps its last record and
  the steps ascend. Records without an integer "step" are then skipped.

  Args:
    path: the .jsonl file.
    by_step: resolve resumed runs as above; False returns every decoded record in file order.

  Returns:
    The records (dicts).

  Raises:
    FileNotFoundError: `path` does not exist (the message names it).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such log file: {path} (has the run written its first log step?)")
  records = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        log.warning("%s:%d: skipping a line that is not JSON (%s; a run killed mid-write?)", path, number, e)
        continue
      if not isinstance(record, dict):
        log.warning("%s:%d: skipping a JSON value that is not an object", path, number)
        continue
      records.append({k: _as_number(v) for k, v in record.items()})
  if not by_step:
    return records
  kept: List[Dict[str, Any]] = []
  for record in records:
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
      log.warning("%s: skipping a record without an integer step: %.80s", path, record)
      continue
    while kept and kept[-1]["step"] >= step:
      kept.pop()
    kept.append(record)
  return kept


def _series(records: Sequence[Mapping[str, Any]], key: str) -> Tuple[List[int], List[float]]:
  """(steps, values) of the records that have a numeric `key`."""
  steps, values = [], []
  for r in records:
    v = r.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
      steps.append(int(r["step"]))
      values.append(float(v))
  return steps, values


def run_config(workdir: str) -> Optional[Dict[str, Any]]:
  """The run configuration of a training run directory, or None when none is found.

  Looks for `<workdir>/config.json`, then for the copy the loop stores with every checkpoint
  (`<workdir>/checkpoints/<step>/config/metadata`, Orbax's JSON item; the newest step is read).
  """
  candidates = [os.path.join(workdir, "config.json")]
  steps = glob.glob(os.path.join(workdir, "checkpoints", "*", "config", "metadata"))
  steps = [p for p in steps if p.split(os.sep)[-3].isdigit()]
  candidates += sorted(steps, key=lambda p: -int(p.split(os.sep)[-3]))
  for path in candidates:
    if os.path.isfile(path):
      try:
        with open(path, encoding="utf-8") as f:
          config = json.load(f)
      except (OSError, ValueError) as e:
        log.warning("could not read the run config %s: %s", path, e)
        continue
      if isinstance(config, dict):
        return config
  return None


def _model_config(workdir: str) -> Dict[str, Any]:
  model = (run_config(workdir) or {}).get("model")
  return model if isinstance(model, dict) else {}


# -- analysis ----------------------------------------------------------------------------------

def chance_exit_step(records: Sequence[Mapping[str, Any]], chance: float, margin: float = 0.05,
                     key: str = "contrastive") -> Optional[int]:
  """The first logged step from which the contrastive loss stays below its chance level.

  Args:
    records: metrics records with "step" and `key` (e.g. from `read_jsonl`); others are ignored.
    chance: the chance-level loss in nats per masked frame, ln(K+1) for K negatives.
    margin: how far below `chance` the loss must be, in nats.
    key: the loss to test.

  Returns:
    The smallest logged step s such that every record at step >= s has a loss < chance - margin
    (a non-finite loss never counts as below); None when the last record's loss is not below it or
    there are no records.
  """
  steps, values = _series(sorted((r for r in records if "step" in r), key=lambda r: r["step"]), key)
  exit_step = None
  for step, value in zip(reversed(steps), reversed(values)):
    if not (math.isfinite(value) and value < chance - margin):
      break
    exit_step = step
  return exit_step


def _chance(records: Sequence[Mapping[str, Any]], workdir: str, num_negatives: Optional[int]
            ) -> Tuple[Optional[float], str]:
  """(chance-level contrastive loss in nats or None, where it came from)."""
  logged = [r["chance_bits"] for r in records if isinstance(r.get("chance_bits"), (int, float))]
  if logged:
    chance = float(logged[-1]) * LN2
    if num_negatives is not None and not math.isclose(chance, math.log(num_negatives + 1), rel_tol=1e-6):
      log.warning("num_negatives=%d disagrees with the logged chance level %.4f nats (K=%d): using the log",
                  num_negatives, chance, round(math.exp(chance)) - 1)
    return chance, "logged"
  if num_negatives is not None:
    return math.log(int(num_negatives) + 1), "argument"
  model = _model_config(workdir)
  if "num_negatives" in model:
    k = int(model["num_negatives"]) + int(model.get("cross_sample_negatives", 0))
    return math.log(k + 1), "run config"
  return None, "unknown"


# -- drawing -----------------------------------------------------------------------------------

def _new_figure(size_px: Tuple[int, int], dpi: int):
  """A Figure on an Agg canvas of `size_px` (width, height) pixels at `dpi`."""
  try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("the training-curve plots need matplotlib: pip install 'w2v2_jax[demo]'") from e
  width, height = size_px
  fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _save(fig, out_png: str, dpi: int) -> str:
  directory = os.path.dirname(os.path.abspath(out_png))
  os.makedirs(directory, exist_ok=True)
  fig.savefig(out_png, dpi=dpi, format="png")
  log.info("wrote %s", out_png)
  return out_png


def _plot(ax, records, key: str, label: str, **style) -> bool:
  steps, values = _series(records, key)
  if steps:
    ax.plot(steps, values, label=label, **style)
  return bool(steps)


def _finish(ax, title: str, ylabel: str, drawn: bool) -> None:
  ax.set_title(title)
  ax.set_xlabel("update step")
  ax.set_ylabel(ylabel)
  ax.grid(True, alpha=0.3)
  if drawn:
    ax.legend(loc="best", fontsize="small")
  else:
    ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")


def pretrain_figure(workdir: str, out_png: str, num_negatives: Optional[int] = None, *,
                    codebook_size: Optional[int] = None, size_px: Tuple[int, int] = (1200, 900),
                    dpi: int = 100) -> str:
  """Draws a pretraining run's curves, 2x2 panels against the update step, to a PNG.

  (a) contrastive loss and total loss (nats per masked frame) with the chance level ln(K+1) dashed
      and the step the contrastive loss leaves it (`chance_exit_step`) dotted;
  (b) accuracy: the fraction of masked frames whose true quantized target scores highest among it
      and its K distractors, with chance 1/(K+1);
  (c) prob perplexity (of the batch-averaged codeword distribution) and code perplexity (of the
      chosen codewords), summed over the G codebooks, against the G*V codewords available;
  (d) Gumbel-softmax temperature.

  Args:
    workdir: the run directory holding metrics.jsonl.
    out_png: the PNG to write (parent directories are created).
    num_negatives: K, the distractors per masked frame, used when the log has no `chance_bits`
      (older runs); otherwise read from the run config stored with the checkpoints.
    codebook_size: G*V; default: from the run config stored with the checkpoints, if any.
    size_px: the image's (width, height) in pixels.
    dpi: dots per inch of the PNG (sets the text size relative to the image).

  Returns:
    `out_png`.

  Raises:
    FileNotFoundError: no metrics.jsonl in `workdir`.
    ValueError: the log holds no pretraining records (no "contrastive" values).
  """
  path = os.path.join(workdir, METRICS)
  records = read_jsonl(path)
  if not _series(records, "contrastive")[0]:
    raise ValueError(f"{path}: no pretraining records (no 'contrastive' values); "
                     "is this a fine-tuning run? use finetune_figure")
  chance, source = _chance(records, workdir, num_negatives)
  if codebook_size is None:
    model = _model_config(workdir)
    if "latent_groups" in model and "latent_vars" in model:
      codebook_size = int(model["latent_groups"]) * int(model["latent_vars"])

  fig = _new_figure(size_px, dpi)
  (ax_loss, ax_acc), (ax_ppl, ax_temp) = fig.subplots(2, 2)
  fig.suptitle(f"wav2vec 2.0 pretraining: {os.path.basename(os.path.normpath(workdir))}")

  drawn = _plot(ax_loss, records, "contrastive", "contrastive loss", color="C0")
  drawn |= _plot(ax_loss, records, "loss", "total loss (+ diversity, feature penalty)", color="C1", alpha=0.7)
  if chance is not None:
    k = round(math.exp(chance)) - 1
    ax_loss.axhline(chance, color="k", linestyle="--", linewidth=1, label=f"chance ln(K+1), K={k}")
    exit_step = chance_exit_step(records, chance)
    if exit_step is not None:
      ax_loss.axvline(exit_step, color="C2", linestyle=":", label=f"below chance from step {exit_step}")
    log.info("chance level %.4f nats (%s); contrastive loss below it from step %s", chance, source, exit_step)
  else:
    log.warning("%s: chance level unknown (no chance_bits logged, no num_negatives, no run config)", workdir)
  _finish(ax_loss, "(a) loss", "loss (nats per masked frame)", drawn)

  drawn = _plot(ax_acc, records, "accuracy", "accuracy", color="C0")
  if chance is not None:
    ax_acc.axhline(math.exp(-chance), color="k", linestyle="--", linewidth=1, label="chance 1/(K+1)")
  ax_acc.set_ylim(0.0, 1.0)
  _finish(ax_acc, "(b) contrastive accuracy", "fraction of masked frames", drawn)

  drawn = _plot(ax_ppl, records, "prob_perplexity", "prob perplexity", color="C0")
  drawn |= _plot(ax_ppl, records, "code_perplexity", "code perplexity", color="C1")
  if codebook_size:
    ax_ppl.axhline(codebook_size, color="k", linestyle="--", linewidth=1,
                   label=f"codebook size G*V = {codebook_size}")
  ax_ppl.set_ylim(bottom=0.0)
  _finish(ax_ppl, "(c) codebook usage", "perplexity (codewords)", drawn)

  drawn = _plot(ax_temp, records, "temperature", "Gumbel temperature", color="C0")
  _finish(ax_temp, "(d) Gumbel-softmax temperature", "temperature (dimensionless)", drawn)
  return _save(fig, out_png, dpi)


def _valid_value(record: Mapping[str, Any], name: str) -> Any:
  return record.get(f"valid/{name}", record.get(name))


def _valid_percent(records: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
  """valid.jsonl records -> {"step", "cer", "wer"} with the rates in percent (non-numbers kept as they are)."""
  out = [{"step": r["step"], "cer": _valid_value(r, "cer"), "wer": _valid_value(r, "wer")} for r in records]
  for r in out:
    for name in ("cer", "wer"):
      if isinstance(r[name], (int, float)):
        r[name] = 100.0 * r[name]
  return out


def finetune_figure(workdir: str, out_png: str, *, size_px: Tuple[int, int] = (1200, 450),
                    dpi: int = 100) -> str:
  """Draws a fine-tuning run's curves, two panels against the update step, to a PNG.

  (a) CTC training loss (nats per utterance; log scale), the first `train.freeze_updates` steps, when
      only the output layer trains, shaded;
  (b) validation CER and WER in percent from valid.jsonl, the exported model marked: the best by the
      run's train.best_metric (best.json's "metric"; WER when absent).

  Args:
    workdir: the run directory holding metrics.jsonl (and valid.jsonl when it validated).
    out_png: the PNG to write (parent directories are created).
    size_px: the image's (width, height) in pixels.
    dpi: dots per inch of the PNG.

  Returns:
    `out_png`.

  Raises:
    FileNotFoundError: no metrics.jsonl in `workdir`.
  """
  records = read_jsonl(os.path.join(workdir, METRICS))
  valid_path = os.path.join(workdir, VALID)
  if os.path.isfile(valid_path):
    valid = read_jsonl(valid_path)
  else:
    log.warning("%s missing: no validation curve (was data.valid_manifest set?)", valid_path)
    valid = []
  valid = _valid_percent(valid)

  fig = _new_figure(size_px, dpi)
  ax_loss, ax_err = fig.subplots(1, 2)
  fig.suptitle(f"wav2vec 2.0 CTC fine-tuning: {os.path.basename(os.path.normpath(workdir))}")

  drawn = _plot(ax_loss, records, "loss", "CTC loss", color="C0")
  losses = _series(records, "loss")[1]
  if losses and all(math.isfinite(v) and v > 0 for v in losses):
    ax_loss.set_yscale("log")
  frozen = [s for s, v in zip(*_series(records, "frozen")) if v > 0]
  if frozen:
    ax_loss.axvspan(0, max(frozen), color="gray", alpha=0.15, label="pretrained layers frozen")
  _finish(ax_loss, "(a) training loss", "CTC loss (nats per utterance)", drawn)

  drawn = _plot(ax_err, valid, "cer", "CER", color="C0", marker="o")
  drawn |= _plot(ax_err, valid, "wer", "WER", color="C1", marker="s")
  metric = "wer"
  best_path = os.path.join(workdir, "best.json")
  if os.path.isfile(best_path):
    with open(best_path, encoding="utf-8") as f:
      metric = json.load(f).get("metric", "wer")
  steps, values = _series(valid, metric)
  finite = [(v, s) for s, v in zip(steps, values) if math.isfinite(v)]
  if finite:
    best_value, best_step = min(finite)
    ax_err.plot([best_step], [best_value], linestyle="none", marker="*", markersize=14, color="C3",
                label=f"best {metric.upper()} {best_value:.1f}% (step {best_step})")
  ax_err.set_ylim(bottom=0.0)
  _finish(ax_err, "(b) validation error rates", "error rate (%)", drawn)
  return _save(fig, out_png, dpi)


def comparison_figure(runs: Mapping[str, str], out_png: str, *, metric: str = "cer",
                      size_px: Tuple[int, int] = (800, 500), dpi: int = 100) -> str:
  """Validation curves of several fine-tuning runs on one axis (e.g. from the pretrained model and from
  random initialisation, same config, data, updates and seed).

  Args:
    runs: legend label -> run directory holding valid.jsonl.
    out_png: the PNG to write (parent directories are created).
    metric: "cer" or "wer", drawn in percent against the update step.

  Returns:
    `out_png`.

  Raises:
    FileNotFoundError: a run has no valid.jsonl.
  """
  if metric not in ("cer", "wer"):
    raise ValueError(f"metric must be 'cer' or 'wer', got {metric!r}")
  fig = _new_figure(size_px, dpi)
  ax = fig.subplots(1, 1)
  fig.suptitle(f"validation {metric.upper()}: pretrained vs random initialisation")
  drawn = False
  for i, (label, workdir) in enumerate(runs.items()):
    path = os.path.join(workdir, VALID)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: no validation log for {label!r}")
    valid = _valid_percent(read_jsonl(path))
    style = dict(color=f"C{i // 2}", linestyle="-" if i % 2 == 0 else "--", marker="o" if i % 2 == 0 else "s")
    drawn |= _plot(ax, valid, metric, label, **style)
  ax.set_ylim(bottom=0.0)
  _finish(ax, "", f"valid {metric.upper()} (%)", drawn)
  return _save(fig, out_png, dpi)
