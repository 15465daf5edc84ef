"""The pretraining job: data -> data-parallel step -> checkpoints and metrics, resumable.

`pretrain(config, workdir)` is what `w2v2 pretrain` runs, on one CPU or on every host of a pod (each
process runs it; `parallel.initialize_distributed` joins them). Restarting with the same workdir
resumes from the latest checkpoint, data iterator included, and reaches the same params as an
uninterrupted run. SIGTERM (preemption) saves a checkpoint and returns cleanly.
"""
from __future__ import annotations

import functools
import json
import logging
import math
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import numpy as np

from w2v2_jax import configs as packaged_configs, models, plots, storage
from w2v2_jax.data import augment as augment_lib
from w2v2_jax.data import pipeline
from w2v2_jax.models.config import ModelConfig
from w2v2_jax.train import checkpoint, fsdp, metrics as metrics_lib, optimizer, parallel, schedules, validation
from w2v2_jax.train import step as train_step

log = logging.getLogger(__name__)
STEP_KEYS = ("audio", "padding_mask", "row_ids")


def batch_geometry(config: Any, num_devices: int) -> Dict[str, int]:
  """Global micro-batch samples and accumulation steps that realise `batch.global_seconds`."""
  rate = int(config.data.sample_rate)
  device_samples = int(round(config.batch.device_seconds * rate))
  global_samples = int(round(config.batch.global_seconds * rate))
  if device_samples < max(config.data.buckets):
    raise ValueError(f"batch.device_seconds={config.batch.device_seconds} holds {device_samples} samples, "
                     f"fewer than the largest bucket data.buckets={tuple(config.data.buckets)}")
  accumulate = max(1, math.ceil(global_samples / (device_samples * num_devices)))
  return {"batch_samples": device_samples * num_devices, "accumulate": accumulate}


def pretrain_step_fn(config: Any, model_cfg: ModelConfig):
  """(module, optimizer, per-device step) of pretraining for `config`: what `pretrain` runs and what
  `w2v2 compile-check` compiles."""
  module = models.build(model_cfg)
  total = int(config.train.steps)
  tx = optimizer.make(config.optim, total)
  step_fn = functools.partial(train_step.pretrain_step, module=module, tx=tx,
                              lr_schedule=schedules.learning_rate(config.optim, total),
                              latent_temp=tuple(config.train.latent_temp),
                              clip_norm=float(config.optim.clip_norm))
  return module, tx, step_fn


def finetune_step_fn(config: Any, model_cfg: ModelConfig, blank_id: int = 0):
  """(module, optimizer, per-device step) of CTC fine-tuning for `config` (see `pretrain_step_fn`).
  With train.freeze_updates >= train.steps the backbone never trains: a linear probe of its features,
  whose step computes no backbone backward pass."""
  module = models.build(model_cfg)
  total = int(config.train.steps)
  tx = optimizer.make(config.optim, total)
  freeze = int(config.train.freeze_updates)
  step_fn = functools.partial(train_step.finetune_step, module=module, tx=tx,
                              lr_schedule=schedules.learning_rate(config.optim, total),
                              freeze_updates=freeze, blank_id=blank_id,
                              freeze_mode="always" if freeze >= total else "auto",
                              clip_norm=float(config.optim.clip_norm),
                              train_top_layers=(int(config.get("reinit_layers", 0))
                                                if freeze < total and config.train.get("train_reinit_while_frozen")
                                                else 0))
  return module, tx, step_fn


def make_source(config: Any, label: Optional[str] = None):
  """The training source: a manifest (with `label` transcripts beside it), packed shards (`w2v2 pack`)
  or a tfds split."""
  data = config.data
  if data.train_manifest and data.tfds_name:
    raise ValueError("set one of data.train_manifest and data.tfds_name, not both")
  if data.train_manifest:     # a manifest .tsv or packed shards' OUT_PREFIX.packed.json
    from w2v2_jax.data.source import open_source  # pylint: disable=import-outside-toplevel
    return open_source(data.train_manifest, label=label or None)
  if data.tfds_name:
    from w2v2_jax.data.tfds_source import TfdsSource  # pylint: disable=import-outside-toplevel
    return TfdsSource(data.tfds_split, name=data.tfds_name, data_dir=data.tfds_data_dir or None,
                      manual_dir=data.tfds_manual_dir or None, label="text" if label else None)
  raise ValueError("no training data: set data.train_manifest (a .tsv from `w2v2 manifest`) or data.tfds_name")


