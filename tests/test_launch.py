"""Launch scripts: syntax, TPU pod dry run, local multi-process JAX run, Slurm environment wiring."""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ("tpu_pod.sh", "gpu_slurm.sbatch", "local_multihost.sh")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(args, env=None, timeout=120, **kwargs):
  full_env = dict(os.environ)
  full_env.update(env or {})
  return subprocess.run(args, env=full_env, capture_output=True, text=True, timeout=timeout, check=False,
                        **kwargs)


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
  proc = _run(["bash", "-n", os.path.join(LAUNCH, script)])
  assert proc.returncode == 0, proc.stderr


def _fake_bin(tmp_path, name, body):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  path = bin_dir / name
  path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
  path.chmod(0o755)
  return str(bin_dir)


def test_tpu_pod_dry_run_prints_all_commands(tmp_path):
  # A gcloud that records any call: a dry run must not make one.
  marker = tmp_path / "gcloud-called"
  bin_dir = _fake_bin(tmp_path, "gcloud", f"touch {marker}\nexit 97\n")
  proc = _run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), "--dry-run", "--name", "pod1",
               "--zone=europe-west4-a", "--accelerator-type", "v4-64", "--version", "tpu-ubuntu2204-base",
               "--bucket", "my-bucket", "--config", "pretrain:large",
               "create", "install", "train", "delete", "--", "--config.train.steps=10"],
              env={"PATH": bin_dir + os.pathsep + os.environ["PATH"], "TMPDIR": str(tmp_path)})
  assert proc.returncode == 0, proc.stderr
  assert not marker.exists()
  lines = proc.stdout.splitlines()
  gcloud = [l for l in lines if l.startswith("gcloud ")]
  assert len(gcloud) == 5, proc.stdout
  create, scp, install, train, delete = gcloud
  assert create.startswith("gcloud compute tpus tpu-vm create pod1 ")
  for flag in ("--zone=europe-west4-a", "--accelerator-type=v4-64", "--version=tpu-ubuntu2204-base"):
    assert flag in create
  assert scp.startswith("gcloud compute tpus tpu-vm scp ") and "--worker=all" in scp and "pod1:" in scp
  assert install.startswith("gcloud compute tpus tpu-vm ssh pod1 ") and "--worker=all" in install
  assert "pip install" in install and "jax[tpu]" in install
  assert train.startswith("gcloud compute tpus tpu-vm ssh pod1 ") and "--worker=all" in train
  assert re.search(r"pretrain --config=pretrain:large --workdir=gs://my-bucket/w2v2/pod1 "
                   r"--config.train.steps=10", train), train
  assert delete.startswith("gcloud compute tpus tpu-vm delete pod1 ") and "--zone=europe-west4-a" in delete
  # The archive step is printed, not run.
  assert any(l.startswith("tar -czf ") for l in lines)
  assert not list(tmp_path.glob("*.tar.gz"))


def test_tpu_pod_usage_and_errors():
  script = os.path.join(LAUNCH, "tpu_pod.sh")
  proc = _run(["bash", script, "--help"])
  assert proc.returncode == 0 and "--accelerator-type" in proc.stdout and "--dry-run" in proc.stdout
  assert _run(["bash", script, "--dry-run", "--bogus", "create"]).returncode == 2
  assert _run(["bash", script, "--dry-run"]).returncode == 2                      # no command
  proc = _run(["bash", script, "--dry-run", "train"])                             # no bucket/workdir
  assert proc.returncode == 2 and "--bucket" in proc.stderr
  proc = _run(["bash", script, "--dry-run", "--bucket", "b", "--name", "pod", "train"])  # the default config
  assert proc.returncode == 0 and "pretrain --config=pretrain:base --workdir=gs://b/w2v2/pod" in proc.stdout, proc.stdout


DIST_SCRIPT = """
  import os, sys
  import jax, numpy as np
  from jax.experimental import multihost_utils
  from jax.sharding import NamedSharding, PartitionSpec as P
  jax.distributed.initialize(coordinator_address=os.environ["W2V2_COORDINATOR"],
                             num_processes=int(os.environ["W2V2_NUM_PROCESSES"]),
                             process_id=int(os.environ["W2V2_PROCESS_ID"]))
  assert jax.process_count() == 2, jax.process_count()
  assert jax.device_count() == 4 and jax.local_device_count() == 2, jax.devices()
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  # Each device holds (its process id + 1); the psum over all devices is 1 + 1 + 2 + 2 = 6.
  local = np.full((jax.local_device_count(),), jax.process_index() + 1.0, np.float32)
  x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
  total = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, "data"), mesh=mesh, in_specs=P("data"),
                                out_specs=P()))(x)
  gathered = np.asarray(multihost_utils.process_allgather(total, tiled=True))
  assert gathered.ravel()[0] == 6.0, gathered
  print(f"OK process {jax.process_index()} psum {gathered.ravel()[0]} args {sys.argv[1:]}", flush=True)
"""


