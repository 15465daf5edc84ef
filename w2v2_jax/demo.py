"""The end-to-end demo (`make demo`, `w2v2 demo`): the whole system on data it makes itself, on a CPU.

  1. corpus      `w2v2 make-corpus`: ~1 h of synthetic English speech (espeak-ng / flite / festival)
                 and as much unlabeled audio (festival's voices of other languages reading the English
                 text: pretraining only), cached: a second run reuses the files.
  2. pretrain    the packaged config pretrain:small (2.2M parameters) on train + unlabeled, no labels.
  3. finetune    finetune:small_1h: CTC on the labeled hour (train_60m: all of train at the
                 default size), conv encoder included, speed perturbation (factors 0.9-1.1) on half
                 the utterances, validated on unseen voices; the best model by
                 validation CER is exported. The claim of the paper, checked (`compare`; `w2v2 demo --compare`):
                 the same fine-tuning from random initialisation (same config, data, updates, seed);
                 both again on 10 labeled minutes (small_10m on train_10m); and a linear CTC probe
                 (frozen features, only the output layer trains) of the pretrained vs a random model.
  4. evaluate    WER / CER of every fine-tuned model on the test split (voices and sentences never trained on):
                 greedy, and beam search with a word 4-gram LM (`w2v2 build-lm` on the corpus's lm.txt,
                 which leaves out the valid and test sentences; LM weights chosen on valid), when the
                 `kenlm` package is installed; and greedy under acoustic conditions no stage trained on
                 (telephone band, noise, reverberation: `augment.CONDITIONS`).
  5. transcribe  one test file, reference vs hypothesis.
  6. report      PNG curves (pretraining loss vs its chance level ln(K+1), accuracy, prob perplexity,
                 temperature; CTC loss and valid CER; valid CER of every arm, compare.png) and
                 report.md / report.json in the run folder.

Every stage resumes: a killed demo picks up where it stopped (checkpoints, finished corpus files); a
training stage's folder records its settings and data, and one trained with other settings or on
other data (a corpus made again in place) is refused (`run_record`).
`scale` multiplies the number of updates of every training stage.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import time
from typing import Any, Callable, Optional

from w2v2_jax import configs as packaged, plots, run_record
from w2v2_jax.corpus import by_voice, synthesize

log = logging.getLogger(__name__)


def _scaled(steps: int, scale: float) -> int:
  return max(1, int(round(steps * scale)))


def _stage(name: str, say: Callable[[str], None]):
  start = time.monotonic()
  say(f"== {name}")
  return start


def run(out_dir: str = "runs/demo", corpus_dir: str = "data/tts_corpus", *, hours: float = 1.0, scale: float = 1.0,
        seed: int = 0, eval_minutes: float = 5.0, labeled_minutes: float = 60.0,
        finetune_config: str = "small_1h", compare: bool = False, low_minutes: float = 10.0,
        low_config: str = "small_10m", unlabeled_hours: Optional[float] = None,
        say: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs (or resumes) the demo; returns the report (also written to out_dir/report.json).

  hours / eval_minutes / labeled_minutes: the corpus (`make_corpus`); the labeled split train_<M>m is
  what fine-tuning trains on, with the packaged config finetune:`finetune_config`; unlabeled_hours: audio
  only pretraining hears (the corpus's unlabeled split; None: as much as `hours`); scale: multiplies the updates
  of both training stages; `say` receives the stage headers and the final report lines (the CLI prints
  them)."""
  from w2v2_jax.evaluate import evaluate  # pylint: disable=import-outside-toplevel
  from w2v2_jax.recognizer import Recognizer  # pylint: disable=import-outside-toplevel
  from w2v2_jax.data.audio import load_audio  # pylint: disable=import-outside-toplevel
  from w2v2_jax.data.manifest import read_manifest  # pylint: disable=import-outside-toplevel
  from w2v2_jax.progress import ProgressBar  # pylint: disable=import-outside-toplevel
  from w2v2_jax.train import loop  # pylint: disable=import-outside-toplevel
  if scale <= 0:
    raise ValueError(f"scale must be positive, got {scale}")
  unlabeled_hours = hours if unlabeled_hours is None else unlabeled_hours
  out_dir, corpus_dir = os.path.abspath(out_dir), os.path.abspath(corpus_dir)   # the report's paths work anywhere
  os.makedirs(out_dir, exist_ok=True)
  times, report = {}, {"seed": seed, "scale": scale}

  start = _stage(f"1/5 corpus: {hours:g} h of synthetic speech in {corpus_dir} (cached after the first run)", say)
  corpus = synthesize.make_corpus(corpus_dir, hours, eval_minutes=eval_minutes,
                                  labeled_minutes=(labeled_minutes, low_minutes) if compare else labeled_minutes,
                                  seed=seed, unlabeled_hours=unlabeled_hours, progress=ProgressBar("synthesising"))
  labeled = f"train_{labeled_minutes:g}m"
  times["corpus"] = time.monotonic() - start
  report["labeled_split"] = labeled
  report["finetune_config"] = finetune_config
  report["corpus"] = {k: {"utterances": v["utterances"], "minutes": round(v["hours"] * 60, 1),
                          "voices": len(v["voices"])} for k, v in corpus["splits"].items()}
  manifest = lambda split: os.path.join(corpus_dir, f"{split}.tsv")  # noqa: E731

  pre_cfg = packaged.get("pretrain", "small")
  pre_cfg.data.train_manifest = manifest("pretrain")      # train + unlabeled
  pre_cfg.train.steps = _scaled(pre_cfg.train.steps, scale)
  pre_cfg.train.seed = pre_cfg.data.seed = seed
  pre_dir = os.path.join(out_dir, "pretrain")
  start = _stage(f"2/5 pretraining: {pre_cfg.train.steps} updates of {pre_cfg.batch.global_seconds:g} s of audio "
                 f"(train{' + unlabeled' if unlabeled_hours else ''}) -> {pre_dir}", say)
  run_record.check(pre_cfg, "pretrain", pre_dir)
  loop.pretrain(pre_cfg, pre_dir)
  times["pretrain"] = time.monotonic() - start
  records = plots.read_jsonl(os.path.join(pre_dir, "metrics.jsonl"))
  chance = math.log(pre_cfg.model.num_negatives + pre_cfg.model.cross_sample_negatives + 1)
  last = records[-1]
  report["pretrain"] = {
      "updates": int(last["step"]), "chance_nats": round(chance, 3),
      "contrastive_first": round(records[0]["contrastive"], 3), "contrastive_last": round(last["contrastive"], 3),
      "accuracy_last": round(last["accuracy"], 3), "prob_perplexity_last": round(last["prob_perplexity"], 1),
      "codebook_size": pre_cfg.model.latent_groups * pre_cfg.model.latent_vars,
      "leaves_chance_at": plots.chance_exit_step(records, chance)}

  start = time.monotonic()
  main = _finetune_arm(finetune_config, labeled, pre_dir, os.path.join(out_dir, "finetune"), manifest,
                       scale=scale, seed=seed, say=say,
                       title=f"3/5 fine-tuning (CTC) from the pretrained model on {labeled}")
  ft_dir = main["dir"]
  report["finetune"] = main["summary"]
  times["finetune"] = time.monotonic() - start
  arms, curves = {}, {f"pretrained, {labeled}": ft_dir}     # curves: legend label -> run dir (compare.png)
  if compare:
    low = f"train_{low_minutes:g}m"
    report["low_split"], report["low_config"] = low, low_config
    plan = [("scratch", finetune_config, labeled, "", "finetune_scratch", "from random initialisation",
             f"scratch, {labeled}")]
    if low != labeled:
      plan += [("pretrained_low", low_config, low, pre_dir, "finetune_low", "from the pretrained model",
                f"pretrained, {low}"),
               ("scratch_low", low_config, low, "", "finetune_low_scratch", "from random initialisation",
                f"scratch, {low}")]
    plan += [("probe", finetune_config, labeled, pre_dir, "probe", "probe of the pretrained features",
              f"probe, pretrained features, {labeled}"),
             ("probe_random", finetune_config, labeled, "", "probe_random", "probe of random features",
              f"probe, random features, {labeled}")]
    for name, cfg_name, split, init, folder, what, label in plan:
      start = time.monotonic()
      arms[name] = _finetune_arm(cfg_name, split, init, os.path.join(out_dir, folder), manifest,
                                 scale=scale, seed=seed, say=say, probe=name.startswith("probe"),
                                 title=f"3/5 fine-tuning (CTC) {what} on {split}")
      curves[label] = arms[name]["dir"]
      times[folder] = time.monotonic() - start
  start = _stage("4/5 evaluating on the test split (unseen voices and sentences)", say)
  recognizer = Recognizer.load(os.path.join(ft_dir, "export"))
  hyp_path = os.path.join(out_dir, "test_hypotheses.tsv")
  scores = evaluate(recognizer, manifest("test"), out_path=hyp_path)
  voices = by_voice.voice_of_utterance(corpus_dir)      # read once for every arm's per-voice line
  report["test"] = {"wer": round(float(scores["wer"]), 4), "cer": round(float(scores["cer"]), 4),
                    "utterances": int(scores["utterances"]), "hypotheses": hyp_path,
                    "by_voice": _by_voice(hyp_path, corpus_dir, voices)}
  report["test_lm"] = _lm_decoding(recognizer, corpus_dir, out_dir, manifest, say)
  report["test_conditions"] = _robustness(recognizer, manifest("test"), seed)
  if arms:
    report["compare"] = {"pretrained": dict(report["finetune"], test_cer=report["test"]["cer"],
                                            test_wer=report["test"]["wer"])}
    for name, arm in arms.items():
      arm_hyps = os.path.join(arm["dir"], "test_hypotheses.tsv")
      scores = evaluate(Recognizer.load(os.path.join(arm["dir"], "export")), manifest("test"), out_path=arm_hyps)
      report["compare"][name] = dict(arm["summary"], test_cer=round(float(scores["cer"]), 4),
                                     test_wer=round(float(scores["wer"]), 4),
                                     test_by_voice=_by_voice(arm_hyps, corpus_dir, voices))
  times["evaluate"] = time.monotonic() - start

  start = _stage("5/5 transcribing one test file; plots; report", say)
  test_split = read_manifest(manifest("test"), label_exts=("wrd",))
  audio_path, reference = os.path.join(test_split.root, test_split.paths[0]), test_split.labels["wrd"][0]
  report["transcribe"] = {"file": audio_path, "reference": reference,
                          "hypothesis": recognizer.transcribe([load_audio(audio_path)])[0]}
  report["plots"] = {
      "pretrain": plots.pretrain_figure(pre_dir, os.path.join(out_dir, "pretrain.png"),
                                        num_negatives=pre_cfg.model.num_negatives),
      "finetune": plots.finetune_figure(ft_dir, os.path.join(out_dir, "finetune.png"))}
  if arms:
    report["plots"]["compare"] = plots.comparison_figure(curves, os.path.join(out_dir, "compare.png"))
  times["report"] = time.monotonic() - start
  report["minutes"] = {k: round(v / 60, 2) for k, v in times.items()}
  report["minutes"]["total"] = round(sum(times.values()) / 60, 2)
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(report, f, indent=1)
  lines = summary_lines(report)
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write("# w2v2_jax demo report\n\n" + "\n".join(f"- {line}" for line in lines) + "\n")
  for line in lines:
    say(line)
  return report


