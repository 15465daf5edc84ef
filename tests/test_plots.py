"""Training-curve plots: reading resumed/killed logs, the chance-exit step, and the PNG figures."""
import json
import logging
import math
import os
import subprocess
import sys

import pytest

from w2v2_jax import plots

matplotlib_image = pytest.importorskip("matplotlib.image")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
K = 100                          # negatives: chance ln(101) = 4.615 nats
CHANCE = math.log(K + 1)


def write_jsonl(path, records, tail=""):
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
    f.write(tail)


def pretrain_records(steps, chance_bits=True):
  """Records with the keys `train.loop.pretrain` logs; the loss leaves chance after step 100."""
  out = []
  for step in steps:
    contrastive = CHANCE + 0.1 - 0.004 * max(step - 75, 0)
    r = {"step": step, "time": 1.0e9 + step, "accuracy": min(0.01 + 0.002 * step, 0.9),
         "code_perplexity": 50.0 + step / 4, "contrastive": contrastive, "diversity": 0.4,
         "feature_pen": 0.2, "grad_norm": 3.0, "loss": contrastive + 0.5, "lr": 1e-4,
         "masked_fraction": 0.45, "prob_perplexity": 60.0 + step / 4, "sample_size": 600.0,
         "skipped": 0.0, "temperature": 2.0 * 0.999 ** step, "data/missing": 0.0,
         "loss_bits": (contrastive + 0.5) / math.log(2), "contrastive_bits": contrastive / math.log(2),
         "perf/sec_per_step": 0.5, "perf/audio_sec_per_sec": 40.0}
    if chance_bits:
      r["chance_bits"] = CHANCE / math.log(2)
    out.append(r)
  return out


def assert_png(path, width, height):
  with open(path, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE
  assert matplotlib_image.imread(path).shape[:2] == (height, width)


# -- read_jsonl --------------------------------------------------------------------------------

def test_read_jsonl_resumed_and_truncated(tmp_path, caplog):
  path = tmp_path / "metrics.jsonl"
  first = [{"step": s, "loss": float(s)} for s in (10, 20, 30, 40)]
  resumed = [{"step": s, "loss": -float(s)} for s in (30, 40, 50)]   # resumed from the step-20 checkpoint
  resumed.append({"step": 60, "loss": "NaN", "lr": "Infinity"})       # MetricsWriter's non-finite values
  write_jsonl(path, first + resumed, tail='{"step": 70, "loss": 1.2')  # killed mid-write
  with caplog.at_level(logging.WARNING, logger="w2v2_jax.plots"):
    records = plots.read_jsonl(str(path))
  assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60]
  assert [r["loss"] for r in records[:5]] == [10.0, 20.0, -30.0, -40.0, -50.0]   # last record per step
  assert math.isnan(records[5]["loss"]) and records[5]["lr"] == math.inf
  assert "metrics.jsonl:9" in caplog.text                           # the truncated line is named
  assert len(plots.read_jsonl(str(path), by_step=False)) == 8


def test_read_jsonl_drops_the_stale_tail_of_an_interrupted_run(tmp_path):
  path = tmp_path / "metrics.jsonl"
  # Ran to 50, resumed from 20 and logged 30, then was killed: 40 and 50 belong to the old run.
  write_jsonl(path, [{"step": s, "v": 0} for s in (10, 20, 30, 40, 50)] + [{"step": 30, "v": 1}])
  assert [(r["step"], r["v"]) for r in plots.read_jsonl(str(path))] == [(10, 0), (20, 0), (30, 1)]


def test_read_jsonl_missing_file_is_named(tmp_path):
  path = str(tmp_path / "nowhere" / "metrics.jsonl")
  with pytest.raises(FileNotFoundError, match="nowhere/metrics.jsonl"):
    plots.read_jsonl(path)


# -- chance_exit_step --------------------------------------------------------------------------

