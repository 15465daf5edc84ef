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


# The longest test files first (`pytest --durations`, this suite's wall time is what CI waits for): with
# `--dist loadfile` xdist hands out whole files in collection order, so a long file collected late ran
# on one worker while the other sat idle. Sorting is stable: the others keep their order.
_LONGEST_FIRST = ("test_demo.py", "test_fsdp.py", "test_aot.py", "test_notebooks.py", "test_train_step.py",
                  "test_multihost.py", "test_object_storage.py", "test_finetune_step.py", "test_finetune_loop.py",
                  "test_pretrain_loop.py", "test_models.py", "test_validation.py")


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))
