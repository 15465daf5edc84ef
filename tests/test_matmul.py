"""bf16 on XLA:CPU's bf16 kernels: the Dense matmuls (models/matmul.py) and the conv encoder's strided convs
(models/conv.py), the same products as everywhere else."""
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from w2v2_jax import backend, models
from w2v2_jax.models import conv, matmul
from w2v2_jax.models.presets import get as preset

BF16 = jnp.bfloat16


def _dense_dims(x):
  return (((x.ndim - 1,), (0,)), ((), ()))


def _reference(x, w, dy):
  """y, dx, dw in float64 from the bf16 values, rounded to bf16 (float32 accumulation's result, up to
  the accumulation order)."""
  x64, w64, dy64 = (np.asarray(a.astype(jnp.float32), np.float64) for a in (x, w, dy))
  y = x64 @ w64
  dx = dy64 @ w64.T
  dw = x64.reshape(-1, x64.shape[-1]).T @ dy64.reshape(-1, dy64.shape[-1])
  return y, dx, dw


@pytest.mark.parametrize("shape", [(4, 199, 64), (6, 64), (13, 64), (3, 5, 64)])
def test_bf16_dense_forward_and_gradients_match_float64(shape):
  """Rows that factor (4 x 199, 6) take the reordered-rows weight gradient, 13 rows the plain one."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape), BF16)
  w = jnp.asarray(rng.standard_normal((64, 48)), BF16)
  dy = jnp.asarray(rng.standard_normal(shape[:-1] + (48,)), BF16)
  y, vjp = jax.vjp(jax.jit(lambda x, w: matmul.dot_general(x, w, _dense_dims(x))), x, w)
  dx, dw = vjp(dy)
  assert y.dtype == dx.dtype == dw.dtype == BF16 and y.shape == shape[:-1] + (48,) and dw.shape == w.shape
  for ours, ref in zip((y, dx, dw), _reference(x, w, dy)):
    ours = np.asarray(ours.astype(jnp.float32), np.float64)
    # One bf16 rounding of the float32 sum: relative error <= 2^-8 of each value (plus float32 noise).
    assert np.all(np.abs(ours - ref) <= 2.0 ** -8 * np.abs(ref) + 1e-3), np.max(np.abs(ours - ref))


def _dot_operand_types(dot):
  """For each matmul kernel call in the compiled CPU program of a Dense layer's forward and backward
  (x (4, 199, 64) @ w (64, 48)): the element types of its operands."""
  def fwd_bwd(x, w, dy):
    y, vjp = jax.vjp(lambda x, w: dot(x, w, _dense_dims(x)), x, w)
    return y, vjp(dy)
  args = (jnp.zeros((4, 199, 64), BF16), jnp.zeros((64, 48), BF16), jnp.zeros((4, 199, 48), BF16))
  text = jax.jit(fwd_bwd).lower(*args).compile().as_text()
  entry = text[text.index("ENTRY"):].splitlines()         # the program's own instructions
  types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", "\n".join(entry)))
  return [tuple(types[name] for name in re.findall(r"%([\w.\-]+)", line.split("fusion(", 1)[1].split(")")[0]))
          for line in entry if '"__ynn_fusion"' in line or " dot(" in line]


def test_the_cpu_program_multiplies_bf16_operands_forward_and_backward():
  """XLA:CPU runs all three dots (y, dx, dw) of our bf16 Dense layer on bf16 operands (its bf16
  kernels); plain lax.dot_general converts operands to float32 first for at least one of them."""
  ours = _dot_operand_types(matmul.dot_general)
  assert len(ours) == 3 and all(t == ("bf16", "bf16") for t in ours), ours
  assert any("f32" in t for t in _dot_operand_types(jax.lax.dot_general))


def test_other_platforms_and_float32_keep_lax_dot_general():
  x = jnp.zeros((4, 10, 64), BF16)
  w = jnp.zeros((64, 48), BF16)
  # A new function for each trace: traces are cached per function, not per target platform.
  traced = lambda x, w: str(jax.make_jaxpr(lambda x, w: matmul.dot_general(x, w, _dense_dims(x)))(x, w))
  with backend.compiling_for("tpu"):
    tpu = traced(x, w)
  assert "custom_vjp" not in tpu and "dot_general" in tpu
  assert "custom_vjp" in traced(x, w)
  assert "custom_vjp" not in traced(x.astype(jnp.float32), w.astype(jnp.float32))


def test_bf16_model_gradients_match_the_native_formulation():
  """The tiny bf16 encoder's gradient with the CPU paths (Dense matmuls, folded convs) equals the one
  traced as for a TPU (lax's bf16 dots and convolutions, run here on CPU) up to bf16 rounding."""
  cfg = preset("tiny").replace(task="encoder", dtype="bfloat16")
  module = models.build(cfg)
  audio = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8000)), jnp.float32)
  params = module.init(jax.random.PRNGKey(0), audio)["params"]

  shape = jax.eval_shape(lambda p: module.apply({"params": p}, audio)["last_hidden_state"], params).shape
  weights = jnp.asarray(np.random.default_rng(2).standard_normal(shape), jnp.float32)

  def grad():       # a new function each call: traces are cached per function, not per platform
    def loss(p):   # a fixed cotangent: the gradients differ only by what the two formulations round
      h = module.apply({"params": p}, audio)["last_hidden_state"].astype(jnp.float32)
      return jnp.sum(h * weights)
    return jax.jit(jax.grad(loss))(params)

  ours = grad()
  with backend.compiling_for("tpu"):
    native = grad()
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(ours),
                                                      jax.tree_util.tree_leaves(native)))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree_util.tree_leaves(native)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    name = jax.tree_util.keystr(path)
    if not np.any(b):                    # unused in this forward pass (mask_emb)
      assert not np.any(a), name
      continue
    if "k_proj" in name and "bias" in name:
      # Zero in exact arithmetic (a key bias adds the same constant to a query's every score): rounding.
      assert np.max(np.abs(a)) < 1e-3 and np.max(np.abs(b)) < 1e-3, name
      continue
    scale = np.max(np.abs(b))
    assert np.max(np.abs(a - b)) < 0.05 * scale, name
    assert a.size < 4 or np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99, name


