"""Model architecture presets: base, large, large_lv60, xlsr_300m, xlsr_1b, xlsr_2b, small, tiny (defined in
w2v2_jax/models/presets.py).

Usage: `--config=model:base`, or `get_config("large_lv60")` in Python. Append `,ctc` for the
CTC fine-tuning variant (e.g. `base,ctc`).
"""
import ml_collections

from w2v2_jax.models import presets


def get_config(arg: str = "base") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(presets.get(arg).to_dict())
