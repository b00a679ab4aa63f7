"""The one precision switch both frameworks are set through, recorded with every result.

    highest  float32 matmuls at full precision in both (parity; no TF32 on GPU, no bf16
             passes on TPU): jax_default_matmul_precision="highest", torch "highest".
    default  each framework as it ships: JAX runs float32 matmuls as TF32 on GPU, PyTorch
             does not; this shows the gap a user gets out of the box.
    bf16     bfloat16 matmuls over float32 parameters: Flax Linear dtype=bfloat16, PyTorch
             torch.autocast(bfloat16). LayerNorm, softmax and the loss stay float32.

This module says what each name means; flax_gpt.precision and torch_reference.precision set
their framework from it.
"""

from flax_gpt.core.config import ConfigError

PRECISIONS = ("highest", "default", "bf16")


def check(name):
    if name not in PRECISIONS:
        raise ConfigError(f"unknown precision {name!r}: choose one of {', '.join(PRECISIONS)}")
    return name


def compute_dtype_name(name):
    """The matmul compute dtype: "bfloat16" for bf16, else "float32"."""
    return "bfloat16" if check(name) == "bf16" else "float32"


def full_float32_matmuls(name):
    """True where float32 matmuls must run at full precision (no TF32, no bf16 passes)."""
    return check(name) == "highest"


def record(name):
    """The framework-free part of what a result records about its precision."""
    return {"precision": check(name), "compute_dtype": compute_dtype_name(name)}