@pytest.mark.parametrize("k,s,length", [(3, 2, 101), (3, 2, 100), (3, 2, 3), (2, 2, 101), (2, 2, 64), (5, 3, 40)])
def test_folded_bf16_conv_matches_the_float32_convolution(k, s, length):
  """The conv encoder's strided convs in bf16 on CPU (matmuls over stride-folded frames): output and both
  gradients equal XLA's float32 convolution of the same bf16 values, up to one bf16 rounding."""
  rng = np.random.default_rng(k * 100 + length)
  x = jnp.asarray(rng.standard_normal((2, length, 16)), BF16)
  w = jnp.asarray(rng.standard_normal((k, 16, 24)) * 0.3, BF16)
  traced = str(jax.make_jaxpr(lambda x, w: conv.strided_conv(x, w, s))(x, w))
  assert "custom_vjp" in traced                    # the folded matmuls, not lax's convolution
  y, vjp = jax.vjp(jax.jit(lambda x, w: conv.strided_conv(x, w, s)), x, w)
  dy = jnp.asarray(rng.standard_normal(y.shape), BF16)
  ref_y, ref_vjp = jax.vjp(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (s,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"), precision="highest"),
      x.astype(jnp.float32), w.astype(jnp.float32))
  assert y.shape == ref_y.shape == (2, (length - k) // s + 1, 24)
  for ours, ref in zip((y,) + vjp(dy), (ref_y,) + ref_vjp(dy.astype(jnp.float32))):
    ours, ref = np.asarray(ours.astype(jnp.float32)), np.asarray(ref)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    assert np.all(np.abs(ours - ref) <= 2.0 ** -7 * np.abs(ref) + 1e-2 * np.max(np.abs(ref))), \
        np.max(np.abs(ours - ref))


def test_float32_and_other_strides_keep_xla_convolutions():
  x = jnp.zeros((2, 50, 8), BF16)
  for xs, w, s in ((x.astype(jnp.float32), jnp.zeros((3, 8, 8)), 2),    # float32
                   (x, jnp.zeros((11, 8, 8), BF16), 5),                  # k > 2 s
                   (x, jnp.zeros((2, 8, 8), BF16), 1)):                  # stride 1
    traced = str(jax.make_jaxpr(lambda x, w, s=s: conv.strided_conv(x, w, s))(xs, w))
    assert "conv_general_dilated" in traced and "custom_vjp" not in traced


@pytest.mark.parametrize("k,s", [(3, 2), (2, 2), (2, 1), (10, 5)])
def test_bf16_conv_with_a_float32_result_is_not_rounded(k, s):
  """strided_conv(bf16, bf16, out_dtype=float32) on CPU: the bf16 values' products summed in float32 and
  left unrounded (folded matmuls for k=2..2s, XLA's float32 convolution otherwise)."""
  rng = np.random.default_rng(k * 10 + s)
  x = jnp.asarray(rng.standard_normal((2, 101, 16)), BF16)
  w = jnp.asarray(rng.standard_normal((k, 16, 24)) * 0.3, BF16)
  y, vjp = jax.vjp(jax.jit(lambda x, w: conv.strided_conv(x, w, s, jnp.float32)), x, w)
  dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  ref_y = jax.lax.conv_general_dilated(x.astype(jnp.float32), w.astype(jnp.float32), (s,), "VALID",
                                       dimension_numbers=("NWC", "WIO", "NWC"), precision="highest")
  assert y.dtype == jnp.float32 and y.shape == ref_y.shape
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), rtol=1e-5, atol=1e-5)
  # A bf16 result is that sum rounded once: it differs, by at most half a bf16 unit.
  rounded = np.asarray(conv.strided_conv(x, w, s).astype(jnp.float32))
  assert not np.array_equal(rounded, np.asarray(y))
  assert np.all(np.abs(rounded - np.asarray(ref_y)) <= 2.0 ** -8 * np.abs(np.asarray(ref_y)) + 1e-5)
  dx, dw = vjp(dy)
  assert dx.dtype == x.dtype and dw.dtype == w.dtype and dx.shape == x.shape and dw.shape == w.shape


