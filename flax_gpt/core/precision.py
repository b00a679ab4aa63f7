"""The one precision switch both frameworks are set through, recorded with every result.

    float64  parameters and compute in float64 in both (JAX's x64 mode, switched on for that
             run; torch.float64): the truth every other precision is judged against.
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

PRECISIONS = ("float64", "highest", "default", "bf16")


def check(name):
    if name not in PRECISIONS:
        raise ConfigError(f"unknown precision {name!r}: choose one of {', '.join(PRECISIONS)}")
    return name


def param_dtype_name(name):
    """The parameters' dtype (and the optimizer state's): float64 only for float64."""
    return "float64" if check(name) == "float64" else "float32"


def compute_dtype_name(name):
    """The matmul compute dtype: "bfloat16" for bf16, else the parameters' dtype."""
    return "bfloat16" if check(name) == "bf16" else param_dtype_name(name)


def full_precision_matmuls(name):
    """True where matmuls must run at their dtype's full precision (no TF32, no bf16 passes)."""
    return check(name) in ("float64", "highest")


def record(name):
    """The framework-free part of what a result records about its precision."""
    return {"precision": check(name), "param_dtype": param_dtype_name(name),
            "compute_dtype": compute_dtype_name(name)}
