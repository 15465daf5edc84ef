"""Checkpoint conversion: Hugging Face transformers and fairseq wav2vec 2.0 <-> our Flax params.

  from_hf(path)                      -> (ModelConfig, params)  a transformers directory
  to_hf(model_config, params, out)   writes config.json + model.safetensors (no torch needed)
  from_fairseq(path)                 -> (ModelConfig, params)  a fairseq pretraining or CTC checkpoint

`params` is the plain nested dict of float32 numpy arrays passed as `module.apply({'params': params}, ...)`
for `module = w2v2_jax.models.build(model_config)`: every conversion checks it against the tree and shapes
that `module.init` produces (obtained with `jax.eval_shape`, nothing is computed).

Layouts (PyTorch -> ours): Linear weight (out, in) -> kernel (in, out); Conv1d weight (out, in/groups, k)
-> kernel (k, in/groups, out), the same for the positional conv's weight-norm direction `weight_v`;
weight-norm magnitude g (1, 1, K) -> (K,); codebook (1, G*V, d) -> (G*V, d); LayerNorm/GroupNorm weight ->
scale. Weight norm is read in both key forms: `weight_g`/`weight_v` (torch.nn.utils.weight_norm, fairseq,
most Hub checkpoints) and `parametrizations.weight.original0`/`original1` (torch >= 2.1's
torch.nn.utils.parametrizations.weight_norm, which transformers uses and saves).

Fields Hugging Face and fairseq do not carry keep ModelConfig's defaults: from HF, `feature_grad_mult`
(1.0), `feature_pen_weight` (10.0; HF has no feature penalty), `cross_sample_negatives`,
`require_same_masks`, `dtype`, `remat` and `scan_layers`; `to_hf` drops them. Params come back per layer
(`layers_N`); `models.stack_layers` gives the scanned layout (`scan_layers=True`), and `to_hf` takes
either.

Length: one file (~700 lines) because both formats and both directions share one parameter-name table,
one layout transform and one tree check; split, each part would reach into the others' private helpers.
"""
from __future__ import annotations

import argparse
import ast
import functools
import json
import os
import re
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from w2v2_jax.models import ModelConfig, build, unstack_layers

__all__ = ["from_hf", "to_hf", "from_fairseq", "hf_config_to_model_config", "model_config_to_hf",
           "parse_conv_layers"]

Params = Dict[str, Any]

# ====================================================================================== config tables
# Hugging Face Wav2Vec2Config <-> ModelConfig: the one place where field names are mapped.
# (ModelConfig field, Wav2Vec2Config field, the Wav2Vec2Config default used when config.json lacks it)
HF_FIELDS: Tuple[Tuple[str, str, Any], ...] = (
    ("conv_bias", "conv_bias", False),
    ("encoder_embed_dim", "hidden_size", 768),
    ("encoder_layers", "num_hidden_layers", 12),
    ("encoder_ffn_embed_dim", "intermediate_size", 3072),
    ("encoder_attention_heads", "num_attention_heads", 12),
    ("layer_norm_first", "do_stable_layer_norm", False),
    ("conv_pos", "num_conv_pos_embeddings", 128),
    ("conv_pos_groups", "num_conv_pos_embedding_groups", 16),
    ("layer_norm_eps", "layer_norm_eps", 1e-5),
    ("dropout", "hidden_dropout", 0.1),
    ("attention_dropout", "attention_dropout", 0.1),
    ("activation_dropout", "activation_dropout", 0.1),
    ("dropout_input", "feat_proj_dropout", 0.0),
    ("dropout_features", "feat_quantizer_dropout", 0.0),
    ("encoder_layerdrop", "layerdrop", 0.1),
    ("final_dropout", "final_dropout", 0.1),
    ("final_dim", "proj_codevector_dim", 256),
    ("latent_vars", "num_codevectors_per_group", 320),
    ("latent_groups", "num_codevector_groups", 2),
    ("latent_dim", "codevector_dim", 256),            # to_hf writes the effective codebook dim (vq_dim)
    ("logit_temp", "contrastive_logits_temperature", 0.1),
    ("num_negatives", "num_negatives", 100),
    ("diversity_weight", "diversity_loss_weight", 0.1),
    ("mask_prob", "mask_time_prob", 0.05),             # 0 when apply_spec_augment is false
    ("mask_length", "mask_time_length", 10),
    ("mask_min_masks", "mask_time_min_masks", 2),
    ("mask_channel_prob", "mask_feature_prob", 0.0),   # 0 when apply_spec_augment is false
    ("mask_channel_length", "mask_feature_length", 10),
    ("mask_channel_min_masks", "mask_feature_min_masks", 0),
    ("vocab_size", "vocab_size", 32),                  # read for CTC models only; not written when 0
)
# conv_layers <-> conv_dim / conv_kernel / conv_stride (zipped); extractor_mode <-> feat_extract_norm:
HF_EXTRACTOR_MODES = {"group": "default", "layer": "layer_norm"}
HF_CONV_DEFAULTS = {"conv_dim": (512,) * 7, "conv_kernel": (10, 3, 3, 3, 3, 2, 2),
                    "conv_stride": (5, 2, 2, 2, 2, 2, 2)}
