"""Two processes x 2 fake devices on localhost (launch/local_multihost.sh) train exactly like one
process with 4 devices on the same global batch."""
import json
import os
import subprocess
import sys

import jax
import numpy as np

import multihost_common as common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_processes_match_one_process(tmp_path):
  out = tmp_path / "result.json"
  env = dict(os.environ, DEVICES_PER_PROCESS="2", JAX_PLATFORMS="cpu",
             W2V2_CMD=f"{sys.executable} {ROOT}/tests/multihost_worker.py")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(["bash", f"{ROOT}/launch/local_multihost.sh", "2", str(out)], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  multi = json.loads(out.read_text())

  losses, params = common.train(common.global_batch(), jax.devices()[:4], steps=2)
  np.testing.assert_allclose(multi["losses"], losses, rtol=1e-5)
  np.testing.assert_allclose(multi["checksum"], common.checksum(params), rtol=1e-5, atol=1e-5)
  assert losses[1] != losses[0]          # the second step saw updated params
