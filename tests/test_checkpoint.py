"""Checkpointer (Orbax) round trips, keep-N, atomicity, shardings, and preemption handling."""
import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from w2v2_jax.train import checkpoint as ckpt_lib
from w2v2_jax.train.checkpoint import Checkpointer, PreemptionGuard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(seed=0):
  params = {"dense": {"kernel": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) / 7 + seed,
                      "bias": jnp.full((4,), 0.5, jnp.bfloat16)},
            "scale": jnp.float32(1.25)}
  tx = optax.adamw(1e-3, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01)
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.1, params)
  _, opt_state = tx.update(grads, opt_state, params)       # non-trivial moments and count
  return {"params": params, "opt_state": opt_state, "step": jnp.int32(7 + seed),
          "rng": jax.random.fold_in(jax.random.key(0), seed),
          "rng_rbg": jax.random.key(seed + 11, impl="rbg")}


def _leaves_equal(a, b):
  """Bit-exact equality of two pytrees with the same structure, typed keys included."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape, (x, y)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert jax.random.key_impl(x) == jax.random.key_impl(y)
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    as_bytes = lambda v: np.asarray(v).reshape(-1).view(np.uint8)
    np.testing.assert_array_equal(as_bytes(x), as_bytes(y))


def test_round_trip_bit_exact_with_typed_keys_and_adam(tmp_path):
  state = _state()
  with Checkpointer(tmp_path, save_every=1) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(7, state, {"epoch": 1, "offset": np.int64(42)}, config_json='{"lr": 0.0005}')
    ckpt.wait()
  with Checkpointer(tmp_path) as ckpt:                     # a fresh process would see the same
    assert ckpt.latest_step() == 7
    restored, data = ckpt.restore(state_template=_state(seed=1))
    _leaves_equal(state, restored)
    assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
    assert jax.random.key_impl(restored["rng_rbg"]) == "rbg"
    assert data == {"epoch": 1, "offset": 42}
    assert ckpt.restore_config() == {"lr": 0.0005}
    # An abstract template (ShapeDtypeStructs, keys included) works as well as a concrete one.
    abstract = jax.eval_shape(lambda: _state(seed=2))
    restored, _ = ckpt.restore(7, state_template=abstract)
    _leaves_equal(state, restored)
    # The restored key continues the same random stream.
    np.testing.assert_array_equal(jax.random.uniform(restored["rng"], (3,)),
                                  jax.random.uniform(state["rng"], (3,)))


def test_keep_n_save_every_force_and_config_survives(tmp_path):
  state = _state()
  ckpt = Checkpointer(tmp_path, keep=2, save_every=10, async_save=True)
  saved = [s for s in range(1, 41) if ckpt.save(s, state, {"pos": s},
                                                 config_json={"name": "t"} if s == 1 else None)]
  assert saved == [10, 20, 30, 40]
  assert not ckpt.should_save(41) and ckpt.should_save(50)
  assert ckpt.save(43, state, {"pos": 43}, force=True)      # preemption: any new step
  assert not ckpt.save(43, state, {"pos": 43}, force=True)  # never overwrites
  ckpt.wait()
  assert ckpt.all_steps() == [40, 43]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["40", "43"]
  assert ckpt.restore_config(40) == {"name": "t"}           # the first checkpoint is long gone
  _, data = ckpt.restore(40, state_template=state)
  assert data == {"pos": 40}
  ckpt.close()


def test_async_save_then_wait(tmp_path):
  big = {"w": jnp.ones((512, 1024), jnp.float32), "rng": jax.random.key(3)}
  ckpt = Checkpointer(tmp_path, save_every=1, async_save=True)
  assert ckpt.save(1, big, None)
  ckpt.wait()
  assert (tmp_path / "checkpoints" / "1" / "state").is_dir()
  assert not [p for p in os.listdir(tmp_path / "checkpoints") if "tmp" in p]
  restored, data = ckpt.restore(state_template=big)
  assert data is None
  _leaves_equal(big, restored)
  ckpt.close()


def test_relative_workdir(tmp_path, monkeypatch):
  """`--workdir runs/x` (as `make demo` passes): Orbax needs absolute paths, the Checkpointer makes them."""
  monkeypatch.chdir(tmp_path)
  state = _state()
  with Checkpointer(os.path.join("runs", "rel"), save_every=1, async_save=True) as ckpt:
    assert ckpt.save(1, state, {"epoch": 2})
    ckpt.wait()
    assert str(ckpt.directory) == str(tmp_path / "runs" / "rel" / "checkpoints")
  restored, data = Checkpointer("runs/rel").restore(state_template=state)
  assert data == {"epoch": 2}
  _leaves_equal(state, restored)


def test_run_directories_orbax_cannot_write_are_refused(tmp_path):
  """s3:// (this Orbax turns it into a relative path) is refused by the checkpointer and by the training
  loops before any work, naming the directory; gs:// and local paths pass."""
  from w2v2_jax import configs  # pylint: disable=import-outside-toplevel
  from w2v2_jax.train import loop  # pylint: disable=import-outside-toplevel
  assert ckpt_lib.check_run_dir("gs://bucket/run") == "gs://bucket/run"
  assert ckpt_lib.check_run_dir("rel/run") == os.path.abspath("rel/run")
  with pytest.raises(ValueError, match=r"run directory s3://bucket/run: Orbax .* gs://"):
    Checkpointer("s3://bucket/run")
  cfg = configs.get("pretrain", "tiny")
  cfg.data.train_manifest = str(tmp_path / "missing.tsv")     # never read: the refusal comes first
  for train in (loop.pretrain, loop.finetune):
    with pytest.raises(ValueError, match="run directory s3://bucket/run"):
      train(cfg if train is loop.pretrain else configs.get("finetune", "tiny"), "s3://bucket/run")