def _host_params(module, cfg: ModelConfig, seed: int, num_samples: int):
  rngs = {"params": jax.random.PRNGKey(seed), "mask": jax.random.PRNGKey(seed + 1)}
  init = jax.jit(lambda r: module.init(r, np.zeros((1, num_samples), np.float32))["params"])
  return jax.device_get(init(rngs))


def _make_iterator(config: Any, source, geometry: Dict[str, int], mode: str):
  data = config.data
  return pipeline.make_iterator(
      source, buckets=tuple(data.buckets), batch_samples=geometry["batch_samples"],
      min_sample_size=data.min_sample_size, max_sample_size=data.max_sample_size,
      multiple_of=jax.device_count(), accumulate=geometry["accumulate"], mode=mode, seed=data.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      sample_rate=data.sample_rate, normalize=data.normalize, num_threads=data.num_threads,
      prefetch=data.prefetch, augment=augment_lib.AugmentConfig.from_any(data.get("augment")))


def make_runner(config: Any, step_fn: Callable) -> parallel.DataParallel:
  """The DataParallel runner of config.parallel (mode; fsdp_min_size for mode "fsdp")."""
  return parallel.DataParallel(step_fn, config.parallel.mode,
                               min_shard_size=int(config.parallel.get("fsdp_min_size", fsdp.DEFAULT_MIN_SIZE)))


def _config_json(config: Any) -> str:
  return config.to_json_best_effort() if hasattr(config, "to_json_best_effort") else json.dumps(config)


def _warn_if_settings_changed(saved: Optional[Any], config_json: str, workdir: str, step: int) -> None:
  """Logs a warning naming every setting in which the resumed run's config differs from the one saved
  with its checkpoint (e.g. a new lr, or a package update's new defaults). Resuming goes on: a longer
  train.steps or another eval_every is a deliberate change; a silent one is not."""
  if saved is None:
    return
  changed = packaged_configs.differences(saved, json.loads(config_json))
  if changed:
    log.warning("%s: resuming from step %d with settings that differ from those its checkpoint was saved with: "
                "%s", workdir, step, "; ".join(changed))