PROBE_LR = 2e-3          # the output layer alone: a larger step than fine-tuning the whole model


def _finetune_arm(config_name: str, split: str, init: str, workdir: str,
                  manifest: Callable[[str], str], *, scale: float, seed: int, say: Callable[[str], None],
                  title: str, probe: bool = False) -> dict[str, Any]:
  """Runs (or resumes) one CTC fine-tuning of the demo: the packaged config finetune:`config_name` on the corpus
  split `split`, from `init` (a pretraining run; "" = random initialisation), validated on valid.

  From random initialisation there is no freeze and the conv encoder trains (feature_grad_mult 1 where
  the recipe freezes it): frozen random weights gain nothing, so these departures only help the
  baseline (and nothing is re-initialised: reinit_layers 0). probe: only the output layer trains, on
  the whole pretrained model's frozen features (no re-initialised layers, no masks, no dropout, no
  waveform augmentation, lr PROBE_LR), for the same number of updates: a linear CTC probe of what the
  backbone's last layer encodes.
  Returns {"dir", "summary"}; the model of the lowest valid CER is exported to workdir/export.
  """
  from w2v2_jax.data import augment  # pylint: disable=import-outside-toplevel
  from w2v2_jax.train import loop  # pylint: disable=import-outside-toplevel
  cfg = packaged.get("finetune", config_name)
  cfg.init = init
  cfg.data.train_manifest = manifest(split)
  cfg.data.valid_manifest = manifest("valid")
  cfg.train.steps = _scaled(cfg.train.steps, scale)
  cfg.train.freeze_updates = min(cfg.train.freeze_updates, cfg.train.steps // 2) if init else 0
  if not init:
    cfg.model.feature_grad_mult = 1.0      # a random conv encoder must train: no frozen random features
    cfg.reinit_layers = 0                  # every layer is random already
  if probe:
    cfg.reinit_layers = 0                  # the probe reads the whole pretrained model's last layer
    cfg.train.freeze_updates = cfg.train.steps
    cfg.model.mask_prob = cfg.model.mask_channel_prob = cfg.model.feature_grad_mult = 0.0
    cfg.model.activation_dropout = 0.0     # the probe reads the features as they are ...
    cfg.data.augment = augment.config_dict()   # ... of the audio as it is (every transform off)
    cfg.optim.lr = PROBE_LR
  cfg.train.eval_every = max(1, min(cfg.train.eval_every, cfg.train.steps // 4))
  cfg.train.seed = cfg.data.seed = seed
  cfg.train.best_metric = "cer"      # every arm exports by the same measure, the one compared
  _stage(f"{title} ({config_name}, {cfg.train.steps} updates) -> {workdir}", say)
  run_record.check(cfg, split, workdir)
  loop.finetune(cfg, workdir)
  with open(os.path.join(workdir, "best.json")) as f:
    best = json.load(f)
  valid = plots.read_jsonl(os.path.join(workdir, "valid.jsonl"))
  summary = {"config": config_name, "split": split, "init": "pretrained" if init else "random",
             "probe": probe, "updates": int(cfg.train.steps), "best_step": best["step"],
             "augment": augment.describe(augment.AugmentConfig.from_any(cfg.data.augment)),
             "valid_wer": round(best["wer"], 4), "valid_cer": round(best["cer"], 4),
             "valid_cer_curve": {int(r["step"]): round(float(r["valid/cer"]), 4) for r in valid}}
  return {"dir": workdir, "summary": summary}


def _comparison_lines(compare: dict[str, Any]) -> list[str]:
  """Pretrained vs random initialisation, same config, data, updates and seed (test CER, greedy)."""
  def pair(a: str, b: str, what: str) -> str:
    x, y = compare[a], compare[b]
    return (f"{what} on {x['split']} ({x['config']}, {x['updates']} updates): test CER {x['test_cer']:.3f} vs "
            f"{y['test_cer']:.3f} (pretrained - random {x['test_cer'] - y['test_cer']:+.3f}); best valid CER "
            f"{x['valid_cer']:.3f} (update {x['best_step']}) vs {y['valid_cer']:.3f} (update {y['best_step']})")
  pairs = [("pretrained", "scratch", "fine-tuning, pretrained vs random init"),
           ("pretrained_low", "scratch_low", "fine-tuning, pretrained vs random init"),
           ("probe", "probe_random", "linear probe (frozen features), pretrained vs random")]
  return [pair(a, b, what) for a, b, what in pairs if a in compare]


def _by_voice(hypotheses_tsv: str, corpus_dir: str, voices: dict[str, str]) -> list[dict[str, Any]]:
  """Test CER per voice, worst first (`corpus.by_voice`), rounded for the report."""
  return [dict(r, cer=round(r["cer"], 4), wer=round(r["wer"], 4), share=round(r["share"], 3))
          for r in by_voice.error_rates(hypotheses_tsv, corpus_dir, voices)]


def _augment_words(transforms: Optional[dict[str, dict[str, Any]]]) -> str:
  """", waveform augmentation speed p=0.5 (0.9-1.1)" for an arm's enabled transforms (`augment.describe`,
  e.g. "reverb p=0.2 (rt60 0.15-0.8, drr 0-12)"); "" for none."""
  def ranges(name: str, spec: dict[str, Any]) -> str:
    return ", ".join(("" if k == name else f"{k} ") + f"{v[0]:g}-{v[1]:g}" for k, v in spec.items() if k != "prob")
  return (", waveform augmentation " + ", ".join(f"{name} p={spec['prob']:g} ({ranges(name, spec)})"
                                                 for name, spec in transforms.items())) if transforms else ""


def _voice_line(what: str, rows: list[dict[str, Any]]) -> str:
  return f"{what} test CER by voice (share of the letters): " + ", ".join(
      f"{r['voice']} {r['cer']:.3f} ({r['share']:.0%})" for r in rows)


def _robustness(recognizer, test_manifest: str, seed: int) -> dict[str, Any]:
  """Greedy CER / WER on the test split under each of `augment.CONDITIONS` (telephone band, noise at
  5-15 dB SNR, a reverberant room): audio no stage of the demo trained on in any form (unseen voices
  through a channel fine-tuning never applies; the demo's only augmentation is speed perturbation)."""
  from w2v2_jax.data import augment, labeled  # pylint: disable=import-outside-toplevel
  from w2v2_jax.evaluate import evaluate  # pylint: disable=import-outside-toplevel
  source = labeled.open_labeled_source(test_manifest, None)      # read once, scored under each condition
  out = {}
  for name in augment.CONDITIONS:
    scores = evaluate(recognizer, source, augment=name, augment_seed=seed)
    out[name] = {"cer": round(float(scores["cer"]), 4), "wer": round(float(scores["wer"]), 4)}
  return out


LM_ORDER = 4
LM_BEAM = 32
LM_GRID = ((0.1, 0.5), (0.1, 2.0), (0.2, 1.0), (0.2, 3.0), (0.5, 4.0))    # (alpha, beta) tried on valid


def _lm_decoding(recognizer, corpus_dir: str, out_dir: str, manifest: Callable[[str], str],
                 say: Callable[[str], None]) -> Optional[dict[str, Any]]:
  """Beam search with a 4-gram LM: build it (cached), pick (alpha, beta) on valid, score test.
  None (and a message) without kenlm."""
  from w2v2_jax import lm  # pylint: disable=import-outside-toplevel
  from w2v2_jax.evaluate import evaluate  # pylint: disable=import-outside-toplevel
  if importlib.util.find_spec("kenlm") is None:
    say("LM decoding skipped: the kenlm package is not installed (pip install 'w2v2_jax[lm]')")
    return None
  text_path, lm_path = os.path.join(corpus_dir, "lm.txt"), os.path.join(out_dir, f"lm{LM_ORDER}.arpa")
  if not os.path.exists(lm_path) or os.path.getmtime(lm_path) < os.path.getmtime(text_path):
    with open(text_path, encoding="utf-8") as f:
      lm.build_arpa(f.read().splitlines(), lm_path, order=LM_ORDER)
  valid = [dict(alpha=a, beta=b, **{k: float(v) for k, v in evaluate(
      recognizer, manifest("valid"), beam_width=LM_BEAM, lm_path=lm_path, alpha=a, beta=b).items()
      if k in ("wer", "cer")}) for a, b in LM_GRID]
  best = min(valid, key=lambda r: r["cer"])
  scores = evaluate(recognizer, manifest("test"), beam_width=LM_BEAM, lm_path=lm_path,
                              alpha=best["alpha"], beta=best["beta"])
  return {"lm": lm_path, "order": LM_ORDER, "beam": LM_BEAM, "alpha": best["alpha"], "beta": best["beta"],
          "valid_cer": round(best["cer"], 4), "valid_wer": round(best["wer"], 4),
          "wer": round(float(scores["wer"]), 4), "cer": round(float(scores["cer"]), 4)}


def summary_lines(report: dict[str, Any]) -> list[str]:
  """The human-readable report."""
  c, p, ft, t, tr = (report[k] for k in ("corpus", "pretrain", "finetune", "test", "transcribe"))
  labeled = c[report["labeled_split"]]
  lm_ = report.get("test_lm")
  compare = report.get("compare")
  unlabeled = c.get("unlabeled", {}).get("minutes")
  leaves = (f"left its chance level at update {p['leaves_chance_at']}" if p["leaves_chance_at"] is not None
            else "did not leave its chance level")
  return [
      f"corpus: train {c['train']['minutes']} min ({c['train']['voices']} voices), labeled "
      f"{labeled['minutes']} min, test {c['test']['minutes']} min ({c['test']['voices']} unseen voices)"
      + (f", unlabeled {unlabeled} min ({c['unlabeled']['voices']} voices of other languages reading English text; "
         "pretraining only)" if unlabeled else ""),
      f"pretraining: {p['updates']} updates; contrastive loss {p['contrastive_first']} -> {p['contrastive_last']} "
      f"nats (chance ln(K+1) = {p['chance_nats']}), {leaves}; accuracy {p['accuracy_last']}; "
      f"prob perplexity {p['prob_perplexity_last']} of {p['codebook_size']} codewords",
      f"fine-tuning ({report['finetune_config']} on {report['labeled_split']}"
      f"{_augment_words(ft.get('augment'))}): {ft['updates']} updates; "
      f"best valid CER {ft['valid_cer']:.3f} WER {ft['valid_wer']:.3f} "
      f"(update {ft['best_step']})",
      f"test (unseen voices): WER {t['wer']:.3f} CER {t['cer']:.3f} on {t['utterances']} utterances (greedy)",
      *([_voice_line("pretrained:", t["by_voice"])] if t.get("by_voice") else []),
      *([_voice_line("random init:", compare["scratch"]["test_by_voice"])]
        if compare and compare.get("scratch", {}).get("test_by_voice") else []),
      *([("test under conditions never trained on (greedy CER): " + ", ".join(
          f"{name} {v['cer']:.3f}" for name, v in report["test_conditions"].items()))]
        if report.get("test_conditions") else []),
      *(_comparison_lines(compare) if compare else []),
      *([f"test with beam {lm_['beam']} + {lm_['order']}-gram LM (alpha {lm_['alpha']}, beta {lm_['beta']} "
         f"chosen on valid): WER {lm_['wer']:.3f} CER {lm_['cer']:.3f}"] if lm_ else []),
      f"transcribe {os.path.basename(tr['file'])}: REF {tr['reference']!r}",
      f"{' ' * (len('transcribe ') + len(os.path.basename(tr['file'])))}  HYP {tr['hypothesis']!r}",
      f"plots: {report['plots']['pretrain']}, {report['plots']['finetune']}",
      f"time (min): " + ", ".join(f"{k} {v}" for k, v in report["minutes"].items()) + f"; seed {report['seed']}, "
      f"scale {report['scale']}",
  ]
