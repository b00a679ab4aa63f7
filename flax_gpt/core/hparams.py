"""Training hyperparameters both trainers read, and the one learning-rate table they share.

Framework-free. The schedule is computed once here in float64 and handed to both trainers
as the same numbers in the parameters' dtype, so the learning rate can never be a source of difference.
"""

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from flax_gpt.core import precision
from flax_gpt.core.config import check_attention, check_number

# Seeds feed numpy, torch.manual_seed and jax.random.key alike; all three take this range.
SEED_LIMIT = 2**32


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
        # Every field, finite and in range: a NaN learning rate or clip would otherwise train
        # to NaN weights and exit 0.
        for name in ("steps", "batch_size", "grad_accum"):
            check_number(name, getattr(self, name), low=1, integer=True)
        check_number("warmup_steps", self.warmup_steps, low=0, integer=True)
        check_number("lr", self.lr, low=0, low_open=True)
        check_number("min_lr_ratio", self.min_lr_ratio, low=0, high=1)
        check_number("weight_decay", self.weight_decay, low=0)
        check_number("beta1", self.beta1, low=0, high=1, high_open=True)
        check_number("beta2", self.beta2, low=0, high=1, high_open=True)
        check_number("eps", self.eps, low=0, low_open=True)
        check_number("grad_clip", self.grad_clip, low=0)
        check_seed(self.seed)
        precision.check(self.precision)
        check_attention(self.attention)

    def replace(self, **changes):
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self):
        return dataclasses.asdict(self)


def check_seed(seed, name="seed"):
    return check_number(name, seed, low=0, high=SEED_LIMIT, high_open=True, integer=True)


def check_sampling(max_new_tokens, temperature, top_k, seed):
    """Refuse a sampling setting of `generate` out of range (ConfigError)."""
    check_number("max_new_tokens", max_new_tokens, low=1, integer=True)
    # NaN or Inf would divide the logits into NaN and sample garbage without a word
    check_number("temperature", temperature, low=0)
    check_number("top_k", top_k, low=0, integer=True)
    check_seed(seed)


def learning_rates(tc):
    """`(steps,)` in the parameters' dtype (float32; float64 for the float64 tier): the
    learning rate of every optimizer step 0 .. steps-1.

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
    return lrs.astype(precision.param_dtype_name(tc.precision))
