"""The framework-free core both implementations share: config and presets, the positional
table, training hyperparameters and the learning-rate table, precision names, the dataset
format and batching, the canonical weights file, the run folder and its checkpoints, the
training loop, and file helpers.

Nothing in this package imports jax, flax, optax, torch or torchtext (tests/test_layout.py
walks it and fails if one does), so `torch_reference` can import it without pulling in JAX.
"""
