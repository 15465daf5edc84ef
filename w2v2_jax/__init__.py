"""wav2vec 2.0 in JAX/Flax: models, masking, losses, data, training, decoding and conversion.

Subpackages and modules: models (Flax modules, presets), masking, losses, data (audio, manifests,
Grain pipeline, augmentation, vocabulary, labeled evaluation data), train (step, parallelism,
checkpoints, metrics, loop, validation, compile check), configs (the packaged configs), recognizer
(load a model, transcribe), decode (greedy / beam CTC), evaluate (WER / CER over a labeled source),
scoring (the rates), export (a Hugging Face directory), convert (HF / fairseq checkpoints), lm, corpus,
demo, plots, progress, storage (local disks and gs:// / s3:// through one layer), cli (the `w2v2`
command). docs/architecture.md draws how they connect.
"""
__version__ = "0.1.0"

from w2v2_jax import storage as _storage

_storage.configure()   # epath through fsspec; an emulator's settings if STORAGE_EMULATOR_HOST is set
