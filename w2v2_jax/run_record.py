"""What each training stage of `w2v2 demo` was trained with, and the refusal to reuse one trained otherwise.

Every stage's folder (pretraining, each fine-tuning arm) holds RUN_SETTINGS, written when the stage
starts: its config without paths, the name of its split, a hash of the data it trains and validates on
and, for a fine-tuning arm, which pretraining it started from. When the demo runs again, `check` compares
that record with the config it would train with now and refuses a folder that differs, naming what
changed: a finished run would otherwise be reused as it is after a config change (a new version of the
package, another `--scale`) or after the corpus was made again in place.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

from w2v2_jax import configs as packaged

log = logging.getLogger(__name__)

RUN_SETTINGS = "demo_run_settings.json"     # in each training stage's workdir: what it was trained with
PATH_FIELDS = ("init", "data.train_manifest", "data.valid_manifest")   # recorded as the split / init kind
DATA_FIELDS = ("train_data", "valid_data")     # the manifests' identity (`data_id`): recorded since 2026-12-07


def pretrained_id(init: str) -> Any:
  """Which pretraining a fine-tuning arm starts from: "sha256:<16 hex>" of the pretraining run's own
  RUN_SETTINGS record, so that an arm trained from an earlier pretraining (its folder deleted and trained
  again with other settings) is not reused; True where that run has no record (an earlier demo's)."""
  path = os.path.join(init, RUN_SETTINGS)
  if not os.path.isfile(path):
    return True
  with open(path, "rb") as f:
    return "sha256:" + hashlib.sha256(f.read()).hexdigest()[:16]


def data_id(manifest_path: str) -> str:
  """Which audio and transcripts a manifest names: "sha256:<16 hex>" of its lines after the root (the
  relative paths and lengths) and of its .ltr transcripts where there are any. A corpus folder re-planned
  in place (`make-corpus` with other hours, seed or engines) keeps its split names, and its paths for
  the most part, but not this."""
  digest = hashlib.sha256()
  with open(manifest_path, "rb") as f:
    digest.update(b"".join(f.readlines()[1:]))
  transcripts = os.path.splitext(manifest_path)[0] + ".ltr"
  if os.path.isfile(transcripts):
    with open(transcripts, "rb") as f:
      digest.update(f.read())
  return "sha256:" + digest.hexdigest()[:16]


def check(cfg, split: str, workdir: str) -> None:
  """Records a training stage's settings (pretraining, or one fine-tuning arm) in workdir/RUN_SETTINGS
  when it starts; when the demo resumes it, raises ValueError if the recorded settings differ from
  `cfg`'s (a finished run would otherwise be reused as it is after a config change, e.g. a new version
  of the package). Paths are left out (a run folder moved with its corpus still matches): the split's
  name and the identity of its training and validation data (`data_id`) and, for a fine-tuning arm,
  which pretraining it starts from (`pretrained_id`) stand for them. A workdir with checkpoints but no
  record (a demo of an earlier version) is resumed with a warning; a record without the data's identity
  (an earlier version's) is compared without it and then given it."""
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  flat = traverse_util.flatten_dict(json.loads(cfg.to_json_best_effort()), sep=".")
  settings = {k: v for k, v in flat.items() if k not in PATH_FIELDS}
  settings["split"] = split
  settings["train_data"] = data_id(cfg.data.train_manifest)
  if cfg.data.get("valid_manifest"):
    settings["valid_data"] = data_id(cfg.data.valid_manifest)
  if "init" in cfg:
    settings["pretrained_init"] = pretrained_id(cfg.init) if cfg.init else False
  path = os.path.join(workdir, RUN_SETTINGS)
  if os.path.exists(path):
    with open(path) as f:
      recorded = json.load(f)
    # Records written before the data identity was kept lack it: compared without it, then given it.
    unrecorded = {k: settings[k] for k in DATA_FIELDS if k in settings and k not in recorded}
    changed = packaged.differences(recorded, {k: v for k, v in settings.items() if k not in unrecorded})
    if changed:
      raise ValueError(f"{workdir} was trained with other settings ({'; '.join(changed)}); delete that folder to train "
                       "it again, or give the demo another --out")
    if not unrecorded:
      return
    log.info("%s: recording the identity of its data (%s) in %s", workdir, ", ".join(unrecorded), RUN_SETTINGS)
  elif os.path.isdir(os.path.join(workdir, "checkpoints")):
    log.warning("%s has checkpoints but no record of its settings (%s): resumed as it is", workdir, RUN_SETTINGS)
    return
  os.makedirs(workdir, exist_ok=True)
  with open(path, "w") as f:
    json.dump(settings, f, indent=1, sort_keys=True)