# Wav2Vec2Config settings that change the architecture in ways our models do not implement:
# (field, default, supported values).
HF_UNSUPPORTED = (
    ("model_type", "wav2vec2", ("wav2vec2",)),
    ("hidden_act", "gelu", ("gelu",)),                 # exact (erf) GELU only
    ("feat_extract_activation", "gelu", ("gelu",)),
    ("add_adapter", False, (False, None)),
    ("adapter_attn_dim", None, (None,)),
)
HF_ARCHITECTURES = {"pretrain": "Wav2Vec2ForPreTraining", "ctc": "Wav2Vec2ForCTC", "encoder": "Wav2Vec2Model"}

# fairseq Wav2Vec2Config (cfg.model of a pretraining checkpoint) -> ModelConfig. The names are fairseq's
# own; defaults are fairseq's (used when a legacy checkpoint lacks the field).
FAIRSEQ_FIELDS: Tuple[Tuple[str, str, Any], ...] = (
    ("extractor_mode", "extractor_mode", "default"),
    ("conv_bias", "conv_bias", False),
    ("feature_grad_mult", "feature_grad_mult", 1.0),
    ("encoder_embed_dim", "encoder_embed_dim", 768),
    ("encoder_layers", "encoder_layers", 12),
    ("encoder_ffn_embed_dim", "encoder_ffn_embed_dim", 3072),
    ("encoder_attention_heads", "encoder_attention_heads", 12),
    ("layer_norm_first", "layer_norm_first", False),
    ("conv_pos", "conv_pos", 128),
    ("conv_pos_groups", "conv_pos_groups", 16),
    ("dropout", "dropout", 0.1),
    ("attention_dropout", "attention_dropout", 0.1),
    ("activation_dropout", "activation_dropout", 0.0),
    ("dropout_input", "dropout_input", 0.0),
    ("dropout_features", "dropout_features", 0.0),
    ("encoder_layerdrop", "encoder_layerdrop", 0.0),
    ("final_dim", "final_dim", 0),                     # 0 means encoder_embed_dim
    ("latent_vars", "latent_vars", 320),
    ("latent_groups", "latent_groups", 2),
    ("latent_dim", "latent_dim", 0),                   # 0 means final_dim, as in ModelConfig
    ("logit_temp", "logit_temp", 0.1),
    ("num_negatives", "num_negatives", 100),
    ("cross_sample_negatives", "cross_sample_negatives", 0),
    ("mask_prob", "mask_prob", 0.65),
    ("mask_length", "mask_length", 10),
    ("require_same_masks", "require_same_masks", True),
    ("mask_channel_prob", "mask_channel_prob", 0.0),
    ("mask_channel_length", "mask_channel_length", 10),
)
# fairseq Wav2Vec2AsrConfig (cfg.model of a CTC checkpoint): the fine-tuning values it overrides.
FAIRSEQ_FINETUNE_FIELDS: Tuple[Tuple[str, str], ...] = (
    ("dropout", "dropout"),
    ("attention_dropout", "attention_dropout"),
    ("activation_dropout", "activation_dropout"),
    ("dropout_input", "dropout_input"),
    ("encoder_layerdrop", "layerdrop"),
    ("feature_grad_mult", "feature_grad_mult"),
    ("final_dropout", "final_dropout"),
    ("mask_prob", "mask_prob"),
    ("mask_length", "mask_length"),
    ("require_same_masks", "require_same_masks"),
    ("mask_channel_prob", "mask_channel_prob"),
    ("mask_channel_length", "mask_channel_length"),
)
# (field, default, supported values, applies to pretraining checkpoints only)
FAIRSEQ_UNSUPPORTED = (
    ("activation_fn", "gelu", ("gelu",), False),
    ("layer_type", "transformer", ("transformer",), False),
    ("pos_conv_depth", 1, (1,), False),
    ("quantize_input", False, (False,), False),
    ("quantize_targets", True, (True,), True),
    ("target_glu", False, (False,), True),
    ("quantizer_depth", 1, (1,), True),
)

