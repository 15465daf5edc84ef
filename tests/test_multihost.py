"""Two processes x 2 fake devices on localhost (launch/local_multihost.sh), the state sharded over both
(fsdp), train exactly like one process with 4 devices and the state replicated, on the same global batch,
and their checkpoint restores in one process; a process killed mid-training stops the other."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

import multihost_common as common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_processes_match_one_process(tmp_path):
  out = tmp_path / "result.json"
  env = dict(os.environ, DEVICES_PER_PROCESS="2", JAX_PLATFORMS="cpu",
             W2V2_CMD=f"{sys.executable} {ROOT}/tests/multihost_worker.py")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(["bash", f"{ROOT}/launch/local_multihost.sh", "2", str(out), str(tmp_path / "ckpt")],
                        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  multi = json.loads(out.read_text())

  # Two hosts with the state sharded over both (fsdp) train like one process with it replicated.
  losses, params = common.train(common.global_batch(), jax.devices()[:4], steps=2)
  np.testing.assert_allclose(multi["losses"], losses, rtol=1e-5)
  np.testing.assert_allclose(multi["checksum"], common.checksum(params), rtol=1e-5, atol=1e-5)
  assert losses[1] != losses[0]          # the second step saw updated params
  # The checkpoint the two hosts wrote (each its own slices) restores whole in one process, replicated.
  restored = common.restore_params(tmp_path / "ckpt", jax.devices()[:4])
  np.testing.assert_allclose(common.checksum(restored), multi["checksum"], rtol=1e-6, atol=1e-6)
  assert max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(restored),
                                                         jax.tree_util.tree_leaves(params))) <= 1e-5


def _launch_pretraining_pair(tmp_path, heartbeat=5):
  """Two `w2v2 pretrain` processes x 1 device on localhost, logging to tmp_path/p{i}.log; returns them
  once process 0 has logged update 3."""
  from test_pretrain_loop import tone_corpus
  from w2v2_jax.data.manifest import write_manifest
  tone_corpus(tmp_path / "audio")
  write_manifest(str(tmp_path / "audio"), str(tmp_path / "manifest"), valid_percent=0.0)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = []
  for i in range(2):
    env = dict(os.environ, W2V2_COORDINATOR=f"127.0.0.1:{port}", W2V2_NUM_PROCESSES="2", W2V2_PROCESS_ID=str(i),
               W2V2_HEARTBEAT_TIMEOUT_S=str(heartbeat), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    with open(tmp_path / f"p{i}.log", "w") as log:
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "w2v2_jax.cli", "pretrain", "--config=pretrain:tiny", f"--workdir={tmp_path / 'run'}",
           f"--config.data.train_manifest={tmp_path / 'manifest' / 'train.tsv'}", "--config.train.steps=100000",
           "--config.train.log_every=1", "--config.data.buckets=(16000,)", "--config.data.min_sample_size=16000",
           "--config.data.max_sample_size=16000", "--config.batch.device_seconds=2.0",
           "--config.batch.global_seconds=4.0"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
  deadline = time.monotonic() + 300
  while not re.search(r"step +3/", (tmp_path / "p0.log").read_text()):
    if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
      for p in procs:
        p.kill()
      raise AssertionError((tmp_path / "p0.log").read_text()[-3000:] + (tmp_path / "p1.log").read_text()[-3000:])
    time.sleep(0.5)
  return procs


def _reap(procs):
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()


def test_sigterm_on_one_host_stops_all_at_one_step(tmp_path):
  """Preemption notice on one host (SIGTERM): JAX's preemption service (public sync-point API) makes
  both processes save the same step and exit cleanly."""
  procs = _launch_pretraining_pair(tmp_path)
  try:
    procs[1].send_signal(signal.SIGTERM)
    rcs = [p.wait(timeout=120) for p in procs]
  finally:
    _reap(procs)
  logs = [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
  assert rcs == [0, 0], [log[-2000:] for log in logs]
  saved = [int(re.search(r"saved step (\d+), exiting", log).group(1)) for log in logs]
  assert saved[0] == saved[1] >= 3
  assert sorted(int(d) for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit())[-1] == saved[0]


def test_a_killed_process_stops_the_others(tmp_path):
  """A host lost mid-training (SIGKILL: no handler runs) must not leave the others hanging in a
  collective: JAX's coordination service stops them once the heartbeat timeout has passed."""
  heartbeat = 5
  procs = _launch_pretraining_pair(tmp_path, heartbeat)
  try:
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    rc = procs[0].wait(timeout=heartbeat + 120)
    waited = time.monotonic() - killed
  finally:
    _reap(procs)
  out = (tmp_path / "p0.log").read_text()
  # Measured here: SIGABRT 3.7 s after the kill (the heartbeat timeout counts from the last heartbeat).
  assert rc != 0 and waited < heartbeat + 60, (rc, waited)
  assert "Task 1 heartbeat timeout" in out and "stopped sending heartbeats" in out, out[-3000:]