def _run(config: Any, workdir: str, *, step_fn: Callable, params: Any, tx, iterator, to_step_batch: Callable,
         max_steps: Optional[int], sum_keys: Tuple[str, ...], decorate: Callable = lambda values: None,
         after_step: Callable = lambda step, state, runner: None) -> Dict[str, float]:
  """The shared training loop: resume, step, log, checkpoint, stop on preemption.

  to_step_batch(batch) -> (arrays for the step, host stats dict); decorate(values) adds derived logged
  values in place; after_step(step, state, runner) runs after each update (e.g. validation).
  """
  total = int(config.train.steps)
  data = config.data
  runner = make_runner(config, step_fn)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints,
                                 save_every=config.train.checkpoint_every)
  state = train_step.init_state(params, tx, jax.random.key(config.train.seed))
  start = 0
  resume = ckpt.latest_step() is not None
  if runner.mode != "pmap":
    # Laid out on the mesh first, then restored into that layout: each device reads only its slices of
    # a sharded state, whatever mode or device count the checkpoint was written with.
    state = runner.put_state(state)
  if resume:
    state, data_state = ckpt.restore(state_template=state)
    if data_state is not None:
      iterator.set_state(data_state)
    start = int(jax.device_get(state["step"]))
    log.info("resumed from step %d in %s", start, workdir)
  if runner.mode == "pmap":
    state = runner.put_state(state)
  config_json = _config_json(config)
  if resume:
    _warn_if_settings_changed(ckpt.restore_config(start), config_json, workdir, start)
  writer = metrics_lib.MetricsWriter(workdir, total_steps=total, log_every=config.train.log_every,
                                     is_primary=jax.process_index() == 0, initial_step=start)
  averager = metrics_lib.Averager(sum_keys=("audio_samples",) + pipeline.STAT_KEYS + tuple(sum_keys))
  last: Dict[str, float] = {}
  step = start
  stop_at = total if max_steps is None else min(total, start + max_steps)
  with checkpoint.PreemptionGuard() as guard:
    while step < stop_at:
      batch = next(iterator)
      arrays, stats = to_step_batch(batch)
      state, step_metrics = runner.step(state, runner.put_batch(arrays))
      step += 1
      averager.add({**step_metrics, **{f"data/{k}": v for k, v in stats.items()}})
      if step == start + 1:
        writer.reset_timer(step)            # the first step compiles: keep it out of the timing
        averager.reset()
      if writer.should_write(step) and averager.count:
        values = averager.result()
        audio_seconds = values.pop("audio_samples") / data.sample_rate
        decorate(values)
        writer.write(step, values, audio_seconds=audio_seconds)
        last = values
      after_step(step, state, runner)
      stopping = guard.should_stop(step)
      if ckpt.should_save(step) or stopping or step == stop_at:
        ckpt.save(step, runner.get_state(state), iterator.get_state(), config_json, force=True)
      if stopping:
        log.warning("stop requested (SIGTERM / preemption): saved step %d, exiting", step)
        break
  ckpt.wait()
  ckpt.close()
  writer.close()
  return last


def pretrain(config: Any, workdir: str, *, max_steps: Optional[int] = None) -> Dict[str, float]:
  """Runs (or resumes) pretraining until config.train.steps (or `max_steps` updates in this call).

  Returns the last logged metrics.
  """
  checkpoint.check_run_dir(workdir)       # before any work: a run directory Orbax cannot write to
  parallel.initialize_distributed()
  model_cfg = ModelConfig.from_any(config.model).replace(task="pretrain")
  module, tx, step_fn = pretrain_step_fn(config, model_cfg)
  geometry = batch_geometry(config, jax.device_count())
  log.info("pretraining: %d devices on %d processes; global micro-batch %d samples x %d accumulation",
           jax.device_count(), jax.process_count(), geometry["batch_samples"], geometry["accumulate"])
  iterator = _make_iterator(config, make_source(config), geometry, mode="crop")
  chance = math.log(model_cfg.num_negatives + model_cfg.cross_sample_negatives + 1)

  def decorate(values):
    for k in ("loss", "contrastive"):
      values[f"{k}_bits"] = values[k] / plots.LN2
    values["chance_bits"] = chance / plots.LN2

  return _run(config, workdir, step_fn=step_fn, tx=tx, iterator=iterator,
              params=_host_params(module, model_cfg, config.train.seed, min(config.data.buckets)),
              to_step_batch=lambda b: ({k: b[k] for k in STEP_KEYS}, b["stats"]), max_steps=max_steps,
              sum_keys=(), decorate=decorate)


# ------------------------------------------------------------------------------------------ fine-tuning
# Fields that define the architecture: taken from the pretrained model when fine-tuning from one.
ARCHITECTURE = ("conv_layers", "extractor_mode", "conv_bias", "encoder_embed_dim", "encoder_layers",
                "encoder_ffn_embed_dim", "encoder_attention_heads", "layer_norm_first", "conv_pos",
                "conv_pos_groups", "layer_norm_eps")