# ====================================================================================== parameter names
# Our module or parameter path (regex, "/"-joined) -> HF name. {b} is the backbone prefix: "wav2vec2." in
# the task models, none in a bare Wav2Vec2Model.
HF_MODULES = (
    (r"wav2vec2/feature_extractor/conv_(\d+)", r"{b}feature_extractor.conv_layers.\1.conv"),
    (r"wav2vec2/feature_extractor/norm_(\d+)", r"{b}feature_extractor.conv_layers.\1.layer_norm"),
    (r"wav2vec2/layer_norm", r"{b}feature_projection.layer_norm"),
    (r"wav2vec2/post_extract_proj", r"{b}feature_projection.projection"),
    (r"wav2vec2/encoder/pos_conv", r"{b}encoder.pos_conv_embed.conv"),
    (r"wav2vec2/encoder/layer_norm", r"{b}encoder.layer_norm"),
    (r"wav2vec2/encoder/layers_(\d+)/self_attn/(q|k|v|out)_proj", r"{b}encoder.layers.\1.attention.\2_proj"),
    (r"wav2vec2/encoder/layers_(\d+)/self_attn_layer_norm", r"{b}encoder.layers.\1.layer_norm"),
    (r"wav2vec2/encoder/layers_(\d+)/fc1", r"{b}encoder.layers.\1.feed_forward.intermediate_dense"),
    (r"wav2vec2/encoder/layers_(\d+)/fc2", r"{b}encoder.layers.\1.feed_forward.output_dense"),
    (r"wav2vec2/encoder/layers_(\d+)/final_layer_norm", r"{b}encoder.layers.\1.final_layer_norm"),
    (r"wav2vec2/mask_emb", r"{b}masked_spec_embed"),
    (r"quantizer/weight_proj", r"quantizer.weight_proj"),
    (r"quantizer/vars", r"quantizer.codevectors"),
    (r"project_q", r"project_q"),
    (r"final_proj", r"project_hid"),
    (r"proj", r"lm_head"),
)
# Our path -> fairseq name. {norm} is the conv block's norm: ".2" (GroupNorm, default mode) or ".2.1"
# (LayerNorm wrapped in TransposeLast, layer_norm mode). Backbone prefix: "w2v_encoder.w2v_model." in CTC
# checkpoints; the CTC head is "w2v_encoder.proj".
FAIRSEQ_MODULES = (
    (r"wav2vec2/feature_extractor/conv_(\d+)", r"{b}feature_extractor.conv_layers.\1.0"),
    (r"wav2vec2/feature_extractor/norm_(\d+)", r"{b}feature_extractor.conv_layers.\1{norm}"),
    (r"wav2vec2/layer_norm", r"{b}layer_norm"),
    (r"wav2vec2/post_extract_proj", r"{b}post_extract_proj"),
    (r"wav2vec2/encoder/pos_conv", r"{b}encoder.pos_conv.0"),
    (r"wav2vec2/encoder/layer_norm", r"{b}encoder.layer_norm"),
    (r"wav2vec2/encoder/layers_(\d+)/self_attn/(q|k|v|out)_proj", r"{b}encoder.layers.\1.self_attn.\2_proj"),
    (r"wav2vec2/encoder/layers_(\d+)/(self_attn_layer_norm|fc1|fc2|final_layer_norm)",
     r"{b}encoder.layers.\1.\2"),
    (r"wav2vec2/mask_emb", r"{b}mask_emb"),
    (r"quantizer/weight_proj", r"quantizer.weight_proj"),
    (r"quantizer/vars", r"quantizer.vars"),
    (r"project_q", r"project_q"),
    (r"final_proj", r"final_proj"),
    (r"proj", r"w2v_encoder.proj"),
)
# Our leaf name -> PyTorch parameter name (a path whose leaf is not here is a parameter itself).
TORCH_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "weight_g": "weight_g",
                "weight_v": "weight_v"}
_WEIGHT_NORM_FORMS = {
    "parametrizations": {"weight_g": "parametrizations.weight.original0",
                         "weight_v": "parametrizations.weight.original1"},
    "legacy": {"weight_g": "weight_g", "weight_v": "weight_v"},
}
_PARAMETRIZATION_SUFFIXES = {".parametrizations.weight.original0": ".weight_g",
                             ".parametrizations.weight.original1": ".weight_v"}


def _torch_name(path: str, table, backbone_prefix: str, norm: str = "") -> str:
  """Our "/"-joined parameter path -> the PyTorch state-dict key under `table`."""
  module, _, leaf = path.rpartition("/")
  for candidate, suffix in ((path, ""), (module, TORCH_LEAVES.get(leaf))):
    if suffix is None:
      continue
    for pattern, template in table:
      m = re.fullmatch(pattern, candidate)
      if m:
        name = m.expand(template).replace("{b}", backbone_prefix).replace("{norm}", norm)
        return f"{name}.{suffix}" if suffix else name
  raise ValueError(f"no checkpoint name for parameter {path!r}: the model's tree and convert.py disagree")


