"""Shared test set-up: CPU only, deterministic, 8 fake devices; tests/ importable for its helper modules."""
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight fake CPU devices for the data-parallel tests; single-device code just uses the first.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
  sys.path.insert(0, TESTS)

# One persistent XLA compilation cache for the whole run, shared by the xdist workers and every subprocess
# the tests start (the CLI, the demo, the notebooks, the multi-host workers): the same programs (a train
# step of the same config and shapes) are compiled once, not once per process or per jit object. Created
# by the process that starts the run (before xdist spawns the workers, which inherit the environment) and
# removed when it exits; a JAX_COMPILATION_CACHE_DIR set by the caller is used as given and kept.
if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  _CACHE = tempfile.mkdtemp(prefix="w2v2-jax-test-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