def load_pretrained(path: str) -> Tuple[ModelConfig, Any]:
  """(model config, backbone params) from one of our pretraining run directories, a Hugging Face
  directory or a fairseq checkpoint (.pt)."""
  from w2v2_jax import convert  # pylint: disable=import-outside-toplevel
  if storage.isdir(storage.join(path, checkpoint.CHECKPOINT_DIR)):
    from orbax import checkpoint as ocp  # pylint: disable=import-outside-toplevel
    ckpt = checkpoint.Checkpointer(path)
    step = ckpt.latest_step()
    if step is None:
      raise ValueError(f"init={path!r}: no complete checkpoint under {path}/{checkpoint.CHECKPOINT_DIR}")
    saved = ckpt.restore_config(step)
    state_dir = ckpt.directory / str(step) / "state"     # absolute: Orbax refuses relative paths
    ckpt.close()
    cfg = ModelConfig.from_any(saved["model"])
    state = ocp.StandardCheckpointer().restore(state_dir)
    return cfg, jax.device_get(state["params"]["wav2vec2"])
  if storage.isdir(path):
    cfg, params = convert.from_hf(storage.local_copy(path))
    return cfg, params["wav2vec2"]
  if storage.isfile(path):
    cfg, params = convert.from_fairseq(storage.local_copy(path))
    return cfg, params["wav2vec2"]
  raise ValueError(f"init={path!r} is neither a run directory, a Hugging Face directory nor a checkpoint file")


def reinit_top_layers(pretrained: Any, fresh: Any, count: int, cfg: ModelConfig) -> Any:
  """The pretrained backbone with its top `count` transformer layers taken from `fresh` (the model's
  random initialisation), in the layout of `cfg` (per layer or stacked). The last layers of a
  contrastive model specialise to the pretext task (docs/pretraining_at_demo_scale.md: at the demo's
  scale, re-initialising the top one turned a blank-only fine-tuning into the best one)."""
  if not 0 <= count <= cfg.encoder_layers:
    raise ValueError(f"config.reinit_layers={count} must be between 0 and the model's {cfg.encoder_layers} layers")
  if count == 0:
    return pretrained
  out, new = models.layer_layout(pretrained, False), models.layer_layout(fresh, False)
  for i in range(cfg.encoder_layers - count, cfg.encoder_layers):
    out["encoder"][f"layers_{i}"] = new["encoder"][f"layers_{i}"]
  return models.layer_layout(out, cfg.scan_layers)


TEXT_STATS = ("text_empty", "text_oov", "text_too_long")   # transcripts the step weights out


def load_vocabulary(spec: str):
  from w2v2_jax.data.text import Vocabulary  # pylint: disable=import-outside-toplevel
  if not spec:
    return Vocabulary.default_letters()
  return Vocabulary.from_hf_vocab(spec) if spec.endswith(".json") else Vocabulary.from_fairseq_dict(spec)


def finetune_model_config(config: Any, vocab_size: int) -> Tuple[ModelConfig, Any]:
  """The CTC model config (architecture from config.init when given, regularisation from config.model)
  and the pretrained backbone params (None without init)."""
  cfg = ModelConfig.from_any(config.model)
  backbone = None
  if config.init:
    pretrained, backbone = load_pretrained(config.init)
    cfg = cfg.replace(**{k: getattr(pretrained, k) for k in ARCHITECTURE})
  return cfg.replace(task="ctc", vocab_size=vocab_size), backbone


