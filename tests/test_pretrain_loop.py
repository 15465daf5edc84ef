"""The pretraining job end to end on CPU: the CLI on a manifest, SIGTERM (preemption) saves and exits
cleanly, and a resumed run reaches bit-identical params to an uninterrupted one."""
import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import soundfile as sf

from w2v2_jax.data.manifest import write_manifest
from w2v2_jax.train import checkpoint, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 60


def tone_corpus(directory, count=24, seed=0):
  """Utterances of 1-2 s: sequences of harmonic notes with a little noise (structure to learn)."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  for i in range(count):
    n = int(rng.uniform(1.0, 2.0) * 16000)
    t = np.arange(n) / 16000
    x = np.zeros(n)
    pos = 0
    while pos < n:
      seg = int(rng.uniform(0.15, 0.4) * 16000)
      f0 = rng.choice([110, 147, 196, 247, 330, 440])
      tt = t[pos:pos + seg]
      x[pos:pos + seg] = np.hanning(len(tt)) * sum(np.sin(2 * np.pi * f0 * k * tt) / k for k in range(1, 5))
      pos += seg
    sf.write(os.path.join(directory, f"utt{i:03d}.flac"), (0.3 * x + 0.01 * rng.standard_normal(n)).astype(np.float32),
             16000)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  tone_corpus(root / "audio")
  write_manifest(str(root / "audio"), str(root / "manifest"), valid_percent=0.0)
  return str(root / "manifest" / "train.tsv")


OVERRIDES = ["--config.data.buckets=(16000,)", "--config.data.min_sample_size=16000",
             "--config.data.max_sample_size=16000", "--config.batch.device_seconds=2.0",
             "--config.batch.global_seconds=16.0", f"--config.train.steps={STEPS}",
             "--config.train.log_every=1", "--config.train.checkpoint_every=1000", "--config.data.num_threads=1"]


def config(manifest_path):
  """pretrain:tiny with the overrides above (one bucket: one compilation)."""
  import ast  # pylint: disable=import-outside-toplevel
  from w2v2_jax import configs  # pylint: disable=import-outside-toplevel
  cfg = configs.get("pretrain", "tiny")
  cfg.data.train_manifest = manifest_path
  for flag in OVERRIDES:
    path, value = flag[len("--config."):].split("=", 1)
    *parents, leaf = path.split(".")
    node = cfg
    for p in parents:
      node = node[p]
    node[leaf] = ast.literal_eval(value)
  return cfg


def read_params(workdir, step):
  ckpt = checkpoint.Checkpointer(workdir)
  meta = ckpt.restore_config(step)
  assert meta["train"]["steps"] == STEPS
  ckpt.close()
  from orbax import checkpoint as ocp  # pylint: disable=import-outside-toplevel
  restored = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
  return restored["params"]


def test_sigterm_saves_and_resume_is_exact(manifest, tmp_path, caplog):
  # 1. The CLI, preempted: SIGTERM once a few updates are logged.
  killed = str(tmp_path / "killed")
  cmd = [sys.executable, "-m", "w2v2_jax.cli", "pretrain", "--config=pretrain:tiny",
         f"--workdir={killed}", f"--config.data.train_manifest={manifest}"] + OVERRIDES
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics_file = os.path.join(killed, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics_file) and len(open(metrics_file).read().splitlines()) >= 3:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  output, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, output[-4000:]
  stopped = checkpoint.Checkpointer(killed).latest_step()
  assert stopped is not None and 3 <= stopped < STEPS, (stopped, output[-2000:])
  assert "stop requested" in output

  # 2. Resume the same workdir to the end, in this process: the same settings, so no warning about them.
  with caplog.at_level(logging.WARNING, logger="w2v2_jax.train.loop"):
    last = loop.pretrain(config(manifest), killed)
  assert "settings that differ" not in caplog.text
  assert checkpoint.Checkpointer(killed).latest_step() == STEPS
  logged = [json.loads(line) for line in open(metrics_file)]
  assert [m["step"] for m in logged][-1] == STEPS and np.isfinite(last["loss"])

  # 3. An uninterrupted run reaches exactly the same params.
  straight = str(tmp_path / "straight")
  loop.pretrain(config(manifest), straight)
  a, b = read_params(killed, STEPS), read_params(straight, STEPS)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)

  # 4. Resuming a run with other settings than its checkpoint's says which (the finished run takes no
  # update, its checkpoint stays).
  changed = config(manifest)
  changed.optim.lr *= 2
  with caplog.at_level(logging.WARNING, logger="w2v2_jax.train.loop"):
    loop.pretrain(changed, straight)
  assert f"resuming from step {STEPS} with settings that differ" in caplog.text
  assert f"optim.lr: {changed.optim.lr / 2!r} -> {changed.optim.lr!r}" in caplog.text
  assert checkpoint.Checkpointer(straight).all_steps()[-1] == STEPS


def test_contrastive_loss_leaves_chance_and_no_collapse(manifest, tmp_path):
  """The tiny model learns: contrastive loss below ln(K+1) by the end, prob perplexity far above 2."""
  cfg = config(manifest)
  cfg.train.steps = 200
  cfg.batch.global_seconds = 8.0
  cfg.batch.device_seconds = 1.0
  loop.pretrain(cfg, str(tmp_path / "run"))
  logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  chance = np.log(cfg.model.num_negatives + 1)
  first, end = np.mean([m["contrastive"] for m in logged[:5]]), np.mean([m["contrastive"] for m in logged[-10:]])
  assert first > chance - 0.1
  assert end < chance - 0.15, (first, end, chance)
  assert min(m["prob_perplexity"] for m in logged) > 4.0