def test_half_written_checkpoint_is_ignored(tmp_path):
  state = _state()
  with Checkpointer(tmp_path, save_every=1) as ckpt:
    ckpt.save(5, state, {"pos": 5})
  # A crash during the save of step 9 leaves Orbax's temporary directory behind.
  tmp_dir = tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-1234567"
  (tmp_dir / "state").mkdir(parents=True)
  (tmp_dir / "state" / "garbage").write_bytes(b"\0" * 100)
  ckpt = Checkpointer(tmp_path, save_every=1)
  assert ckpt.latest_step() == 5
  assert ckpt.all_steps() == [5]
  _, data = ckpt.restore(state_template=state)
  assert data == {"pos": 5}
  assert ckpt.save(9, state, {"pos": 9}, force=True)       # the same step saves fine again
  ckpt.wait()
  assert ckpt.latest_step() == 9
  assert not [p for p in os.listdir(tmp_path / "checkpoints") if "tmp" in p]
  ckpt.close()


def test_restore_errors(tmp_path):
  ckpt = Checkpointer(tmp_path)
  with pytest.raises(FileNotFoundError):
    ckpt.restore(state_template=_state())
  with pytest.raises(TypeError):
    ckpt.restore(_state())                                  # template passed as the step
  with pytest.raises(ValueError):
    Checkpointer(tmp_path, keep=0)
  ckpt.close()


def test_preemption_guard_in_process():
  previous = signal.getsignal(signal.SIGTERM)
  with PreemptionGuard() as guard:
    assert not guard.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(100):                   # the handler runs between bytecodes of the main thread
      if guard.signalled:
        break
      time.sleep(0.01)
    assert guard.should_stop(2) and ckpt_lib.should_stop() and ckpt_lib.reached_preemption(2)
  assert signal.getsignal(signal.SIGTERM) is previous
  assert not ckpt_lib.should_stop()


# -- subprocess tests: fresh JAX runtimes with their own device counts ---------------------------

def _env(devices):
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return env


def _run_script(tmp_path, name, code, *args, devices=1, timeout=120):
  script = tmp_path / name
  script.write_text(textwrap.dedent(code))
  return subprocess.run([sys.executable, str(script), *map(str, args)], env=_env(devices),
                        capture_output=True, text=True, timeout=timeout, check=False)


def _result(stdout):
  lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
  assert lines, stdout
  return json.loads(lines[-1][len("RESULT "):])


def test_restore_shardings_of_template_on_8_devices(tmp_path):
  code = """
    import sys, json
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from w2v2_jax.train.checkpoint import Checkpointer
    assert jax.device_count() == 8
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    def put(x, spec):
      return jax.device_put(x, NamedSharding(mesh, spec))
    params = {"w": put(jnp.arange(64.0).reshape(8, 8), P("data", "model")), "b": put(jnp.ones(8), P())}
    state = {"params": params, "opt_state": optax.adam(1e-3).init(params),
             "step": put(jnp.int32(3), P()), "rng": put(jax.random.key(5), P())}
    ckpt = Checkpointer(sys.argv[1], save_every=1)
    ckpt.save(3, state, {"pos": 3})
    ckpt.wait()
    # Restore into a different layout: w sharded the other way, b sharded instead of replicated.
    specs = {"w": P("model", "data"), "b": P("data")}
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    template["params"] = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, specs[k]))
                          for k, v in params.items()}
    restored, data = ckpt.restore(state_template=template)
    ckpt.close()
    out = {"data": data}
    out["params_ok"] = all(restored["params"][k].sharding == template["params"][k].sharding and
                           np.array_equal(restored["params"][k], params[k]) for k in params)
    mu = restored["opt_state"][0].mu["w"]
    out["mu_ok"] = mu.sharding == params["w"].sharding and len(mu.addressable_shards) == 8
    rng, rng0 = restored["rng"], state["rng"]
    out["rng_ok"] = (rng.dtype == rng0.dtype and rng.sharding == rng0.sharding
                     and np.array_equal(jax.random.key_data(rng), jax.random.key_data(rng0)))
    out["w_shard_shape"] = list(restored["params"]["w"].addressable_shards[0].data.shape)
    print("RESULT " + json.dumps(out))
  """
  proc = _run_script(tmp_path, "sharded.py", code, tmp_path / "run", devices=8)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = _result(proc.stdout)
  assert res == {"data": {"pos": 3}, "params_ok": True, "mu_ok": True, "rng_ok": True,
                 "w_shard_shape": [4, 2]}


