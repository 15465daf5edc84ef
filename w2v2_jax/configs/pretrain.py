"""wav2vec 2.0 pretraining configs: the paper's three models, and `tiny` for a CPU.

Command (any of the configs; `--config.x=y` overrides a field):

  w2v2 pretrain --config=pretrain:base --workdir=DIR --config.data.train_manifest=train.tsv

Global batch is given in audio seconds and kept whatever the device count: each device processes
`batch.device_seconds` per micro-step and gradients are accumulated over micro-steps until the global
batch is reached (accumulation = ceil(global / (device * devices))).

base        BASE on LibriSpeech 960 h. Hardware: the recipe's 64 V100 x 1.4M samples (1.6 days,
            400k updates); on fewer devices the same global batch by accumulation (e.g. a TPU v4-32
            slice: 16 chips x 4 micro-steps; add --config.model.dtype=bfloat16 on TPU/GPU).
            Expected outcome (paper, Table 2): fine-tuned on 960 h of labels, 3.4 / 8.5 WER on
            test-clean / test-other without a language model. Watch prob perplexity: it must stay far
            above 2 (codebook collapse) and the contrastive loss must leave its chance level ln(K+1).
            Check a slice first: `w2v2 compile-check --config=pretrain:base --topology=v5e-8
            --config.model.dtype=bfloat16` (measured: 7.3 GiB of a v5e chip's 16 with accumulation 8;
            6.9 GiB on v5e-64 with none; 2.55e14 model FLOP per update, 3.05e14 with remat).
large       LARGE on LibriSpeech 960 h: 128 V100 x 1.2M samples, 250k updates, lr 3e-4 (paper).
large_lv60  LARGE on Libri-Light 60k h: pre-LN, layer-norm conv encoder, no dropout, normalised
            waveforms, no feature penalty, 600k updates. lr 3e-4 as the paper (Table 6 / Sec. 4.2):
            fairseq's shipped yaml says 0.005, with which users report divergence and codebook
            collapse; 3e-4 is what the paper trained with.
xlsr_300m   XLS-R sizes (Babu et al., 2021; the LV-60k layout): 315M / 962M / 2.16B encoder parameters
xlsr_1b     (HF's Wav2Vec2Model counts, tests/test_hf_reference.py). Sharded state (parallel.mode="fsdp",
xlsr_2b     train/fsdp.py) and remat; training values are large_lv60's (buckets up to 20 s, normalised
            waveforms, lr 3e-4, 600k updates): set the XLS-R paper's batch, lr and steps for a real run.
            Check the slice first, e.g. `w2v2 compile-check --config=pretrain:xlsr_1b --topology=v5p-64
            --config.model.dtype=bfloat16`. Measured (bf16, HBM per chip, params + Adam moments per
            chip): xlsr_1b on v5p-64 4.44 of 95 GiB (0.34 GiB; replicated 27.21 GiB), on v4-128 4.04
            of 32 GiB, on v5e-64 4.10 of 16 GiB (replicated: does not fit); xlsr_2b on v5p-128 5.47
            of 95 GiB (0.38 GiB; replicated 56.79 GiB, 24.17 GiB of state). README, "Models bigger
            than a chip's share", has the table and `benchmarks/compile_table.py --table sharded`.
small       The demo: a 2.2M-parameter model on the synthetic corpus of `w2v2 make-corpus` (1 h of
            espeak-ng / flite / festival speech), 2 CPU cores: 3000 updates in about 12 minutes.
            lr 1e-3: at 2e-3 (until 2026-12) the run of seed 0 learned but seed 1's contrastive loss
            went back to chance by update 750 while the conv features' mean square grew past 1e5
            (docs/pretraining_at_demo_scale.md); at 1e-3 seed 1 learns (2.23 nats at update 1050, mean square 160),
            and on the demo's train + unlabeled audio seeds 0 and 1 both do (2.12 nats at update 3000).
tiny        A 0.1M-parameter model on a few minutes of audio, 2 CPU cores: 200 updates in a few
            minutes; the contrastive loss falls below its chance level ln(K+1) and prob perplexity
            stays well above 2 (no codebook collapse).
"""
import ml_collections

from w2v2_jax.data import augment
from w2v2_jax.data.audio import SAMPLE_RATE
from w2v2_jax.models import presets