def test_local_multihost_two_processes(tmp_path):
  script = tmp_path / "dist.py"
  script.write_text(textwrap.dedent(DIST_SCRIPT))
  proc = _run(["bash", os.path.join(LAUNCH, "local_multihost.sh"), "2", "--flag", "two words"],
              env={"W2V2_CMD": f"{sys.executable} {script}", "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  for i in range(2):
    assert f"[{i}] OK process {i} psum 6.0 args ['--flag', 'two words']" in proc.stdout, proc.stdout[-3000:]


FAIL_SCRIPT = """
  import os, sys, time
  if os.environ["W2V2_PROCESS_ID"] == "1":
    print("process 1 fails", flush=True)
    sys.exit(3)
  import jax
  # Process 0 would wait for process 1 forever: the launcher must stop it.
  jax.distributed.initialize(coordinator_address=os.environ["W2V2_COORDINATOR"], num_processes=2,
                             process_id=0, initialization_timeout=300)
  time.sleep(300)
"""


def test_local_multihost_one_failure_fails_all(tmp_path):
  script = tmp_path / "fail.py"
  script.write_text(textwrap.dedent(FAIL_SCRIPT))
  proc = _run(["bash", os.path.join(LAUNCH, "local_multihost.sh"), "2"], timeout=60,
              env={"W2V2_CMD": f"{sys.executable} {script}", "W2V2_KILL_GRACE": "5", "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 3, proc.stdout + proc.stderr
  assert "[1] process 1 fails" in proc.stdout
  assert "process 1 exited with status 3" in proc.stderr


def test_local_multihost_usage():
  script = os.path.join(LAUNCH, "local_multihost.sh")
  assert _run(["bash", script]).returncode == 2
  assert _run(["bash", script, "zero"]).returncode == 2
  proc = _run(["bash", script, "--help"])
  assert proc.returncode == 0 and "W2V2_CMD" in proc.stdout


ENV_DUMP = """
  import json, os, sys
  keys = ("W2V2_COORDINATOR", "W2V2_NUM_PROCESSES", "W2V2_PROCESS_ID", "CUDA_VISIBLE_DEVICES")
  print("TASK " + json.dumps({"env": {k: os.environ.get(k) for k in keys}, "args": sys.argv[1:]}))
"""

# srun stand-in: runs the command once per task, one after another, with Slurm's task variables.
FAKE_SRUN = """
  nodes=1; per_node=1
  while [[ "$1" == -* ]]; do
    case "$1" in
      --nodes=*) nodes=${1#*=} ;;
      --ntasks-per-node=*) per_node=${1#*=} ;;
    esac
    shift
  done
  n=$((nodes * per_node))
  for ((i = 0; i < n; i++)); do
    SLURM_NTASKS=$n SLURM_PROCID=$i SLURM_LOCALID=$((i % per_node)) "$@" || exit $?
  done
"""


@pytest.mark.parametrize("mode,tasks", [("per_gpu", 8), ("per_node", 2)])
def test_gpu_slurm_environment(tmp_path, mode, tasks):
  _fake_bin(tmp_path, "srun", FAKE_SRUN)
  bin_dir = _fake_bin(tmp_path, "scontrol", 'printf "gpu-node-a\\ngpu-node-b\\n"\n')
  dump = tmp_path / "dump.py"
  dump.write_text(textwrap.dedent(ENV_DUMP))
  env = {"PATH": bin_dir + os.pathsep + os.environ["PATH"], "SLURM_JOB_ID": "4242",
         "SLURM_JOB_NODELIST": "gpu-node-[a-b]", "SLURM_JOB_NUM_NODES": "2", "GPUS_PER_NODE": "4",
         "PROCESS_MODE": mode, "WORKDIR": "/shared/run1", "W2V2_CMD": f"{sys.executable} {dump}"}
  full_env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
  full_env.update(env)
  proc = subprocess.run(["bash", os.path.join(LAUNCH, "gpu_slurm.sbatch"), "--config.train.steps=5"],
                        env=full_env, capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 0, proc.stderr
  tasks_out = [json.loads(l[5:]) for l in proc.stdout.splitlines() if l.startswith("TASK ")]
  assert len(tasks_out) == tasks, proc.stdout
  for i, task in enumerate(tasks_out):
    assert task["env"]["W2V2_COORDINATOR"] == "gpu-node-a:24242"
    assert task["env"]["W2V2_NUM_PROCESSES"] == str(tasks)
    assert task["env"]["W2V2_PROCESS_ID"] == str(i)
    assert task["env"]["CUDA_VISIBLE_DEVICES"] == (str(i % 4) if mode == "per_gpu" else None)
    assert task["args"] == ["pretrain", "--config=pretrain:base", "--workdir=/shared/run1",
                            "--config.train.steps=5"]
