"""One process of the 2-process x 2-device test (run by launch/local_multihost.sh from test_multihost.py).

Every process builds the same tiny model and feeds only its own half of a fixed global batch, trains with
the state sharded over all 4 devices (parallel.mode="fsdp") and checkpoints it to argv[2]; process 0
writes the losses and a parameter checksum as JSON to argv[1].
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from w2v2_jax.train import parallel  # noqa: E402


def main(out_path, checkpoint_dir):
  parallel.initialize_distributed()
  import multihost_common as common  # pylint: disable=import-outside-toplevel
  assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.device_count())
  batch = common.global_batch()
  half = batch["audio"].shape[1] // 2
  rows = slice(jax.process_index() * half, (jax.process_index() + 1) * half)
  local = {k: v[:, rows] for k, v in batch.items()}
  # Sharded state across the two processes: each holds (and checkpoints) only its slices.
  losses, params = common.train(local, jax.devices(), steps=2, mode="fsdp", checkpoint_dir=checkpoint_dir)
  if jax.process_index() == 0:
    with open(out_path, "w") as f:
      json.dump({"losses": losses, "checksum": common.checksum(params)}, f)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  main(sys.argv[1], sys.argv[2])