def get_config(arg: str = "base") -> ml_collections.ConfigDict:
  names = ("base", "large", "large_lv60", "xlsr_300m", "xlsr_1b", "xlsr_2b", "small", "tiny")
  if arg not in names:
    raise ValueError(f"unknown pretraining config {arg!r}; choose one of {', '.join(names)}")
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(presets.get(arg).to_dict())

  c.data = ml_collections.ConfigDict(dict(
      train_manifest="",           # fairseq .tsv (w2v2 manifest); or use tfds_name
      tfds_name="",                # e.g. "librispeech" (needs the tfds extra; offline via tfds_manual_dir)
      tfds_split="train_clean100+train_clean360+train_other500",
      tfds_data_dir="",
      tfds_manual_dir="",
      sample_rate=SAMPLE_RATE,
      normalize=False,             # per-utterance zero mean, unit variance
      min_sample_size=32000,
      max_sample_size=250000,
      buckets=(32000, 64000, 128000, 250000),   # static batch shapes (samples per utterance)
      num_threads=8,
      prefetch=16,
      seed=0,
  ))
  c.data.augment = augment.config_dict()     # waveform augmentation (w2v2_jax/data/augment.py); off
  c.batch = ml_collections.ConfigDict(dict(
      global_seconds=1.4e6 * 64 / SAMPLE_RATE,    # 5600 s of audio per update (fairseq: 64 x 1.4M samples)
      device_seconds=1.4e6 / SAMPLE_RATE,         # per device per micro-step (memory bound)
  ))
  c.optim = ml_collections.ConfigDict(dict(
      lr=5e-4, schedule="polynomial", warmup_steps=32000, end_lr=0.0, power=1.0,
      b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01, clip_norm=0.0,
  ))
  c.train = ml_collections.ConfigDict(dict(
      steps=400000,
      latent_temp=(2.0, 0.5, 0.999995),
      seed=0,
      log_every=100,
      checkpoint_every=2000,
      keep_checkpoints=3,
  ))
  # mode: "shard_map" (replicated state), "pmap", or "fsdp" (params and moments sharded over the devices:
  # train/fsdp.py); fsdp_min_size: leaves with fewer elements stay replicated in mode "fsdp".
  c.parallel = ml_collections.ConfigDict(dict(mode="shard_map", fsdp_min_size=4096))
  xlsr = arg.startswith("xlsr")
  if arg.startswith(("base", "large")) or xlsr:
    # Recompute each transformer layer in the backward pass: no change to the numbers; chosen from
    # `w2v2 compile-check` (BASE on TPU v5e-8, bf16: 17.2 GiB per chip without, 7.3 GiB with).
    c.model.remat = "full"

  if xlsr:
    c.parallel.mode = "fsdp"       # replicated: 12 bytes per parameter of state, 10.8 GiB (1B) / 24.2 GiB (2B)
    c.model.scan_layers = True     # one layer's program for 24 / 48 layers: compile time and host memory
  if arg in ("large", "large_lv60") or xlsr:
    c.data.max_sample_size = 320000
    c.data.buckets = (32000, 80000, 160000, 320000)
    c.batch.global_seconds = 1.2e6 * 128 / SAMPLE_RATE      # 128 GPUs x 1.2M samples
    c.batch.device_seconds = 1.2e6 / SAMPLE_RATE
    c.optim.lr = 3e-4
    c.train.latent_temp = (2.0, 0.1, 0.999995)
    c.train.steps = 250000 if arg == "large" else 600000
    c.data.normalize = arg != "large"
  elif arg == "small":
    c.data.min_sample_size = 16000
    c.data.max_sample_size = 48000
    c.data.buckets = (16000, 32000, 48000)
    c.data.num_threads = 2
    c.data.prefetch = 4
    c.batch.global_seconds = 8.0
    c.batch.device_seconds = 8.0
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 200
    c.train.steps = 3000
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.latent_temp = (2.0, 0.5, 0.999)
  elif arg == "tiny":
    c.data.min_sample_size = 8000
    c.data.max_sample_size = 32000
    c.data.buckets = (8000, 16000, 32000)
    c.data.num_threads = 2
    c.data.prefetch = 4
    c.batch.global_seconds = 8.0
    c.batch.device_seconds = 8.0
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 20
    c.train.steps = 200
    c.train.log_every = 10
    c.train.checkpoint_every = 50
    c.train.latent_temp = (2.0, 0.5, 0.99)
  return c