def finetune(config: Any, workdir: str, *, max_steps: Optional[int] = None) -> Dict[str, float]:
  """Runs (or resumes) CTC fine-tuning. The best model by validation WER (or CER, with
  config.train.best_metric="cer") is exported as a Hugging Face directory (config.json,
  model.safetensors, vocab.json) to `<workdir>/export`; `<workdir>/best.json` says which step."""
  checkpoint.check_run_dir(workdir)
  from w2v2_jax import export  # pylint: disable=import-outside-toplevel
  metric = str(config.train.get("best_metric", "wer"))
  if metric not in ("wer", "cer"):
    raise ValueError(f"config.train.best_metric must be 'wer' or 'cer', got {metric!r}")
  reinit = int(config.get("reinit_layers", 0))
  if reinit and not config.init:
    raise ValueError(f"config.reinit_layers={reinit} needs config.init (a pretrained model); from random "
                     "initialisation set --config.reinit_layers=0")
  parallel.initialize_distributed()
  vocab = load_vocabulary(config.data.vocab)
  model_cfg, backbone = finetune_model_config(config, len(vocab))
  module, tx, step_fn = finetune_step_fn(config, model_cfg, vocab.blank_id)
  params = _host_params(module, model_cfg, config.train.seed, min(config.data.buckets))
  if backbone is not None:
    backbone = models.layer_layout(backbone, model_cfg.scan_layers)   # per layer or stacked, as configured
    expected = jax.tree_util.tree_map(np.shape, params["wav2vec2"])
    if jax.tree_util.tree_map(np.shape, backbone) != expected:
      raise ValueError(f"init={config.init!r}: its backbone does not match the model config")
    params["wav2vec2"] = reinit_top_layers(backbone, params["wav2vec2"], reinit, model_cfg)
  total = int(config.train.steps)
  geometry = batch_geometry(config, jax.device_count())
  # tfds LibriSpeech transcripts are words; manifests use data.label (.ltr or .wrd beside the .tsv).
  label = config.data.label if config.data.train_manifest else "wrd"
  iterator = _make_iterator(config, make_source(config, label), geometry, mode="pad")

  def to_step_batch(batch):
    texts = batch["labels"]
    num_micro, rows, length = batch["audio"].shape
    width = model_cfg.num_frames(length)
    encoded = vocab.encode_batch([str(t) for t in texts.reshape(-1)], max_len=width, ltr=label == "ltr")
    stats = dict(batch["stats"])
    for reason, count in encoded.counts().items():
      if reason != "ok":
        stats[f"text_{reason}"] = count
    weight = encoded.valid.astype(np.float32)
    arrays = {"audio": batch["audio"], "padding_mask": batch["padding_mask"],
              "labels": encoded.labels.reshape(num_micro, rows, width),
              "label_padding": encoded.label_padding.reshape(num_micro, rows, width),
              "weight": weight.reshape(num_micro, rows)}
    return arrays, {k: stats.get(k, 0) for k in pipeline.STAT_KEYS + TEXT_STATS}

  validator = None       # greedy WER / CER on every device of every host (= `w2v2 evaluate`'s numbers)
  best_path = storage.join(workdir, "best.json")
  best = {metric: math.inf}
  if storage.exists(best_path):
    best = json.loads(storage.read_text(best_path))
  export_dir = storage.join(workdir, "export")

  def after_step(step, state, runner):
    nonlocal validator
    if not config.data.valid_manifest or (step % int(config.train.eval_every) and step != total):
      return
    if validator is None:
      validator = validation.Validator(runner, model_cfg, vocab, config.data.valid_manifest,
                                       label=label if config.data.train_manifest else None,
                                       normalize=bool(config.data.normalize))
    scores = validator(state)
    result = {"valid/wer": float(scores["wer"]), "valid/cer": float(scores["cer"]),
              "valid/utterances": float(scores["utterances"]), "valid/skipped": float(scores["skipped"])}
    log.info("step %d validation: %s", step, " ".join(f"{k}={v:.4f}" for k, v in result.items()))
    if jax.process_index() == 0:
      storage.append_text(storage.join(workdir, "valid.jsonl"), json.dumps({"step": step, **result}) + "\n")
    # Every process takes the same decision (same scores): gathering sharded params is collective.
    if result[f"valid/{metric}"] < best.get(metric, math.inf):
      params_now = runner.host_params(state)
      best.update(wer=result["valid/wer"], cer=result["valid/cer"], step=step, metric=metric)
      if jax.process_index() == 0:
        export.export_hf(model_cfg, params_now, vocab, export_dir, normalize=bool(config.data.normalize))
        storage.write_text(best_path, json.dumps(best))
        log.info("new best %s %.4f at step %d: exported to %s", metric.upper(), best[metric], step, export_dir)

  storage.makedirs(workdir)
  return _run(config, workdir, step_fn=step_fn, tx=tx, iterator=iterator, params=params,
              to_step_batch=to_step_batch, max_steps=max_steps, sum_keys=TEXT_STATS, after_step=after_step)