def losses(*values, start=10, every=10):
  return [{"step": start + every * i, "contrastive": v} for i, v in enumerate(values)]


@pytest.mark.parametrize("values, expected", [
    ((4.7, 4.65, 4.62, 4.60), None),                  # never 0.05 below chance
    ((4.5, 4.4, 4.3), 10),                            # below from the first record
    ((4.7, 4.5, 4.4, 4.3), 20),                       # leaves chance at step 20
    ((4.7, 4.4, 4.62, 4.3, 4.2), 40),                 # dips, returns above, leaves for good at 40
    ((4.7, 4.4, 4.3, 4.62), None),                    # ends above
    ((4.7, 4.4, CHANCE - 0.05), None),                # not strictly below chance - margin
    ((4.7, 4.4, float("nan"), 4.3), 40),              # a non-finite loss is not below chance
    ((4.7, 4.4, float("nan")), None),
    ((), None),
])
def test_chance_exit_step(values, expected):
  assert plots.chance_exit_step(losses(*values), CHANCE) == expected


def test_chance_exit_step_margin_order_and_missing_keys():
  records = losses(4.7, 4.58, 4.55)
  assert plots.chance_exit_step(records, CHANCE) == 30                  # 4.58 > 4.565
  assert plots.chance_exit_step(records, CHANCE, margin=0.0) == 20
  shuffled = [records[2], {"step": 25, "accuracy": 0.1}, records[0], records[1]]
  assert plots.chance_exit_step(shuffled, CHANCE, margin=0.0) == 20


# -- figures -----------------------------------------------------------------------------------

def test_pretrain_figure_writes_the_requested_png(tmp_path, caplog):
  write_jsonl(tmp_path / "metrics.jsonl", pretrain_records(range(10, 301, 10)))
  out = str(tmp_path / "figs" / "pretrain.png")
  with caplog.at_level(logging.INFO, logger="w2v2_jax.plots"):
    assert plots.pretrain_figure(str(tmp_path), out, size_px=(800, 600), dpi=80) == out
  assert_png(out, 800, 600)
  # 4.615 + 0.1 - 0.004 * (step - 75) < 4.565 from step 120 on.
  assert "chance level 4.6151 nats (logged)" in caplog.text
  assert "below it from step 120" in caplog.text


def test_pretrain_figure_chance_from_the_run_config(tmp_path, caplog):
  """Without chance_bits in the log, K (and G*V) come from the config stored with the checkpoints."""
  write_jsonl(tmp_path / "metrics.jsonl", pretrain_records(range(10, 201, 10), chance_bits=False))
  for step, negatives in ((100, 7), (200, K)):                        # the newest checkpoint counts
    meta = tmp_path / "checkpoints" / str(step) / "config" / "metadata"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"model": {"num_negatives": negatives, "cross_sample_negatives": 0,
                                          "latent_groups": 2, "latent_vars": 320}}))
  assert plots.run_config(str(tmp_path))["model"]["num_negatives"] == K
  out = str(tmp_path / "pretrain.png")
  with caplog.at_level(logging.INFO, logger="w2v2_jax.plots"):
    plots.pretrain_figure(str(tmp_path), out)
  assert "chance level 4.6151 nats (run config)" in caplog.text
  assert_png(out, 1200, 900)
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="w2v2_jax.plots"):
    plots.pretrain_figure(str(tmp_path), out, num_negatives=50)      # the argument beats the config
  assert f"chance level {math.log(51):.4f} nats (argument)" in caplog.text