def _from_torch(path: str, x: np.ndarray) -> np.ndarray:
  """A PyTorch-layout array -> our layout for the parameter at `path`."""
  leaf = path.rpartition("/")[2]
  if leaf in ("kernel", "weight_v"):
    return x.T if x.ndim == 2 else np.transpose(x, (2, 1, 0))
  if leaf == "weight_g":
    return x.reshape(-1)
  if path == "quantizer/vars":
    return x.reshape(x.shape[-2:])
  return x


def _to_torch(path: str, x: np.ndarray) -> np.ndarray:
  """Our layout -> PyTorch's for the parameter at `path` (the inverse of `_from_torch`)."""
  leaf = path.rpartition("/")[2]
  if leaf in ("kernel", "weight_v"):
    return x.T if x.ndim == 2 else np.transpose(x, (2, 1, 0))
  if leaf == "weight_g":
    return x.reshape(1, 1, -1)
  if path == "quantizer/vars":
    return x[None]
  return x


# ====================================================================================== the target tree
@functools.lru_cache(maxsize=16)
def _param_shapes(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
  """Flat {path: shape} of `build(cfg).init(...)['params']`, by abstract evaluation (nothing computed)."""
  module = build(cfg)
  frames = 2                                          # the tree does not depend on the length
  samples = cfg.receptive_field + cfg.hop * (frames - 1)
  rngs = {name: jax.random.PRNGKey(0) for name in ("params", "mask", "dropout", "gumbel", "layerdrop")}
  variables = jax.eval_shape(module.init, rngs, jax.ShapeDtypeStruct((1, samples), jnp.float32),
                             mask_time=jax.ShapeDtypeStruct((1, frames), jnp.bool_))
  return {path: tuple(leaf.shape) for path, leaf in _flatten(variables["params"]).items()}


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(_flatten(value, path + "/"))
    else:
      flat[path] = value
  return flat


def _unflatten(flat: Mapping[str, Any]) -> Params:
  tree: Params = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _listing(names: Iterable[str], limit: int = 40) -> str:
  names = sorted(names)
  shown = ", ".join(names[:limit])
  return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _canonical_weight_norm(state: Dict[str, Any], source: str) -> Dict[str, Any]:
  """Rename `X.parametrizations.weight.original0/1` to `X.weight_g/weight_v` (one key form to match)."""
  out = {}
  for name, value in state.items():
    for suffix, legacy in _PARAMETRIZATION_SUFFIXES.items():
      if name.endswith(suffix):
        name = name[:-len(suffix)] + legacy
        break
    if name in out:
      raise ValueError(f"{source}: weight-norm parameter {name!r} is stored twice, as weight_g/weight_v "
                       "and as parametrizations.weight.original0/1")
    out[name] = value
  return out


def _to_params(cfg: ModelConfig, state: Dict[str, Any], name_of: Callable[[str], str], source: str,
               optional: Optional[Dict[str, Callable[[Tuple[int, ...]], np.ndarray]]] = None,
               ignore: Callable[[str], bool] = lambda name: False) -> Params:
  """A PyTorch state dict (numpy or torch values) -> our params tree for `cfg`.

  Every key must map to one of our parameters and every parameter must be present (or in `optional`,
  which fills it from its shape), with exactly the expected shape: otherwise ValueError listing them all.
  """
  optional = optional or {}
  shapes = _param_shapes(cfg)
  state = _canonical_weight_norm(state, source)
  wanted = {name_of(path): path for path in shapes}
  missing = [n for n, p in wanted.items() if n not in state and p not in optional]
  unexpected = [n for n in state if n not in wanted and not ignore(n)]
  if missing or unexpected:
    lines = [f"{source}: the weights do not match a {cfg.task!r} model of this configuration"]
    if missing:
      lines.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
      lines.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    raise ValueError("\n  ".join(lines))
  flat, bad = {}, []
  for name, path in wanted.items():
    shape = shapes[path]
    if name not in state:
      flat[path] = np.asarray(optional[path](shape), np.float32)
      continue
    value = _as_float32(state[name], name, source)
    torch_shape = _to_torch(path, np.broadcast_to(np.float32(0), shape)).shape
    if value.shape != torch_shape:
      bad.append(f"{name}: {tuple(value.shape)} in the file, {tuple(torch_shape)} expected")
      continue
    flat[path] = np.ascontiguousarray(_from_torch(path, value))
  if bad:
    raise ValueError(f"{source}: shape mismatch with the configuration:\n  " + "\n  ".join(bad))
  return _unflatten(flat)


def _as_float32(value: Any, name: str, source: str) -> np.ndarray:
  if hasattr(value, "detach"):                           # a torch tensor
    if not value.is_floating_point():
      raise ValueError(f"{source}: {name} has non-float dtype {value.dtype}")
    import torch
    return value.detach().cpu().to(torch.float32).numpy()
  value = np.asarray(value)
  if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
    raise ValueError(f"{source}: {name} has non-float dtype {value.dtype}")
  return value.astype(np.float32)


def _zeros(shape):
  return np.zeros(shape, np.float32)


# ====================================================================================== Hugging Face
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")   # what makes a directory a Hugging Face model


def from_hf(path) -> Tuple[ModelConfig, Params]:
  """Read a transformers Wav2Vec2Model / Wav2Vec2ForPreTraining / Wav2Vec2ForCTC directory.

  The directory holds config.json and model.safetensors (or a sharded model.safetensors.index.json;
  safetensors are read without torch), or pytorch_model.bin[.index.json] (needs torch, the `hf` extra;
  read with torch.load(weights_only=True)). The task is detected from the keys: a "wav2vec2." prefix with
  quantizer.* / project_* keys is "pretrain", with lm_head.* "ctc", keys without the prefix "encoder".

  Returns (ModelConfig, params): params a nested dict of float32 numpy arrays with exactly the tree of
  `build(cfg).init(...)['params']`. Raises FileNotFoundError naming a missing file, ValueError naming an
  unsupported config field or listing missing / unexpected / mis-shaped keys.
  """
  directory = os.fspath(path)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"not a Hugging Face model directory: {directory}")
  config_path = os.path.join(directory, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"no config.json in {directory} (expected {config_path})")
  with open(config_path) as f:
    hf_config = json.load(f)
  state = _read_hf_weights(directory)
  task, prefix = _detect_hf_task(state)
  cfg = hf_config_to_model_config(hf_config, task)
  optional = {}
  if float(hf_config.get("mask_time_prob", 0.05) or 0) <= 0 and float(hf_config.get("mask_feature_prob") or 0) <= 0:
    optional["wav2vec2/mask_emb"] = _zeros       # transformers creates no masked_spec_embed then
  params = _to_params(cfg, state, lambda p: _torch_name(p, HF_MODULES, prefix), directory, optional)
  return cfg, params


