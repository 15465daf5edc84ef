"""`w2v2 demo` end to end at a tiny scale: corpus -> pretrain -> fine-tune -> evaluate -> report, and resume;
run from the built wheel installed in a fresh virtual environment, outside the checkout.

The demo runs as a user runs it: the `w2v2` console script of the installed wheel, in a fresh process on
one CPU device (the suite's other tests see 8 fake devices), in a working directory outside the
checkout, with run and corpus folders relative to it, as `make demo` passes them. The wheel's
dependencies come from this test environment's site-packages (PYTHONPATH: no network, and .pth files
there, such as the checkout's editable install, are not read); w2v2_jax itself only from the wheel.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import jax
import numpy as np
import pytest

from w2v2_jax import demo, run_record

SCALE = 0.01          # 30 pretraining updates, 30 (small_1h) and 20 (small_10m) fine-tuning updates
ARGS = ["--out", "run", "--corpus", "corpus", "--hours", "0.03", "--scale", str(SCALE), "--eval-minutes", "0.3",
        "--labeled-minutes", "0.5", "--compare", "--low-minutes", "0.25"]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_LEVEL_SKIP = {".git", ".venv", "build", "dist", "data", "runs", "w2v2_jax.egg-info", ".pytest_cache"}


def _ignore(folder, names):
  """What the wheel's source copy leaves out: the checkout's own runs, data and environments (top level
  only: w2v2_jax/data is a package) and bytecode caches."""
  top = os.path.abspath(folder) == ROOT
  return {n for n in names if n == "__pycache__" or (top and n in TOP_LEVEL_SKIP)}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """(venv bin folder, environment): the wheel built from a copy of the checkout, installed with
  --no-deps into a new venv."""
  tmp = tmp_path_factory.mktemp("wheel")
  src = tmp / "src"
  shutil.copytree(ROOT, src, ignore=_ignore)
  pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
  subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
                 check=True, capture_output=True, text=True, timeout=600)
  (wheel,) = (tmp / "dist").glob("w2v2_jax-*.whl")
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")], check=True, timeout=300)
  subprocess.run(pip + ["--python", str(tmp / "venv" / "bin" / "python"), "install", "--no-deps", str(wheel)],
                 check=True, capture_output=True, text=True, timeout=600)
  env = dict(os.environ)
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).strip()
  env["PYTHONPATH"] = sysconfig.get_paths()["purelib"]
  return tmp / "venv" / "bin", env


def run_demo(cwd, installed):
  bin_dir, env = installed
  proc = subprocess.run([str(bin_dir / "w2v2"), "demo"] + ARGS, cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads((cwd / "run" / "report.json").read_text())
  return report, proc.stdout.splitlines()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, installed):
  root = tmp_path_factory.mktemp("demo")
  report, lines = run_demo(root, installed)
  return root, report, lines


def test_the_wheel_runs_outside_the_checkout(demo_run, installed):
  """The installed package is the wheel's (not the checkout), and `w2v2 pretrain --config=pretrain:tiny`
  (a packaged config, by name) trains a few updates on the demo's corpus."""
  root, _, _ = demo_run
  bin_dir, env = installed
  where = subprocess.run([str(bin_dir / "python"), "-c", "import w2v2_jax; print(w2v2_jax.__file__)"], cwd=root,
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
  assert where.startswith(str(bin_dir.parent)) and not where.startswith(ROOT + os.sep), where
  proc = subprocess.run([str(bin_dir / "w2v2"), "pretrain", "--config=pretrain:tiny", "--workdir=pt_tiny",
                         "--config.data.train_manifest=corpus/train.tsv", "--config.train.steps=3",
                         "--config.train.log_every=1", "--config.data.num_threads=1"],
                        cwd=root, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  records = [json.loads(line) for line in (root / "pt_tiny" / "metrics.jsonl").read_text().splitlines()]
  assert records and records[-1]["step"] == 3 and all(np.isfinite(r["loss"]) for r in records)


def test_demo_report(demo_run):
  root, report, lines = demo_run
  run = root / "run"
  assert report["pretrain"]["updates"] == 30 and report["finetune"]["updates"] == 30     # 3000 x scale 0.01
  # Chance level of the small config: ln(20 negatives + 1).
  assert report["pretrain"]["chance_nats"] == pytest.approx(3.045, abs=1e-3)
  assert report["corpus"]["test"]["utterances"] > 0 and report["corpus"]["train_0.5m"]["utterances"] > 0
  assert 0.0 <= report["test"]["cer"] and report["test"]["utterances"] == report["corpus"]["test"]["utterances"]
  with open(report["test"]["hypotheses"]) as f:
    assert len(f.read().splitlines()) >= report["test"]["utterances"]
  # Per voice: exactly the test voices, every utterance once, the letters' errors adding up to the CER.
  rows = report["test"]["by_voice"]
  corpus_json = json.loads((root / "corpus" / "corpus.json").read_text())
  assert {r["voice"] for r in rows} == set(corpus_json["splits"]["test"]["voices"])
  assert sum(r["utterances"] for r in rows) == report["test"]["utterances"]
  assert sum(r["char_errors"] for r in rows) / sum(r["ref_chars"] for r in rows) == pytest.approx(
      report["test"]["cer"], abs=1e-4)
  assert sum(r["share"] for r in rows) == pytest.approx(1.0, abs=0.01)
  assert any(line.startswith("pretrained: test CER by voice") for line in lines)
  assert isinstance(report["transcribe"]["hypothesis"], str) and report["transcribe"]["reference"]
  # Beam search with the 4-gram LM of the corpus text, weights chosen on valid (kenlm is a test dependency).
  lm_ = report["test_lm"]
  assert (lm_["alpha"], lm_["beta"]) in demo.LM_GRID and 0.0 <= lm_["cer"] and lm_["order"] == 4
  with open(lm_["lm"], encoding="utf-8") as f:
    assert f.readline() == "\\data\\\n"
  assert any(line.startswith("test with beam 32 + 4-gram LM") for line in lines)
  # Robustness: the test split again under each held-out acoustic condition.
  from w2v2_jax.data import augment
  conditions = report["test_conditions"]
  assert set(conditions) == set(augment.CONDITIONS) and all(0.0 <= v["cer"] for v in conditions.values())
  assert any(line.startswith("test under conditions never trained on (greedy CER): telephone") for line in lines)
  for png in report["plots"].values():
    with open(png, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert (run / "finetune" / "export" / "config.json").exists()
  # small_1h exports the model of the lowest valid CER.
  valid = [json.loads(line) for line in (run / "finetune" / "valid.jsonl").read_text().splitlines()]
  best = json.loads((run / "finetune" / "best.json").read_text())
  assert best["metric"] == "cer" and best["cer"] == min(v["valid/cer"] for v in valid)
  assert report["finetune"]["valid_cer"] == pytest.approx(best["cer"], abs=1e-4)
  md = (run / "report.md").read_text()
  assert "test (unseen voices): WER" in md and lines[-len(demo.summary_lines(report)):] == demo.summary_lines(report)
  assert any(line.startswith("== 2/5 pretraining: 30 updates") and "(train + unlabeled)" in line for line in lines)
  # Pretraining also hears the unlabeled split (as much as --hours by default); fine-tuning never does.
  corpus = root / "corpus"
  train, unlabeled, pretrain = ((corpus / f"{s}.tsv").read_text().splitlines()
                                for s in ("train", "unlabeled", "pretrain"))
  assert report["corpus"]["unlabeled"]["utterances"] == len(unlabeled) - 1 > 0
  assert pretrain == train + unlabeled[1:]
  assert "unlabeled" in md and "pretraining only" in md


def test_demo_compares_pretrained_with_random_initialisation(demo_run):
  """Each baseline is the same fine-tuning (config, data, updates, seed) from random initialisation; the
  probes train only the output layer, on the pretrained or the random backbone."""
  root, report, lines = demo_run
  run, cmp = root / "run", report["compare"]
  assert set(cmp) == {"pretrained", "scratch", "pretrained_low", "scratch_low", "probe", "probe_random"}
  for a, b in (("pretrained", "scratch"), ("pretrained_low", "scratch_low"), ("probe", "probe_random")):
    assert (cmp[a]["init"], cmp[b]["init"]) == ("pretrained", "random")
    assert {k: cmp[a][k] for k in ("config", "split", "updates", "probe")} == {
        k: cmp[b][k] for k in ("config", "split", "updates", "probe")}
    assert 0.0 <= cmp[a]["test_cer"] and 0.0 <= cmp[b]["test_cer"]
  assert cmp["pretrained"]["split"] == "train_0.5m" and cmp["pretrained_low"]["split"] == "train_0.25m"
  # The low-resource split is the start of the labeled one (nested, as Libri-light's 10 min in its 1 h).
  low, labeled = ((root / "corpus" / f"{s}.tsv").read_text().splitlines() for s in ("train_0.25m", "train_0.5m"))
  assert 1 < len(low) < len(labeled) and labeled[:len(low)] == low
  assert cmp["pretrained_low"]["updates"] == 20 and cmp["probe"]["probe"] and not cmp["scratch"]["probe"]
  assert cmp["pretrained"]["test_cer"] == report["test"]["cer"]
  # Both arms of a pair hear the same augmentation (the demo configs' speed perturbation); the probes read the
  # audio as it is.
  speed = {"speed": {"prob": 0.5, "speed": [0.9, 1.1]}}
  assert cmp["pretrained"]["augment"] == cmp["scratch"]["augment"] == speed
  assert cmp["pretrained_low"]["augment"] == cmp["scratch_low"]["augment"] == speed
  assert cmp["probe"]["augment"] == cmp["probe_random"]["augment"] == {}
  assert any(line.startswith("fine-tuning (small_1h on train_0.5m, waveform augmentation speed p=0.5 (0.9-1.1))")
             for line in lines)
  for arm in ("scratch", "pretrained_low", "scratch_low", "probe", "probe_random"):
    rows = cmp[arm]["test_by_voice"]
    assert sum(r["char_errors"] for r in rows) / sum(r["ref_chars"] for r in rows) == pytest.approx(
        cmp[arm]["test_cer"], abs=1e-4)
  assert any(line.startswith("random init: test CER by voice") for line in lines)
  # No freeze from random initialisation; the probes never unfreeze.
  scratch = [json.loads(line) for line in (run / "finetune_scratch" / "metrics.jsonl").read_text().splitlines()]
  assert scratch and all(r["frozen"] == 0.0 for r in scratch)
  probe = [json.loads(line) for line in (run / "probe" / "metrics.jsonl").read_text().splitlines()]
  assert probe and all(r["frozen"] == 1.0 for r in probe)
  # The probe's exported backbone is the pretrained one, untouched.
  from w2v2_jax import convert
  from w2v2_jax.train import loop
  _, pretrained = loop.load_pretrained(str(run / "pretrain"))
  _, probed = convert.from_hf(str(run / "probe" / "export"))
  flat_pre = dict(jax.tree_util.tree_leaves_with_path(pretrained))
  for path, value in jax.tree_util.tree_leaves_with_path(probed["wav2vec2"]):
    # mask_emb: a model without masks is exported without it (as transformers does) and reads back as zeros.
    if path in flat_pre and "mask_emb" not in jax.tree_util.keystr(path):
      np.testing.assert_array_equal(value, flat_pre[path], err_msg=jax.tree_util.keystr(path))
  assert sum(path in flat_pre for path, _ in jax.tree_util.tree_leaves_with_path(probed["wav2vec2"])) > 20
  assert any(line.startswith("fine-tuning, pretrained vs random init on train_0.25m") for line in lines)
  assert any(line.startswith("linear probe (frozen features)") for line in lines)
  with open(report["plots"]["compare"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_demo_resumes_without_retraining(demo_run, installed):
  """A second run reuses the corpus and the finished checkpoints: no update is taken again."""
  root, report, _ = demo_run
  before = os.path.getmtime(root / "run" / "pretrain" / "metrics.jsonl")
  lm_before = os.path.getmtime(report["test_lm"]["lm"])
  again, _ = run_demo(root, installed)
  assert os.path.getmtime(root / "run" / "pretrain" / "metrics.jsonl") == before
  assert os.path.getmtime(report["test_lm"]["lm"]) == lm_before       # the cached LM is not rebuilt
  assert again["test"] == report["test"] and again["pretrain"] == report["pretrain"]
  assert again["test_lm"] == report["test_lm"] and again["compare"] == report["compare"]


def test_demo_refuses_to_resume_a_run_trained_with_other_settings(demo_run, installed, tmp_path):
  """A finished arm whose recorded settings differ from the config's (here: as if trained before its
  config had speed perturbation) is not reused silently: the demo stops, names the folder and the
  changed setting, and deletes nothing. A run folder moved with its corpus still resumes."""
  root, _, _ = demo_run
  copy = tmp_path / "moved"
  for folder in ("run", "corpus"):
    shutil.copytree(root / folder, copy / folder)
  settings_path = copy / "run" / "finetune_scratch" / run_record.RUN_SETTINGS
  settings = json.loads(settings_path.read_text())
  assert settings["data.augment.speed_prob"] == 0.5 and settings["split"] == "train_0.5m"
  assert settings["pretrained_init"] is False and "init" not in settings
  settings["data.augment.speed_prob"] = 0.0
  settings_path.write_text(json.dumps(settings))
  arm = copy / "run" / "finetune_scratch"
  before = {p.relative_to(arm): p.read_bytes() for p in arm.rglob("*") if p.is_file()}
  report_before = (copy / "run" / "report.json").read_bytes()
  bin_dir, env = installed
  proc = subprocess.run([str(bin_dir / "w2v2"), "demo"] + ARGS, cwd=copy, env=env,
                        capture_output=True, text=True, timeout=1200)
  assert proc.returncode != 0
  assert "finetune_scratch was trained with other settings (data.augment.speed_prob: 0.0 -> 0.5)" in proc.stderr
  assert {p.relative_to(arm): p.read_bytes() for p in arm.rglob("*") if p.is_file()} == before
  assert (copy / "run" / "report.json").read_bytes() == report_before      # no new report was written
  # Pretraining and the main arm before it resumed from the moved folder: their settings matched (paths
  # are not compared).
  for stage in ("pretrain", "finetune"):
    assert (copy / "run" / stage / run_record.RUN_SETTINGS).exists() and f"run/{stage} was trained" not in proc.stderr
  assert json.loads((copy / "run" / "pretrain" / run_record.RUN_SETTINGS).read_text())["split"] == "pretrain"


def test_an_arm_is_not_reused_after_its_pretraining_changed(tmp_path):
  """A fine-tuning arm records which pretraining it started from (a hash of that run's own settings
  record): after the pretraining folder is trained again with other settings, resuming the arm raises
  and names the change; an arm from random initialisation does not depend on it."""
  pre_cfg, arm_cfg, scratch_cfg = _configs_reading_manifests(tmp_path)
  pre, arm, scratch = tmp_path / "pretrain", tmp_path / "finetune_low", tmp_path / "finetune_low_scratch"
  arm_cfg.init = str(pre)
  run_record.check(pre_cfg, "pretrain", str(pre))
  run_record.check(arm_cfg, "train_10m", str(arm))
  recorded = json.loads((arm / run_record.RUN_SETTINGS).read_text())["pretrained_init"]
  assert re.fullmatch(r"sha256:[0-9a-f]{16}", recorded)
  run_record.check(scratch_cfg, "train_10m", str(scratch))
  run_record.check(arm_cfg, "train_10m", str(arm))           # the same pretraining: resumes
  shutil.rmtree(pre)                                                  # pretraining trained again, longer
  pre_cfg.train.steps += 1000
  run_record.check(pre_cfg, "pretrain", str(pre))
  with pytest.raises(ValueError, match=rf"finetune_low was trained with other settings \(pretrained_init: "
                                       rf"'{recorded}' -> 'sha256:[0-9a-f]{{16}}'\)"):
    run_record.check(arm_cfg, "train_10m", str(arm))
  run_record.check(scratch_cfg, "train_10m", str(scratch))   # random init: unaffected
  # A pretraining run without a record (an earlier demo's) is recorded as True, as earlier arms recorded it.
  (pre / run_record.RUN_SETTINGS).unlink()
  assert run_record.pretrained_id(str(pre)) is True


def _configs_reading_manifests(tmp_path):
  """(pretrain:small, finetune:small_10m, finetune:small_10m) configs reading small manifests and
  transcripts written under tmp_path/corpus (the second fine-tuning config for a random-init arm)."""
  from w2v2_jax import configs  # pylint: disable=import-outside-toplevel
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for split, lines in (("pretrain", ["train/a.flac\t16000", "unlabeled/b.flac\t32000"]),
                       ("train_10m", ["train/a.flac\t16000"]), ("valid", ["valid/c.flac\t24000"])):
    (corpus / f"{split}.tsv").write_text("\n".join([str(corpus / "audio")] + lines) + "\n")
  (corpus / "train_10m.ltr").write_text("I N | T H E |\n")
  (corpus / "valid.ltr").write_text("A N D |\n")
  pre_cfg = configs.get("pretrain", "small")
  pre_cfg.data.train_manifest = str(corpus / "pretrain.tsv")
  arms = []
  for _ in range(2):
    cfg = configs.get("finetune", "small_10m")
    cfg.data.train_manifest, cfg.data.valid_manifest = str(corpus / "train_10m.tsv"), str(corpus / "valid.tsv")
    arms.append(cfg)
  return pre_cfg, *arms


def test_a_run_is_not_reused_after_its_corpus_was_replanned(tmp_path):
  """The records hold the identity of the audio and transcripts a stage trains and validates on (its
  manifests and .ltr files without the root folder): the same corpus moved elsewhere still matches; a
  corpus re-planned in place (the same split names, other utterances or transcripts) does not. A record
  of an earlier version, without it, resumes and is given it."""
  pre_cfg, arm_cfg, _ = _configs_reading_manifests(tmp_path)
  pre, arm = tmp_path / "pretrain", tmp_path / "finetune_low"
  run_record.check(pre_cfg, "pretrain", str(pre))
  run_record.check(arm_cfg, "train_10m", str(arm))
  recorded = json.loads((arm / run_record.RUN_SETTINGS).read_text())
  assert re.fullmatch(r"sha256:[0-9a-f]{16}", recorded["train_data"])
  assert re.fullmatch(r"sha256:[0-9a-f]{16}", recorded["valid_data"])
  corpus = tmp_path / "corpus"
  moved = tmp_path / "moved"
  shutil.copytree(corpus, moved)
  for name in ("pretrain.tsv", "train_10m.tsv", "valid.tsv"):    # the same corpus under another root
    lines = (moved / name).read_text().splitlines()
    (moved / name).write_text("\n".join([str(moved / "audio")] + lines[1:]) + "\n")
  pre_cfg.data.train_manifest = str(moved / "pretrain.tsv")
  arm_cfg.data.train_manifest, arm_cfg.data.valid_manifest = str(moved / "train_10m.tsv"), str(moved / "valid.tsv")
  run_record.check(pre_cfg, "pretrain", str(pre))
  run_record.check(arm_cfg, "train_10m", str(arm))
  (moved / "pretrain.tsv").write_text((moved / "pretrain.tsv").read_text().replace("32000", "32480"))
  with pytest.raises(ValueError, match=r"pretrain was trained with other settings \(train_data: 'sha256:"):
    run_record.check(pre_cfg, "pretrain", str(pre))
  (moved / "train_10m.ltr").write_text("I N | T H E M |\n")              # other transcripts, same audio list
  with pytest.raises(ValueError, match=r"finetune_low was trained with other settings \(train_data: 'sha256:"):
    run_record.check(arm_cfg, "train_10m", str(arm))
  # A record of an earlier version, without the data's identity: resumed, and given the current one.
  old_record = {k: v for k, v in recorded.items() if k not in run_record.DATA_FIELDS}
  (arm / run_record.RUN_SETTINGS).write_text(json.dumps(old_record))
  run_record.check(arm_cfg, "train_10m", str(arm))
  upgraded = json.loads((arm / run_record.RUN_SETTINGS).read_text())
  assert upgraded["train_data"] != recorded["train_data"] and upgraded["valid_data"] == recorded["valid_data"]
  assert {k: v for k, v in upgraded.items() if k not in run_record.DATA_FIELDS} == old_record
  (moved / "train_10m.ltr").write_text("I N | T H E |\n")
  with pytest.raises(ValueError, match=r"train_data: 'sha256:"):
    run_record.check(arm_cfg, "train_10m", str(arm))
  arm_cfg.train.steps += 1                     # an earlier record with another setting still stops the demo
  (arm / run_record.RUN_SETTINGS).write_text(json.dumps(old_record))
  with pytest.raises(ValueError, match=r"train.steps: 2000 -> 2001\)"):
    run_record.check(arm_cfg, "train_10m", str(arm))


def test_demo_cli_rejects_bad_scale(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "w2v2_jax.cli", "demo", "--out", str(tmp_path / "r"), "--corpus",
                         str(tmp_path / "c"), "--scale", "0"], capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "scale must be positive" in proc.stderr
