"""Shared pieces of the on-device learning codebase.

Datasets (speech keywords, images, TFDS), the JAX audio front end, models,
the pure train step, metrics, checkpoints and cost accounting. Nothing in
here imports a research area (fedjax_ext, quantized_training, ...).
"""
