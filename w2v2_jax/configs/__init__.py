"""The packaged configs, reachable from an installed wheel: `--config=pretrain:base`.

  pretrain.py   pretraining: base, large, large_lv60, small (the demo), tiny
  finetune.py   CTC fine-tuning: {base,large}_{10m,1h,10h,100h,960h}, small_1h, small_10m, tiny
  model.py      architecture presets alone (base, large, large_lv60, small, tiny; ",ctc" for the CTC head)

On the command line a config is `NAME:ARG` (one of the files above, e.g. `finetune:base_10m`) or, for a
config file of your own, `PATH.py:ARG` (ml_collections' config-file flag). `resolve` maps the first form
to the file inside the package; `get(NAME, ARG)` returns the ConfigDict in Python; `differences` lists
what changed between two run configs.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Mapping

NAMES = ("pretrain", "finetune", "model")


def path(name: str) -> str:
  """The packaged config file of `name` (one of NAMES)."""
  if name not in NAMES:
    raise ValueError(f"unknown packaged config {name!r}; choose one of {', '.join(NAMES)}")
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")


def resolve(spec: str) -> str:
  """`NAME[:ARG]` -> `/abs/path/w2v2_jax/configs/NAME.py[:ARG]` for a packaged NAME; any other spec (a
  file path, with or without `:ARG`) is returned unchanged."""
  name, sep, arg = spec.partition(":")
  if name in NAMES and not os.path.exists(name):
    return path(name) + sep + arg
  return spec


def get(name: str, arg: str | None = None) -> Any:
  """`get_config(arg)` of a packaged config, e.g. get("finetune", "small_1h")."""
  path(name)     # the name check
  module = importlib.import_module(f"w2v2_jax.configs.{name}")
  return module.get_config() if arg is None else module.get_config(arg)


def differences(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
  """Every setting that differs between two run configs, as "dotted.key: before -> after", sorted.

  Both are nested mappings (e.g. `json.loads(cfg.to_json_best_effort())`) or already flat with dotted
  keys; a setting present in one only shows None on the other side. Compare configs that went through
  the same encoding (JSON: tuples are lists)."""
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  a = traverse_util.flatten_dict(dict(before), sep=".")
  b = traverse_util.flatten_dict(dict(after), sep=".")
  return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
