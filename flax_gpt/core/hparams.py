"""Training hyperparameters both trainers read, and the one learning-rate table they share.

Framework-free. The schedule is computed once here in float64 and handed to both trainers
as the same float32 numbers, so the learning rate can never be a source of difference.
"""

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from flax_gpt.core.config import ConfigError, check_attention


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    grad_accum: int = 1  # micro-batches of batch_size per optimizer step
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30  # linear warmup from lr / warmup_steps
    weight_decay: float = 0.1  # decoupled (AdamW), applied to every parameter
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8  # added to sqrt(v_hat) in both optax and PyTorch
    grad_clip: float = 1.0  # global-norm clip; 0 turns it off
    seed: int = 0  # data order and dropout
    precision: str = "highest"
    attention: str = "explicit"  # one of config.ATTENTIONS

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not isinstance(self.seed, int) or self.seed < 0:
            # numpy seeds the batches from it, and takes no negative seed
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.warmup_steps < 0 or self.lr <= 0 or self.grad_clip < 0:
            raise ConfigError("warmup_steps and grad_clip must be >= 0 and lr > 0")
        check_attention(self.attention)

    def replace(self, **changes):
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self):
        return dataclasses.asdict(self)


def learning_rates(tc):
    """float32 `(steps,)`: the learning rate of every optimizer step 0 .. steps-1.

    Linear warmup to `lr` over `warmup_steps`, then cosine decay to `lr * min_lr_ratio` at
    the last step.
    """
    lrs = np.empty(tc.steps, dtype=np.float64)
    floor = tc.lr * tc.min_lr_ratio
    decay_steps = max(tc.steps - tc.warmup_steps - 1, 1)
    for step in range(tc.steps):
        if step < tc.warmup_steps:
            lrs[step] = tc.lr * (step + 1) / tc.warmup_steps
        else:
            progress = min((step - tc.warmup_steps) / decay_steps, 1.0)
            lrs[step] = floor + 0.5 * (tc.lr - floor) * (1.0 + math.cos(math.pi * progress))
    return lrs.astype(np.float32)