def finetune_run(workdir, with_valid=True):
  """metrics.jsonl and valid.jsonl with the keys `train.loop.finetune` writes."""
  train = [{"step": s, "time": 1.0e9 + s, "loss": 300.0 * 0.99 ** s, "infinite_losses": 0.0,
            "utterances": 8.0, "frozen": float(s <= 100), "lr": 5e-5, "grad_norm": 2.0, "skipped": 0.0,
            "data/missing": 0.0, "text_empty": 0.0, "text_oov": 0.0, "text_too_long": 0.0,
            "perf/sec_per_step": 0.3} for s in range(50, 801, 50)]
  write_jsonl(os.path.join(workdir, "metrics.jsonl"), train)
  if with_valid:
    valid = [{"step": s, "valid/wer": w, "valid/cer": c, "valid/utterances": 20.0, "valid/skipped": 0.0}
             for s, w, c in ((200, 1.0, 0.95), (400, 0.9, 0.9), (600, 0.7, 0.86), (800, 0.75, 0.85))]
    write_jsonl(os.path.join(workdir, "valid.jsonl"), valid)


def test_finetune_figure(tmp_path):
  finetune_run(str(tmp_path))
  out = str(tmp_path / "finetune.png")
  assert plots.finetune_figure(str(tmp_path), out, size_px=(900, 400)) == out
  assert_png(out, 900, 400)


def test_finetune_figure_without_validation(tmp_path, caplog):
  finetune_run(str(tmp_path), with_valid=False)
  out = str(tmp_path / "finetune.png")
  with caplog.at_level(logging.WARNING, logger="w2v2_jax.plots"):
    plots.finetune_figure(str(tmp_path), out)
  assert "valid.jsonl missing" in caplog.text
  assert_png(out, 1200, 450)


def test_pretrain_figure_rejects_a_finetuning_run(tmp_path):
  finetune_run(str(tmp_path))
  with pytest.raises(ValueError, match="no pretraining records"):
    plots.pretrain_figure(str(tmp_path), str(tmp_path / "p.png"))
  with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
    plots.pretrain_figure(str(tmp_path / "empty"), str(tmp_path / "p.png"))


# -- matplotlib is optional --------------------------------------------------------------------

def test_import_does_not_need_matplotlib():
  code = "import sys, w2v2_jax.plots; assert 'matplotlib' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_missing_matplotlib_says_which_extra(tmp_path, monkeypatch):
  write_jsonl(tmp_path / "metrics.jsonl", pretrain_records([10, 20]))
  for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
    monkeypatch.setitem(sys.modules, name, None)
  monkeypatch.setitem(sys.modules, "matplotlib", None)
  with pytest.raises(ImportError, match=r"pip install 'w2v2_jax\[demo\]'"):
    plots.pretrain_figure(str(tmp_path), str(tmp_path / "p.png"))


@pytest.mark.parametrize("metric", [None, "cer"])
def test_finetune_figure_marks_the_exported_model(tmp_path, monkeypatch, metric):
  finetune_run(str(tmp_path))                 # best WER 70% at step 600, best CER 85% at step 800
  if metric:
    with open(tmp_path / "best.json", "w") as f:
      json.dump({"wer": 0.75, "cer": 0.85, "step": 800, "metric": metric}, f)
  figures = []
  monkeypatch.setattr(plots, "_save", lambda fig, out, dpi: figures.append(fig) or out)
  plots.finetune_figure(str(tmp_path), str(tmp_path / "f.png"))
  labels = [t.get_text() for t in figures[0].axes[1].get_legend().get_texts()]
  assert ("best CER 85.0% (step 800)" if metric else "best WER 70.0% (step 600)") in labels


def test_comparison_figure_draws_every_run_and_names_a_missing_one(tmp_path):
  runs = {}
  for name in ("pretrained", "scratch"):
    os.makedirs(tmp_path / name)
    finetune_run(str(tmp_path / name))
    runs[name] = str(tmp_path / name)
  out = str(tmp_path / "compare.png")
  assert plots.comparison_figure(runs, out, size_px=(640, 400)) == out
  assert_png(out, 640, 400)
  os.makedirs(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="valid.jsonl: no validation log for 'probe'"):
    plots.comparison_figure(dict(runs, probe=str(tmp_path / "empty")), out)
  with pytest.raises(ValueError, match="metric must be"):
    plots.comparison_figure(runs, out, metric="loss")