def hf_config_to_model_config(hf: Mapping[str, Any], task: str) -> ModelConfig:
  """A Wav2Vec2Config (as its config.json dict) -> ModelConfig for `task`, through the HF_FIELDS table."""
  for field, default, supported in HF_UNSUPPORTED:
    value = hf.get(field, default)
    if value not in supported:
      raise ValueError(f"Hugging Face config: {field}={value!r} is not supported (supported: {supported})")
  for arch in hf.get("architectures") or ():
    if arch not in HF_ARCHITECTURES.values():
      raise ValueError(f"Hugging Face config: architectures={hf['architectures']!r}: {arch} is not supported "
                       f"(supported: {sorted(HF_ARCHITECTURES.values())})")
  values: Dict[str, Any] = {"task": task}
  for ours, theirs, default in HF_FIELDS:
    value = hf.get(theirs)
    values[ours] = type(default)(default if value is None else value)
  if task != "ctc":
    values.pop("vocab_size")
  if not hf.get("apply_spec_augment", True):
    values["mask_prob"] = values["mask_channel_prob"] = 0.0
  norm = hf.get("feat_extract_norm", "group")
  if norm not in HF_EXTRACTOR_MODES:
    raise ValueError(f"Hugging Face config: feat_extract_norm={norm!r} must be one of {list(HF_EXTRACTOR_MODES)}")
  values["extractor_mode"] = HF_EXTRACTOR_MODES[norm]
  conv = [hf.get(k) or HF_CONV_DEFAULTS[k] for k in ("conv_dim", "conv_kernel", "conv_stride")]
  if len({len(c) for c in conv}) != 1:
    raise ValueError(f"Hugging Face config: conv_dim, conv_kernel and conv_stride differ in length: {conv}")
  values["conv_layers"] = tuple((int(c), int(k), int(s)) for c, k, s in zip(*conv))
  return ModelConfig.from_any(values)


def model_config_to_hf(cfg: ModelConfig) -> Dict[str, Any]:
  """ModelConfig -> a Wav2Vec2Config dict (config.json), through the HF_FIELDS table."""
  cfg = ModelConfig.from_any(cfg)
  out: Dict[str, Any] = {
      "model_type": "wav2vec2",
      "architectures": [HF_ARCHITECTURES[cfg.task]],
      "feat_extract_norm": {v: k for k, v in HF_EXTRACTOR_MODES.items()}[cfg.extractor_mode],
      "conv_dim": [c for c, _, _ in cfg.conv_layers],
      "conv_kernel": [k for _, k, _ in cfg.conv_layers],
      "conv_stride": [s for _, _, s in cfg.conv_layers],
      "num_feat_extract_layers": len(cfg.conv_layers),
      "hidden_act": "gelu",
      "feat_extract_activation": "gelu",
      "apply_spec_augment": True,
      "add_adapter": False,
      "adapter_attn_dim": None,
      "use_weighted_layer_sum": False,
  }
  for ours, theirs, default in HF_FIELDS:
    out[theirs] = type(default)(getattr(cfg, ours))
  out["codevector_dim"] = cfg.vq_dim
  if cfg.vocab_size <= 0:
    del out["vocab_size"]
  return out


