"""Training: objectives, steps, parallelism, checkpoints and metrics."""
