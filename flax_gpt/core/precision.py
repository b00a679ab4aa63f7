"""The one precision switch both frameworks are set through, recorded with every result.

    float64  parameters and compute in float64 in both (JAX's x64 mode, switched on for that
             run; torch.float64): the truth every other precision is judged against.
    highest  float32 matmuls at full precision in both (parity; no TF32 on GPU, no bf16
             passes on TPU): jax_default_matmul_precision="highest", torch "highest".
    default  float32 with the accelerator's fast matmuls, the same in both: TF32 on an NVIDIA
             GPU (JAX's own default; PyTorch set to match with
             set_float32_matmul_precision("high")), full float32 on a CPU. Judged against
             the truth with TF32's ulp where TF32 ran (`matmul_dtype_name`).
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


def matmul_dtype_name(name, backend="cpu"):
    """What float32 matmuls compute in on `backend` (JAX's: "cpu", "gpu", "tpu"): "tfloat32"
    for default on a GPU (a 10-bit mantissa), else compute_dtype_name. The ulp that results
    are judged with."""
    if check(name) == "default" and backend == "gpu":
        return "tfloat32"
    return compute_dtype_name(name)


def full_precision_matmuls(name):
    """True where matmuls must run at their dtype's full precision (no TF32, no bf16 passes)."""
    return check(name) in ("float64", "highest")


def record(name, backend="cpu"):
    """The framework-free part of what a result records about its precision on `backend`."""
    return {"precision": check(name), "param_dtype": param_dtype_name(name),
            "compute_dtype": compute_dtype_name(name),
            "matmul_dtype": matmul_dtype_name(name, backend)}