def to_hf(model_config, params: Mapping[str, Any], out_dir, *,
          weight_norm_keys: str = "parametrizations") -> None:
  """Write `params` as a transformers checkpoint: out_dir/config.json + out_dir/model.safetensors.

  The architecture follows `model_config.task`: Wav2Vec2ForPreTraining ("pretrain"), Wav2Vec2ForCTC
  ("ctc") or Wav2Vec2Model ("encoder"); `transformers.<that class>.from_pretrained(out_dir)` loads it with
  no missing or unexpected keys. Written with safetensors.numpy (torch is not needed).

  weight_norm_keys: "parametrizations" (default) writes the positional conv's weight norm as
  `parametrizations.weight.original0/1`, the names transformers (4.57, torch >= 2.1) itself saves and
  loads; "legacy" writes `weight_g/weight_v`, the form of fairseq and older Hub checkpoints, which
  transformers renames on load. masked_spec_embed is written only when mask_prob or mask_channel_prob is
  positive (transformers creates it only then). `params` may also be the {'params': ...} variables dict.
  """
  from safetensors.numpy import save_file
  if weight_norm_keys not in _WEIGHT_NORM_FORMS:
    raise ValueError(f"weight_norm_keys={weight_norm_keys!r} must be one of {list(_WEIGHT_NORM_FORMS)}")
  cfg = ModelConfig.from_any(model_config)
  if set(params) == {"params"}:
    params = params["params"]
  if cfg.scan_layers:                   # one mapping: the per-layer names, whatever the model's layout
    params, cfg = unstack_layers(params), cfg.replace(scan_layers=False)
  flat = {path: np.asarray(value, np.float32) for path, value in _flatten(params).items()}
  _check_tree(cfg, flat)
  prefix = "" if cfg.task == "encoder" else "wav2vec2."
  renames = _WEIGHT_NORM_FORMS[weight_norm_keys]
  tensors = {}
  for path, value in flat.items():
    if path == "wav2vec2/mask_emb" and cfg.mask_prob <= 0 and cfg.mask_channel_prob <= 0:
      continue
    name = _torch_name(path, HF_MODULES, prefix)
    leaf = path.rpartition("/")[2]
    if leaf in renames:
      name = name[:-len(leaf)] + renames[leaf]
    tensors[name] = np.ascontiguousarray(_to_torch(path, value))
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(model_config_to_hf(cfg), f, indent=2, sort_keys=True)
    f.write("\n")
  save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


def _check_tree(cfg: ModelConfig, flat: Mapping[str, np.ndarray]) -> None:
  shapes = _param_shapes(cfg)
  missing = sorted(set(shapes) - set(flat))
  extra = sorted(set(flat) - set(shapes))
  wrong = [f"{p}: {flat[p].shape}, expected {shapes[p]}" for p in sorted(set(flat) & set(shapes))
           if tuple(flat[p].shape) != shapes[p]]
  if missing or extra or wrong:
    lines = [f"params do not match a {cfg.task!r} model of this configuration"]
    if missing:
      lines.append(f"missing: {_listing(missing)}")
    if extra:
      lines.append(f"unexpected: {_listing(extra)}")
    if wrong:
      lines.append("wrong shapes: " + "; ".join(wrong))
    raise ValueError("\n  ".join(lines))


def _detect_hf_task(state: Mapping[str, Any]) -> Tuple[str, str]:
  """(task, backbone key prefix) from the state-dict keys."""
  if not any(k.startswith("wav2vec2.") for k in state):
    return "encoder", ""
  heads = {k.split(".")[0] for k in state if not k.startswith("wav2vec2.")}
  pretrain = bool(heads & {"quantizer", "project_q", "project_hid"})
  ctc = "lm_head" in heads
  if pretrain and ctc:
    raise ValueError("the weights hold both pretraining (quantizer/project_*) and CTC (lm_head) heads")
  return ("pretrain" if pretrain else "ctc" if ctc else "encoder"), "wav2vec2."


def _read_hf_weights(directory: str) -> Dict[str, Any]:
  found = [name for name in HF_WEIGHT_FILES if os.path.isfile(os.path.join(directory, name))]
  if not found:
    raise FileNotFoundError(f"no weights in {directory}: expected one of {', '.join(HF_WEIGHT_FILES)}")
  name = found[0]
  path = os.path.join(directory, name)
  if name.endswith(".index.json"):
    with open(path) as f:
      weight_map = json.load(f)["weight_map"]
    state: Dict[str, Any] = {}
    for shard in sorted(set(weight_map.values())):
      shard_path = os.path.join(directory, shard)
      if not os.path.isfile(shard_path):
        raise FileNotFoundError(f"shard {shard_path} listed in {path} does not exist")
      state.update(_read_weight_file(shard_path))
    absent = sorted(set(weight_map) - set(state))
    if absent:
      raise ValueError(f"{path} lists keys its shards do not hold: {_listing(absent)}")
    return state
  return _read_weight_file(path)


