"""The tools that hold the two frameworks side by side: parity (one set of weights, every
layer, gradient and training step), compare (two training runs on identical batches) and
bench (both train steps timed in one process). The only part of flax_gpt that imports both
jax and torch.
"""
