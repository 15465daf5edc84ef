"""wav2vec 2.0 in JAX/Flax: models, masking, losses, data, training, decoding and conversion.

Subpackages and modules: models (Flax modules, presets), masking, losses, data (audio, manifests,
Grain pipeline, vocabulary), train (step, parallelism, checkpoints, metrics, loop), decode, evaluate,
inference, convert, cli.
"""
__version__ = "0.1.0"