def _read_weight_file(path: str) -> Dict[str, Any]:
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return load_file(path)
  torch = _require_torch(f"reading {os.path.basename(path)}")
  return torch.load(path, map_location="cpu", weights_only=True)


def _require_torch(why: str):
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"{why} needs PyTorch: install the `hf` extra (pip install 'w2v2_jax[hf]')") from e
  return torch


# ====================================================================================== fairseq
def from_fairseq(path) -> Tuple[ModelConfig, Params]:
  """Read a fairseq wav2vec 2.0 checkpoint (.pt): pretraining (Wav2Vec2Model) or CTC fine-tuned
  (Wav2VecCtc: backbone under "w2v_encoder.w2v_model.", head "w2v_encoder.proj").

  SECURITY: this calls torch.load(weights_only=False), which unpickles the file and so can execute
  arbitrary code it contains: only convert checkpoints you trust. Needs torch (the `hf` extra); some
  fairseq versions pickled the config as omegaconf objects, so unpickling those also needs `omegaconf`.

  The architecture comes from ckpt["cfg"]["model"] (for CTC: cfg.model.w2v_args.model, with the
  fine-tuning dropouts / masking of cfg.model on top) or the legacy ckpt["args"] Namespace; loss weights
  from the criterion's loss_weights when present. A checkpoint without post_extract_proj (conv dim equals
  encoder_embed_dim) gets an identity projection; one without mask_emb gets zeros; the pretraining heads
  sometimes left in CTC checkpoints are ignored.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such fairseq checkpoint: {path}")
  torch = _require_torch("reading fairseq checkpoints")
  try:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
  except ModuleNotFoundError as e:
    raise ImportError(f"{path}: unpickling needs the module {e.name!r}. Older fairseq checkpoints store "
                      "their config as omegaconf objects (pip install 'w2v2_jax[hf]' installs omegaconf); "
                      "ones that pickle fairseq's own classes need fairseq installed") from e
  if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("model"), Mapping):
    raise ValueError(f"{path}: not a fairseq checkpoint (no 'model' state dict)")
  state = dict(ckpt["model"])
  if any(k.startswith("w2v_encoder.") for k in state):
    prefix = "w2v_encoder.w2v_model."
    task = "ctc" if "w2v_encoder.proj.weight" in state else "encoder"
  else:
    prefix = ""
    task = "pretrain" if any(k.startswith("quantizer.") for k in state) else "encoder"
  vocab = int(state["w2v_encoder.proj.weight"].shape[0]) if task == "ctc" else 0
  cfg = _fairseq_model_config(ckpt, task, vocab, path)

  norm = ".2" if cfg.extractor_mode == "default" else ".2.1"
  optional = {"wav2vec2/mask_emb": _zeros}
  if cfg.conv_dim == cfg.encoder_embed_dim:           # fairseq has no post_extract_proj then
    optional["wav2vec2/post_extract_proj/kernel"] = lambda shape: np.eye(*shape, dtype=np.float32)
    optional["wav2vec2/post_extract_proj/bias"] = _zeros
  heads = tuple(prefix + h for h in ("quantizer.", "project_q.", "final_proj.", "target_glu."))
  ignore = (lambda name: name.startswith(heads)) if prefix else (lambda name: False)
  params = _to_params(cfg, state, lambda p: _torch_name(p, FAIRSEQ_MODULES, prefix, norm), path,
                      optional, ignore)
  return cfg, params


def _fairseq_model_config(ckpt: Mapping[str, Any], task: str, vocab_size: int, source: str) -> ModelConfig:
  if ckpt.get("cfg") is not None:
    root = _plain(ckpt["cfg"])
    model = root.get("model") or {}
    criterion = root.get("criterion") or {}
  elif ckpt.get("args") is not None:
    model = criterion = _plain(ckpt["args"])         # legacy: one flat argparse Namespace
  else:
    raise ValueError(f"{source}: the checkpoint has neither 'cfg' nor 'args': the architecture is unknown")
  finetune = None
  if model.get("w2v_args") is not None:               # a fine-tuned model: the pretraining config inside
    finetune = model
    w2v = _plain(model["w2v_args"])
    if isinstance(w2v.get("model"), Mapping):
      arch, criterion = w2v["model"], w2v.get("criterion") or {}
    else:
      arch = criterion = w2v
  elif task == "ctc":
    raise ValueError(f"{source}: a fine-tuned checkpoint whose config has no w2v_args (the pretraining "
                     "model's architecture)")
  else:
    arch = model

  name = arch.get("_name") or arch.get("arch")
  if name is not None and not str(name).startswith("wav2vec2"):
    raise ValueError(f"{source}: model _name={name!r} is not a wav2vec 2.0 model")
  for field, default, supported, pretrain_only in FAIRSEQ_UNSUPPORTED:
    if pretrain_only and task != "pretrain":
      continue
    value = arch.get(field, default)
    if value is not None and value not in supported:
      raise ValueError(f"fairseq config: {field}={value!r} is not supported (supported: {supported})")

  values: Dict[str, Any] = {"task": task}
  for ours, theirs, default in FAIRSEQ_FIELDS:
    value = arch.get(theirs)
    values[ours] = type(default)(default if value is None else value)
  if values["final_dim"] <= 0:
    values["final_dim"] = values["encoder_embed_dim"]
  if "conv_feature_layers" not in arch:
    raise ValueError(f"{source}: fairseq config has no conv_feature_layers")
  values["conv_layers"] = parse_conv_layers(arch["conv_feature_layers"])
  if finetune is not None:
    for ours, theirs in FAIRSEQ_FINETUNE_FIELDS:
      if finetune.get(theirs) is not None:
        values[ours] = type(values.get(ours, 0.0))(finetune[theirs])
    if finetune.get("apply_mask") is False:
      values["mask_prob"] = values["mask_channel_prob"] = 0.0
  weights = criterion.get("loss_weights")
  try:
    if isinstance(weights, str):
      weights = ast.literal_eval(weights)             # legacy "[0.1, 10]"; literals only, never code
    weights = [float(w) for w in weights] if weights else []
  except (ValueError, TypeError, SyntaxError) as e:
    raise ValueError(f"fairseq config: loss_weights={criterion.get('loss_weights')!r} is not a list of "
                     "numbers") from e
  if weights:
    values["diversity_weight"] = weights[0]
    values["feature_pen_weight"] = weights[1] if len(weights) > 1 else weights[0]
  if task == "ctc":
    values["vocab_size"] = vocab_size
  return ModelConfig.from_any(values)


def _plain(obj: Any) -> Any:
  """omegaconf DictConfig / ListConfig, argparse.Namespace, mappings and lists -> plain dicts and lists."""
  if type(obj).__module__.split(".")[0] == "omegaconf":
    from omegaconf import OmegaConf
    try:
      obj = OmegaConf.to_container(obj, resolve=True)
    except Exception:  # an interpolation that cannot be resolved outside fairseq: keep it unresolved
      obj = OmegaConf.to_container(obj, resolve=False)
  if isinstance(obj, argparse.Namespace):
    obj = vars(obj)
  if isinstance(obj, Mapping):
    return {str(k): _plain(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_plain(v) for v in obj]
  return obj


def parse_conv_layers(spec: Any) -> Tuple[Tuple[int, int, int], ...]:
  """fairseq's conv_feature_layers, e.g. "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2", parsed
  without eval: only int literals, lists/tuples of them, list + list and list * int are accepted."""
  if isinstance(spec, str):
    try:
      node = ast.parse(spec, mode="eval").body
    except SyntaxError as e:
      raise ValueError(f"conv_feature_layers={spec!r} is not a list expression") from e
    layers = _eval_conv_spec(node, spec)
  else:
    layers = spec
  try:
    out = tuple(tuple(int(v) for v in layer) for layer in layers)
  except (TypeError, ValueError) as e:
    raise ValueError(f"conv_feature_layers={spec!r} must be a list of (dim, kernel, stride)") from e
  if not out or any(len(layer) != 3 for layer in out):
    raise ValueError(f"conv_feature_layers={spec!r} must be a non-empty list of (dim, kernel, stride)")
  return out


def _eval_conv_spec(node: ast.AST, spec: str) -> Any:
  if isinstance(node, ast.Constant) and type(node.value) is int:
    return node.value
  if isinstance(node, (ast.List, ast.Tuple)):
    items = [_eval_conv_spec(e, spec) for e in node.elts]
    return items if isinstance(node, ast.List) else tuple(items)
  if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
    left, right = _eval_conv_spec(node.left, spec), _eval_conv_spec(node.right, spec)
    if isinstance(node.op, ast.Add) and isinstance(left, list) and isinstance(right, list):
      return left + right
    if isinstance(node.op, ast.Mult):
      if isinstance(left, int) and isinstance(right, list):
        left, right = right, left
      if isinstance(left, list) and isinstance(right, int) and 0 <= right <= 1000:
        return left * right
  raise ValueError(f"conv_feature_layers={spec!r}: unsupported expression {ast.dump(node)[:80]}")