LOOP = """
  import json, os, sys, time
  import jax, jax.numpy as jnp
  from w2v2_jax.train.checkpoint import Checkpointer, PreemptionGuard
  if "W2V2_COORDINATOR" in os.environ:
    jax.distributed.initialize(coordinator_address=os.environ["W2V2_COORDINATOR"],
                               num_processes=int(os.environ["W2V2_NUM_PROCESSES"]),
                               process_id=int(os.environ["W2V2_PROCESS_ID"]))
  from jax.sharding import NamedSharding, PartitionSpec as P
  workdir = sys.argv[1]
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  init = jax.jit(lambda: {"w": jnp.zeros((4, 3)), "step": jnp.int32(0), "rng": jax.random.key(0)},
                 out_shardings=NamedSharding(mesh, P()))
  update = jax.jit(lambda s: {"w": s["w"] + 1, "step": s["step"] + 1, "rng": jax.random.fold_in(s["rng"], 1)})
  state = init()
  ckpt = Checkpointer(workdir, save_every=1_000_000)
  with PreemptionGuard() as guard:
    for step in range(1, 100_000):
      state = update(state)
      print(f"step {step}", flush=True)
      time.sleep(0.01)
      stop = guard.should_stop(step)
      if stop or ckpt.should_save(step):
        ckpt.save(step, state, {"pos": step, "process": jax.process_index()}, force=stop)
      if stop:
        break
  ckpt.close()
  ckpt = Checkpointer(workdir)
  restored, data = ckpt.restore(state_template=init())
  print("RESULT " + json.dumps({"stopped": step, "latest": ckpt.latest_step(), "data": data,
                                "w": float(restored["w"].addressable_data(0)[0, 0]),
                                "step": int(restored["step"].addressable_data(0))}), flush=True)
  ckpt.close()
"""


def _wait_for_line(proc, prefix, timeout):
  """Reads proc.stdout until a line starting with `prefix`; returns the lines read."""
  deadline, lines = time.monotonic() + timeout, []
  while time.monotonic() < deadline:
    ready, _, _ = select.select([proc.stdout], [], [], 0.5)
    if ready:
      line = proc.stdout.readline()
      if not line:
        break
      lines.append(line)
      if line.startswith(prefix):
        return lines
  raise AssertionError(f"no line starting with {prefix!r} within {timeout}s: {lines[-20:]}")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  script = tmp_path / "loop.py"
  script.write_text(textwrap.dedent(LOOP))
  proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run")], env=_env(1),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    _wait_for_line(proc, "step 5", timeout=60)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
  finally:
    proc.kill()
  assert proc.returncode == 0, err[-3000:]
  res = _result(out)
  assert res["stopped"] >= 5
  assert res["latest"] == res["stopped"] == res["step"] == res["w"]
  assert res["data"] == {"pos": res["stopped"], "process": 0}
  assert Checkpointer(tmp_path / "run").latest_step() == res["stopped"]


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
  script = tmp_path / "loop.py"
  script.write_text(textwrap.dedent(LOOP))
  port = _free_port()
  procs = []
  for i in range(2):
    env = _env(2)
    env.update(W2V2_COORDINATOR=f"127.0.0.1:{port}", W2V2_NUM_PROCESSES="2", W2V2_PROCESS_ID=str(i))
    procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path / "run")], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  try:
    _wait_for_line(procs[1], "step 5", timeout=90)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=90) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  results = [_result(out) for out, _ in outs]
  stopped = results[0]["stopped"]
  for i, res in enumerate(results):
    assert res["stopped"] == res["latest"] == res["step"] == res["w"] == stopped
    assert res["data"] == {"pos": stopped, "process": i}      # each host gets its own data state