def _elementwise_dtypes(platform=None):
  """The dtypes of every erf / erfc (the exact GELU) and of the operands of every batched dot (the attention core's two
  einsums) in the tiny bf16 encoder's forward pass, traced on CPU or as for `platform`; and the dtype of
  its output."""
  cfg = preset("tiny").replace(task="encoder", dtype="bfloat16")
  module = models.build(cfg)
  audio = jnp.zeros((2, 8000), jnp.float32)
  params = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), audio))["params"]
  def trace():    # a new function each call: traces are cached per function, not per platform
    return jax.make_jaxpr(lambda p, a: module.apply({"params": p}, a)["last_hidden_state"])(params, audio)
  if platform is None:
    jaxpr = trace()
  else:
    with backend.compiling_for(platform):
      jaxpr = trace()
  found = {"erf": set(), "batched_dot": set()}
  def walk(jp):
    for eqn in jp.eqns:
      if eqn.primitive.name in ("erf", "erfc"):
        found["erf"].add(str(eqn.outvars[0].aval.dtype))
      if eqn.primitive.name == "dot_general" and eqn.params["dimension_numbers"][1][0]:
        found["batched_dot"].update(str(v.aval.dtype) for v in eqn.invars)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jaxpr.jaxpr)
  return found, str(jaxpr.out_avals[0].dtype)


def test_bf16_model_keeps_elementwise_work_in_float32_on_cpu_only():
  """XLA:CPU emulates bf16 arithmetic op by op: on CPU a bf16 model's GELUs (conv encoder, positional
  conv, feed-forward) and attention core run in float32 (backend.elementwise_dtype); traced for a TPU
  they are bf16. The model's output is bf16 either way."""
  cpu, cpu_out = _elementwise_dtypes()
  tpu, tpu_out = _elementwise_dtypes("tpu")
  assert cpu_out == tpu_out == "bfloat16"
  assert cpu["erf"] == {"float32"} and cpu["batched_dot"] == {"float32"}, cpu
  assert tpu["erf"] == {"bfloat16"} and tpu["batched_dot"] == {"bfloat16"}, tpu
  assert backend.elementwise_dtype(jnp.float32) == jnp.float32
  with backend.compiling_for("tpu"):
    assert backend.elementwise_dtype(BF16) == BF16
  assert backend.elementwise_dtype(BF16) == jnp.float32
